"""Pretrained backbones of the off-the-shelf study, as the ATC/ToMe code takes them.

A :class:`BackbonePreset` names the timm architecture, the input resolution,
the evaluation crop (resize the shorter side to ``img_size / crop_pct``, then
centre-crop), the normalisation, and whether ToMe-style proportional
attention applies. Proportional attention is on for the timm (AugReg) and SWAG
families and off for MAE, as ToMe's ``patch/timm.py``, ``patch/swag.py`` and
``patch/mae.py`` set it (MAE's global average pooling already weights merged
tokens by size, see ``ReducedViTMixin.pool``).

Weights come from:

``augreg``  timm's pretrained tags (``vit_*_patch16_224.augreg_in21k_ft_in1k``),
            or a local file in timm layout.
``swag``    a local SWAG checkpoint (the ``*_in1k.torch`` files that SWAG's
            ``torch.hub`` entry points download, or torchvision's
            ``IMAGENET1K_SWAG_E2E_V1`` files): timm has no SWAG ViT weights, so
            the timm VisionTransformer of the right size is built and the state
            dict converted by :func:`convert_swag_state_dict`.
``mae``     a local MAE checkpoint in the release format (``{"model": state}``,
            MAE key names, ``fc_norm`` + global average pooling): the
            fine-tuned ``mae_finetuned_vit_{base,large,huge}.pth`` for
            evaluation; without a file, timm's ``vit_*_patch16_224.mae``
            (pre-training weights, no classifier: a start for fine-tuning only).
``trained`` a ``final.pth`` written by this project's trainer (the demo's own
            pretrained backbone).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..models.budget import r_schedule
from ..safe_load import load_checkpoint_file

PathLike = Union[str, Path]
FAMILIES = ("augreg", "swag", "mae", "trained", "timm")
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackbonePreset:
    """How one pretrained backbone is built and fed.

    ``model`` is the timm architecture; ``timm_weights`` the timm name with a
    pretrained tag (None: weights from ``checkpoint``); ``model_kwargs`` go to
    ``timm.create_model`` (image size, global pool). ``r_values`` is the
    study's r sweep for this backbone, the largest r that still leaves tokens
    at every block under the constant schedule.
    """

    name: str
    family: str
    model: str
    img_size: int
    crop_pct: float
    prop_attn: bool
    depth: int
    patch_size: int
    timm_weights: Optional[str] = None
    checkpoint: Optional[str] = None
    num_classes: int = 1000
    mean: tuple = tuple(IMAGENET_DEFAULT_MEAN)
    std: tuple = tuple(IMAGENET_DEFAULT_STD)
    interpolation: str = "bicubic"
    model_kwargs: dict = field(default_factory=dict)
    r_values: tuple = ()

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def with_checkpoint(self, checkpoint: Optional[PathLike]) -> "BackbonePreset":
        return replace(self, checkpoint=None if checkpoint is None else str(checkpoint))


def _augreg(name: str, size: str, depth: int, img_size: int, r_values: Sequence[int]) -> BackbonePreset:
    arch = f"vit_{size}_patch16_{img_size}"
    return BackbonePreset(
        name=name, family="augreg", model=arch, img_size=img_size, crop_pct=0.875, prop_attn=True,
        depth=depth, patch_size=16, timm_weights=f"{arch}.augreg_in21k_ft_in1k",
        mean=INCEPTION_MEAN, std=INCEPTION_STD, r_values=tuple(r_values),
    )


def _swag(name: str, arch: str, depth: int, patch: int, img_size: int, r_values: Sequence[int]) -> BackbonePreset:
    # SWAG evaluates with a bicubic resize to img_size and a centre crop of the same size
    return BackbonePreset(
        name=name, family="swag", model=arch, img_size=img_size, crop_pct=1.0, prop_attn=True, depth=depth,
        patch_size=patch, model_kwargs={"img_size": img_size}, r_values=tuple(r_values),
    )


def _mae(name: str, arch: str, depth: int, patch: int, r_values: Sequence[int]) -> BackbonePreset:
    return BackbonePreset(
        name=name, family="mae", model=arch, img_size=224, crop_pct=0.875, prop_attn=False, depth=depth,
        patch_size=patch, timm_weights=f"{arch}.mae", model_kwargs={"global_pool": "avg"}, r_values=tuple(r_values),
    )


#: the backbones of the ATC off-the-shelf study (REFERENCES 2.3), with its r sweeps
PRESETS: dict[str, BackbonePreset] = {
    p.name: p
    for p in (
        _augreg("augreg_tiny", "tiny", 12, 224, range(0, 17, 2)),
        _augreg("augreg_small", "small", 12, 224, range(0, 17, 2)),
        _augreg("augreg_base", "base", 12, 224, range(0, 17, 2)),
        _augreg("augreg_large", "large", 24, 224, range(0, 9)),
        _augreg("augreg_large_384", "large", 24, 384, (0, 5, 10, 15, 20, 23)),
        _swag("swag_b16", "vit_base_patch16_384", 12, 16, 384, range(0, 46, 5)),
        _swag("swag_l16", "vit_large_patch16_384", 24, 16, 512, range(0, 41, 5)),
        _swag("swag_h14", "vit_huge_patch14_224", 32, 14, 518, range(0, 41, 5)),
        _mae("mae_base", "vit_base_patch16_224", 12, 16, range(0, 17, 2)),
        _mae("mae_large", "vit_large_patch16_224", 24, 16, range(0, 9)),
        _mae("mae_huge", "vit_huge_patch14_224", 32, 14, range(0, 8)),
    )
}


def get_preset(name: str, checkpoint: Optional[PathLike] = None, **overrides: Any) -> BackbonePreset:
    """The preset `name` (a key of :data:`PRESETS`), with `checkpoint` and any
    field overrides (img_size, crop_pct, prop_attn, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; known presets: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(BackbonePreset.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown preset field(s) {unknown}")
    preset = replace(PRESETS[name], **overrides)
    if "img_size" in overrides and preset.model_kwargs.get("img_size") is not None:
        preset = replace(preset, model_kwargs={**preset.model_kwargs, "img_size": int(overrides["img_size"])})
    return preset.with_checkpoint(checkpoint) if checkpoint is not None else preset


def trained_preset(checkpoint: PathLike, name: Optional[str] = None, prop_attn: bool = True,
                   crop_pct: float = 0.875) -> BackbonePreset:
    """A preset for a ``final.pth`` of this project's trainer: architecture,
    image size and classes come from the file's spec (evaluation transform as
    the project's evaluator uses it)."""
    raw = _load(checkpoint)
    if not isinstance(raw, dict) or "spec" not in raw or "model" not in raw:
        raise ValueError(f"{checkpoint} is not a tokenreduction training result (needs keys 'model' and 'spec')")
    spec = raw["spec"]
    kwargs = dict(spec.get("model_kwargs") or {})
    img_size = int(spec.get("img_size") or kwargs.get("img_size") or 224)
    kwargs["img_size"] = img_size
    state = raw["model"]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    return BackbonePreset(
        name=name or Path(checkpoint).parent.name, family="trained", model=spec["model"], img_size=img_size,
        crop_pct=crop_pct, prop_attn=prop_attn, depth=depth, patch_size=patch, checkpoint=str(checkpoint),
        num_classes=int(spec["num_classes"]), model_kwargs=kwargs,
    )


def preset_from_spec(spec: dict[str, Any]) -> BackbonePreset:
    """A preset from a config entry: ``{"name", "preset": <PRESETS key>,
    "checkpoint": path or null, <field overrides>}``, or ``{"name",
    "trained": <final.pth of this project's trainer>}`` (the demo's own
    pretrained backbone). Unknown keys are a ValueError naming them."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if "trained" in spec:
        path = spec.pop("trained")
        extra = sorted(set(spec) - {"prop_attn", "crop_pct"})
        if extra:
            raise ValueError(f"backbone {name!r}: a trained backbone takes only prop_attn and crop_pct, got {extra}")
        return trained_preset(path, name=name, **spec)
    if "preset" not in spec:
        raise ValueError(f"backbone {name!r}: give 'preset' (one of {', '.join(PRESETS)}) or 'trained'")
    preset = get_preset(spec.pop("preset"), checkpoint=spec.pop("checkpoint", None), **spec)
    return replace(preset, name=name) if name else preset


def _load(path: PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return load_checkpoint_file(path, map_location="cpu")  # weights_only, allow-listed types


# ---------------------------------------------------------------- SWAG
_SWAG_LAYER = re.compile(r"^encoder\.layers\.(?:encoder_)?layer_(\d+)\.(.+)$")
_SWAG_BLOCK_KEYS = {
    "ln_1": "norm1",
    "ln_2": "norm2",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj": "attn.proj",
    "mlp.linear_1": "mlp.fc1",
    "mlp.linear_2": "mlp.fc2",
    "mlp.0": "mlp.fc1",  # torchvision >= 0.13 names the MLP layers by index
    "mlp.3": "mlp.fc2",
}
_SWAG_TOP_KEYS = {
    "class_token": "cls_token",
    "conv_proj.weight": "patch_embed.proj.weight",
    "conv_proj.bias": "patch_embed.proj.bias",
    "encoder.ln.weight": "norm.weight",
    "encoder.ln.bias": "norm.bias",
    "head.layers.head.weight": "head.weight",  # SWAG's own VisionTransformerHead
    "head.layers.head.bias": "head.bias",
    "heads.head.weight": "head.weight",  # torchvision
    "heads.head.bias": "head.bias",
}


def convert_swag_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SWAG / torchvision ViT state dict -> timm VisionTransformer names.

    SWAG (``encoder.layers.layer_{i}``) and torchvision
    (``encoder.layers.encoder_layer_{i}``) differ only in the block prefix,
    the MLP names and the position embedding layout: (S, 1, D) in SWAG,
    (1, S, D) in torchvision; timm wants (1, S, D). ``nn.MultiheadAttention``
    packs q, k, v as rows of ``in_proj_weight`` (3D, D) in the order of timm's
    ``qkv`` linear, so the tensors are copied unchanged. A pre-logits layer
    (a representation head timm's ViT does not have) or any other unknown key
    is a ValueError naming it.
    """
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if "encoder.pos_embedding" not in state or "class_token" not in state:
        raise ValueError("not a SWAG/torchvision ViT state dict: no encoder.pos_embedding or class_token")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key == "encoder.pos_embedding":
            pos = value
            if pos.ndim != 3:
                raise ValueError(f"encoder.pos_embedding has shape {tuple(pos.shape)}, expected 3 dims")
            if pos.shape[0] != 1 and pos.shape[1] == 1:  # SWAG: (S, 1, D)
                pos = pos.permute(1, 0, 2)
            out["pos_embed"] = pos.contiguous()
            continue
        if key in _SWAG_TOP_KEYS:
            out[_SWAG_TOP_KEYS[key]] = value
            continue
        m = _SWAG_LAYER.match(key)
        if m:
            index, rest = m.groups()
            for src, dst in _SWAG_BLOCK_KEYS.items():
                if rest == src or rest.startswith(src + "."):
                    out[f"blocks.{index}.{dst}{rest[len(src):]}"] = value
                    break
            else:
                unknown.append(key)
            continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"SWAG checkpoint has {len(unknown)} keys with no timm counterpart, e.g. {unknown[:5]}")
    return out


def load_swag_checkpoint(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a local SWAG/torchvision ViT checkpoint into a timm VisionTransformer
    (converted by :func:`convert_swag_state_dict`; the position embedding is
    resized by timm when the resolution differs). Every weight must match."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    raw = _load(path)
    state = convert_swag_state_dict(raw.get("model", raw) if isinstance(raw, dict) else raw)
    state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in state and key in own and state[key].shape != own[key].shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(state[key].shape)} but the model's is {tuple(own[key].shape)}"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".reduction." not in k]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


# ---------------------------------------------------------------- building
def build_backbone(preset: BackbonePreset, pretrained: Optional[bool] = None) -> nn.Module:
    """The plain (unreduced) timm VisionTransformer of `preset` with its weights,
    in eval mode; :func:`tokenreduction.patch_model` adds a reduction to it.

    Weights: the preset's checkpoint file when set (format by family), else
    timm's pretrained ``timm_weights`` (downloaded by timm, or from its cache);
    ``pretrained=False`` builds random weights (tests)."""
    import timm

    from ..models.vit import load_checkpoint
    from ..train.checkpoint import load_trained_model

    if preset.family not in FAMILIES:
        raise ValueError(f"unknown backbone family {preset.family!r}; use one of {', '.join(FAMILIES)}")
    if preset.family == "trained":
        if preset.checkpoint is None:
            raise ValueError(f"preset {preset.name!r} (trained) needs a checkpoint")
        model, _ = load_trained_model(preset.checkpoint)
        return model.eval()
    use_timm = preset.checkpoint is None and (pretrained if pretrained is not None else True)
    if use_timm and preset.timm_weights is None:
        raise ValueError(
            f"preset {preset.name!r} ({preset.family}) has no timm weights: give a local checkpoint file"
        )
    name = preset.timm_weights if use_timm else preset.model
    model = timm.create_model(name, pretrained=use_timm, num_classes=preset.num_classes, **preset.model_kwargs)
    if preset.checkpoint is not None:
        if preset.family == "swag":
            load_swag_checkpoint(model, preset.checkpoint)
        else:
            load_checkpoint(model, preset.checkpoint)
    depth, patch = len(model.blocks), int(model.patch_embed.patch_size[0])
    if (depth, patch) != (preset.depth, preset.patch_size):
        raise ValueError(f"preset {preset.name!r} says depth {preset.depth}, patch {preset.patch_size}; "
                         f"{name} has {depth}, {patch}")
    return model.eval()


def feasible_r(preset: BackbonePreset, r: Union[int, Sequence[int]], schedule: Union[str, float] = "constant") -> list[int]:
    """Patch tokens left after each block when `r` (with `schedule`) is removed
    ToMe-style; ValueError naming the block and the count where r is too large
    (the check :func:`tokenreduction.patch_model` makes, without a model)."""
    n = preset.num_patches
    left = []
    for block, r_here in enumerate(r_schedule(r, preset.depth, schedule)):
        if r_here >= n:
            raise ValueError(f"r={r_here} at block {block} is too large: only {n} patch tokens are left there")
        n -= r_here
        left.append(n)
    return left


def transform_for(preset: BackbonePreset):
    """The evaluation transform of `preset` (resize, centre crop, normalise)."""
    from ..data import build_transform

    return build_transform(
        False, preset.img_size, "imagefolder", crop_pct=preset.crop_pct, interpolation=preset.interpolation,
        mean=preset.mean, std=preset.std,
    )


__all__ = [
    "BackbonePreset", "PRESETS", "build_backbone", "convert_swag_state_dict", "feasible_r", "get_preset",
    "load_swag_checkpoint", "preset_from_spec", "trained_preset", "transform_for",
]
