"""A diffusion experiment of the workflow config as :func:`apply_patch` keywords.

The config names a variant the way every study section does: ``{method,
the method's options, keep_rate}`` with ``keep_rate`` the fraction of the
tokens *kept* (``method``: none, tome or atc; ATC's option ``linkage``)::

    atc-single-r0.1: {method: atc, linkage: single, keep_rate: 0.9}

:func:`~tokenreduction.diffusion.apply_patch` keeps tomesd's keyword
``ratio``, the fraction of the tokens *removed* (what tomesd users type), and
``merge_fn``. :func:`tomesd_ratio` / :func:`keep_rate_of` are the one place
the two meet; :func:`patch_options` maps a whole experiment.

Standard library only: the workflow loads this file by path at DAG build
(without torch).
"""
from __future__ import annotations

from decimal import Decimal
from typing import Any, Mapping

#: a diffusion experiment's ``method``: no merging, ToMe-SD, ATC
METHODS = ("none", "tome", "atc")

#: apply_patch keywords an experiment may set besides method and keep_rate
#: (``linkage``: ATC only)
PATCH_OPTIONS = ("linkage", "max_downsample", "sx", "sy", "use_rand", "merge_attn", "merge_crossattn",
                 "merge_mlp", "seed")

#: experiment keys that are job settings, not merging options
JOB_KEYS = ("runtime",)


def _decimal(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return Decimal(repr(float(value)))


def tomesd_ratio(keep_rate: float) -> float:
    """tomesd's ``ratio`` (fraction removed) of a keep rate (fraction kept):
    ``1 - keep_rate``, exact in the decimals the config and the tables print
    (0.9 -> 0.1, not 0.09999999999999998). `keep_rate` in (0, 1]."""
    kept = _decimal(keep_rate, "keep_rate")
    if not 0 < kept <= 1:
        raise ValueError(f"keep_rate (fraction of tokens kept) must be in (0, 1], got {keep_rate}")
    return float(1 - kept)


def keep_rate_of(ratio: float) -> float:
    """The keep rate of tomesd's ``ratio`` (fraction removed, in [0, 1)):
    ``1 - ratio``, exact in printed decimals (0.1 -> 0.9)."""
    removed = _decimal(ratio, "ratio")
    if not 0 <= removed < 1:
        raise ValueError(f"ratio (fraction of tokens removed) must be in [0, 1), got {ratio}")
    return float(1 - removed)


def patch_options(experiment: Mapping[str, Any]) -> dict[str, Any]:
    """apply_patch's keywords for one config experiment: ``method`` ->
    ``merge_fn``, ``keep_rate`` -> ``ratio`` (:func:`tomesd_ratio`), the
    other merging options as they are, job settings (``runtime``) dropped.
    Method none: ``{"merge_fn": "none"}`` (no merging, no options).

    Raises ValueError naming the key for an unknown method or key, a missing
    keep_rate, or options on method none.
    """
    spec = {k: v for k, v in experiment.items() if k not in JOB_KEYS}
    method = spec.pop("method", "none")
    if method not in METHODS:
        raise ValueError(f"method: unknown diffusion method {method!r}; use one of {', '.join(METHODS)}")
    unknown = [k for k in spec if k not in PATCH_OPTIONS + ("keep_rate",)]
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key of a diffusion experiment; known: "
                         f"method, keep_rate, {', '.join(PATCH_OPTIONS)}, {', '.join(JOB_KEYS)}")
    if method == "none":
        if spec:
            raise ValueError(f"{next(iter(spec))}: method none merges nothing; remove the merging options")
        return {"merge_fn": "none"}
    if "keep_rate" not in spec:
        raise ValueError(f"keep_rate: method {method} needs keep_rate (the fraction of tokens kept)")
    if "linkage" in spec and method != "atc":
        raise ValueError(f"linkage: an option of method atc only (this one is {method})")
    options = {"merge_fn": method, "ratio": tomesd_ratio(spec.pop("keep_rate"))}
    options.update(spec)
    return options
