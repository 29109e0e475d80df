"""Validation of the workflow config at DAG build, before any job is queued.

On a cluster a config mistake that surfaces only when a job starts costs a
queue wait per attempt. :func:`check_config` therefore checks, at DAG build,
everything the jobs would check, and names the key path of each problem
(``methods.evit.fuse_tokn``, ``finetune.epochs``, ``ots.backbones.x.r``).

One source of truth: nothing here repeats the library's option lists.

* Reduction methods: each method's declaration in
  :mod:`tokenreduction.reduction.options` (option names, types, defaults,
  allowed values and ranges, builder-set options, class flags), the same one
  its constructor checks values with, so both refuse a value with one message.
* Token budgets: :mod:`tokenreduction.models.budget` itself, and each method's
  declared output count, simulate every stage of every model of the study (r
  too large at some block, keep-rate lists of the wrong length).
* Recipes: :class:`tokenreduction.train.config.TrainConfig` itself (allowed
  keys, field types from its annotations, ranges from its ``validate``).
* CLCA options: the fields, types and ``validate`` of ``clca.config.CLCAConfig``.
* timm models: the architecture, its depth, patch size, image size and
  pretrained tags are read from timm's own model definitions
  (``@register_model`` functions and ``default_cfgs``), not guessed from names.

The DAG build must stay fast, so this module imports neither torch nor timm:
only torch-free library modules are loaded, by path (``reduction/options.py``,
``models/budget.py``, ``train/config.py``, ``clca/config.py``); timm's sources
and a few library tables (OTS presets, dataset kinds, tuning modes) are read
with :mod:`ast` (parsed once, cached). The library expressions evaluated here
are the package's own code; config values only ever enter them as data.
"""
from __future__ import annotations

import ast
import collections.abc
import importlib.util
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional

PACKAGE = Path(__file__).resolve().parent
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


class ConfigError(ValueError):
    """One or more config problems; ``problems`` is a list of (key path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(format_problems(problems))


def format_problems(problems: list[tuple[str, str]]) -> str:
    if len(problems) == 1:
        key, message = problems[0]
        return f"invalid config at {key}: {message}"
    lines = [f"invalid config ({len(problems)} problems):"]
    lines += [f"  at {key}: {message}" for key, message in problems]
    return "\n".join(lines)


# ---------------------------------------------------------------- reading library code

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


# ---------------------------------------------------------------- types of dataclass fields
# The annotations of TrainConfig and CLCAConfig, evaluated (typing.get_type_hints
# on the dataclasses, both loaded from torch-free modules).

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
    """Dataclass field -> its type (annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in cls.__dataclass_fields__}


# ---------------------------------------------------------------- the reduction methods


def _method(cls: ast.ClassDef, name: str) -> Optional[ast.FunctionDef]:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    return None


def options_module() -> types.ModuleType:
    """reduction/options.py, loaded by path: every method's declared options,
    class flags and output count (standard library only, as here)."""
    return _load("reduction/options.py", "tokenreduction_config_options")


def method_catalog() -> dict[str, Any]:
    """Method name -> its declaration (``reduction.options.MethodOptions``):
    the same object each reducer's constructor checks its options with."""
    return options_module().METHODS


def _close(word: str, known: Iterable[str]) -> str:
    import difflib

    match = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


# ---------------------------------------------------------------- pure library modules


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
    return _load("train/config.py", "tokenreduction_config_train")


def clca_config_class() -> type:
    """clca.config.CLCAConfig (the options apply_clca takes), loaded by path."""
    return _load("clca/config.py", "tokenreduction_config_clca").CLCAConfig


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


def _literal_set(node: ast.expr) -> Optional[tuple]:
    """A literal collection, also written frozenset({...}) / tuple(...)."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("frozenset", "set", "tuple") and node.args:
        node = node.args[0]
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return None
    return tuple(value)


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


# ---------------------------------------------------------------- timm models


@dataclass(frozen=True)
class ModelInfo:
    """What the checks need of a timm ViT, read from timm's definitions."""

    name: str
    depth: int
    patch_size: int
    img_size: int
    embed_dim: Optional[int]
    class_token: bool
    builds: Optional[str]  # the class the @register_model function returns

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


VIT_CLASSES = ("VisionTransformer", "VisionTransformerDistilled")


