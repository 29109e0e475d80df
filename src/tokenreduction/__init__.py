"""tokenreduction: token reduction methods for Vision Transformers.

Importing the package imports nothing heavy: its submodules and the names
below load on first use (PEP 562). So the pipeline's table and figure steps
(:mod:`tokenreduction.analysis`, :mod:`tokenreduction.report`,
:mod:`tokenreduction.summary`) run without importing torch or timm, and the
torch-only parts (:mod:`tokenreduction.reduction`,
:mod:`tokenreduction.detection`) without timm. The timm model builders
(create_model, patch_model, ...) load with :mod:`tokenreduction.models.vit`.
The model extensions (CLCA) register themselves with
:mod:`tokenreduction.models.extensions` when an extension is first looked up;
the model code never imports them.
"""
import importlib

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_LAZY_NAMES = {
    "compose_assignments": "patterns",
    "model_patterns": "patterns",
    "token_depth": "patterns",
    "get_method": "reduction",
    "list_methods": "reduction",
    "r_schedule": "models",
    "count_flops": "models",
    "create_model": "models",
    "load_checkpoint": "models",
    "patch_model": "models",
    "set_budget": "models",
    "unpatch_model": "models",
    "visualize": "visualization",  # matplotlib is imported only when a figure is drawn
}

#: subpackages and modules reachable as attributes (``tokenreduction.models``)
_SUBMODULES = frozenset({
    "analysis", "benchmark", "clca", "config_validation", "data", "detection", "diffusion", "evaluate",
    "io", "metrics", "models", "ots", "patterns", "provenance", "reduction", "report", "safe_load",
    "summary", "tracking", "train", "visualization",
})


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    elif name in _SUBMODULES:  # the import binds it as an attribute of the package
        return importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY_NAMES) | _SUBMODULES)


__all__ = sorted(_LAZY_NAMES)
