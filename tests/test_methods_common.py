"""Behaviour every registered reduction method shares, on tiny random ViTs.

Parametrised over ``tokenreduction.list_methods()`` at collection time, so a
newly registered method is covered without editing this file.
"""
from __future__ import annotations

import pytest
import torch

import tokenreduction as tr
from tokenreduction.models.context import ReductionContext
from tokenreduction.reduction import get_method
from tokenreduction.reduction.ops import sum_by_assignment

METHODS = tr.list_methods()
# methods with ToMe-style r budgets (bipartite matching; ATC off the shelf)
R_METHODS = [m for m in METHODS if m.startswith(("tome", "atc"))]
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=5)
PATCHES = 64
LOCS = (3, 6, 9)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(method, name="deit_tiny_patch16_224", seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(method=method, reduction_loc=LOCS)
    if "r" not in kwargs:
        args["keep_rate"] = 0.5
    args.update(kwargs)
    return tr.create_model(name, **TINY, **args)


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def is_sampler(method):
    """ATS keeps at most the budget (duplicates collapse, padding is masked)."""
    return method.startswith("ats")


class Spy:
    """Records, for every reduction stage of a forward, what went into
    ReductionContext.reduce, what the reducer itself was called with and
    returned, and what came out."""

    def __init__(self, monkeypatch):
        self.records = []
        original = ReductionContext.reduce

        def reduce(ctx, reducer, block, stage, budget, x, feats):
            seen = {}

            def hook(module, args, out):
                seen["patches"], seen["size_in"] = args[0], args[1]
                seen["out"] = out

            handle = reducer.register_forward_hook(hook)
            try:
                y = original(ctx, reducer, block, stage, budget, x, feats)
            finally:
                handle.remove()
            self.records.append(dict(x_in=x, x_out=y, p=ctx.num_prefix, size=ctx.size, **seen))
            return y

        monkeypatch.setattr(ReductionContext, "reduce", reduce)


@pytest.mark.parametrize("method", METHODS)
def test_logits_and_token_counts(method):
    model = build(method).eval()
    with torch.no_grad():
        logits = model(images())
    assert logits.shape == (2, 5)
    assert bool(torch.isfinite(logits).all())
    expected = model.reduction_config["expected_tokens"]
    assert len(expected) == len(LOCS) and len(model.tokens_kept) == len(LOCS)
    if is_sampler(method):
        assert all(k <= e for k, e in zip(model.tokens_kept, expected))
    else:
        assert model.tokens_kept == expected
    assert all(0 < e <= PATCHES for e in expected)


@pytest.mark.parametrize("method", R_METHODS)
def test_r_budget_counts(method):
    """r=4 at every block of 12: bipartite matching removes 4 tokens per
    block (60, 56, ..., 16); every method keeps what the build promised."""
    model = build(method, r=4, reduction_loc=None).eval()
    with torch.no_grad():
        assert model(images()).shape == (2, 5)
    expected = model.reduction_config["expected_tokens"]
    assert model.tokens_kept == expected
    assert len(expected) == 12 and all(a > b for a, b in zip([PATCHES] + expected, expected))
    if method.startswith("tome"):
        assert expected == [PATCHES - 4 * (i + 1) for i in range(12)]


@pytest.mark.parametrize("name,prefix", [("deit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
@pytest.mark.parametrize("method", METHODS)
def test_prefix_tokens_untouched(method, name, prefix, monkeypatch):
    """The method sees exactly the patch tokens; the prefix tokens (CLS,
    distillation) leave every stage bit-identical, with size 1; the sequence
    is prefix + the reducer's outputs; assignments cover only patches."""
    model = build(method, name=name).eval()
    assert model.num_prefix_tokens == prefix
    spy = Spy(monkeypatch)
    final = {}
    model.norm.register_forward_hook(lambda m, args, out: final.update(x=args[0]))
    with torch.no_grad():
        model(images())
    assert len(spy.records) == len(LOCS)
    n = PATCHES
    for rec, stage in zip(spy.records, model.reduction_state.stages):
        p, x_in, x_out, out = rec["p"], rec["x_in"], rec["x_out"], rec["out"]
        assert p == prefix
        assert x_in.shape[1] == p + n
        assert torch.equal(rec["patches"], x_in[:, p:])  # the method got the patches, nothing else
        assert torch.equal(x_out[:, :p], x_in[:, :p])  # prefix passed through untouched
        assert x_out.shape[1] == p + out.x.shape[1]
        assert torch.equal(x_out[:, p:], out.x.to(x_out.dtype))
        assert torch.equal(rec["size"][:, :p], torch.ones_like(rec["size"][:, :p]))
        assert stage.assignment.shape == (2, n)
        if out.mask is None:
            assert stage.tokens_out == out.x.shape[1]
        n = out.x.shape[1]
    kept = model.tokens_kept[-1]
    assert final["x"].shape[1] == prefix + n
    if not is_sampler(method):
        assert n == kept


@pytest.mark.parametrize("method", METHODS)
def test_sizes_and_composed_assignments(method, monkeypatch):
    spy = Spy(monkeypatch)
    model = build(method).eval()
    with torch.no_grad():
        model(images())
    kind = get_method(method).kind
    stages = model.reduction_state.stages
    composed = tr.compose_assignments([s.assignment for s in stages])
    assert len(composed) == len(stages)
    for rec, stage, comp in zip(spy.records, stages, composed):
        out = rec["out"]
        slots = out.x.shape[1]
        assert comp.shape == (2, PATCHES)
        assert int(stage.assignment.max()) < slots and int(stage.assignment.min()) >= -1
        assert int(comp.max()) < slots
        total = out.size.float().sum(1)
        if kind == "soft":
            assert bool((comp >= 0).all())
            torch.testing.assert_close(total, torch.full_like(total, float(PATCHES)), atol=1e-3, rtol=0)
            continue
        # hard patterns: every output token's size is the number of original
        # patches that ended in it (pruned patches, -1, end nowhere)
        alive = comp >= 0
        counts = sum_by_assignment(alive.float(), comp.clamp_min(0), slots)
        torch.testing.assert_close(out.size.float(), counts, atol=1e-4, rtol=0)
        if kind == "merge":
            assert bool(alive.all()), "a merge drops no patch"
            torch.testing.assert_close(total, torch.full_like(total, float(PATCHES)))
            for b in range(2):  # every final token holds at least one patch
                assert comp[b].unique().numel() == slots
        else:
            assert bool((total <= PATCHES).all())
            # a kept token exists for every surviving patch
            assert int(alive.sum(1).min()) >= 1


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_in_eval(method):
    model = build(method).eval()
    x = images()
    with torch.no_grad():
        a = model(x)
        first = [s.assignment for s in model.reduction_state.stages]
        b = model(x)
        second = [s.assignment for s in model.reduction_state.stages]
    assert torch.equal(a, b)
    assert all(torch.equal(u, v) for u, v in zip(first, second))


@pytest.mark.parametrize("method", METHODS)
def test_backward_reaches_reduction_parameters(method):
    model = build(method).train()
    logits = model(images())
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3]))
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None
    assert float(model.patch_embed.proj.weight.grad.abs().sum()) > 0
    named = model.reduction_parameters()
    for name, p in named:
        assert p.grad is not None, f"{method}: no gradient reaches {name}"
        assert float(p.grad.abs().sum()) > 0, f"{method}: zero gradient at {name}"
    # every parameter of the attached reducers is in the reduction group
    attached = {id(p) for blk in model.blocks if blk.reducer is not None for p in blk.reducer.parameters()}
    assert attached == {id(p) for _, p in named}


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_autocast(method):
    model = build(method).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images())
    assert logits.shape == (2, 5)
    assert bool(torch.isfinite(logits.float()).all())
    assert len(model.tokens_kept) == len(LOCS)


