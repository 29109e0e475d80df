"""Evaluator: metrics JSON, patterns.npz and cls_features.npz of trained tiny
checkpoints, checked against per-image recomputation and slow references."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenreduction.data import build_dataset, build_transform
from tokenreduction.evaluate import average_precision_per_class, evaluate, mean_average_precision, topk_accuracy
from tokenreduction.patterns import compose_assignments
from tokenreduction.train import load_trained_model, train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(patch_size=4, embed_dim=16, depth=4, num_heads=2)
N_PATTERN = 7  # crosses the batch boundary (batch 4) and stops inside a batch


def make_imagefolder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("val", 4)):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (rng.random((16, 16, 3)) * 80 + c * 80).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{split}_{c}_{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Tiny checkpoints (one epoch) of a pruning, a merging and the unreduced model."""
    base = tmp_path_factory.mktemp("eval")
    root = make_imagefolder(base / "data")
    common = dict(
        model="vit_tiny_patch16_224", model_kwargs=dict(TINY), img_size=16, dataset="imagefolder",
        data_root=str(root), epochs=1, warmup_epochs=0, batch_size=6, lr=1e-3, lr_batch_normalizer=None,
        num_workers=0, model_ema=False,
    )
    runs = {
        "topk": dict(method="topk", keep_rate=0.7, reduction_loc=[1, 2]),
        "tome": dict(method="tome", keep_rate=0.7, reduction_loc=[1, 2]),
        "none": dict(method=None),
    }
    out = {"root": root}
    for name, extra in runs.items():
        train(dict(common, **extra), base / name)
        out[name] = base / name
    return out


def run_eval(trained, name: str, out: Path, **kwargs) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return evaluate(
        trained[name] / "final.pth", "imagefolder", trained["root"], split="val",
        out_metrics=out / "metrics.json", out_patterns=out / "patterns.npz", out_features=out / "cls_features.npz",
        num_pattern_images=N_PATTERN, batch_size=4, device="cpu", throughput_batch=2, **kwargs,
    )


def per_image_reference(trained, name: str):
    """Slow reference: each pattern image alone through the model; composed
    assignments and the CLS token after each block, in a plain loop."""
    model, spec = load_trained_model(trained[name] / "final.pth")
    ds = build_dataset("imagefolder", trained["root"], "val", build_transform(False, 16, "imagefolder"))
    composed, cls = [], []
    for i in range(N_PATTERN):
        x = ds[i][0][None]
        with torch.no_grad():
            tokens = model.patch_embed(x)
            model(x)
        stages = model.reduction_state.stages
        composed.append(torch.stack(compose_assignments([s.assignment for s in stages]))[:, 0] if stages else None)
        # the CLS outputs per block, recomputed by running the blocks one by one
        from tokenreduction.models.context import ReductionContext

        with torch.no_grad():
            h = model.norm_pre(model.patch_drop(model._pos_embed(tokens)))
            ctx = ReductionContext(num_prefix=model.num_prefix_tokens, size=torch.ones(1, h.shape[1]),
                                   prop_attn=model.reduction_config["prop_attn"])
            per_block = []
            for blk in model.blocks:
                h = blk(h, ctx)
                per_block.append(h[0, 0].clone())
        cls.append(torch.stack(per_block))
    return model, composed, torch.stack(cls)  # cls: (N, depth, D)


