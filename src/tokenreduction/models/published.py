"""Parameter names of published reduced-model checkpoints -> this library's.

The backbones of every published checkpoint below use timm's names (timm
0.4.12 for "Which Tokens to Use?" (TokenReduction), ATC and EViT, timm
0.9.12 for CLCA), which :func:`~tokenreduction.models.vit.load_checkpoint`
reads unchanged. What differs is where the learned parts live:

* **TokenReduction and CLCA reduced models** keep one learned module per
  reduction stage in a top-level ``nn.ModuleList``; here the module of stage
  s is ``blocks.<reduction_loc[s]>.reduction``:

  ==========  =====================================  ==========================================
  method      reference (stage s)                    here
  ==========  =====================================  ==========================================
  dynamicvit  ``score_predictor.s.{in,out}_conv.*``  ``blocks.L.reduction.predictor.{in,out}_conv.*``
  sit         ``cluster_layers.s.weight.{0,1,3}.*``  ``blocks.L.reduction.mlp.{0,1,3}.*``
  sit         ``cluster_layers.s.scale`` (1, 1, 1)   ``blocks.L.reduction.scale`` (1,)
  patchmerger ``cluster_layers.s.{norm.*,queries}``  ``blocks.L.reduction.{norm.*,queries}``
  sinkhorn    ``cluster_layers.s.v``                 ``blocks.L.reduction.centres``
  dpcknn      ``cluster_layers.s.score.*``           ``blocks.L.reduction.score.*``
  ==========  =====================================  ==========================================

* **CLCA**: the CLA head ``ifa_head.0.*`` -> ``clca.head.*``; the carrier
  tokens ``clr`` (1, N, D) -> ``clca.carriers``; the carriers' positional
  embeddings, which the reference appends to ``pos_embed`` (1, P + T + N, D),
  -> ``clca.carrier_pos`` (on models without a class-token position, DeiT-III,
  the reference gives carriers none: zeros here); the reference's unused
  ``head.*`` Linear beside the CLA head is dropped.

* EViT, ATC, ToMe, Top-K, ATS, K-Medoids and the other parameter-free methods
  have nothing to map.

:func:`convert_published` applies these to a state dict for a given patched
model; a checkpoint whose learned modules belong to another method, another
number of stages or a model without CLCA is one ValueError naming the keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn


@dataclass(frozen=True)
class StageLayout:
    """Where a reference keeps one method's learned modules: entry s of the
    top-level ModuleList `container` is reduction stage s. `renames` map a
    name inside the entry to ours inside ``blocks.<loc>.reduction`` (a
    prefix when it ends with "." , else the exact name); `reshape` names ours
    whose reference tensor holds the same values in another shape."""

    container: str
    renames: tuple[tuple[str, str], ...]
    reshape: tuple[str, ...] = ()

    def rename(self, name: str) -> Optional[str]:
        for ref, ours in self.renames:
            if ref.endswith("."):
                if name.startswith(ref):
                    return ours + name[len(ref):]
            elif name == ref:
                return ours
        return None


#: TokenReduction's models/*.py and CLCA's models/*.py name them alike
STAGE_LAYOUTS: dict[str, StageLayout] = {
    "dynamicvit": StageLayout("score_predictor", (("in_conv.", "predictor.in_conv."), ("out_conv.", "predictor.out_conv."))),
    "sit": StageLayout("cluster_layers", (("weight.", "mlp."), ("scale", "scale")), reshape=("scale",)),
    "patchmerger": StageLayout("cluster_layers", (("norm.", "norm."), ("queries", "queries"))),
    "sinkhorn": StageLayout("cluster_layers", (("v", "centres"),)),
    "dpcknn": StageLayout("cluster_layers", (("score.", "score."),)),
}
_CONTAINERS = frozenset(layout.container for layout in STAGE_LAYOUTS.values())
#: CLCA's head without depthwise groups: Sequential(Linear(L, 1), Rearrange, ReLU, LayerNorm, Linear, Rearrange)
_CLA_HEAD_NO_GROUPS = {"0": "mix", "3": "net.1", "4": "net.2"}


def convert_published(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """`state` with the published layouts' names turned into `model`'s (a
    model from :func:`~tokenreduction.models.vit.create_model`); keys of no
    published layout pass through. Call before timm's ``checkpoint_filter_fn``
    (CLCA's longer ``pos_embed`` is split here)."""
    state = _map_stage_modules(state, model)
    return _map_clca(state, model)


def _map_stage_modules(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    ref_keys = [k for k in state if k.split(".", 1)[0] in _CONTAINERS]
    if not ref_keys:
        return state
    config = getattr(model, "reduction_config", None) or {}
    method = config.get("method")
    layout = STAGE_LAYOUTS.get(method)
    containers = sorted({k.split(".", 1)[0] for k in ref_keys})
    if layout is None or containers != [layout.container]:
        owners = sorted(m for m, lay in STAGE_LAYOUTS.items() if lay.container in containers)
        raise ValueError(
            f"the checkpoint holds learned reduction modules {ref_keys[:3]} ({len(ref_keys)} keys under "
            f"{', '.join(containers)}: the TokenReduction/CLCA layout of {', '.join(owners)}), but the model's "
            f"method is {method!r}; build the model with the method, keep_rate and reduction_loc it was trained with"
        )
    locs = list(config["reduction_loc"])
    out = {k: v for k, v in state.items() if k not in set(ref_keys)}
    own = model.state_dict()
    bad = []
    for key in ref_keys:
        parts = key.split(".", 2)
        if len(parts) < 3 or not parts[1].isdigit():
            bad.append(key)
            continue
        stage, name = int(parts[1]), layout.rename(parts[2])
        if stage >= len(locs):
            raise ValueError(
                f"checkpoint key {key} belongs to reduction stage {stage}, but the model reduces at "
                f"{len(locs)} locations {locs}; build it with the checkpoint's reduction_loc"
            )
        if name is None:
            bad.append(key)
            continue
        target = f"blocks.{locs[stage]}.reduction.{name}"
        value = state[key]
        if name in layout.reshape and target in own and value.numel() == own[target].numel():
            value = value.reshape(own[target].shape)
        out[target] = value
    if bad:
        fits = [m for m, lay in STAGE_LAYOUTS.items() if m != method and lay.container == layout.container
                and all(lay.rename(k.split(".", 2)[-1]) is not None for k in ref_keys)]
        which = f"the TokenReduction/CLCA layout of {', '.join(fits)}" if fits else "no method's layout"
        raise ValueError(
            f"the checkpoint's learned reduction modules {bad[:3]} ({len(bad)} keys under {layout.container}) "
            f"match {which}, not the model's method {method!r}; build the model with the method, keep_rate "
            "and reduction_loc it was trained with"
        )
    return out


def _map_clca(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    has_ref = "clr" in state or any(k.startswith("ifa_head.") for k in state)
    if not has_ref:
        return state
    clca = getattr(model, "clca", None)
    if clca is None:
        found = [k for k in state if k == "clr" or k.startswith("ifa_head.")]
        raise ValueError(
            f"the checkpoint holds CLCA's {found[:3]} (CLA head / carrier tokens), but the model has no CLCA; "
            "build it with clca=dict(ifa_head=..., clc=..., num_clr=...) as it was trained"
        )
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith("ifa_head.0.") and clca.head is not None:
            index, name = key[len("ifa_head.0."):].split(".", 1)
            sub = f"net.{index}" if clca.head.groups else _CLA_HEAD_NO_GROUPS.get(index)
            if sub is None:
                raise ValueError(f"checkpoint key {key} is not part of CLCA's CLA head (without groups)")
            out[f"clca.head.{sub}.{name}"] = value
        elif key == "clr":
            out["clca.carriers"] = value
        elif key.startswith("head.") and clca.head is not None:
            continue  # the reference keeps its (unused) Linear head beside the CLA head
        else:
            out[key] = value
    if "clr" in state and clca.num_clr:
        n = int(state["clr"].shape[1])
        if getattr(model, "no_embed_class", False):
            out["clca.carrier_pos"] = torch.zeros_like(clca.carrier_pos)  # the reference adds none
        elif "pos_embed" in out and out["pos_embed"].shape[1] > n:
            pos = out["pos_embed"]
            out["pos_embed"], out["clca.carrier_pos"] = pos[:, :-n], pos[:, -n:]
    return out


__all__ = ["STAGE_LAYOUTS", "StageLayout", "convert_published"]
