"""Method variants as the workflow reads them: a ``methods:`` registry name's
method and options (detection, the clustering benchmark), and a diffusion
experiment's apply_patch keywords (``diffusion/variant.py``, loaded by path)."""
from __future__ import annotations

import types
from typing import Any

from .library import BASELINE_NAMES, _load, method_catalog


def diffusion_variant_module() -> types.ModuleType:
    """diffusion/variant.py, loaded by path: a diffusion experiment as
    apply_patch keywords, keep_rate <-> tomesd's ratio (standard library only)."""
    return _load("diffusion/variant.py", "tokenreduction_config_diffusion_variant")


def variant_options(config: dict, name: str) -> tuple[str, dict[str, Any]]:
    """(method, options) of the methods: registry entry `name`, its options
    completed with the method's declared defaults (workflow keys such as
    budget and clca left out); a baseline method has no options."""
    spec = dict(config["methods"][name])
    method = spec.pop("method")
    if method in BASELINE_NAMES:
        return method, {}
    declared = method_catalog()[method]
    return method, declared.with_defaults({k: v for k, v in spec.items() if k in declared.options})