@pytest.mark.parametrize("name", ["topk", "tome"])
def test_reduced_model_outputs(trained, tmp_path, name):
    m = run_eval(trained, name, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["top1"] == pytest.approx(m["top1"])
    # same weights, same val split, same transform as the trainer's last validation
    train_metrics = json.loads((trained[name] / "train_metrics.json").read_text())
    assert m["top1"] == pytest.approx(train_metrics["final"]["top1"])
    assert m["metric"] == "top1" and 0.0 <= m["top1"] <= m["top5"] <= 100.0
    assert m["num_images"] == 12 and m["method"] == name
    assert m["tokens_kept"] == m["tokens_expected"] == [11, 7] and m["tokens_kept_mean"] == [11.0, 7.0]
    assert m["stage_blocks"] == [1, 2] and m["num_patches"] == 16
    assert 0.0 < m["params_m"] < 0.1 and m["gflops"] > 0 and m["throughput"] > 0

    p = np.load(tmp_path / "patterns.npz")
    assert p["stage_blocks"].tolist() == [1, 2]
    assert p["composed"].dtype == np.int32 and p["composed"].shape == (2, N_PATTERN, 16)
    assert p["grid"].tolist() == [4, 4] and str(p["method"]) == name
    assert str(p["kind"]) == ("prune" if name == "topk" else "merge")
    assert p["image_ids"].tolist() == ["val_0_0", "val_0_1", "val_0_2", "val_0_3", "val_1_0", "val_1_1", "val_1_2"]
    comp = p["composed"]
    for s, kept in enumerate([11, 7]):
        assert comp[s].min() >= -1 and comp[s].max() < kept
        if name == "tome":  # merging: every patch is in some token, every token has a patch
            assert (comp[s] >= 0).all()
            assert all(len(set(row.tolist())) == kept for row in comp[s])
        else:  # pruning: exactly the kept count survives, and dropped stays dropped
            assert ((comp[s] >= 0).sum(1) == kept).all()
            if s:
                assert (comp[s][comp[s - 1] < 0] == -1).all()

    f = np.load(tmp_path / "cls_features.npz")
    assert f["blocks"].tolist() == [1, 2, 3]
    assert f["features"].dtype == np.float32 and f["features"].shape == (3, N_PATTERN, 16)
    assert f["image_ids"].tolist() == p["image_ids"].tolist()

    model, composed, cls = per_image_reference(trained, name)
    for i in range(N_PATTERN):
        np.testing.assert_array_equal(comp[:, i], composed[i].numpy())
    ref = cls[:, [1, 2, 3]].permute(1, 0, 2).numpy()
    np.testing.assert_allclose(f["features"], ref, rtol=1e-4, atol=1e-5)
    # before the final norm: not equal to the normed output
    normed = model.norm(torch.from_numpy(f["features"][-1])).detach().numpy()
    assert not np.allclose(normed, f["features"][-1], atol=1e-3)


def test_unreduced_model(trained, tmp_path):
    m = run_eval(trained, "none", tmp_path)
    assert m["method"] == "none" and m["tokens_kept"] == [] and m["stage_blocks"] == [] and m["reduction_loc"] == []
    p = np.load(tmp_path / "patterns.npz")
    assert p["composed"].shape == (0, N_PATTERN, 16) and p["stage_blocks"].shape == (0,) and str(p["kind"]) == "none"
    f = np.load(tmp_path / "cls_features.npz")
    assert f["blocks"].tolist() == [3]  # (3, 6, 9, last) below depth 4
    _, _, cls = per_image_reference(trained, "none")
    np.testing.assert_allclose(f["features"][0], cls[:, 3].numpy(), rtol=1e-4, atol=1e-5)
    # explicit blocks
    m2 = run_eval(trained, "none", tmp_path / "b", blocks=[0, 2])
    f2 = np.load(tmp_path / "b" / "cls_features.npz")
    assert f2["blocks"].tolist() == [0, 2] and m2["top1"] == m["top1"]
    np.testing.assert_allclose(f2["features"][1], cls[:, 2].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="depth"):
        run_eval(trained, "none", tmp_path / "c", blocks=[4])


def test_two_runs_are_identical(trained, tmp_path):
    a = run_eval(trained, "tome", tmp_path / "a")
    b = run_eval(trained, "tome", tmp_path / "b")
    for key in ("top1", "top5", "gflops", "params_m", "tokens_kept", "tokens_kept_mean"):
        assert a[key] == b[key]
    for fname in ("patterns.npz", "cls_features.npz"):
        pa, pb = np.load(tmp_path / "a" / fname), np.load(tmp_path / "b" / fname)
        assert set(pa.files) == set(pb.files)
        for k in pa.files:
            np.testing.assert_array_equal(pa[k], pb[k])


def test_missing_checkpoint_is_clear(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate(tmp_path / "nope.pth", "imagefolder", trained["root"])


def test_topk_accuracy_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=g)
    targets = torch.randint(0, 7, (50,), generator=g)
    ref = []
    for k in (1, 5):
        hits = 0
        for row, t in zip(logits.tolist(), targets.tolist()):
            order = sorted(range(7), key=lambda j: -row[j])
            hits += t in order[:k]
        ref.append(100.0 * hits / 50)
    assert topk_accuracy(logits, targets, (1, 5)) == pytest.approx(ref)
    assert topk_accuracy(logits[:, :3], targets.clamp(max=2), (5,))[0] == 100.0  # k capped at K


def test_map_matches_sklearn():
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(40, 6, generator=g)
    targets = (torch.rand(40, 6, generator=g) < 0.3).float()
    targets[:, 5] = 0  # a class without positives is left out of the mean
    ap = average_precision_per_class(scores, targets)
    ref = [average_precision_score(targets[:, k].numpy(), scores[:, k].numpy()) for k in range(5)]
    np.testing.assert_allclose(ap[:5].numpy(), ref, rtol=1e-10)
    assert torch.isnan(ap[5])
    assert mean_average_precision(scores, targets) == pytest.approx(100 * np.mean(ref))
