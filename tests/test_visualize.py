"""Pictures of reduction patterns: the overlay of one stage (pruned black,
merged groups tinted and outlined), tokenreduction.visualize on a tiny
model, the per-dataset grid and its DAG script on the digits demo data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")

import tokenreduction as tr  # noqa: E402
from tokenreduction.visualization import (  # noqa: E402
    BORDER_COLOR,
    HATCH_COLOR,
    group_colors,
    pattern_grid,
    pattern_image,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)


pytestmark = pytest.mark.usefixtures("one_thread")


def _patch(img: np.ndarray, r: int, c: int, px: int = 4) -> np.ndarray:
    return img[r * px:(r + 1) * px, c * px:(c + 1) * px]


def _pruned_mask(img: np.ndarray) -> np.ndarray:
    """Pixels drawn as pruned: black, or the grey of the hatching."""
    return np.all(img == 0, axis=-1) | np.all(img == HATCH_COLOR, axis=-1)


def _looks_pruned(img: np.ndarray) -> bool:
    black = np.all(img == 0, axis=-1)
    return bool(_pruned_mask(img).all() and black.mean() > 0.6 and (~black).any())


def test_overlay_blacks_out_pruned_tints_groups_and_draws_their_borders():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 0.8, size=(16, 16, 3))  # 4 x 4 patches of 4 px
    where = np.arange(16)
    where[[0, 1, 4]] = 0  # patches 0, 1, 4 merged into token 0
    where[[10, 15]] = -1  # pruned
    out = pattern_image(image, where, (4, 4), alpha=0.5)
    assert out.shape == (16, 16, 3)
    assert _looks_pruned(_patch(out, 2, 2)) and _looks_pruned(_patch(out, 3, 3))  # pruned -> black, hatched
    np.testing.assert_array_equal(_patch(out, 1, 2), _patch(image, 1, 2))  # its own token: untouched
    colour = group_colors(16)[0]  # the group's colour is its lowest patch's
    inner = (0.5 * _patch(image, 0, 0) + 0.5 * colour)[1:3, 1:3]
    np.testing.assert_allclose(_patch(out, 0, 0)[1:3, 1:3], inner)
    # white border where the group meets another token, none inside the group
    assert np.all(_patch(out, 0, 1)[:, -1] == BORDER_COLOR)  # patch 1's right edge meets patch 2
    assert np.all(_patch(out, 1, 0)[-1, :] == BORDER_COLOR)  # patch 4's bottom edge meets patch 8
    np.testing.assert_allclose(_patch(out, 0, 0)[1:3, -1], (0.5 * _patch(image, 0, 0) + 0.5 * colour)[1:3, -1])
    assert not np.any(np.all(out == BORDER_COLOR, axis=-1)[8:, 8:])  # no group there: no border
    big = pattern_image((image * 255).astype(np.uint8), where, (4, 4), scale=3)
    assert big.shape == (48, 48, 3) and _looks_pruned(big[24:36, 24:36])
    with pytest.raises(ValueError, match="grid 4x4 has 16"):
        pattern_image(image, where[:9], (4, 4))
    with pytest.raises(ValueError, match="image must be"):
        pattern_image(np.zeros((2, 16, 16, 3)), where, (4, 4))


def test_visualize_draws_each_stage_of_the_models_forward():
    torch.manual_seed(0)
    model = tr.create_model("vit_tiny_patch16_224", **TINY, method="topk", keep_rate=0.5, reduction_loc=(1, 2))
    image = torch.randn(3, 32, 32)
    fig = tr.visualize(image, model, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3  # the input and two stages
    assert [ax.get_title() for ax in panels[1:]] == ["after block 1\n8 tokens", "after block 2\n4 tokens"]
    composed = tr.model_patterns(model)
    shown = (image * 0.25 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    for ax, comp in zip(panels[1:], composed):
        drawn = np.asarray(ax.images[0].get_array())
        scale = drawn.shape[0] // 32
        np.testing.assert_allclose(drawn, pattern_image(shown, comp[0], (4, 4), scale=scale))
        black = _pruned_mask(drawn).mean()
        assert black == pytest.approx(float((comp[0] < 0).float().mean()), abs=0.02)
    with pytest.raises(ValueError, match="one image"):
        tr.visualize(torch.randn(2, 3, 32, 32), model)


def test_pattern_grid_has_one_row_per_run_and_a_column_per_image_and_stage():
    rng = np.random.default_rng(1)
    images = [rng.uniform(size=(16, 16, 3)) for _ in range(2)]
    prune = np.tile(np.where(np.arange(16) < 8, np.arange(16), -1), (2, 2, 1))
    merge = np.tile(np.arange(16) // 2, (1, 2, 1))
    rows = [
        {"label": "topk kr0.5", "blocks": [3, 6], "composed": prune},
        {"label": "tome kr0.5", "blocks": [3], "composed": merge},
    ]
    fig = pattern_grid(images, rows, (4, 4), title="demo")
    grid_axes = [ax for ax in fig.axes if ax.get_subplotspec() is not None]
    assert len(grid_axes) == 2 * 2 * 3
    assert sum(ax.get_visible() for ax in grid_axes) == 2 * 3 + 2 * 2  # tome has one stage fewer
    assert grid_axes[0].get_ylabel() == "topk kr0.5" and grid_axes[6].get_ylabel() == "tome kr0.5"
    assert grid_axes[1].get_title() == "image 1\nblock 3"
    with pytest.raises(ValueError, match="composed must be"):
        pattern_grid(images, [{"label": "x", "blocks": [3], "composed": prune}], (4, 4))


def _write_run(run_dir: Path, model, images: torch.Tensor, ids: list[str], split: str) -> None:
    from tokenreduction.evaluate.evaluate import save_npz

    with torch.no_grad():
        model.eval()(images)
    composed = torch.stack(tr.model_patterns(model)).to(torch.int32).numpy()
    run_dir.mkdir(parents=True)
    save_npz(
        run_dir / "patterns.npz",
        stage_blocks=np.array([s.block for s in model.reduction_state.stages]),
        composed=composed,
        kind=np.array("prune"),
        method=np.array(model.reduction_config["method"]),
        image_ids=np.array(ids),
        grid=np.array(model.patch_embed.grid_size),
    )
    (run_dir / "metrics.json").write_text(json.dumps({"split": split, "tokens_kept": model.tokens_kept}))


def test_pattern_grid_script_on_the_digits_data(tmp_path):
    from tokenreduction.data import build_dataset, build_transform
    from tokenreduction.data.demo import make_digits_dataset

    root = make_digits_dataset(tmp_path / "digits", img_size=32)
    ds = build_dataset("digits", root, "val", build_transform(False, 32, "digits"))
    images = torch.stack([ds[i][0] for i in range(4)])
    ids = [ds.image_id(i) for i in range(4)]
    runs = []
    for method, kwargs in (("topk", dict(keep_rate=0.5)), ("tome", dict(keep_rate=0.5))):
        torch.manual_seed(0)
        model = tr.create_model("vit_tiny_patch16_224", **TINY, method=method, reduction_loc=(1, 2), **kwargs)
        _write_run(tmp_path / method, model, images, ids, "val")
        runs.append(method)
    out = tmp_path / "fig" / "pattern_grid.png"
    cmd = [sys.executable, str(REPO / "scripts" / "visualize_patterns.py"), "--kind", "digits", "--root", str(root),
           "--img-size", "32", "--num-images", "2", "--out", str(out),
           "--patterns", *[str(tmp_path / m / "patterns.npz") for m in runs],
           "--metrics", *[str(tmp_path / m / "metrics.json") for m in runs],
           "--labels", "topk kr0.5", "tome kr0.5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 runs x 2 images (val: " in done.stdout
    from PIL import Image

    with Image.open(out) as png:
        width, height = png.size
    assert width > height > 100  # 2 rows, 2 x (input + 2 stages) columns
    assert not list(out.parent.glob(".*tmp*"))

    _write_run(tmp_path / "other", model, images.flip(0), ids[::-1], "val")  # other images
    bad = cmd[:]
    bad[bad.index(str(tmp_path / "tome" / "patterns.npz"))] = str(tmp_path / "other" / "patterns.npz")
    done = subprocess.run(bad, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "holds other images" in done.stderr
