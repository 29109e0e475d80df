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
    cfg = build_config(str(CONFIGS / "demo_tiny.py"), str(tmp / "work"), linkage="average", keep_rate=0.5,
                       data_root=str(tmp / "data"), cumulative_iters=2, options={"train_cfg.max_iters": 2,
                       "default_hooks.checkpoint.interval": 2})
    assert cfg.optim_wrapper.accumulative_counts == 2 and cfg.model.backbone.reduction_ratio == 0.5
    # keep_rate 1 keeps every token: the unreduced backbone (reduction_ratio 0, no merging module)
    assert build_config(str(CONFIGS / "demo_tiny.py"), str(tmp / "w1"), keep_rate=1.0).model.backbone.reduction_ratio == 0.0
    for bad in (0.0, 1.5):
        try:
            build_config(str(CONFIGS / "demo_tiny.py"), str(tmp / "w2"), keep_rate=bad)
        except ValueError as err:
            assert "keep_rate" in str(err), err
        else:
            raise AssertionError(f"keep_rate {bad} was accepted")
    assert cfg.val_evaluator.ann_file == str(tmp / "data") + "/annotations/instances_val.json"
    final = tmp / "final.pth"
    train(cfg, str(final))
    from tokenreduction.detection.checkpoint import load_detection_checkpoint

    state = load_detection_checkpoint(final)  # the run's own checkpoint, weights-only
    assert state["meta"]["iter"] == 2, state["meta"]
    metrics = evaluate(build_config(str(CONFIGS / "demo_tiny.py"), str(tmp / "eval"), linkage="average",
                                    keep_rate=0.5, data_root=str(tmp / "data")), str(final))
    for key in ("coco/bbox_mAP", "coco/segm_mAP", "coco/bbox_mAP_50", "coco/segm_mAP_50"):
        assert key in metrics, metrics  # the values' correctness: check_known_ap
    assert metrics["tokens_kept"] == [32, 16, 8], metrics["tokens_kept"]  # 8 x 8 grid, half each stage
    result = benchmark(build_config(str(CONFIGS / "demo_tiny.py"), str(tmp / "bench"), linkage="tome", keep_rate=0.5,
                                    data_root=str(tmp / "data")), str(final), batch_size=2, runs=1, warmup=0)
    assert result["images_per_s"] > 0 and result["backbone_images_per_s"] > 0 and result["image_shape"] == [128, 128]
    assert result["tokens_kept"] == [32, 16, 8]


