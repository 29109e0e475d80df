"""The one registry of reduction methods, looked up by name."""
from __future__ import annotations

from typing import Callable, Dict, Type

from .base import TokenReducer

_METHODS: Dict[str, Type[TokenReducer]] = {}


def register(name: str) -> Callable[[Type[TokenReducer]], Type[TokenReducer]]:
    """Class decorator: make a TokenReducer available as `name`."""

    def wrap(cls: Type[TokenReducer]) -> Type[TokenReducer]:
        if name in _METHODS:
            raise ValueError(f"reduction method {name!r} is registered twice")
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> Type[TokenReducer]:
    """The method class registered as `name`; a ValueError lists the known ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown reduction method {name!r}; known methods: {', '.join(list_methods())}"
        ) from None