@lru_cache(maxsize=None)
def _timm_dir() -> Optional[Path]:
    try:
        spec = importlib.util.find_spec("timm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _cache_file() -> Optional[Path]:
    root = _timm_dir()
    if root is None:
        return None
    try:
        from importlib.metadata import version

        tag = version("timm")
    except Exception:
        tag = str(int((root / "models").stat().st_mtime))
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tokenreduction" / f"timm-{tag}-architectures.json"


@lru_cache(maxsize=None)
def timm_architectures() -> dict[str, dict[str, Any]]:
    """Every ``@register_model`` function of timm: {arch: {file, builds,
    args (literal model_args), tags: {tag: input_size}}}. Read from timm's
    sources once, then cached per timm version (``~/.cache/tokenreduction``)."""
    cache = _cache_file()
    if cache is not None and cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, ValueError):
            pass
    root = _timm_dir()
    if root is None:
        return {}
    archs: dict[str, dict[str, Any]] = {}
    for path in sorted((root / "models").glob("*.py")):
        text = path.read_text()
        if "register_model" not in text:
            continue
        tree = ast.parse(text)
        cfgs = _default_cfgs(tree)
        vit_defaults = _vit_defaults(tree)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef):
                continue
            if not any(getattr(d, "id", getattr(d, "attr", None)) == "register_model" for d in node.decorator_list):
                continue
            args = {}
            for stmt in ast.walk(node):
                if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                        and stmt.targets[0].id == "model_args" and isinstance(stmt.value, ast.Call)):
                    for kw in stmt.value.keywords:
                        try:
                            args[kw.arg] = ast.literal_eval(kw.value)
                        except ValueError:
                            pass
            builds = node.returns.id if isinstance(node.returns, ast.Name) else (
                node.returns.value if isinstance(node.returns, ast.Constant) else None)
            tags = {k.split(".", 1)[1] if "." in k else "": v for k, v in cfgs.items() if k.split(".", 1)[0] == node.name}
            archs[node.name] = {"file": path.name, "builds": builds, "args": args, "tags": tags,
                                "defaults": vit_defaults}
    archs = json.loads(json.dumps(archs))  # the same values as read back from the cache
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}")
            tmp.write_text(json.dumps(archs))
            os.replace(tmp, cache)
        except OSError:
            pass
    return archs


def _default_cfgs(tree: ast.Module) -> dict[str, Optional[list]]:
    """{'arch.tag': input_size or None} from a timm file's ``default_cfgs``."""
    out: dict[str, Optional[list]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "default_cfgs" for t in node.targets)):
            continue
        value = node.value
        if isinstance(value, ast.Call) and value.args:  # generate_default_cfgs({...})
            value = value.args[0]
        if not isinstance(value, ast.Dict):
            continue
        for key, cfg in zip(value.keys, value.values):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                continue
            size = None
            if isinstance(cfg, ast.Call):
                for kw in cfg.keywords:
                    if kw.arg == "input_size":
                        try:
                            size = list(ast.literal_eval(kw.value))
                        except ValueError:
                            pass
            out[key.value] = size
    return out


def _vit_defaults(tree: ast.Module) -> dict[str, Any]:
    """Literal defaults of ``VisionTransformer.__init__`` where the file defines it."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "VisionTransformer":
            init = _method(node, "__init__")
            if init is None:
                break
            args = init.args.args
            defaults = [None] * (len(args) - len(init.args.defaults)) + list(init.args.defaults)
            out = {}
            for arg, default in zip(args, defaults):
                if default is not None:
                    try:
                        out[arg.arg] = ast.literal_eval(default)
                    except ValueError:
                        pass
            return out
    return {}


def timm_model_info(name: str, model_kwargs: Optional[dict] = None) -> ModelInfo:
    """Depth, patch size, image size of timm model `name` (``arch`` or
    ``arch.tag``) built with `model_kwargs`, from timm's own definitions.
    ValueError when timm has no such model or tag, or it is not a ViT this
    package can reduce; LookupError when timm is not installed here."""
    archs = timm_architectures()
    if not archs:
        raise LookupError("timm is not installed where Snakemake runs: model names are not checked")
    arch, _, tag = name.partition(".")
    if arch not in archs:
        raise ValueError(f"timm has no model {arch!r}{_close(arch, archs)}")
    info = archs[arch]
    tags = info["tags"]
    if tag and tag not in tags:
        known = ", ".join(sorted(t for t in tags if t)) or "none"
        raise ValueError(f"timm model {arch!r} has no pretrained tag {tag!r}; its tags: {known}")
    if info["builds"] is not None and info["builds"] not in VIT_CLASSES:
        raise ValueError(
            f"timm model {arch!r} builds a {info['builds']}; token reduction patches timm's VisionTransformer"
        )
    vit_defaults = timm_architectures().get("vit_base_patch16_224", {}).get("defaults") or {}
    merged = {**vit_defaults, **info["args"], **(model_kwargs or {})}
    size = None
    if "img_size" not in info["args"] and "img_size" not in (model_kwargs or {}):
        chosen = tags.get(tag) if tag else next(iter(tags.values()), None)
        size = chosen[-1] if chosen else None
    img = merged.get("img_size", 224) if size is None else size
    patch = merged.get("patch_size", 16)
    img = img[-1] if isinstance(img, (list, tuple)) else img
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    return ModelInfo(
        name=name,
        depth=int(merged.get("depth", 12)),
        patch_size=int(patch),
        img_size=int(img),
        embed_dim=merged.get("embed_dim"),
        class_token=bool(merged.get("class_token", True)),
        builds=info["builds"],
    )


@lru_cache(maxsize=None)
def timm_optimizers() -> tuple[str, ...]:
    """Optimizer names timm's ``create_optimizer_v2`` knows (its ``OptimInfo(name=...)``
    registrations); () when timm is not readable here."""
    root = _timm_dir()
    path = root / "optim" / "_optim_factory.py" if root else None
    if path is None or not path.is_file():
        return ()
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "OptimInfo":
            for kw in node.keywords:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                    names.append(kw.value.value)
    return tuple(sorted(set(names)))


@lru_cache(maxsize=None)
def timm_schedulers() -> tuple[str, ...]:
    """Schedule names timm's ``create_scheduler_v2`` compares ``sched`` with."""
    root = _timm_dir()
    path = root / "scheduler" / "scheduler_factory.py" if root else None
    if path is None or not path.is_file():
        return ()
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == "sched":
            for comp in node.comparators:
                for c in (comp.elts if isinstance(comp, ast.Tuple) else [comp]):
                    if isinstance(c, ast.Constant) and isinstance(c.value, str):
                        names.append(c.value)
    return tuple(sorted(set(names)))


