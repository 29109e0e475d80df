"""The library's own tables, without torch: torch-free modules loaded by path
(budgets, recipes, CLCA, the reducers' option declarations) and a few tables
read from source (tuning modes, dataset kinds, OTS presets)."""
from __future__ import annotations

import ast
import importlib.util
import sys
import types
from functools import lru_cache
from pathlib import Path
from typing import Any

from .source import _eval, _literal_set, _module, _namespace


PACKAGE = Path(__file__).resolve().parents[1]


BASELINE_NAMES = ("none", "deit", "baseline")


DEMO_KINDS = ("digits", "digits_multilabel", "digits_ufgir")


#: fallback where data/transforms.py cannot be read (see :func:`dataset_kinds`)
MULTILABEL_KINDS = ("coco", "nuswide", "digits_multilabel")


#: TrainConfig fields the workflow fills from other sections (not recipe keys)
WORKFLOW_FIELDS = {
    "model": "backbones.<name>.model",
    "model_kwargs": "backbones.<name>.model_kwargs",
    "pretrained": "backbones.<name>.init",
    "init_checkpoint": "backbones.<name>.init",
    "method": "methods",
    "keep_rate": "experiments[].keep_rates",
    "reduction_loc": "reduction_loc",
    "budget": "budget / methods.<name>.budget",
    "method_kwargs": "methods.<name>",
    "clca": "methods.<name>.clca",
    "dataset": "datasets.<name>.kind",
    "data_root": "datasets.<name>.root",
    "img_size": "datasets.<name>.img_size",
    "seed": "seeds",
    "teacher_checkpoint": "the DAG (DynamicViT's teacher)",
    "wandb_project": "wandb_project",
    "r": "mae.r",
    "r_schedule": "mae.schedules",
}


def _load(relative: str, name: str) -> types.ModuleType:
    """A pure-Python library module (no torch imports) loaded by path."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PACKAGE / relative)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # dataclasses look their module up
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        del sys.modules[name]
        raise
    return loaded


def budget_module() -> types.ModuleType:
    return _load("models/budget.py", "tokenreduction_config_budget")


def train_config_module() -> types.ModuleType:
    """train/config.py and the train/spec.py it imports, loaded by path as
    modules of a stand-in package (train/__init__.py, which imports torch, is not run)."""
    package = "tokenreduction_config_train"
    if package not in sys.modules:
        stand_in = types.ModuleType(package)
        stand_in.__path__ = [str(PACKAGE / "train")]
        sys.modules[package] = stand_in
    return _load("train/config.py", f"{package}.config")


def clca_config_class() -> type:
    """clca.config.CLCAConfig (the options apply_clca takes), loaded by path."""
    return _load("clca/config.py", "tokenreduction_config_clca").CLCAConfig


def options_module() -> types.ModuleType:
    """reduction/options.py, loaded by path: every method's declared options,
    class flags and output count (standard library only, as here)."""
    return _load("reduction/options.py", "tokenreduction_config_options")


def method_catalog() -> dict[str, Any]:
    """Method name -> its declaration (``reduction.options.MethodOptions``):
    the same object each reducer's constructor checks its options with."""
    return options_module().METHODS


@lru_cache(maxsize=None)
def tuning_modes() -> tuple[str, ...]:
    """"full" and the modes registered with ``@register_tuning("name")`` in
    clca/baselines.py (TrainConfig's ``tuning``); () when not readable."""
    path = PACKAGE / "clca" / "baselines.py"
    if not path.is_file():
        return ()
    names = ["full"]
    for node in ast.walk(_module(path).tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "register_tuning" and deco.args
                        and isinstance(deco.args[0], ast.Constant)):
                    names.append(deco.args[0].value)
    return tuple(dict.fromkeys(names)) if len(names) > 1 else ()


@lru_cache(maxsize=None)
def dataset_kinds() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every dataset kind, the multi-label ones): the keys of data/readers.py's
    READERS and data/transforms.py's MULTILABEL_KINDS; () where not readable."""
    kinds: tuple = ()
    multilabel: tuple = ()
    readers, transforms = PACKAGE / "data" / "readers.py", PACKAGE / "data" / "transforms.py"
    if readers.is_file():
        for node in _module(readers).tree.body:
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) else None)
            if getattr(target, "id", None) == "READERS" and isinstance(node.value, ast.Dict):
                kinds = tuple(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    if transforms.is_file():
        for node in _module(transforms).tree.body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "MULTILABEL_KINDS":
                multilabel = tuple(sorted(_literal_set(node.value) or ()))
    return kinds, multilabel


@lru_cache(maxsize=None)
def ots_presets() -> dict[str, dict[str, Any]]:
    """{preset: {model, depth, patch_size, img_size, model_kwargs}} evaluated
    from ``ots/presets.py``'s PRESETS table (its helper calls bound to their
    parameters); {} when the table cannot be read."""
    path = PACKAGE / "ots" / "presets.py"
    if not path.is_file():
        return {}
    mod = _module(path)
    table = None
    for node in mod.tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "PRESETS":
            table = node.value
    if table is None:
        return {}
    presets = {}
    for call in ast.walk(table):
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in mod.functions):
            continue
        fn = mod.functions[call.func.id]
        try:
            args = [_eval(a, {}) for a in call.args]
        except Exception:
            continue
        names = {**_namespace(mod), **dict(zip([a.arg for a in fn.args.args], args))}
        for stmt in fn.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                try:
                    names[stmt.targets[0].id] = _eval(stmt.value, names)
                except Exception:
                    pass
        for inner in ast.walk(fn):
            if isinstance(inner, ast.Call) and getattr(inner.func, "id", None) == "BackbonePreset":
                fields = {}
                for kw in inner.keywords:
                    try:
                        fields[kw.arg] = _eval(kw.value, names)
                    except Exception:
                        pass
                if "name" in fields:
                    presets[fields["name"]] = fields
    return presets