# ---- released ViT-Adapter backbones: key -> (T shape, S shape), read from the reference code
# (ViT-Adapter detection/mmdet_custom/models/backbones: vit_adapter.py, adapter_modules.py,
# base/vit.py, ops/modules/ms_deform_attn.py) with the 3x configs' options: patch 16, depth 12,
# T: embed 192, 3 heads; S: embed 384, 6 heads; conv_inplane 64, deform_num_heads 6, n_points 4,
# cffn_ratio 0.25, deform_ratio 1.0, extra extractors in the last interaction. Keys are the
# detector checkpoint's ``backbone.*`` with the prefix removed. Layer scale
# (blocks.i.gamma1/gamma2) is in ViT-Adapter's own releases (TIMMVisionTransformer's
# default layer_scale=True), not in SViT's/ATC's vit-adapter-{t,s}-3x (layer_scale=False).
ADAPTER_OUTER = {
    "pos_embed": ((1, 197, 192), (1, 197, 384)),
    "patch_embed.proj.weight": ((192, 3, 16, 16), (384, 3, 16, 16)), "patch_embed.proj.bias": ((192,), (384,)),
    "level_embed": ((3, 192), (3, 384)),
    "spm.stem.0.weight": ((64, 3, 3, 3),) * 2, "spm.stem.3.weight": ((64, 64, 3, 3),) * 2,
    "spm.stem.6.weight": ((64, 64, 3, 3),) * 2, "spm.conv2.0.weight": ((128, 64, 3, 3),) * 2,
    "spm.conv3.0.weight": ((256, 128, 3, 3),) * 2, "spm.conv4.0.weight": ((256, 256, 3, 3),) * 2,
    "spm.fc1.weight": ((192, 64, 1, 1), (384, 64, 1, 1)), "spm.fc1.bias": ((192,), (384,)),
    "spm.fc2.weight": ((192, 128, 1, 1), (384, 128, 1, 1)), "spm.fc2.bias": ((192,), (384,)),
    "spm.fc3.weight": ((192, 256, 1, 1), (384, 256, 1, 1)), "spm.fc3.bias": ((192,), (384,)),
    "spm.fc4.weight": ((192, 256, 1, 1), (384, 256, 1, 1)), "spm.fc4.bias": ((192,), (384,)),
    "up.weight": ((192, 192, 2, 2), (384, 384, 2, 2)), "up.bias": ((192,), (384,)),
}
# (Sync)BatchNorm layers: weight, bias, running_mean, running_var (C,), num_batches_tracked ()
ADAPTER_BATCHNORMS = {
    "spm.stem.1": (64, 64), "spm.stem.4": (64, 64), "spm.stem.7": (64, 64), "spm.conv2.1": (128, 128),
    "spm.conv3.1": (256, 256), "spm.conv4.1": (256, 256),
    "norm1": (192, 384), "norm2": (192, 384), "norm3": (192, 384), "norm4": (192, 384),
}
ADAPTER_BLOCK = {  # blocks.{i}., i = 0..11
    "norm1.weight": ((192,), (384,)), "norm1.bias": ((192,), (384,)),
    "attn.qkv.weight": ((576, 192), (1152, 384)), "attn.qkv.bias": ((576,), (1152,)),
    "attn.proj.weight": ((192, 192), (384, 384)), "attn.proj.bias": ((192,), (384,)),
    "norm2.weight": ((192,), (384,)), "norm2.bias": ((192,), (384,)),
    "mlp.fc1.weight": ((768, 192), (1536, 384)), "mlp.fc1.bias": ((768,), (1536,)),
    "mlp.fc2.weight": ((192, 768), (384, 1536)), "mlp.fc2.bias": ((192,), (384,)),
}
ADAPTER_LAYER_SCALE = {"gamma1": ((192,), (384,)), "gamma2": ((192,), (384,))}
ADAPTER_INJECTOR = {  # interactions.{j}.injector., j = 0..3; MSDeformAttn over 3 levels
    "gamma": ((192,), (384,)),
    "query_norm.weight": ((192,), (384,)), "query_norm.bias": ((192,), (384,)),
    "feat_norm.weight": ((192,), (384,)), "feat_norm.bias": ((192,), (384,)),
    "attn.sampling_offsets.weight": ((144, 192), (144, 384)), "attn.sampling_offsets.bias": ((144,), (144,)),
    "attn.attention_weights.weight": ((72, 192), (72, 384)), "attn.attention_weights.bias": ((72,), (72,)),
    "attn.value_proj.weight": ((192, 192), (384, 384)), "attn.value_proj.bias": ((192,), (384,)),
    "attn.output_proj.weight": ((192, 192), (384, 384)), "attn.output_proj.bias": ((192,), (384,)),
}
ADAPTER_EXTRACTOR = {  # interactions.{j}.extractor. and interactions.3.extra_extractors.{0,1}.; 1 level
    "query_norm.weight": ((192,), (384,)), "query_norm.bias": ((192,), (384,)),
    "feat_norm.weight": ((192,), (384,)), "feat_norm.bias": ((192,), (384,)),
    "attn.sampling_offsets.weight": ((48, 192), (48, 384)), "attn.sampling_offsets.bias": ((48,), (48,)),
    "attn.attention_weights.weight": ((24, 192), (24, 384)), "attn.attention_weights.bias": ((24,), (24,)),
    "attn.value_proj.weight": ((192, 192), (384, 384)), "attn.value_proj.bias": ((192,), (384,)),
    "attn.output_proj.weight": ((192, 192), (384, 384)), "attn.output_proj.bias": ((192,), (384,)),
    "ffn.fc1.weight": ((48, 192), (96, 384)), "ffn.fc1.bias": ((48,), (96,)),
    "ffn.dwconv.dwconv.weight": ((48, 1, 3, 3), (96, 1, 3, 3)), "ffn.dwconv.dwconv.bias": ((48,), (96,)),
    "ffn.fc2.weight": ((192, 48), (384, 96)), "ffn.fc2.bias": ((192,), (384,)),
    "ffn_norm.weight": ((192,), (384,)), "ffn_norm.bias": ((192,), (384,)),
}
ADAPTER_OPTIONS = {  # the 3x configs' backbone options, T and S
    "T": dict(embed_dim=192, num_heads=3, conv_inplane=64, deform_num_heads=6, n_points=4, cffn_ratio=0.25,
              deform_ratio=1.0, drop_path_rate=0.1, interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]]),
    "S": dict(embed_dim=384, num_heads=6, conv_inplane=64, deform_num_heads=6, n_points=4, cffn_ratio=0.25,
              deform_ratio=1.0, drop_path_rate=0.2, interaction_indexes=[[0, 2], [3, 5], [6, 8], [9, 11]]),
}


