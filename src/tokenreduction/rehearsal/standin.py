"""The rehearsal's config rewrite: a study's config with every input replaced
by a small stand-in, and the list of stand-ins to fabricate.

Pure functions on plain dicts, standard library only: the workflow loads this
file at DAG build (``workflow/rules/common.smk``) without importing torch.

What changes (and nothing else: the job list, the wildcards and every
aggregation's inputs stay the study's):

* ``results``: ``<results>-rehearsal``;
* each dataset's ``root``: a stand-in of its kind under
  ``<results>/standins/data/<name>`` (fabricated by :mod:`.fabricate` in the
  kind's real on-disk format);
* each backbone: the same timm model (family, depth, patch grid, prefix
  tokens, image size) narrowed to ``embed_dim`` 16-32 and 1-2 heads; ``init:
  timm`` loads a generated file through timm's own pretrained-weight loading
  (``pretrained_cfg_overlay.file``), so nothing is downloaded;
* off-the-shelf presets (``ots``): narrowed alike, weights generated in the
  family's format (AugReg timm layout, SWAG ``*_in1k.torch``, MAE release);
* ``diffusion``: the tiny pipeline of the same layout as a folder, the class
  names file in its format, clean-fid's Inception weights as a TorchScript
  stand-in; 2 steps at 64 px;
* ``detection``: COCO 2017 instances in their layout (``data_root``); each
  size's mmdet config replaced by a stand-in config whose ``_base_`` is the
  study's (narrow ViT-Adapter and heads, 1/10 image scale, 1 epoch, fp32 on the
  CPU); ``load_from`` by a ViT-Adapter 3x checkpoint of that narrow model in
  mmdet's format, written by the detection environment; the benchmark cut;
* recipes: a few optimiser steps, small batches, no data-loading workers;
  evaluation on the stand-in's validation images;
* resources: one thread and no GPU per job (so the jobs run on the CPU, and
  the local cores run jobs side by side).

A config naming a dataset kind, backbone family, ``init`` or section the
stand-ins do not cover raises :class:`RehearsalError` naming the key.
"""
from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

#: dataset kinds with a stand-in writer (tokenreduction.rehearsal.fabricate);
#: the demo kinds are made by the DAG itself and stay as they are
STANDIN_KINDS = ("imagenet", "imagefolder", "nabirds", "coco", "nuswide", "ufgir")
DEMO_KINDS = ("digits", "digits_multilabel", "digits_ufgir")
#: timm families narrowed by embed_dim / num_heads (all build timm's VisionTransformer)
BACKBONE_FAMILIES = ("vit_", "deit_", "deit3_")
#: the stand-in width of a real width (embed_dim -> (embed_dim, num_heads))
WIDTHS = ((192, (16, 1)), (384, (24, 2)), (10**9, (32, 2)))
#: real widths of the families' size names (the model name says the size)
SIZE_WIDTHS = {"tiny": 192, "small": 384, "base": 768, "large": 1024, "huge": 1280, "giant": 1408}
#: images per split of the stand-in data sets of a study whose widest stand-in
#: is 32 wide (val, test: more images than two stand-in widths together, as the
#: CCA of the analysis needs; train_val, what CLCA's --train_trainval trains on
#: at 448 px: one image per class); :func:`standin_splits` sizes val and test
#: for the study's widest stand-in
SPLIT_SIZES = {"train": 24, "val": 80, "test": 80, "train_val": 8}
#: images the val and test splits have beyond the two widest stand-ins' widths together
PATTERN_IMAGES_SLACK = 16
#: sections of a study config the stand-ins do not cover yet
UNCOVERED_SECTIONS = ("benchmark", "pretrain")
#: classes of the single-label stand-in data sets (tokenreduction.rehearsal.fabricate.NUM_CLASSES)
STANDIN_CLASSES = 8
#: images each off-the-shelf sweep evaluates per value of r (the study: the
#: whole val split): one batch; the ATC rehearsal's SWAG sweeps at 1,024 and
#: 1,369 tokens spent 3 min each clustering 80 images per r
OTS_MAX_IMAGES = 16
#: the generation recipe of the Stable Diffusion stage, cut
DIFFUSION = {"steps": 2, "img_size": 64, "dtype": "float32", "device": "cpu", "gpus": 0, "threads": 1}
CLASS_NAME_FORMATS = (".txt", ".json", ".py")
#: the recipe: optimiser steps per run = epochs x ceil(train / (batch x accum))
RECIPE = {"epochs": 2, "batch_size": 4, "num_workers": 0}
#: throughput batch 1: the measurement's 15 forward passes (5 untimed, 10
#: timed) cost 15 images, not 60 (at 448 px as much as the evaluation itself)
EVALUATE = {"batch_size": 16, "throughput_batch": 1}
#: selections that never read the validations before the last epoch
LAST_SELECTIONS = ("last", "last_ema")
#: the repository (detection config paths are relative to it)
REPO_ROOT = Path(__file__).resolve().parents[3]
#: the mmdet base config of the ViT-Adapter Mask R-CNN: a detection config is
#: covered when its ``_base_`` chain reaches it
DETECTION_BASE = "config/detection/_base_/vit_adapter_mask_rcnn.py"
#: images per split of the COCO 2017 stand-in (each split has one more image, without annotations)
DETECTION_SPLITS = {"train": 4, "val": 4}
#: each size's run: batch, minutes, MB (one CPU thread, no GPU)
DETECTION_RUN = {"batch_size": 2, "runtime": 20, "mem_mb": 3000}
DETECTION_BENCHMARK = {"batch_size": 1, "runs": 3, "warmup": 1}
#: the scale of the stand-in pipelines against the study's (COCO images / 8 are the stand-in's)
DETECTION_SCALE = 0.1