# ---------------------------------------------------------------- off-the-shelf presets


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


# ---------------------------------------------------------------- the checks


class ValidatorError(RuntimeError):
    """A config check itself failed (a bug in the validator): the DAG build stops."""


class _Checker:
    def __init__(self, config: dict, base: Path, repo: Path) -> None:
        self.config = config
        self.base = base
        self.repo = repo
        self.problems: list[tuple[str, str]] = []
        self._models: dict[str, Optional[ModelInfo]] = {}
        self._simulated: set = set()

    def fail(self, key: str, message: str) -> None:
        if (key, message) not in self.problems:
            self.problems.append((key, message))

    def path(self, value: str, repo_relative: bool = False) -> Path:
        p = Path(os.path.expanduser(str(value)))
        if p.is_absolute():
            return p
        return (self.repo if repo_relative else self.base) / p

    # -- datasets, backbones ---------------------------------------------------

    def datasets(self) -> None:
        kinds = dataset_kinds()[0]
        for name, spec in self.config["datasets"].items():
            if kinds and spec["kind"] not in kinds:
                self.fail(f"datasets.{name}.kind", f"unknown dataset kind {spec['kind']!r}{_close(spec['kind'], kinds)};"
                          f" known kinds (tokenreduction.data.DATASET_KINDS): {', '.join(kinds)}")
                continue
            if spec["kind"] not in DEMO_KINDS and not self.path(spec["root"]).exists():
                self.fail(f"datasets.{name}.root", f"{spec['root']} does not exist (dataset {name!r}, kind {spec['kind']})")
            if spec.get("recipe") is not None:
                self.recipe_keys(f"datasets.{name}.recipe", spec["recipe"])

    def model(self, backbone: str) -> Optional[ModelInfo]:
        """The backbone's ModelInfo (None when unknown; the problem is recorded)."""
        if backbone not in self._models:
            spec = self.config["backbones"][backbone]
            try:
                self._models[backbone] = timm_model_info(spec["model"], spec.get("model_kwargs") or {})
            except LookupError:
                self._models[backbone] = None
            except ValueError as err:
                self._models[backbone] = None
                self.fail(f"backbones.{backbone}.model", str(err))
        return self._models[backbone]

    def backbones(self) -> None:
        for name, spec in self.config["backbones"].items():
            for key in ("depth", "patch_size", "img_size", "embed_dim", "num_heads"):
                value = (spec.get("model_kwargs") or {}).get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    if key in ("patch_size", "img_size") and isinstance(value, list):
                        continue
                    self.fail(f"backbones.{name}.model_kwargs.{key}", f"must be a positive integer, got {value!r}")
            self.model(name)
            init = spec["init"]
            if init == "pretrain":
                pre = (self.config.get("pretrain") or {}).get("dataset")
                if pre not in self.config["datasets"]:
                    self.fail("pretrain.dataset", f"backbone {name!r} is pretrained by the DAG but pretrain.dataset {pre!r} is not a dataset")
            elif init != "timm" and not self.path(init).is_file():
                self.fail(f"backbones.{name}.init", f"checkpoint {init} does not exist (use pretrain, timm or a file path)")
        pre = self.config.get("pretrain") or {}
        if pre.get("recipe") is not None:
            self.recipe_keys("pretrain.recipe", pre["recipe"])

    # -- methods -----------------------------------------------------------------

    def methods(self) -> None:
        catalog = method_catalog()
        for name, spec in self.config["methods"].items():
            method = spec["method"]
            if method in BASELINE_NAMES:
                continue
            if method not in catalog:
                self.fail(f"methods.{name}.method",
                          f"unknown method {method!r}{_close(method, catalog)}; known methods: {', '.join(sorted(catalog))}")
                continue
            options = {k: v for k, v in spec.items() if k not in ("method", "budget", "clca", "tuning", "tuning_kwargs")}
            for key, message in catalog[method].problems(options):
                self.fail(f"methods.{name}.{key}" if key else f"methods.{name}", message)
            if spec.get("clca"):
                self.clca(f"methods.{name}.clca", spec["clca"])

    def clca(self, key: str, values: Any) -> None:
        """One method's CLCA options: CLCAConfig's fields, types and validate()."""
        if not isinstance(values, dict):
            self.fail(key, f"must be a mapping of CLCA options, got {values!r}")
            return
        cls = clca_config_class()
        fields = field_types(cls)
        bad = False
        for opt, value in values.items():
            if opt not in fields:
                self.fail(f"{key}.{opt}", f"unknown CLCA option{_close(opt, fields)}; known: {', '.join(fields)}")
                bad = True
            else:
                why = type_problem(value, fields[opt])
                if why:
                    self.fail(f"{key}.{opt}", why)
                    bad = True
        if not bad:
            try:
                cls(**values).validate()
            except ValueError as err:
                self.fail(key, str(err))

    def method_ok(self, name: str) -> bool:
        return name in self.config["methods"] and not any(
            k == f"methods.{name}" or k.startswith(f"methods.{name}.") for k, _ in self.problems)

    # -- token budgets -----------------------------------------------------------

    def locations(self, locs: list, key: str = "reduction_loc") -> bool:
        if sorted(set(locs)) != list(locs):
            self.fail(key, f"reduction locations must be increasing and distinct, got {list(locs)}")
            return False
        return True

    def simulate(self, key: str, method_name: str, info: ModelInfo, budget: str, locs: Optional[list],
                 keep_rate: Any = None, r: Any = None, schedule: Any = "constant", backbone: str = "") -> None:
        """Build the model's stages as patch_model does (budget, each stage's
        output count); record the first problem under `key`."""
        spec = self.config["methods"][method_name]
        method = spec["method"]
        if method in BASELINE_NAMES:
            return
        what = f"method {method_name!r} on backbone {backbone!r}"
        sig = (key, method_name, info, budget, json.dumps([locs, keep_rate, r, schedule]))
        if sig in self._simulated:
            return
        self._simulated.add(sig)
        mi = method_catalog()[method]
        values = {k: v for k, v in spec.items() if k not in ("method", "budget", "clca", "tuning", "tuning_kwargs")}
        if info.embed_dim is not None:
            problems = mi.problems(values, int(info.embed_dim))
            if problems:
                self.fail(f"methods.{method_name}", f"{problems[0][1]} ({what}, embed_dim {info.embed_dim})")
                return
        if mi.needs_class_token and not info.class_token:
            self.fail(key, f"{what}: method {method!r} reads the CLS attention but the model has no class token")
            return
        bmod = budget_module()
        depth = info.depth
        if locs is None:
            locs = list(range(depth)) if budget == "r" else [3, 6, 9]
        bad = [loc for loc in locs if not 0 <= int(loc) < depth]
        if bad:
            self.fail("reduction_loc" if key.startswith("experiments") else key,
                      f"location {bad[0]} is beyond the depth of backbone {backbone!r} ({depth} blocks: 0..{depth - 1})")
            return
        n = info.num_patches
        try:
            if budget == "r":
                tb = bmod.TokenBudget("r", n, len(locs), r_per_block=bmod.r_schedule(r, depth, schedule))
            else:
                tb = bmod.TokenBudget(budget, n, len(locs), keep_rate=keep_rate)
            for stage, loc in enumerate(locs):
                if budget == "r":
                    r_here = tb.r_per_block[loc]
                    if r_here >= n:
                        raise ValueError(
                            f"r={r} ({schedule}) removes {r_here} tokens at block {loc}, but only {n} patch"
                            f" tokens are left there ({info.num_patches} patches, {depth} blocks)"
                        )
                sb = tb.stage(stage, loc, n)
                n = mi.output_count(values, n, sb)
                if n < 1:
                    raise ValueError(f"no patch tokens are left after block {loc}")
        except ValueError as err:
            once = (key, backbone, budget, json.dumps([keep_rate, r, schedule]))
            if once not in self._simulated:  # one line per setting, not per method
                self._simulated.add(once)
                self.fail(key, f"{what}: {err}")

    def experiments(self) -> None:
        cfg = self.config
        locs = list(cfg["reduction_loc"])
        locs_ok = self.locations(locs)
        for i, exp in enumerate(cfg["experiments"]):
            for key, table in (("datasets", "datasets"), ("backbones", "backbones"), ("methods", "methods")):
                for item in exp[key]:
                    if item not in cfg[table]:
                        self.fail(f"experiments[{i}].{key}", f"{item!r} is not defined under {table}: ({', '.join(cfg[table])})")
            if not locs_ok:
                continue
            for b in exp["backbones"]:
                info = self.model(b) if b in cfg["backbones"] else None
                if info is None:
                    continue
                for m in exp["methods"]:
                    if not self.method_ok(m):
                        continue
                    budget = cfg["methods"][m].get("budget") or cfg["budget"]
                    for kr in exp["keep_rates"]:
                        self.simulate(f"experiments[{i}].keep_rates", m, info, budget, locs, keep_rate=kr, backbone=b)

    # -- recipes -------------------------------------------------------------------

    def recipe_keys(self, key: str, recipe: Any) -> None:
        """Keys and value types of one recipe section (TrainConfig fields)."""
        if not isinstance(recipe, dict):
            self.fail(key, f"must be a mapping of training settings, got {recipe!r}")
            return
        tc = train_config_module().TrainConfig
        hints = field_types(tc)
        for name, value in recipe.items():
            if name not in hints:
                self.fail(f"{key}.{name}", f"unknown training setting{_close(name, hints)} (see tokenreduction.train.config.TrainConfig)")
            elif name in WORKFLOW_FIELDS:
                self.fail(f"{key}.{name}", f"is set by the workflow from {WORKFLOW_FIELDS[name]}; remove it here")
            else:
                why = type_problem(value, hints[name])
                if why:
                    self.fail(f"{key}.{name}", why)

    def recipe(self, key: str, *layers: Optional[dict], extra: Optional[dict] = None) -> None:
        """The merged recipe through TrainConfig's own validation."""
        if any(k.startswith(key) or (k.startswith("finetune") and key != "finetune") for k, _ in self.problems):
            return  # reported where it is (the shared finetune section, or this section's keys)
        merged: dict = {}
        for layer in layers:
            if isinstance(layer, dict):
                merged.update(layer)
        merged.update(extra or {})
        tc = train_config_module().TrainConfig
        known = set(tc.__dataclass_fields__)
        merged = {k: v for k, v in merged.items() if k in known}
        tuning = merged.get("tuning", "full")
        modes = tuning_modes()
        if modes and tuning not in modes:
            self.fail(f"{key}.tuning", f"tuning must be one of {', '.join(modes)}, got {tuning!r}")
            return
        merged["tuning"] = "full"  # checked above; TrainConfig would import the (torch) registry
        opt = merged.get("opt")
        if isinstance(opt, str) and timm_optimizers() and opt.lower().split("_")[-1] not in timm_optimizers():
            self.fail(f"{key}.opt", f"timm has no optimizer {opt!r}{_close(opt, timm_optimizers())};"
                      f" known: {', '.join(timm_optimizers())}")
            return
        sched = merged.get("sched")
        if isinstance(sched, str) and timm_schedulers() and sched not in timm_schedulers():
            self.fail(f"{key}.sched", f"timm has no learning-rate schedule {sched!r}{_close(sched, timm_schedulers())};"
                      f" known: {', '.join(timm_schedulers())}")
            return
        try:
            tc.from_dict(merged)
        except ImportError:
            return  # a check that needs torch: the job makes it
        except (ValueError, TypeError) as err:
            first = str(err).split(" ", 1)[0]
            self.fail(f"{key}.{first}" if first in known else key, str(err))

    def recipes(self) -> None:
        cfg = self.config
        self.recipe_keys("finetune", cfg["finetune"])
        self.recipe("finetune", cfg["finetune"])
        for name, spec in cfg["datasets"].items():
            if spec.get("recipe"):
                self.recipe(f"datasets.{name}.recipe", cfg["finetune"], spec["recipe"], extra={"img_size": spec["img_size"]})
        pre = cfg.get("pretrain") or {}
        if pre.get("recipe"):
            self.recipe("pretrain.recipe", cfg["finetune"], pre["recipe"])
        mae = cfg.get("mae") or {}
        if mae.get("recipe") is not None:
            self.recipe_keys("mae.recipe", mae["recipe"])
            self.recipe("mae.recipe", cfg["finetune"], mae["recipe"])

    # -- sections --------------------------------------------------------------------

    def _refs(self, key: str, items: Iterable[str], table: str) -> list[str]:
        good = []
        for item in items:
            if item not in self.config[table]:
                self.fail(key, f"{item!r} is not defined under {table}: ({', '.join(self.config[table])})")
            else:
                good.append(item)
        return good

    def _single_label(self, key: str, dataset: str) -> bool:
        if dataset not in self.config["datasets"]:
            self.fail(key, f"{dataset!r} is not defined under datasets: ({', '.join(self.config['datasets'])})")
            return False
        if self.config["datasets"][dataset]["kind"] in (dataset_kinds()[1] or MULTILABEL_KINDS):
            self.fail(key, f"{dataset!r} is multi-label; this stage reports top-1/top-5")
            return False
        return True

    def ots(self) -> None:
        ots = self.config.get("ots")
        if not ots:
            return
        self._single_label("ots.dataset", ots["dataset"])
        methods = [m for m in self._refs("ots.methods", ots["methods"], "methods") if self.method_ok(m)]
        presets = ots_presets()
        for name, spec in ots["backbones"].items():
            key = f"ots.backbones.{name}"
            info = None
            if "pretrain" in spec:
                pre = spec["pretrain"]
                if self.config["backbones"].get(pre, {}).get("init") != "pretrain":
                    self.fail(f"{key}.pretrain", f"{pre!r} is not a backbone pretrained by the DAG (backbones.<name>.init: pretrain)")
                    continue
                info = self.model(pre)
                if info is not None and spec.get("img_size"):
                    info = _replace(info, img_size=int(spec["img_size"]))
            else:
                preset = presets.get(spec["preset"])
                if presets and preset is None:
                    self.fail(f"{key}.preset", f"unknown backbone preset {spec['preset']!r}{_close(spec['preset'], presets)};"
                              f" known presets (tokenreduction.ots.PRESETS): {', '.join(presets)}")
                    continue
                if spec.get("checkpoint") and not self.path(spec["checkpoint"]).is_file():
                    self.fail(f"{key}.checkpoint", f"{spec['checkpoint']} does not exist")
                if preset is not None and {"depth", "patch_size", "img_size"} <= set(preset):
                    info = ModelInfo(preset.get("model", spec["preset"]), int(preset["depth"]), int(preset["patch_size"]),
                                     int(spec.get("img_size") or preset["img_size"]), None, True, "VisionTransformer")
            r_values = spec.get("r", ots.get("r"))
            if r_values is None:
                self.fail(f"{key}.r", "no r sweep given (here or as ots.r)")
                continue
            if info is None:
                continue
            rkey = f"{key}.r" if "r" in spec else "ots.r"
            for m in methods:
                for sched in ots["schedules"]:
                    for r in r_values:
                        self.simulate(rkey, m, info, "r", None, r=int(r), schedule=sched, backbone=name)

    def mae(self) -> None:
        mae = self.config.get("mae")
        if not mae:
            return
        self._single_label("mae.dataset", mae["dataset"])
        backbones = self._refs("mae.backbones", mae["backbones"], "backbones")
        methods = [m for m in self._refs("mae.methods", mae["methods"], "methods") if self.method_ok(m)]
        for b in backbones:
            info = self.model(b)
            if info is None:
                continue
            kwargs = {**(self.config["backbones"][b].get("model_kwargs") or {}), **(mae.get("model_kwargs") or {})}
            if kwargs != (self.config["backbones"][b].get("model_kwargs") or {}):
                try:
                    info = timm_model_info(self.config["backbones"][b]["model"], kwargs)
                except (LookupError, ValueError):
                    pass
            for m in methods:
                for sched in mae["schedules"]:
                    for r in mae["r"]:
                        self.simulate("mae.r", m, info, "r", None, r=int(r), schedule=sched, backbone=b)

    def benchmark(self) -> None:
        bench = self.config.get("benchmark")
        if not bench or bench.get("enabled", True) is False:
            return
        names = bench.get("backbones")
        if names is None:
            names = [b for exp in self.config["experiments"] for b in exp["backbones"] if b in self.config["backbones"]]
        backbones = self._refs("benchmark.backbones", dict.fromkeys(names), "backbones")
        self._refs("benchmark.methods", bench.get("methods") or [], "methods")
        schedules = budget_module().R_SCHEDULES
        for i, spec in enumerate(bench.get("r_models") or []):
            key = f"benchmark.r_models[{i}]"
            if not self._refs(f"{key}.method", [spec["method"]], "methods") or not self.method_ok(spec["method"]):
                continue
            sched = spec.get("schedule", "constant")
            if isinstance(sched, str) and sched not in schedules:
                self.fail(f"{key}.schedule", f"unknown r schedule {sched!r}; use one of {', '.join(schedules)} or a number in [-1, 1]")
                continue
            if not isinstance(sched, str) and not -1 <= float(sched) <= 1:
                self.fail(f"{key}.schedule", f"r schedule inflection must lie in [-1, 1], got {sched}")
                continue
            for b in backbones:
                info = self.model(b)
                if info is not None:
                    self.simulate(f"{key}.r", spec["method"], info, "r", None, r=int(spec["r"]), schedule=sched, backbone=b)
        headline = bench.get("headline_batch")
        exps = bench.get("batch_exponents")
        if headline is not None and exps and headline not in [2 ** e for e in exps]:
            self.fail("benchmark.headline_batch", f"{headline} is not one of the benchmarked batch sizes {[2 ** e for e in exps]}")

    def detection(self) -> None:
        det = self.config.get("detection")
        if not det or det.get("enabled", True) is False or not det.get("sizes"):
            return
        if det.get("data_root") and not self.path(det["data_root"]).exists():
            self.fail("detection.data_root", f"{det['data_root']} does not exist (a COCO-layout root)")
        for size, spec in det["sizes"].items():
            key = f"detection.sizes.{size}"
            if not self.path(spec["config"], repo_relative=True).is_file():
                self.fail(f"{key}.config", f"mmdet config {spec['config']} does not exist (paths are relative to the repository)")
            for field_name in ("load_from", "pretrained"):
                if spec.get(field_name) and not self.path(spec[field_name], repo_relative=True).is_file():
                    self.fail(f"{key}.{field_name}", f"checkpoint {spec[field_name]} does not exist (paths are relative to the repository)")
        if det.get("methods") and not det.get("ratios") and not det.get("baseline", True):
            self.fail("detection.ratios", "no ratios and no baseline: the detection section has no runs")

    def diffusion(self) -> None:
        diff = self.config.get("diffusion")
        if not diff or diff.get("enabled", True) is False:
            return
        if diff["dataset"] not in self.config["datasets"]:
            self.fail("diffusion.dataset", f"{diff['dataset']!r} is not defined under datasets: ({', '.join(self.config['datasets'])})")
        names = diff.get("class_names")
        if isinstance(names, str) and not self.path(names).is_file():
            self.fail("diffusion.class_names", f"{names} does not exist (a .txt with one name per line, a .json, "
                      "or the ATC study's class_names.py; see docs/diffusion.md)")
        elif diff["dataset"] in self.config["datasets"] and diff.get("num_classes") is None:
            kind = self.config["datasets"][diff["dataset"]].get("kind")
            count = _class_name_count(self.path(names)) if isinstance(names, str) else (
                len(names) if isinstance(names, list) else None)
            if kind == "imagenet" and count is not None and count != 1000:
                self.fail("diffusion.class_names", f"holds {count} class names; ImageNet needs exactly 1000 "
                          "(line i = class i in sorted-wnid order, e.g. 'tench, Tinca tinca')")
        for name, spec in diff["experiments"].items():
            merge = spec.get("merge_fn", "none")
            if merge != "atc" and "linkage" in spec:
                self.fail(f"diffusion.experiments.{name}.linkage", f"linkage applies to merge_fn atc only (this one is {merge})")
            cap = 1 - 1 / (spec.get("sx", 2) * spec.get("sy", 2))  # ToMe-SD keeps one destination per cell
            if merge == "tome" and spec.get("ratio", 0.5) > cap:
                self.fail(f"diffusion.experiments.{name}.ratio", f"ToMe-SD removes at most 1 - 1/(sx*sy) = {cap:.4g} "
                          "of the tokens (tomesd would cap it silently)")
            if diff.get("model", "sd15") == "pixart" and spec.get("max_downsample", 1) != 1:
                self.fail(f"diffusion.experiments.{name}.max_downsample",
                          "applies to UNets: every PixArt block runs on the patch grid (leave it unset)")
        self.diffusion_model(diff)

    def diffusion_model(self, diff: dict) -> None:
        """A local pipeline folder must hold a pipeline class of diffusion.model."""
        classes = {"sd15": ("StableDiffusionPipeline",), "sdxl": ("StableDiffusionXLPipeline",),
                   "pixart": ("PixArtAlphaPipeline", "PixArtSigmaPipeline")}[diff.get("model", "sd15")]
        source = str(diff.get("pipeline", "tiny"))
        index = self.path(source) / "model_index.json"
        if source != "tiny" and index.is_file():
            held = json.loads(index.read_text()).get("_class_name")
            if held not in classes:
                self.fail("diffusion.model", f"{diff.get('model', 'sd15')} loads {' or '.join(classes)}, "
                          f"but the pipeline folder {source} holds a {held}")

    def run(self) -> list[tuple[str, str]]:
        sections = ("datasets", "backbones", "methods", "experiments", "recipes", "ots", "mae", "benchmark",
                    "detection", "diffusion")
        for section in sections:
            try:
                getattr(self, section)()
            except Exception as err:
                # A bug in a check must not switch that check off: stop, with the
                # traceback into the validator attached (``raise ... from``).
                raise ValidatorError(
                    f"internal error in tokenreduction's config check '{section}' "
                    f"({type(err).__name__}: {err}). This is a bug in the validator, not "
                    "necessarily in your config: please report it with the traceback above."
                ) from err
        return self.problems