def adapter_key_shapes(size: str, layer_scale: bool) -> dict:
    """The reference backbone's {key: shape} for size "T" or "S"."""
    col = 0 if size == "T" else 1
    keys = {k: v[col] for k, v in ADAPTER_OUTER.items()}
    for name, channels in ADAPTER_BATCHNORMS.items():
        c = channels[col]
        keys.update({f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
                     f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()})
    block = {**ADAPTER_BLOCK, **(ADAPTER_LAYER_SCALE if layer_scale else {})}
    for i in range(12):
        keys.update({f"blocks.{i}.{k}": v[col] for k, v in block.items()})
    extractors = [f"interactions.{j}.extractor" for j in range(4)] + [f"interactions.3.extra_extractors.{e}" for e in (0, 1)]
    for j in range(4):
        keys.update({f"interactions.{j}.injector.{k}": v[col] for k, v in ADAPTER_INJECTOR.items()})
    for prefix in extractors:
        keys.update({f"{prefix}.{k}": v[col] for k, v in ADAPTER_EXTRACTOR.items()})
    return keys


def fabricate_detector_checkpoint(path: Path, backbone_shapes: dict, seed: int) -> dict:
    """A detector checkpoint in mmdet's release layout ({meta, state_dict}) with the
    backbone under ``backbone.`` beside some neck/head weights; returns the backbone part."""
    g = torch.Generator().manual_seed(seed)
    backbone = {k: (torch.tensor(seed) if not shape else torch.randn(shape, generator=g).abs() + 0.1)
                for k, shape in backbone_shapes.items()}
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state.update({"neck.lateral_convs.0.conv.weight": torch.randn(256, 192, 1, 1, generator=g),
                  "rpn_head.rpn_conv.weight": torch.randn(256, 256, 3, 3, generator=g)})
    meta = {"mmdet_version": "2.22.0", "CLASSES": ("person", "bicycle"), "epoch": 36, "iter": 263808,
            "config": "model = dict(...)", "hook_msgs": {"last_ckpt": "work_dirs/epoch_36.pth"}}
    torch.save({"meta": meta, "state_dict": state}, path)
    return backbone


def check_released_adapter_keys(tmp: Path) -> None:
    """ViT-Adapter-T (SViT/ATC 3x: no layer scale) and -S (ViT-Adapter's own 3x: layer
    scale) key/shape lists load strictly into the project's backbone, read weights-only;
    a missing or foreign key is one error naming it."""
    from tokenreduction.detection.checkpoint import backbone_state, check_backbone_state, load_detection_checkpoint
    from tokenreduction.detection.vit_adapter import ViTAdapter

    for size, layer_scale in (("T", False), ("S", True)):
        shapes = adapter_key_shapes(size, layer_scale)
        path = tmp / f"vit-adapter-{size.lower()}-3x.pth"
        written = fabricate_detector_checkpoint(path, shapes, seed=3)
        model = ViTAdapter(**ADAPTER_OPTIONS[size], layer_scale=layer_scale, reduction_ratio=0.7)
        state = backbone_state(load_detection_checkpoint(path))
        assert set(state) == set(shapes), sorted(set(state) ^ set(shapes))[:5]
        check_backbone_state(model, state, str(path))
        model.load_state_dict(state, strict=True)
        own = model.state_dict()
        for key, value in written.items():
            assert torch.equal(own[key], value), key
        assert model.interactions[3].extra_extractors[1].ffn.dwconv.dwconv.weight.shape == shapes[
            "interactions.3.extra_extractors.1.ffn.dwconv.dwconv.weight"]
    # the S list (layer scale) into a backbone without layer scale, and a missing key
    wrong = ViTAdapter(**ADAPTER_OPTIONS["S"], layer_scale=False)
    state = backbone_state(load_detection_checkpoint(tmp / "vit-adapter-s-3x.pth"))
    try:
        check_backbone_state(wrong, state, "s-3x")
    except ValueError as err:
        assert "blocks.0.gamma1" in str(err) and "does not" in str(err), err
    else:
        raise AssertionError("no error for layer-scale weights the backbone lacks")
    del state["interactions.2.injector.gamma"]
    right = ViTAdapter(**ADAPTER_OPTIONS["S"], layer_scale=True)
    try:
        check_backbone_state(right, state, "s-3x")
    except ValueError as err:
        assert "lacks 1 backbone weights" in str(err) and "interactions.2.injector.gamma" in str(err), err
    else:
        raise AssertionError("no error for a missing key")