FAMILIES = {
    "deit": ("deit_tiny_patch16_224", {}),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {}),
    "deit3": ("deit3_small_patch16_224", {}),  # LayerScale
    "augreg": ("vit_small_patch16_224", {}),
    "mae": ("vit_base_patch16_224", {"global_pool": "avg", "fc_norm": True}),
    "clip": ("vit_base_patch16_clip_quickgelu_224", {}),  # norm_pre, quick_gelu
    "swag": ("vit_base_patch16_384", {}),
}
FAMILY_METHODS = [m for m in ("topk", "tome", "sit") if m in METHODS]


@pytest.mark.parametrize("method", FAMILY_METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_timm_families(family, method):
    name, extra = FAMILIES[family]
    model = build(method, name=name, **extra).train()
    if family == "deit3":
        assert not isinstance(model.blocks[0].ls1, torch.nn.Identity)
    if family == "clip":
        assert not isinstance(model.norm_pre, torch.nn.Identity)
    if family == "mae":
        assert not isinstance(model.fc_norm, torch.nn.Identity) and model.global_pool == "avg"
    logits = model(images())
    assert logits.shape == (2, 5)
    logits.square().sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:3])
    for _, p in model.reduction_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    model.eval()
    with torch.no_grad():
        model(images())
    assert model.tokens_kept == model.reduction_config["expected_tokens"]
