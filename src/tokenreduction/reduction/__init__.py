"""Token reduction methods, one module each, looked up by name.

Every module in this package registers its method(s) with
:func:`~tokenreduction.reduction.registry.register` on import; importing the
package imports them all, so a new method is one new file here.
"""
import importlib
import pkgutil

from .base import BlockFeatures, ReductionOutput, TokenReducer
from .registry import get_method, list_methods, register

_SHARED = {"base", "registry", "ops", "bipartite", "clustering"}
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["BlockFeatures", "ReductionOutput", "TokenReducer", "get_method", "list_methods", "register"]