class _Payload:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def check_malicious_checkpoint_refused(tmp: Path) -> None:
    """A checkpoint whose pickle calls os.system is refused on every detection load path
    (the safe loader, mmengine's load_checkpoint, the runner's load_from) and runs nothing."""
    from mmengine.runner.checkpoint import load_checkpoint

    from tokenreduction.detection import make_shapes_coco
    from tokenreduction.detection.checkpoint import install_safe_loader, load_detection_checkpoint
    from tokenreduction.detection.run import _runner, build_config
    from tokenreduction.safe_load import UnsafeCheckpointError

    marker = tmp / "pwned"
    evil = tmp / "evil.pth"
    torch.save({"state_dict": {"backbone.level_embed": torch.zeros(3, 64)}, "meta": _Payload(marker)}, evil)
    install_safe_loader()
    make_shapes_coco(tmp / "evil_data", num_images=1, image_size=64)
    cfg = build_config(str(CONFIGS / "demo_tiny.py"), str(tmp / "evil_work"), data_root=str(tmp / "evil_data"),
                       load_from=str(evil))
    attempts = (
        lambda: load_detection_checkpoint(evil),
        lambda: load_checkpoint(tiny_backbone(), str(evil), map_location="cpu"),
        lambda: _runner(cfg),
    )
    for attempt in attempts:
        try:
            attempt()
        except UnsafeCheckpointError as err:
            assert "posix.system" in str(err) or "os.system" in str(err), err
        else:
            raise AssertionError("the malicious checkpoint loaded")
        assert not marker.exists(), "the checkpoint ran its command"


def check_known_ap(tmp: Path) -> None:
    """mmdet's CocoMetric (what evaluate() reports) on the fabricated set: its own
    ground truth as predictions scores AP 1.0 (boxes and masks); every box shifted
    right by 20 % of its width has IoU (1 - 0.2) / (1 + 0.2) = 2/3 with its object,
    so it counts at the IoU thresholds 0.50, 0.55, 0.60, 0.65 and not above:
    box AP = 4 / 10, AP50 = 1, AP75 = 0."""
    import numpy as np
    from mmdet.evaluation import CocoMetric
    from pycocotools.coco import COCO

    from tokenreduction.detection import make_shapes_coco
    from tokenreduction.detection.data import CATEGORIES

    ann = make_shapes_coco(tmp / "ap_data", splits=("val",), num_images=6, image_size=128, seed=1)["val"]
    coco = COCO(ann)

    def samples(shift: float) -> list:
        out = []
        for img_id in coco.getImgIds():
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
            boxes = []
            for a in anns:
                x, y, w, h = a["bbox"]
                boxes.append([x + shift * w, y, x + shift * w + w, y + h])
            masks = np.stack([coco.annToMask(a) for a in anns]).astype(bool)
            out.append({
                "img_id": img_id, "ori_shape": (128, 128),
                "pred_instances": {
                    "bboxes": torch.tensor(boxes, dtype=torch.float32),
                    "scores": torch.linspace(1.0, 0.5, len(anns)),
                    "labels": torch.tensor([a["category_id"] - 1 for a in anns]),
                    "masks": torch.from_numpy(masks),
                },
            })
        return out

    def iou(a, b) -> float:  # (x, y, w, h), independent of pycocotools
        ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        return ix * iy / (a[2] * a[3] + b[2] * b[3] - ix * iy)

    # the construction holds: each shifted box meets its own object at 2/3 and no other
    # object of its class at >= 0.5
    for img_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        for a in anns:
            x, y, w, h = a["bbox"]
            moved = (x + 0.2 * w, y, w, h)
            assert abs(iou(moved, a["bbox"]) - 2 / 3) < 1e-6
            others = [iou(moved, b["bbox"]) for b in anns if b is not a and b["category_id"] == a["category_id"]]
            assert all(v < 0.5 for v in others), others

    def score(shift: float) -> dict:
        metric = CocoMetric(ann_file=ann, metric=["bbox", "segm"])
        metric.dataset_meta = {"classes": CATEGORIES}
        metric.process({}, samples(shift))
        return metric.compute_metrics(metric.results)

    exact = score(0.0)
    for key in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50"):
        assert abs(exact[key] - 1.0) < 1e-3, (key, exact)
    shifted = score(0.2)
    assert abs(shifted["bbox_mAP"] - 0.4) < 1e-3, shifted
    assert abs(shifted["bbox_mAP_50"] - 1.0) < 1e-3 and abs(shifted["bbox_mAP_75"]) < 1e-3, shifted


CHECKS = {
    "no_timm": check_no_timm,
    "feature_shapes": check_feature_shapes,
    "unmerge_merge": check_unmerge_merge,
    "ratio_zero_matches": check_ratio_zero_matches,
    "bfloat16": check_bfloat16,
    "pretrained_and_layer_decay": check_pretrained_and_layer_decay,
    "configs": check_configs,
    "train_eval": check_train_eval,
    "released_adapter_keys": check_released_adapter_keys,
    "malicious_checkpoint": check_malicious_checkpoint_refused,
    "known_ap": check_known_ap,
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
