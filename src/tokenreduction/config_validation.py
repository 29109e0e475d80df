"""Validation of the workflow config at DAG build: the entry point.

The checks live in :mod:`tokenreduction.validation`, one module per job
(config sections, the library's tables, timm's models, field types). The
workflow loads this file by path (``workflow/rules/common.smk``), and this
file loads that package by path under its own name, so a DAG build imports
neither torch nor timm nor the ``tokenreduction`` package. Everything the
package exports is available here (``check_config``, ``validate_config``,
``format_problems``, ``ConfigError``, ``ots_presets``, ``timm_model_info``...).

``python -m tokenreduction.config_validation CONFIG.yaml`` checks a config
file outside Snakemake.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent / "validation"
_PACKAGE_NAME = "tokenreduction_config_validation_checks"


def _load_package() -> types.ModuleType:
    """tokenreduction/validation, loaded by path (its modules import each
    other relatively, and nothing else of the package)."""
    if _PACKAGE_NAME in sys.modules:
        return sys.modules[_PACKAGE_NAME]
    spec = importlib.util.spec_from_file_location(
        _PACKAGE_NAME, _PACKAGE_DIR / "__init__.py", submodule_search_locations=[str(_PACKAGE_DIR)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE_NAME] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules[_PACKAGE_NAME]
        raise
    return package


_package = _load_package()
globals().update({name: getattr(_package, name) for name in _package.__all__})
__all__ = list(_package.__all__)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(_package.main())