class RehearsalError(ValueError):
    """A config the stand-ins do not cover; the message names the key."""


def rehearsal_results(results: str) -> str:
    """Where a rehearsal of a study writing to `results` writes."""
    return f"{results.rstrip('/')}-rehearsal"


def standin_width(model: str, model_kwargs: dict) -> tuple[int, int]:
    """(embed_dim, num_heads) of the stand-in of timm `model` (16-32 wide,
    wider stand-ins for wider models, so the capacity axis keeps its order)."""
    real = _real_width(model, model_kwargs)
    return next(standin for bound, standin in WIDTHS if real <= bound)


def _real_width(model: str, model_kwargs: dict) -> int:
    real = model_kwargs.get("embed_dim")
    if real is None:
        arch = model.partition(".")[0]
        real = next((w for size, w in SIZE_WIDTHS.items() if f"_{size}_" in f"_{arch}_"), 768)
    return int(real)


def study_standin_widths(backbones: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """(embed_dim, num_heads) of each backbone's stand-in, ranked within the
    study: the study's narrowest real width gets the narrowest stand-in
    (:data:`WIDTHS`: 16 / 1 head), the next wider one 24 / 2 heads, every wider
    one 32 / 2 heads. The capacity axis keeps its order (which-tokens and ATC:
    tiny / small / base -> 16 / 24 / 32, as :func:`standin_width`), and a study
    of one width (CLCA: two base models at 448 px, 785 tokens) gets the 16-wide
    stand-in: one head, half the attention of two."""
    real = {name: _real_width(spec["model"], dict(spec.get("model_kwargs") or {})) for name, spec in backbones.items()}
    ranks = {w: i for i, w in enumerate(sorted(set(real.values())))}
    standins = [standin for _, standin in WIDTHS]
    return {name: standins[min(ranks[w], len(standins) - 1)] for name, w in real.items()}


def standin_splits(widest: int) -> dict[str, int]:
    """Images per split of a study's stand-in data sets whose widest stand-in
    is `widest` wide: val and test hold 2 x `widest` + 16 images (more than two
    stand-in widths together, as the CCA of the analysis needs: 80 at 32 wide,
    48 at 16), train and train_val as :data:`SPLIT_SIZES`."""
    pattern_images = 2 * int(widest) + PATTERN_IMAGES_SLACK
    return {**SPLIT_SIZES, "val": pattern_images, "test": pattern_images}


def _check_family(key: str, model: str) -> None:
    if not model.startswith(BACKBONE_FAMILIES):
        raise RehearsalError(
            f"{key}: rehearsal stand-ins cover the timm families {', '.join(f + '*' for f in BACKBONE_FAMILIES)}; "
            f"{model!r} is not one of them"
        )


def _cut_recipe(recipe: dict) -> dict:
    """A recipe cut to a few steps (warm-up / cool-down kept, one epoch each,
    where the study has them). A recipe that keeps the last weights
    (``select_weights`` last / last_ema) validates only after its last epoch
    (``val_every_epochs``): no earlier validation is read; ``best`` keeps
    validating every epoch, so its selection compares epochs."""
    out = dict(recipe)
    out.update(RECIPE)
    if recipe.get("warmup_epochs"):
        out["warmup_epochs"] = 1
    if recipe.get("cooldown_epochs"):
        out["cooldown_epochs"] = 1
    if recipe.get("max_steps"):
        out["max_steps"] = None
    if recipe.get("select_weights") in LAST_SELECTIONS:
        out["val_every_epochs"] = out["epochs"] + int(out.get("cooldown_epochs") or 0)
    return out


def standin_dataset_root(results: str, name: str) -> str:
    return f"{results}/standins/data/{name}"


def standin_weights_path(results: str, backbone: str) -> str:
    return f"{results}/standins/weights/{backbone}.pth"


def _restrict_datasets(cfg: dict[str, Any], only: list[str]) -> None:
    """Keep the datasets `only` (``rehearse_datasets``): the experiments list
    just these, experiments left with none are dropped."""
    unknown = [d for d in only if d not in cfg["datasets"]]
    if unknown:
        raise RehearsalError(f"rehearse_datasets: {unknown} are not keys of datasets ({', '.join(cfg['datasets'])})")
    experiments = []
    for exp in cfg["experiments"]:
        kept = [d for d in exp["datasets"] if d in only]
        if kept:
            experiments.append({**exp, "datasets": kept})
    if not experiments:
        raise RehearsalError(f"rehearse_datasets: no experiment uses {only}")
    cfg["experiments"] = experiments
    cfg["datasets"] = {name: spec for name, spec in cfg["datasets"].items() if name in only}


def _standin_ots(cfg: dict[str, Any], results: str, presets: Optional[dict[str, dict]], plan: list) -> None:
    """The off-the-shelf sweeps on narrow backbones: each preset's weights
    generated in its family's real format (AugReg: timm layout through timm's
    pretrained loading, or the configured local file's timm layout; SWAG: the
    ``*_in1k.torch`` state dict; MAE: the release's ``{"model": state}``)."""
    ots = cfg["ots"]
    real_max = ots.get("max_images")
    ots.update(batch_size=16, num_workers=0, max_images=min(real_max or OTS_MAX_IMAGES, OTS_MAX_IMAGES))
    if ots.get("throughput_batch"):
        ots["throughput_batch"] = EVALUATE["throughput_batch"]
    for name, spec in (ots.get("backbones") or {}).items():
        if "pretrain" in spec:
            continue  # the DAG's own pretrained backbone
        key = f"ots.backbones.{name}"
        preset = (presets or {}).get(spec.get("preset"))
        if preset is None:
            raise RehearsalError(f"{key}.preset: no stand-in for preset {spec.get('preset')!r} "
                                 f"(tokenreduction.ots.PRESETS could not be read, or has no such preset)")
        family = preset.get("family")
        kwargs = dict(preset.get("model_kwargs") or {})
        if spec.get("img_size") and "img_size" in kwargs:
            kwargs["img_size"] = int(spec["img_size"])
        dim, heads = standin_width(preset["model"], {})
        kwargs.update(embed_dim=dim, num_heads=heads)
        path = f"{results}/standins/weights/ots-{name}" + (".torch" if family == "swag" else ".pth")
        if family in ("augreg", "mae") and not spec.get("checkpoint"):
            # timm's pretrained tag, loaded by timm from the generated file
            weights_kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
            plan.append({"what": "timm_weights", "model": preset["timm_weights"], "model_kwargs": weights_kwargs, "path": path})
            kwargs["pretrained_cfg_overlay"] = {"file": path, "source": ""}
        elif family in ("augreg", "swag", "mae"):
            what = {"augreg": "timm_weights", "swag": "swag_weights", "mae": "mae_weights"}[family]
            plan.append({"what": what, "model": preset["model"], "model_kwargs": dict(kwargs), "path": path})
            spec["checkpoint"] = path
        else:
            raise RehearsalError(f"{key}.preset: rehearsal stand-ins cover the AugReg, SWAG and MAE presets; "
                                 f"not {spec.get('preset')!r} (family {family!r})")
        spec["model_kwargs"] = kwargs


def _standin_diffusion(cfg: dict[str, Any], results: str, plan: list) -> None:
    """Stable Diffusion + FID on stand-ins: the pipeline (a hub name or a
    folder) -> the tiny pipeline of the same layout saved as a folder
    (save_pretrained); the class-names file -> one in the same format naming
    the stand-in's classes (num_classes set to them); clean-fid's Inception
    weights -> a TorchScript file of the same name and interface; the
    generation cut to 2 steps at 64 px on the CPU."""
    diff = cfg["diffusion"]
    if diff.get("enabled") is False:
        return
    if cfg["datasets"].get(diff.get("dataset"), {}).get("kind") in DEMO_KINDS:
        raise RehearsalError("diffusion.dataset: the rehearsal rewrites study configs, whose datasets are real kinds")
    base = f"{results}/standins/diffusion"
    if str(diff.get("pipeline", "tiny")) != "tiny":
        path = f"{base}/pipeline"
        plan.append({"what": "diffusion_pipeline", "model": diff.get("model", "sd15"), "img_size": DIFFUSION["img_size"], "path": path})
        diff["pipeline"] = path
    names = diff.get("class_names")
    if isinstance(names, str):
        suffix = "." + names.rsplit(".", 1)[-1] if "." in names.rsplit("/", 1)[-1] else ""
        if suffix not in CLASS_NAME_FORMATS:
            raise RehearsalError(f"diffusion.class_names: stand-ins cover {', '.join(CLASS_NAME_FORMATS)} files; not {names!r}")
        path = f"{base}/class_names{suffix}"
        plan.append({"what": "class_names", "count": STANDIN_CLASSES, "path": path})
        diff["class_names"] = path
    elif isinstance(names, list):
        diff["class_names"] = names[:STANDIN_CLASSES]
    diff["num_classes"] = min(int(diff.get("num_classes") or STANDIN_CLASSES), STANDIN_CLASSES)
    diff.update(DIFFUSION)
    fid = dict(diff.get("fid") or {})
    if fid.get("feature_extractor", "inception") == "inception":
        path = f"{base}/inception/inception-2015-12-05.pt"
        plan.append({"what": "inception_weights", "path": path})
        fid["inception_weights"] = path
    diff["fid"] = fid


def _literal(node: ast.AST, names: dict[str, Any]) -> Any:
    """The value of a plain mmengine config expression: constants, lists,
    tuples, dicts, ``dict(...)``, ``[x] * n`` and names assigned before."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e, names) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {_literal(k, names): _literal(v, names) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name) and node.id in names:
        return copy.deepcopy(names[node.id])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value, names) for kw in node.keywords}
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _literal(node.left, names) * _literal(node.right, names)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_literal(node.operand, names)
    raise ValueError(ast.dump(node)[:80])


def detection_config_chain(config: str, key: str) -> list[tuple[Path, dict[str, Any]]]:
    """(file, its plain top-level values) of an mmdet config and its local
    ``_base_`` files, the config first (read with ast: nothing is run).
    ``mmdet::`` bases are mmdet's own and are not read."""
    todo = [Path(config) if Path(config).is_absolute() else REPO_ROOT / config]
    chain = []
    while todo:
        path = todo.pop(0)
        try:
            tree = ast.parse(path.read_text())
        except (OSError, SyntaxError) as err:
            raise RehearsalError(f"{key}: cannot read the mmdet config {path}: {err}") from None
        names: dict[str, Any] = {}
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                try:
                    names[stmt.targets[0].id] = _literal(stmt.value, names)
                except (ValueError, TypeError, KeyError):
                    pass
        chain.append((path.resolve(), names))
        bases = names.get("_base_") or []
        todo.extend(path.parent / b for b in ([bases] if isinstance(bases, str) else bases) if "::" not in b)
    return chain


def _scaled(value: Any, factor: float, sizes: bool = False) -> Any:
    """`value` with every image size (under ``scale``, ``scales``, ``crop_size``) times `factor`."""
    if isinstance(value, dict):
        return {k: _scaled(v, factor, sizes or k in ("scale", "scales", "crop_size")) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scaled(v, factor, sizes) for v in value)
    if sizes and isinstance(value, int) and not isinstance(value, bool):
        return max(8, round(value * factor))
    return value


#: mmdet's COCO instance test pipeline (``_base_/datasets/coco_instance.py``), which the study's configs keep
MMDET_COCO_TEST_PIPELINE = [
    {"type": "LoadImageFromFile"},
    {"type": "Resize", "scale": (1333, 800), "keep_ratio": True},
    {"type": "LoadAnnotations", "with_bbox": True, "with_mask": True},
    {"type": "PackDetInputs", "meta_keys": ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")},
]


def detection_standin_config_text(config: str, key: str) -> str:
    """The stand-in mmdet config of the study's `config` (a ViT-Adapter Mask
    R-CNN config): ``_base_`` is the study's file, and it changes only

    * the widths: the ViT-Adapter at the stand-in width of its ``embed_dim``
      (:func:`standin_width`; depth, patch size, position embedding,
      interactions and merging locations are the study's), SPM, FPN and heads
      16-32 channels (COCO's 80 classes kept);
    * the image scale: the study's train pipeline and mmdet's test pipeline
      with every size times :data:`DETECTION_SCALE`;
    * the schedule: 1 epoch (validation after it, as the study's), no loader workers;
    * the optimiser wrapper: fp32 (mmengine's AMP wrapper needs a GPU), the
      study's constructor, optimiser, layer decay and accumulation.

    Raises RehearsalError naming `key` for a config outside the ViT-Adapter family."""
    chain = detection_config_chain(config, key)
    if (REPO_ROOT / DETECTION_BASE).resolve() not in [path for path, _ in chain]:
        raise RehearsalError(
            f"{key}: rehearsal stand-ins cover the ViT-Adapter Mask R-CNN configs (whose _base_ chain reaches "
            f"{DETECTION_BASE}); not {config}"
        )
    values: dict[str, Any] = {}
    for _, names in reversed(chain):  # the config's own values over its bases'
        values.update(names)
    real_dim = next((names["model"]["backbone"]["embed_dim"] for _, names in chain
                     if isinstance(names.get("model", {}).get("backbone", {}).get("embed_dim"), int)), None)
    if real_dim is None or "train_pipeline" not in values:
        raise RehearsalError(f"{key}: {config} sets no plain model.backbone.embed_dim or train_pipeline the stand-in can narrow")
    dim, heads = standin_width("", {"embed_dim": real_dim})
    model = {
        "backbone": {"embed_dim": dim, "num_heads": heads, "deform_num_heads": dim // 8, "conv_inplane": 8},
        "neck": {"in_channels": [dim] * 4, "out_channels": 16},
        "rpn_head": {"in_channels": 16, "feat_channels": 16},
        "roi_head": {
            "bbox_roi_extractor": {"out_channels": 16}, "bbox_head": {"in_channels": 16, "fc_out_channels": 32},
            "mask_roi_extractor": {"out_channels": 16}, "mask_head": {"in_channels": 16, "conv_out_channels": 16},
        },
    }
    train_pipeline = _scaled(values["train_pipeline"], DETECTION_SCALE)
    test_pipeline = _scaled(values.get("test_pipeline", MMDET_COCO_TEST_PIPELINE), DETECTION_SCALE)
    loop = dict(values.get("train_cfg") or {})
    train_cfg = {"max_iters": 2, "val_interval": 2} if "max_iters" in loop else {"max_epochs": 1, "val_interval": 1}
    loader = {"num_workers": 0, "persistent_workers": False}
    lines = [
        f"# Rehearsal stand-in of {config} (tokenreduction.rehearsal.standin.detection_standin_config_text):",
        "# the study's config, narrowed, at 1/10 image scale, 1 epoch, fp32 on the CPU.",
        f"_base_ = [{str(chain[0][0])!r}]",
        f"model = {model!r}",
        f"train_pipeline = {train_pipeline!r}",
        f"test_pipeline = {test_pipeline!r}",
        f"train_dataloader = {dict(loader, dataset={'pipeline': train_pipeline})!r}",
        f"val_dataloader = {dict(loader, dataset={'pipeline': test_pipeline})!r}",
        f"test_dataloader = {dict(loader, dataset={'pipeline': test_pipeline})!r}",
        f"train_cfg = {train_cfg!r}",
    ]
    wrapper = values.get("optim_wrapper") or {}
    if wrapper.get("type") == "AmpOptimWrapper":
        kept = [k for k in ("constructor", "optimizer", "paramwise_cfg", "clip_grad", "accumulative_counts") if k in wrapper]
        lines.append("optim_wrapper = dict(_delete_=True, type='OptimWrapper', "
                     + ", ".join(f"{k}={{{{_base_.optim_wrapper.{k}}}}}" for k in kept) + ")")
    return "\n".join(lines) + "\n"


def _standin_detection(cfg: dict[str, Any], results: str, plan: list) -> None:
    """Detection on stand-ins: ``data_root`` -> COCO 2017 instances in their
    layout; each size's ``config`` -> its stand-in config
    (:func:`detection_standin_config_text`, absolute path: the rules take
    configs and checkpoints from the repository); ``load_from`` -> a
    ViT-Adapter 3x checkpoint of the stand-in model in mmdet's format, written
    by the detection environment; batch 2, CPU, 1 thread, benchmark cut."""
    det = cfg["detection"]
    if det.get("enabled") is False or not det.get("sizes"):
        return
    base = os.path.abspath(f"{results}/standins")
    if det.get("data_root"):  # null: the demo shapes set, made by the DAG
        root = f"{results}/standins/data/coco2017"
        plan.append({"what": "coco_instances", "path": root, "splits": dict(DETECTION_SPLITS)})
        det["data_root"] = root
    python = str(det.get("python") or ".venv-mmdet/bin/python")
    if "/" in python and not os.path.isabs(os.path.expanduser(python)):
        python = str(REPO_ROOT / python)
    for size, spec in det["sizes"].items():
        key = f"detection.sizes.{size}"
        if spec.get("pretrained"):
            raise RehearsalError(f"{key}.pretrained: no stand-in for a DeiT/ViT checkpoint of the backbone's ViT part "
                                 "(rehearsal stand-ins cover load_from, a ViT-Adapter detector checkpoint)")
        text = detection_standin_config_text(spec["config"], f"{key}.config")
        config_path = f"{base}/detection/{size}.py"
        plan.append({"what": "detection_config", "path": config_path, "text": text})
        spec["config"] = config_path
        if spec.get("load_from"):
            path = f"{base}/weights/detection-{size}.pth"
            plan.append({"what": "detection_checkpoint", "path": path, "config": config_path, "python": python,
                         "config_sha": hashlib.sha256(text.encode()).hexdigest()[:16]})
            spec["load_from"] = path
        spec.update(DETECTION_RUN)
    det.update(gpus_per_train_job=0, gpus_per_eval_job=0, threads_per_job=1, benchmark=dict(DETECTION_BENCHMARK))


def standin_config(
    config: dict[str, Any], ots_presets: Optional[dict[str, dict]] = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the rehearsal's config, the stand-ins to fabricate) of a study config.
    `ots_presets`: tokenreduction.config_validation.ots_presets() (needed
    when the config has an ``ots`` section).

    Each stand-in is a dict with ``what`` (``dataset``, ``timm_weights``,
    ``swag_weights``, ``mae_weights``, ``diffusion_pipeline``, ``class_names``,
    ``inception_weights``, ``coco_instances``, ``detection_config`` or
    ``detection_checkpoint``), ``path`` and what its writer needs; :func:`standin_fingerprint` names it.
    Raises RehearsalError naming the first uncovered key."""
    cfg = copy.deepcopy(config)
    cfg.pop("rehearse", None)
    only = cfg.pop("rehearse_datasets", None)
    if only:
        _restrict_datasets(cfg, list(only))
    for section in UNCOVERED_SECTIONS:
        if section in cfg and not (isinstance(cfg[section], dict) and cfg[section].get("enabled") is False):
            raise RehearsalError(
                f"{section}: the rehearsal has no stand-ins for this section yet "
                f"(it covers datasets, backbones, the fine-tuning and MAE grids, off-the-shelf sweeps, Stable Diffusion + FID, detection, evaluation, analysis, summary and report)"
            )
    results = rehearsal_results(cfg["results"])
    cfg["results"] = results
    plan: list[dict[str, Any]] = []
    for name, spec in cfg["backbones"].items():
        _check_family(f"backbones.{name}.model", spec["model"])
    widths = study_standin_widths(cfg["backbones"])
    splits = standin_splits(max(dim for dim, _ in widths.values()))

    for name, spec in cfg["datasets"].items():
        kind = spec.get("kind")
        if kind in DEMO_KINDS:
            continue
        if kind not in STANDIN_KINDS:
            raise RehearsalError(
                f"datasets.{name}.kind: rehearsal stand-ins cover {', '.join(STANDIN_KINDS + DEMO_KINDS)}; not {kind!r}"
            )
        root = standin_dataset_root(results, name)
        spec["root"] = root
        if spec.get("recipe"):
            spec["recipe"] = {k: v for k, v in spec["recipe"].items() if k not in RECIPE and k != "max_steps"}
        plan.append({"what": "dataset", "kind": kind, "path": root, "splits": dict(splits)})

    for name, spec in cfg["backbones"].items():
        kwargs = dict(spec.get("model_kwargs") or {})
        dim, heads = widths[name]
        kwargs.update(embed_dim=dim, num_heads=heads)
        init = spec["init"]
        if init == "timm":
            path = standin_weights_path(results, name)
            # timm's own pretrained loading (filter, position-embedding resampling,
            # head removal) reads the generated file instead of downloading
            kwargs["pretrained_cfg_overlay"] = {"file": path, "source": ""}
            weights_kwargs = {k: v for k, v in kwargs.items() if k not in ("img_size", "pretrained_cfg_overlay")}
            plan.append({"what": "timm_weights", "model": spec["model"], "model_kwargs": weights_kwargs, "path": path})
        elif init != "pretrain":
            raise RehearsalError(
                f"backbones.{name}.init: rehearsal stand-ins cover init timm and pretrain; "
                f"no stand-in for the checkpoint file {init!r} (its format is not known)"
            )
        spec["model_kwargs"] = kwargs

    if cfg.get("ots"):
        _standin_ots(cfg, results, ots_presets, plan)
    if cfg.get("diffusion"):
        _standin_diffusion(cfg, results, plan)
    if cfg.get("detection"):
        _standin_detection(cfg, results, plan)
    cfg["finetune"] = _cut_recipe(cfg.get("finetune") or {})
    if cfg.get("mae"):
        # the MAE fine-tuning grid: its recipe (over finetune) cut alike
        cfg["mae"] = {**cfg["mae"], "recipe": _cut_recipe(cfg["mae"].get("recipe") or {})}
    evaluate = dict(cfg.get("evaluate") or {})
    evaluate.update(EVALUATE)
    val_images = min(splits["val"], splits["test"])
    evaluate["num_pattern_images"] = min(int(evaluate.get("num_pattern_images", val_images)), val_images)
    cfg["evaluate"] = evaluate
    resources = dict(cfg.get("resources") or {})
    resources.update(gpus_per_train_job=0, gpus_per_eval_job=0, threads_per_job=1)
    cfg["resources"] = resources
    cfg["wandb_project"] = None
    for item in plan:
        item["fingerprint"] = standin_fingerprint(item)
    return cfg, plan


def standin_fingerprint(item: dict[str, Any]) -> str:
    """A short hash of what a stand-in holds (its writer's inputs): a stand-in
    whose stamp carries it is up to date."""
    from_item = {k: v for k, v in item.items() if k != "fingerprint"}
    from_item["format_version"] = 1
    return hashlib.sha256(json.dumps(from_item, sort_keys=True).encode()).hexdigest()[:16]


#: the stamp a written stand-in carries (in a data set's root; beside a weights file)
STAMP = ".standin.json"
#: stand-ins that are folders (stamped inside)
DIRECTORY_STANDINS = ("dataset", "coco_instances")


def stamp_path(item: dict[str, Any]) -> str:
    path = item["path"].rstrip("/")
    return f"{path}/{STAMP}" if item["what"] in DIRECTORY_STANDINS else f"{path}{STAMP}"


def is_current(item: dict[str, Any]) -> bool:
    """Whether the stand-in of a plan item is written and stamped with its fingerprint."""
    try:
        with open(stamp_path(item)) as f:
            return json.load(f).get("fingerprint") == item["fingerprint"]
    except (OSError, ValueError):
        return False
