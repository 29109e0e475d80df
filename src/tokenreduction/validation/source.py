"""Reading library source with ast (module constants, classes, functions) where
a table is not importable without torch."""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional


_SAFE_BUILTINS = {
    "int": int, "float": float, "bool": bool, "str": str, "len": len, "min": min, "max": max,
    "abs": abs, "range": range, "tuple": tuple, "list": list, "dict": dict, "sorted": sorted,
    "set": set, "isinstance": isinstance, "round": round, "sum": sum, "any": any, "all": all,
    "repr": repr, "type": type, "getattr": getattr, "math": math, "None": None, "True": True,
    "False": False, "ValueError": ValueError, "TypeError": TypeError,
}


def _eval(node: ast.AST, names: dict[str, Any]) -> Any:
    """Evaluate one expression of the library's source with `names` bound."""
    code = compile(ast.fix_missing_locations(ast.Expression(node)), "<library>", "eval")
    return eval(code, {"__builtins__": _SAFE_BUILTINS}, dict(names))


@dataclass
class _Module:
    path: Path
    tree: ast.Module
    constants: dict[str, Any] = field(default_factory=dict)
    functions: dict[str, ast.FunctionDef] = field(default_factory=dict)
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)


@lru_cache(maxsize=None)
def _module(path: Path) -> _Module:
    tree = ast.parse(path.read_text(), filename=str(path))
    mod = _Module(path, tree)
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if len(targets) == 1 and isinstance(targets[0], ast.Name) and node.value is not None:
                try:
                    mod.constants[targets[0].id] = ast.literal_eval(node.value)
                except (ValueError, TypeError, SyntaxError, RecursionError):
                    pass
        elif isinstance(node, ast.FunctionDef):
            mod.functions[node.name] = node
        elif isinstance(node, ast.ClassDef):
            mod.classes[node.name] = node
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                mod.imports[alias.asname or alias.name] = (node.module, alias.name)
    return mod


def _namespace(mod: _Module) -> dict[str, Any]:
    """Module-level literal constants, with those imported from siblings."""
    names = {}
    for local, (sibling, name) in mod.imports.items():
        path = mod.path.parent / f"{sibling}.py"
        if path.is_file():
            other = _module(path)
            if name in other.constants:
                names[local] = other.constants[name]
    names.update(mod.constants)
    return names


def _method(cls: ast.ClassDef, name: str) -> Optional[ast.FunctionDef]:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    return None


def _literal_set(node: ast.expr) -> Optional[tuple]:
    """A literal collection, also written frozenset({...}) / tuple(...)."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("frozenset", "set", "tuple") and node.args:
        node = node.args[0]
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return None
    return tuple(value)
