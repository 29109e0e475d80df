"""The timm releases this package runs on: the oldest one, checked before its
internals are read, and what differs between them.

The model patch reads timm's ``Block`` and ``Attention`` attributes
(:mod:`tokenreduction.models.blocks`, :mod:`tokenreduction.models.vit`,
:mod:`tokenreduction.clca.baselines`), which changed across timm releases.
``MIN_TIMM`` is the oldest release the library's fast tests pass on
(``.ci/lowest_deps.sh``); ``pyproject.toml`` declares the same bound
(``tests/test_dependency_ranges.py`` checks they agree). The check reads the
installed version from the package metadata, without importing timm, and this
module imports neither torch nor timm, so importing it stays cheap.
"""
from __future__ import annotations

import re
from importlib import metadata

MIN_TIMM = "1.0.15"


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: "1.0.16.dev0" -> (1, 0, 16).

    Pre- and post-release tags are ignored (a 1.0.15 release candidate counts
    as 1.0.15). ValueError if the string does not start with a number."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if match is None:
        raise ValueError(f"not a version number: {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def require_timm(installed: str | None = None) -> None:
    """ImportError naming the installed and the required timm when the
    installed timm (`installed`, else read from its metadata) is older than
    ``MIN_TIMM`` or missing."""
    if installed is None:
        try:
            installed = metadata.version("timm")
        except metadata.PackageNotFoundError:
            raise ImportError(
                f"tokenreduction's models need timm>={MIN_TIMM}, and timm is not installed: "
                f"pip install 'timm>={MIN_TIMM}'"
            ) from None
    if release(installed) < release(MIN_TIMM):
        raise ImportError(
            f"tokenreduction needs timm>={MIN_TIMM}, but timm {installed} is installed "
            f"(its ViT internals differ): pip install 'timm>={MIN_TIMM}'"
        )


def merge_heads(attn, out):
    """Per-head attention output (B, H, T, head_dim) -> (B, T, H * head_dim),
    through the Attention's scale norm where it has one.

    timm's Attention has a ``norm`` (scale_norm; Identity unless enabled) only
    from 1.0.16 and an ``attn_dim`` only from 1.0.23: this reads neither from
    the shapes, so every supported release gives the same result."""
    B, H, T, head_dim = out.shape
    out = out.transpose(1, 2).reshape(B, T, H * head_dim)
    norm = getattr(attn, "norm", None)
    return out if norm is None else norm(out)
