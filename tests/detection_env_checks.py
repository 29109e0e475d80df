"""Checks of tokenreduction.detection that run INSIDE the detection environment
(mmcv, mmengine, mmdet; no timm, no pytest). tests/test_detection.py runs
``<mmdet python> tests/detection_env_checks.py <check>[,<check>...] <tmp dir>``,
which prints ``check NAME: ok`` or ``check NAME: FAIL`` and the traceback for
each. Plain asserts with messages.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "config" / "detection"
torch.set_num_threads(1)  # tiny models; threads only add latency on shared cores

TINY = dict(
    pretrain_size=128, embed_dim=64, depth=12, num_heads=2, deform_num_heads=4, conv_inplane=16,
    drop_path_rate=0.0, reduction_loc=[3, 6, 9],
)


def tiny_backbone(**kwargs):
    from tokenreduction.detection.vit_adapter import ViTAdapter

    torch.manual_seed(0)
    return ViTAdapter(**{**TINY, **kwargs}).eval()


def check_no_timm() -> None:
    import tokenreduction.detection.run  # noqa: F401
    import tokenreduction.detection.vit_adapter  # noqa: F401

    assert "timm" not in sys.modules and "torchvision" not in sys.modules, "detection imported timm/torchvision"


def check_feature_shapes() -> None:
    """Four maps at strides 4..32 with C channels, reduced or not; the FPN
    takes them; merging keeps ceil(0.7 n) of the tokens present."""
    from mmdet.models.necks import FPN

    from tokenreduction.detection import vit_adapter as va

    x = torch.randn(2, 3, 128, 96)  # 8 x 6 = 48 patch tokens
    want = [(2, 64, 32, 24), (2, 64, 16, 12), (2, 64, 8, 6), (2, 64, 4, 3)]
    fpn = FPN(in_channels=[64] * 4, out_channels=32, num_outs=5).eval()
    for linkage, ratio in (("tome", 0.0), ("tome", 0.7), ("single", 0.7), ("average", 0.7), ("complete", 0.7)):
        model = tiny_backbone(linkage=linkage, reduction_ratio=ratio)
        seen = []
        original = va.unmerge
        va.unmerge = lambda t, a: seen.append(original(t, a)) or seen[-1]
        try:
            with torch.no_grad():
                feats = model(x)
        finally:
            va.unmerge = original
        assert [tuple(f.shape) for f in feats] == want, (linkage, ratio, [f.shape for f in feats])
        assert all(torch.isfinite(f).all() for f in feats)
        kept = model.tokens_kept
        assert kept == ([] if ratio == 0 else [34, 24, 17]), (linkage, kept)  # ceil(0.7 n): 48 -> 34 -> 24 -> 17
        full = seen[-1]  # the grid the extractor and the outputs read
        assert full.shape == (2, 48, 64)
        distinct = [torch.unique(full[b], dim=0).shape[0] for b in range(2)]
        assert distinct == [kept[-1] if kept else 48] * 2, (linkage, distinct)
        with torch.no_grad():
            outs = fpn(feats)
        assert [tuple(o.shape) for o in outs] == [(2, 32, 32, 24), (2, 32, 16, 12), (2, 32, 8, 6), (2, 32, 4, 3), (2, 32, 2, 2)]

    bad = [dict(reduction_ratio=1.5), dict(reduction_loc=[12]), dict(linkage="ward"), dict(reduction_ratio=[0.5])]
    for kwargs in bad:
        try:
            tiny_backbone(**kwargs)
        except ValueError:
            continue
        raise AssertionError(f"no ValueError for {kwargs}")
    try:
        tiny_backbone()(torch.randn(1, 3, 100, 96))
    except ValueError as err:
        assert "divisible by 32" in str(err)
    else:
        raise AssertionError("no ValueError for a 100 px side")


def check_unmerge_merge() -> None:
    """unmerge / merge against per-image loops."""
    from tokenreduction.detection.vit_adapter import merge, unmerge

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g)
    a = torch.randint(0, 5, (3, 11), generator=g)
    a[:, :5] = torch.arange(5)  # every token has a patch
    full = unmerge(x, a)
    for b in range(3):
        for n in range(11):
            assert torch.equal(full[b, n], x[b, a[b, n]])
    y = torch.randn(3, 11, 4, generator=g)
    pooled = merge(y, a, 5)
    for b in range(3):
        for m in range(5):
            assert torch.allclose(pooled[b, m], y[b][a[b] == m].mean(0), atol=1e-6)
    assert torch.allclose(merge(full, a, 5), x, atol=1e-6)
    assert unmerge(x, None) is x and merge(y, None, 11) is y


def check_ratio_zero_matches() -> None:
    """Ratio 0 (off) and keep 1.0 (ToMe and ATC) give the unreduced outputs."""
    x = torch.randn(2, 3, 96, 128)
    reference = tiny_backbone(reduction_loc=[])
    state = reference.state_dict()
    with torch.no_grad():
        want = reference(x)
    for kwargs in (dict(reduction_ratio=0.0), dict(linkage="tome", reduction_ratio=1.0),
                   dict(linkage="average", reduction_ratio=1.0), dict(reduction_ratio=[0.0, 0.0, 0.0])):
        model = tiny_backbone(**kwargs)
        model.load_state_dict(state)
        with torch.no_grad():
            got = model(x)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, atol=1e-5, rtol=1e-5), (kwargs, (g - w).abs().max())
    reduced = tiny_backbone(reduction_ratio=0.5)
    reduced.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(reduced(x)[2], want[2], atol=1e-4), "reduction changed nothing"


def check_bfloat16() -> None:
    model = tiny_backbone(reduction_ratio=0.5, linkage="complete").to(torch.bfloat16)
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))
    assert all(f.dtype == torch.bfloat16 and torch.isfinite(f.float()).all() for f in feats)


def check_pretrained_and_layer_decay(tmp: Path) -> None:
    """A DeiT-style checkpoint (CLS slot, head, final norm) fills the ViT part;
    the layer-decay constructor scales lr by rate ** (L + 1 - layer)."""
    from tokenreduction.detection.optim import LayerDecayOptimWrapperConstructor, vit_layer_id

    source = tiny_backbone(reduction_loc=[])
    deit = {k: v.clone() for k, v in source.state_dict().items() if k.startswith(("blocks.", "patch_embed.")) or k == "pos_embed"}
    deit.update({"cls_token": torch.zeros(1, 1, 64), "head.weight": torch.zeros(10, 64), "norm.weight": torch.ones(64)})
    torch.save({"model": deit}, tmp / "deit.pth")
    torch.manual_seed(1)
    from tokenreduction.detection.vit_adapter import ViTAdapter

    model = ViTAdapter(**{**TINY, "reduction_loc": []}, pretrained=str(tmp / "deit.pth"))
    model.init_weights()
    loaded = model.state_dict()
    for key, value in deit.items():
        if key in loaded:
            assert torch.equal(loaded[key], value), key
    assert not torch.equal(loaded["spm.fc1.weight"], source.state_dict()["spm.fc1.weight"])  # adapter stays random

    assert vit_layer_id("backbone.pos_embed", 12) == 0
    assert vit_layer_id("backbone.blocks.3.attn.qkv.weight", 12) == 4
    assert vit_layer_id("backbone.spm.fc1.weight", 12) == 13
    assert vit_layer_id("roi_head.bbox_head.fc_cls.weight", 12) == 13
    wrapper = LayerDecayOptimWrapperConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)),
        dict(num_layers=12, layer_decay_rate=0.5),
    )(torch.nn.ModuleDict({"backbone": model}))
    by_param = {id(p): g for g in wrapper.optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["blocks.0.attn.qkv.weight"])]["lr"] == 1e-3 * 0.5**12
    assert by_param[id(named["blocks.11.mlp.fc1.weight"])]["lr"] == 1e-3 * 0.5
    assert by_param[id(named["spm.fc1.weight"])]["lr"] == 1e-3
    assert by_param[id(named["blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert by_param[id(named["blocks.0.attn.qkv.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["level_embed"])]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in wrapper.optimizer.param_groups) == len(named)


def check_configs() -> None:
    """Every config loads with mmengine and names only registered types; the
    study configs build their backbone and schedules as published."""
    import mmcv.ops
    import mmdet.registry as registries
    from mmengine.config import Config
    from mmengine.registry import Registry
    from mmengine.utils import import_modules_from_strings

    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    all_registries = [r for r in vars(registries).values() if isinstance(r, Registry)]

    def types(node):
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                yield node["type"]
            for value in node.values():
                yield from types(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                yield from types(value)

    files = sorted(CONFIGS.glob("*.py"))
    assert {f.name for f in files} >= {"demo_tiny.py", "vit_adapter_t_0.5x_coco.py", "vit_adapter_s_0.33x_coco.py"}
    for path in files:
        cfg = Config.fromfile(str(path))
        import_modules_from_strings(**cfg.custom_imports)
        names = set(types(cfg.to_dict()))
        # RoI layers and nms are named by their mmcv.ops attribute, not a registry
        missing = sorted(
            t for t in names if not any(r.get(t) is not None for r in all_registries) and not hasattr(mmcv.ops, t)
        )
        assert not missing, f"{path.name}: unregistered types {missing}"
        assert cfg.model.backbone.type == "ViTAdapter" and registries.MODELS.get("ViTAdapter") is not None
        assert cfg.optim_wrapper.constructor == "LayerDecayOptimWrapperConstructor"
        assert cfg.model.backbone.interaction_indexes == [[0, 2], [3, 5], [6, 8], [9, 11]]
    t = Config.fromfile(str(CONFIGS / "vit_adapter_t_0.5x_coco.py"))
    s = Config.fromfile(str(CONFIGS / "vit_adapter_s_0.33x_coco.py"))
    assert (t.model.backbone.embed_dim, t.model.backbone.num_heads, t.train_cfg.max_epochs) == (192, 3, 6)
    assert (s.model.backbone.embed_dim, s.model.backbone.num_heads, s.train_cfg.max_epochs) == (384, 6, 4)
    assert t.model.neck.in_channels == [192] * 4 and s.model.neck.in_channels == [384] * 4
    assert t.param_scheduler[1].milestones == [4] and s.param_scheduler[1].milestones == [3]
    for cfg in (t, s):
        assert cfg.optim_wrapper.optimizer.type == "AdamW" and cfg.optim_wrapper.optimizer.lr == 1e-5
        assert cfg.model.backbone.reduction_loc == [3, 6, 9]
        kinds = {step["type"] for step in cfg.train_dataloader.dataset.pipeline}
        assert {"RandomChoice", "RandomCrop", "RandomFlip"} <= kinds  # DETR-style augmentation
    with torch.no_grad():  # the study's T backbone at a small input
        model = registries.MODELS.build({**t.model.backbone, "norm_cfg": dict(type="BN")}).eval()
        feats = model(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 192, 16, 16), (1, 192, 8, 8), (1, 192, 4, 4), (1, 192, 2, 2)]


def check_train_eval(tmp: Path) -> None:
    """A few iterations (with gradient accumulation) and one COCO evaluation
    on the fabricated set, then the throughput benchmark."""
    from tokenreduction.detection import make_shapes_coco
    from tokenreduction.detection.run import benchmark, build_config, evaluate, train

    make_shapes_coco(tmp / "data", num_images=4, image_size=128)
    cfg = build_config(str(CONFIGS / "demo_tiny.py"), str(tmp / "work"), linkage="average", ratio=0.5,
                       data_root=str(tmp / "data"), cumulative_iters=2, options={"train_cfg.max_iters": 2,
                       "default_hooks.checkpoint.interval": 2})
    assert cfg.optim_wrapper.accumulative_counts == 2 and cfg.model.backbone.reduction_ratio == 0.5
    assert cfg.val_evaluator.ann_file == str(tmp / "data") + "/annotations/instances_val.json"
    final = tmp / "final.pth"
    train(cfg, str(final))
    state = torch.load(final, map_location="cpu", weights_only=False)
    assert state["meta"]["iter"] == 2, state["meta"]
    metrics = evaluate(build_config(str(CONFIGS / "demo_tiny.py"), str(tmp / "eval"), linkage="average",
                                    ratio=0.5, data_root=str(tmp / "data")), str(final))
    for key in ("coco/bbox_mAP", "coco/segm_mAP", "coco/bbox_mAP_50", "coco/segm_mAP_50"):
        assert key in metrics and -1.0 <= metrics[key] <= 1.0, metrics
    assert metrics["tokens_kept"] == [32, 16, 8], metrics["tokens_kept"]  # 8 x 8 grid, half each stage
    result = benchmark(build_config(str(CONFIGS / "demo_tiny.py"), str(tmp / "bench"), linkage="tome", ratio=0.5,
                                    data_root=str(tmp / "data")), str(final), batch_size=2, runs=1, warmup=0)
    assert result["images_per_s"] > 0 and result["backbone_images_per_s"] > 0 and result["image_shape"] == [128, 128]
    assert result["tokens_kept"] == [32, 16, 8]


CHECKS = {
    "no_timm": check_no_timm,
    "feature_shapes": check_feature_shapes,
    "unmerge_merge": check_unmerge_merge,
    "ratio_zero_matches": check_ratio_zero_matches,
    "bfloat16": check_bfloat16,
    "pretrained_and_layer_decay": check_pretrained_and_layer_decay,
    "configs": check_configs,
    "train_eval": check_train_eval,
}

if __name__ == "__main__":
    import traceback

    names = sys.argv[1].split(",")
    tmp_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(".")
    failed = False
    for name in names:
        fn = CHECKS[name]
        try:
            fn(tmp_dir) if fn.__code__.co_argcount else fn()
        except Exception:  # report every check, then fail
            failed = True
            print(f"check {name}: FAIL\n{traceback.format_exc()}", flush=True)
        else:
            print(f"check {name}: ok", flush=True)
    sys.exit(1 if failed else 0)
