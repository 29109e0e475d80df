"""Config values against dataclass field types (TrainConfig, CLCAConfig),
annotations evaluated by typing.get_type_hints."""
from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from typing import Any, Optional


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               dict: "a mapping", list: "a list"}


def type_problem(value: Any, hint: Any) -> Optional[str]:
    """Why `value` does not fit the type `hint` (``Optional[float]``,
    ``Literal["a", "b"]``, ``Sequence[int]``...), or None when it does (or
    the hint is not one this checks)."""
    ok = _fits(value, hint)
    if ok is None or ok:
        return None
    more = ""
    if isinstance(value, str) and _fits(1.0, hint):
        try:
            float(value)
            more = " (YAML reads a number like 1e-3 as text: write 1.0e-3)"
        except ValueError:
            pass
    return f"expected {_describe(hint)}, got {type(value).__name__} {value!r}{more}"


def _describe(hint: Any) -> str:
    if hint in _TYPE_WORDS:
        return _TYPE_WORDS[hint]
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return str(hint).replace("typing.", "")


def _fits(value: Any, hint: Any) -> Optional[bool]:
    """True/False when `hint` is understood, None when it is not."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (bool, str, dict):
        return isinstance(value, hint)
    if hint in (list, tuple):
        return isinstance(value, (list, tuple))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        results = [_fits(value, a) for a in args]
        if any(results):
            return True
        return None if None in results else False
    if origin is typing.Literal:
        return value in args and type(value) in {type(a) for a in args}
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        if len(inner) == 1:
            results = [_fits(v, inner[0]) for v in value]
            return None if None in results else all(results)
        return True
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if origin is typing.ClassVar:
        return _fits(value, args[0])
    return None


def field_types(cls: type) -> dict[str, Any]:
    """Dataclass field -> its type (annotations evaluated); a field that holds
    a dataclass (TrainConfig's model_spec) stands for that class's fields, as
    a config spells them: flat."""
    hints = typing.get_type_hints(cls)
    flat: dict[str, Any] = {}
    for name in cls.__dataclass_fields__:
        flat.update(field_types(hints[name]) if dataclasses.is_dataclass(hints[name]) else {name: hints[name]})
    return flat
