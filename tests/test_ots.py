"""Off-the-shelf sweeps, SWAG and MAE checkpoint loading, and the MAE
fine-tuning recipe (layer-wise lr decay, blr, r schedule). Tiny random models
and fabricated images only. (The r schedules against a hand-worked table are
in test_model_errors.py.)"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import tokenreduction as tr
from tokenreduction.data import build_dataset
from tokenreduction.ots import (
    COLUMNS,
    PRESETS,
    BackbonePreset,
    build_backbone,
    collect_tables,
    convert_swag_state_dict,
    feasible_r,
    plot_sweep,
    sweep,
    transform_for,
    write_table,
)
from tokenreduction.train import TrainConfig, load_trained_model, train
from tokenreduction.train.engine import layer_decay_groups

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "vit_tiny_patch16_224"
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2)  # 64 patches


def make_imagefolder(root: Path, classes: int = 6, per_class: int = 2) -> Path:
    """root/{train,val}/c<k>/*.png, 32 px; class k is brighter with k."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = (rng.random((32, 32, 3)) * 120 + c * 25).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{split}_{c}_{i}.png")
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("ots_imgs"))


def tiny_preset(**overrides) -> BackbonePreset:
    fields = dict(name="tiny", family="timm", model=ARCH, img_size=32, crop_pct=1.0, prop_attn=True, depth=4,
                  patch_size=4, num_classes=6, model_kwargs=dict(TINY))
    fields.update(overrides)
    return BackbonePreset(**fields)


def random_backbone(preset: BackbonePreset, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_backbone(preset, pretrained=False)
    with torch.no_grad():  # a head that tells the images apart (timm starts it near zero)
        model.head.weight.normal_(0, 1.0)
    return model


def reference_accuracy(model: nn.Module, preset: BackbonePreset, root: Path) -> tuple[float, float]:
    """Top-1/top-5 of a plain timm model, image by image."""
    ds = build_dataset("imagefolder", root, "val", transform_for(preset))
    hit1 = hit5 = 0
    with torch.no_grad():
        for i in range(len(ds)):
            x, y = ds[i]
            order = model(x[None])[0].argsort(descending=True).tolist()
            hit1 += order[0] == y
            hit5 += y in order[:5]
    return 100.0 * hit1 / len(ds), 100.0 * hit5 / len(ds)


# ---------------------------------------------------------------- sweep
@pytest.mark.parametrize("method,schedule,kwargs", [("tome", "constant", {}), ("atc", "decrease", {"linkage": "average"}),
                                                    ("topk", "decrease", {})])
def test_sweep_table(data_root, tmp_path, method, schedule, kwargs):
    preset = tiny_preset()
    plain = random_backbone(preset)  # untouched copy (same seed) for the reference
    expected_top1, expected_top5 = reference_accuracy(plain, preset, data_root)
    r_values = [0, 2, 5]
    table = sweep(preset, method, r_values, schedule, dataset="imagefolder", data_root=data_root, label=f"{method}-x",
                  method_kwargs=kwargs, batch_size=5, throughput_batch=2, model=random_backbone(preset))
    assert list(table.columns) == COLUMNS
    assert table["r"].tolist() == r_values
    assert (table["method"] == f"{method}-x").all() and (table["reducer"] == method).all()
    assert (table["num_images"] == 12).all() and (table["schedule"] == schedule).all()
    # r = 0 is the unreduced model
    row0 = table.iloc[0]
    assert row0["top1"] == pytest.approx(expected_top1) and row0["top5"] == pytest.approx(expected_top5)
    assert row0["gflops"] == pytest.approx(tr.count_flops(plain), rel=1e-6)
    assert row0["tokens_left"] == 64
    # the schedule reaches the model: tokens left and GFLOPs fall with r
    for _, row in table.iterrows():
        schedule_r = tr.r_schedule(int(row["r"]), 4, schedule)
        assert row["r_per_block"].split() == [str(v) for v in schedule_r]
        assert row["tokens_left"] == 64 - sum(schedule_r)
    assert (table["gflops"].diff().iloc[1:] < 0).all()
    assert table["top1"].between(0, 100).all() and (table["throughput"] > 0).all()
    assert table["prop_attn"].all()


def test_sweep_csv_collect_and_plot(data_root, tmp_path):
    preset = tiny_preset()
    paths = []
    for method, schedule in (("tome", "constant"), ("tome", "decrease")):
        table = sweep(preset, method, [0, 4], schedule, dataset="imagefolder", data_root=data_root, batch_size=12,
                      throughput_batch=0, model=random_backbone(preset))
        assert table["throughput"].isna().all()  # throughput_batch 0: not measured
        paths.append(tmp_path / f"{method}_{schedule}.csv")
        write_table(table, paths[-1])
    both = collect_tables(paths, tmp_path / "all.csv")
    assert len(both) == 4 and list(pd.read_csv(tmp_path / "all.csv").columns) == COLUMNS
    assert both.groupby("schedule")["r"].apply(list).to_dict() == {"constant": [0, 4], "decrease": [0, 4]}
    # r=0 is the same model whatever the schedule
    r0 = both[both.r == 0]
    assert r0["top1"].nunique() == 1 and r0["gflops"].nunique() == 1
    plot_sweep(both, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))


def test_too_large_r_names_block_and_count_before_any_evaluation(tmp_path):
    preset = tiny_preset()
    # topk, 4 blocks x r=20: 64 - 60 = 4 tokens are left at block 3, where r=20 is
    # asked; the data root does not exist: the r check must come first
    with pytest.raises(ValueError, match=r"r=20 \(constant\).*r=20 at block 3 is too large: only 4 patch tokens"):
        sweep(preset, "topk", [0, 20], "constant", dataset="imagefolder", data_root=tmp_path / "nowhere",
              model=random_backbone(preset))
    # ToMe's bipartite matching removes at most half the tokens: 64 -> 44 -> 24 -> 12
    with pytest.raises(ValueError, match=r"r=20 at block 3 is too large: only 12 patch tokens"):
        sweep(preset, "tome", [20], "constant", dataset="imagefolder", data_root=tmp_path / "nowhere",
              model=random_backbone(preset))
    with pytest.raises(ValueError, match="at block 3 is too large: only 4 patch tokens"):
        feasible_r(preset, 20)


def test_study_presets():
    """Image size, crop, proportional attention per family; the study's r sweeps
    are feasible and maximal (one more token per block fails somewhere)."""
    assert PRESETS["swag_b16"].img_size == 384 and PRESETS["swag_l16"].img_size == 512
    assert PRESETS["swag_h14"].img_size == 518 and PRESETS["swag_h14"].num_patches == 37 * 37
    assert all(p.prop_attn == (p.family != "mae") for p in PRESETS.values())
    assert all(p.model_kwargs.get("global_pool") == "avg" for p in PRESETS.values() if p.family == "mae")
    assert PRESETS["augreg_base"].timm_weights == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert PRESETS["mae_large"].timm_weights == "vit_large_patch16_224.mae"
    for p in PRESETS.values():
        top = max(p.r_values)
        for schedule in ("constant", "decrease"):
            left = feasible_r(p, top, schedule)
            assert left[-1] >= 1
        with pytest.raises(ValueError, match="too large"):
            feasible_r(p, p.num_patches // p.depth + 1)


# ---------------------------------------------------------------- SWAG
class _SwagMlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(OrderedDict(linear_1=nn.Linear(dim, hidden), act=nn.GELU(), linear_2=nn.Linear(hidden, dim)))


class _SwagBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _SwagMlp(dim, 4 * dim)

    def forward(self, x):  # (S, N, D) as SWAG
        h = self.ln_1(x)
        x = x + self.self_attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _SwagViT(nn.Module):
    """SWAG's ViT layout and forward (seq-first, nn.MultiheadAttention), for the converter test."""

    def __init__(self, img: int, patch: int, dim: int, depth: int, heads: int, classes: int) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.encoder = nn.Module()
        self.encoder.pos_embedding = nn.Parameter(torch.randn((img // patch) ** 2 + 1, 1, dim) * 0.02)
        self.encoder.layers = nn.Sequential(OrderedDict((f"layer_{i}", _SwagBlock(dim, heads)) for i in range(depth)))
        self.encoder.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Module()
        self.head.layers = nn.Sequential(OrderedDict(head=nn.Linear(dim, classes)))

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).permute(2, 0, 1)
        x = torch.cat([self.class_token.expand(-1, x.shape[1], -1), x])
        x = self.encoder.ln(self.encoder.layers(x + self.encoder.pos_embedding))
        return self.head.layers(x[0])


def _torchvision_names(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        k = k.replace("encoder.layers.layer_", "encoder.layers.encoder_layer_")
        k = k.replace("mlp.linear_1", "mlp.0").replace("mlp.linear_2", "mlp.3").replace("head.layers.head", "heads.head")
        out[k] = v.permute(1, 0, 2) if k == "encoder.pos_embedding" else v
    return out


@pytest.mark.parametrize("layout", ["swag", "torchvision"])
def test_swag_checkpoint_matches_swag_forward(tmp_path, layout):
    torch.manual_seed(3)
    ref = _SwagViT(img=32, patch=4, dim=32, depth=2, heads=2, classes=5).eval()
    state = ref.state_dict()
    if layout == "torchvision":
        state = _torchvision_names(state)
    path = tmp_path / "vit_in1k.torch"
    torch.save(state, path)
    preset = BackbonePreset(name="swag_tiny", family="swag", model=ARCH, img_size=32, crop_pct=1.0, prop_attn=True,
                            depth=2, patch_size=4, num_classes=5,
                            model_kwargs=dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2),
                            checkpoint=str(path))
    model = build_backbone(preset)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)
        # and through the reduction patch, r = 0 is still the same network
        tr.patch_model(model, method="tome", r=0, prop_attn=True)
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-4)


def test_swag_converter_rejects_unknown_keys():
    torch.manual_seed(0)
    state = _SwagViT(img=16, patch=4, dim=8, depth=1, heads=2, classes=3).state_dict()
    assert set(convert_swag_state_dict(state)) == set(timm.create_model(
        ARCH, img_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2, num_classes=3).state_dict())
    state["head.layers.pre_logits.weight"] = torch.zeros(8, 8)
    with pytest.raises(ValueError, match="pre_logits"):
        convert_swag_state_dict(state)
    with pytest.raises(ValueError, match="not a SWAG"):
        convert_swag_state_dict({"cls_token": torch.zeros(1)})


# ---------------------------------------------------------------- MAE
def _mae_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, num_classes=5, global_pool="avg", **TINY).eval()


def test_mae_finetuned_release_file_loads_with_global_pool(tmp_path):
    src = _mae_model(1)
    with torch.no_grad():  # non-trivial fc_norm
        src.fc_norm.weight.uniform_(0.5, 1.5)
        src.fc_norm.bias.uniform_(-0.5, 0.5)
    path = tmp_path / "mae_finetuned_vit_tiny.pth"
    # MAE release format: {"model": state}, MAE names (fc_norm, no final norm)
    torch.save({"model": src.state_dict()}, path)
    assert "fc_norm.weight" in src.state_dict() and "norm.weight" not in src.state_dict()
    preset = BackbonePreset(name="mae_tiny", family="mae", model=ARCH, img_size=32, crop_pct=0.875, prop_attn=False,
                            depth=4, patch_size=4, num_classes=5, model_kwargs=dict(TINY, global_pool="avg"),
                            checkpoint=str(path))
    model = build_backbone(preset)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # reference: blocks, mean of the patch tokens, fc_norm, head
        t = src._pos_embed(src.patch_embed(x))
        for blk in src.blocks:
            t = blk(t)
        expected = src.head(src.fc_norm(t[:, 1:].mean(1)))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-4)
    # the same file through create_model with a merging method: size-weighted pool, no prop attn
    reduced = tr.create_model(ARCH, method="tome", r=4, r_schedule="decrease", prop_attn=False, checkpoint_path=path,
                              num_classes=5, global_pool="avg", **TINY).eval()
    with torch.no_grad():
        out = reduced(x)
    assert out.shape == (2, 5) and reduced.tokens_kept[-1] == 64 - sum(tr.r_schedule(4, 4, "decrease"))
    assert reduced.reduction_config["prop_attn"] is False


def test_mae_pretrain_file_with_decoder_loads_encoder_only(tmp_path):
    src = timm.create_model(ARCH, num_classes=0, **TINY)  # pretraining encoder: final norm, no head
    state = dict(src.state_dict())
    state["mask_token"] = torch.zeros(1, 1, 16)
    state["decoder_embed.weight"] = torch.zeros(16, 32)
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": state}, path)
    model = _mae_model(2)
    head_before = model.head.weight.clone()
    tr.load_checkpoint(model, path)
    own = model.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("norm."):
            torch.testing.assert_close(own[k], v)
    # fc_norm starts afresh (as MAE fine-tuning does), the new head is kept
    assert torch.equal(own["fc_norm.weight"], torch.ones(32)) and torch.equal(own["fc_norm.bias"], torch.zeros(32))
    assert torch.equal(model.head.weight, head_before)


# ---------------------------------------------------------------- MAE fine-tuning recipe
def _expected_scale(name: str, depth: int, decay: float) -> float:
    """MAE's layer ids: stem 0, block i -> i + 1, the rest depth + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = depth + 1
    return decay ** (depth + 1 - layer)


def test_layer_decay_groups_follow_mae():
    model = tr.create_model(ARCH, method="tome", r=2, num_classes=5, global_pool="avg", **TINY)
    groups = layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            seen.add(name)
            assert g["lr_scale"] == pytest.approx(_expected_scale(name, 4, 0.5)), name
            no_decay = p.ndim <= 1 or name in ("cls_token", "pos_embed")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert seen == set(names.values())
    assert {round(g["lr_scale"], 6) for g in groups} == {0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0}


def test_mae_style_finetune_with_layer_decay_and_r_schedule(data_root, tmp_path):
    cfg = dict(
        model=ARCH, model_kwargs=dict(TINY, global_pool="avg"), img_size=32, dataset="imagefolder",
        data_root=str(data_root), method="atc", method_kwargs={"linkage": "complete"}, r=3, r_schedule="decrease",
        budget="r", prop_attn=False, epochs=1, warmup_epochs=0, max_steps=3, batch_size=4, grad_accum_steps=1,
        lr=5e-4, lr_batch_normalizer=256, layer_decay=0.65, weight_decay=0.05, drop_path=0.1, reprob=0.25,
        mixup=0.8, cutmix=1.0, smoothing=0.1, auto_augment=None, model_ema=False, num_workers=0, sched="cosine",
    )
    result = train(cfg, tmp_path / "run")
    assert result["steps"] == 3
    assert result["lr"] == pytest.approx(5e-4 * 4 / 256)  # blr x batch / 256
    state = torch.load(tmp_path / "run" / "checkpoint_last.pth", map_location="cpu", weights_only=False)
    opt_groups = state["optimizer"]["param_groups"]
    head_lr = [g["lr"] for g in opt_groups if g["lr_scale"] == 1.0][0]
    scales = sorted({round(g["lr_scale"], 8) for g in opt_groups})
    assert scales == sorted({round(0.65 ** k, 8) for k in range(0, 6)})  # head .. stem (4 blocks)
    for g in opt_groups:  # the scheduler applies every group's scale
        assert g["lr"] == pytest.approx(head_lr * g["lr_scale"])
    model, spec = load_trained_model(tmp_path / "run" / "final.pth")
    assert spec["r_schedule"] == "decrease" and spec["model_kwargs"]["global_pool"] == "avg"
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.tokens_kept[-1] == 64 - sum(tr.r_schedule(3, 4, "decrease"))
    assert model.global_pool == "avg" and not model.reduction_config["prop_attn"]


def test_layer_decay_config_is_checked():
    with pytest.raises(ValueError, match="layer_decay"):
        TrainConfig(layer_decay=1.5)
    with pytest.raises(ValueError, match="cannot be combined"):
        TrainConfig(layer_decay=0.65, backbone_lr_scale=0.1)


# ---------------------------------------------------------------- the DAG
def test_schema_presets_match_the_library():
    import yaml

    from workflow_utils import REPO

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    entry = schema["properties"]["ots"]["properties"]["backbones"]["additionalProperties"]
    assert entry["properties"]["preset"]["enum"] == list(PRESETS)


@pytest.mark.slow
def test_atc_study_config_dry_run(tmp_path):
    from workflow_utils import load_config, planned_jobs, snakemake, with_existing_roots, write_config

    config = with_existing_roots(load_config("atc.yaml"), tmp_path)
    for other in ("detection", "diffusion"):  # other stages' sections (tested with their stages)
        config.pop(other, None)
    for spec in config["ots"]["backbones"].values():  # local checkpoints must exist (rule inputs)
        if "checkpoint" in spec:
            path = tmp_path / spec["checkpoint"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    path = write_config(tmp_path / "atc.yaml", config)
    jobs = planned_jobs(snakemake(["-n", "--configfile", str(path)], tmp_path).stdout)
    assert jobs["ots_sweep"] == 11 * 4 * 2  # backbones x methods x schedules, each looping over its r sweep
    assert jobs["ots_plot"] == 11
    assert jobs["mae_finetune"] == jobs["mae_evaluate"] == 1 + 4 * 2  # unreduced + methods x schedules (r 16)
    assert jobs["finetune"] == 4 * 3 * (5 * 4 + 1)  # the DeiT grid
    assert "pretrain" not in jobs


@pytest.mark.slow
def test_bad_ots_config_is_rejected_with_its_key(tmp_path):
    from workflow_utils import load_config, snakemake, write_config

    config = load_config("config.yaml")
    config["ots"]["dataset"] = "mosaic"  # multi-label
    path = write_config(tmp_path / "bad.yaml", config)
    proc = snakemake(["-n", "--configfile", str(path)], tmp_path, check=False)
    assert proc.returncode != 0 and "ots.dataset" in proc.stdout + proc.stderr and "multi-label" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_demo_ots_and_mae_stages_run(tmp_path):
    """The demo's off-the-shelf and MAE stages through the real Snakefile (reduced config)."""
    from test_workflow import tiny_demo_config
    from workflow_utils import snakemake, write_config

    config = tiny_demo_config(tmp_path)
    config["ots"].update(methods=["tome", "atc-single", "topk"], r=[0, 3], schedules=["constant", "decrease"])
    config["mae"].update(methods=["deit", "atc-average"])
    path = write_config(tmp_path / "demo.yaml", config)
    results = tmp_path / "results"
    targets = [str(results / "ots" / "tiny" / "sweep.csv"), str(results / "mae" / "metrics.csv")]
    snakemake([*targets, "--cores", "2", "--configfile", str(path)], tmp_path, timeout=1500)
    table = pd.read_csv(results / "ots" / "tiny" / "sweep.csv")
    assert list(table.columns) == COLUMNS and len(table) == 3 * 2 * 2
    r0 = table[table.r == 0]
    assert r0["top1"].nunique() == 1 and r0["gflops"].nunique() == 1  # r 0 is the unreduced model
    assert (table[table.r == 3]["gflops"] < r0["gflops"].iloc[0]).all()
    assert (results / "ots" / "tiny" / "accuracy_vs_gflops.png").read_bytes()[:4] == b"\x89PNG"
    mae = pd.read_csv(results / "mae" / "metrics.csv")
    assert sorted(mae.method) == ["atc-average", "deit"] and mae.top1.between(0, 100).all()
    assert mae.set_index("method").loc["atc-average", "r"] == 4
