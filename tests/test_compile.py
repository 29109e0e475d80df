"""torch.compile: every method traces into one graph (no graph breaks) and a
new batch size does not recompile (dynamic batch dimension). Checked with
``torch._dynamo.explain`` and a counting backend, neither of which generates
code, on a 2-block ViT with 16 patches (a few seconds per method on a CPU).

Methods whose breaks come from inside their reducer module are marked
xfail(strict=True) with the cause, so a fix shows up as an XPASS."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

import tokenreduction as tr

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)

REDUCER_BREAKS: dict = {}  # method -> reason, for a reducer that still breaks the graph
METHODS = ["tome", "tomecis", "topk", "evit", "dpcknn", "kmedoids", "atc", "sit", "patchmerger", "sinkhorn",
           "heuristic", "ats", "dynamicvit"]


@pytest.fixture(autouse=True)
def _fresh_dynamo(one_thread):
    dynamo.reset()
    yield
    dynamo.reset()


def build(method: str, train: bool = False):
    torch.manual_seed(0)
    model = tr.create_model("vit_tiny_patch16_224", **TINY, method=method, keep_rate=0.5, reduction_loc=(1,))
    return model.train(train)


def images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _breaks(model, x) -> tuple[int, str]:
    explained = dynamo.explain(model)(x)
    where = "; ".join(
        f"{b.reason.splitlines()[0][:90]} at {b.user_stack[-1].filename.rsplit('/', 2)[-1]}:{b.user_stack[-1].lineno}"
        for b in explained.break_reasons[:3]
        if b.user_stack
    )
    return explained.graph_break_count, where


@pytest.mark.parametrize(
    "method",
    [
        pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=REDUCER_BREAKS[m])) if m in REDUCER_BREAKS else m
        for m in METHODS
    ],
)
def test_one_graph_and_no_recompile_for_a_new_batch_size(method):
    model = build(method).eval()
    with torch.no_grad():
        count, where = _breaks(model, images(2))
        assert count == 0, f"{method}: {count} graph breaks: {where}"
        dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter)
        first = images(2)
        dynamo.mark_dynamic(first, 0)
        compiled(first)
        for batch in (3, 5):
            x = images(batch, seed=batch)
            torch.testing.assert_close(compiled(x), model(x))
    assert counter.frame_count == 1, f"{method}: compiled {counter.frame_count} times for batch sizes 2, 3, 5"
    expected = model.reduction_config["expected_tokens"]
    assert model.tokens_kept == expected or method == "ats" and model.tokens_kept[0] <= expected[0]


@pytest.mark.parametrize("method", ["dynamicvit", "ats"])
def test_variable_count_methods_train_without_graph_breaks(method):
    """DynamicViT's soft policy and ATS's padded sampling in training mode."""
    model = build(method, train=True)
    count, where = _breaks(model, images(2))
    assert count == 0, f"{method} (training): {count} graph breaks: {where}"


@pytest.mark.parametrize("method", ["tome", "ats"])
def test_torch_export_matches_eager(method):
    model = build(method).eval()
    x = images(2)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