def _replace(info: ModelInfo, **changes: Any) -> ModelInfo:
    from dataclasses import replace

    return replace(info, **changes)


def schema_problems(config: dict, schema: dict) -> list[tuple[str, str]]:
    """JSON-schema violations as (key path, message), key paths like
    ``datasets.imagenet.kind`` and ``experiments[0].keep_rates[1]``."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        leaves = [err]
        if err.validator in ("oneOf", "anyOf") and err.context:
            leaves = [min(err.context, key=lambda e: len(list(e.absolute_path)))]
        for leaf in leaves:
            path = ""
            for part in leaf.absolute_path:
                path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
            message = leaf.message
            if leaf.validator == "additionalProperties":
                allowed = sorted((leaf.schema.get("properties") or {}))
                extra = [p for p in (leaf.instance or {}) if p not in allowed]
                if extra:
                    path = f"{path}.{extra[0]}" if path else extra[0]
                    message = f"unknown key{_close(extra[0], allowed)}; allowed here: {', '.join(allowed)}"
            problems.append((path or "(top level)", message))
    return problems


def check_config(config: dict, schema: Optional[dict] = None, base: Optional[Path] = None,
                 repo: Optional[Path] = None) -> list[tuple[str, str]]:
    """Every problem of `config` as (key path, message); [] when it is valid.

    `schema` (the workflow's JSON schema) is checked first; the library checks
    run on a config that passes it. Relative paths resolve against `base`
    (Snakemake's working directory; default the current one); detection
    configs against `repo` (the repository root).
    """
    if schema is not None:
        problems = schema_problems(config, schema)
        if problems:
            return problems
    base = Path.cwd() if base is None else Path(base)
    repo = PACKAGE.parents[1] if repo is None else Path(repo)
    return _Checker(config, base, repo).run()


def validate_config(config: dict, schema: Optional[dict] = None, base: Optional[Path] = None,
                    repo: Optional[Path] = None) -> None:
    """:func:`check_config`, raising :class:`ConfigError` listing every problem."""
    problems = check_config(config, schema, base, repo)
    if problems:
        raise ConfigError(problems)


def load_schema(path: Path) -> dict:
    import yaml

    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m tokenreduction.config_validation CONFIG.yaml``: check a
    config file outside Snakemake (exit 1 with the problems)."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("--schema", type=Path, default=PACKAGE.parents[1] / "workflow" / "schemas" / "config.schema.yaml")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    problems = check_config(config, load_schema(args.schema) if args.schema.is_file() else None)
    if problems:
        print(format_problems(problems), file=sys.stderr)
        return 1
    print(f"{args.config}: valid")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def _class_name_count(path: Path) -> Optional[int]:
    """Names in a diffusion class-names file (.txt: non-empty lines; .json: a
    list or a map); None for another format (checked when the job reads it)."""
    try:
        if path.suffix == ".txt":
            return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        if path.suffix == ".json":
            loaded = json.loads(path.read_text(encoding="utf-8"))
            return len(loaded) if isinstance(loaded, (list, dict)) else None
    except (OSError, ValueError):
        return None
    return None
