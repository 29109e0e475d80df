"""Model extensions: plug-ins that extend a reduced ViT after it is built.

An extension (CLCA, :mod:`tokenreduction.clca`) is a function
``apply(model, **options) -> model`` that changes a model from
:func:`~tokenreduction.models.vit.patch_model` in place, usually by adding a
mixin class in front of the patched class (:func:`add_mixin`) that overrides
the model's hooks (``_before_blocks``, ``_after_block``, ``forward_head``).
It registers itself by name, as the reduction methods do::

    @register_extension("clca")
    def apply_clca(model, **options): ...

and ``create_model(name, ..., clca=dict(...))`` (or
``extensions={"clca": {...}}``) finds it here by that name. The model code
never imports an extension: the dependency runs one way, extension -> models.

This module needs only torch; the class composition lives in
:mod:`tokenreduction.models.vit` (timm).
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Dict

from torch import nn

ExtensionFn = Callable[..., nn.Module]

_EXTENSIONS: Dict[str, ExtensionFn] = {}

#: the package's own extension modules, imported (so that they register) on
#: the first lookup, so that `import tokenreduction` stays light
BUILTIN_EXTENSION_MODULES = ("tokenreduction.clca",)


def _load_builtin_extensions() -> None:
    for module in BUILTIN_EXTENSION_MODULES:
        if module not in sys.modules:
            importlib.import_module(module)


def register_extension(name: str) -> Callable[[ExtensionFn], ExtensionFn]:
    """Decorator: make ``apply(model, **options)`` available to
    ``create_model`` as the keyword (or ``extensions`` key) `name`."""

    def wrap(fn: ExtensionFn) -> ExtensionFn:
        if name in _EXTENSIONS and _EXTENSIONS[name] is not fn:
            raise ValueError(f"model extension {name!r} is registered twice")
        _EXTENSIONS[name] = fn
        return fn

    return wrap


def list_extensions() -> list[str]:
    """Names of the registered extensions, sorted."""
    _load_builtin_extensions()
    return sorted(_EXTENSIONS)


def get_extension(name: str) -> ExtensionFn:
    """The apply function registered as `name`; a ValueError lists the known ones."""
    _load_builtin_extensions()
    try:
        return _EXTENSIONS[name]
    except KeyError:
        known = ", ".join(list_extensions()) or "none"
        raise ValueError(f"unknown model extension {name!r}; known extensions: {known}") from None


def apply_extensions(model: nn.Module, extensions: Dict[str, Any]) -> nn.Module:
    """Apply each ``name: options`` of `extensions` (in the given order) to
    `model`; options None, False or {} leave that extension out."""
    for name, options in extensions.items():
        fn = get_extension(name)
        if not options:
            continue
        if options is True:
            options = {}
        if not isinstance(options, dict):
            raise ValueError(f"options of the model extension {name!r} must be a mapping, got {options!r}")
        model = fn(model, **options)
    return model
