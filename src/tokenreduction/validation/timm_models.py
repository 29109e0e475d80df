"""What the checks need of timm's ViTs (architecture, depth, patch and image
size, pretrained tags, optimisers, schedulers), read from timm's sources
without importing timm; cached per timm version."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from .problems import _close
from .source import _method


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


def _replace(info: ModelInfo, **changes: Any) -> ModelInfo:
    from dataclasses import replace

    return replace(info, **changes)
