"""Classes and the FID reference set from a class-folder validation split
(``<val_root>/<class>/<image>``: ImageNet val as torchvision lays it out, or
the demo digits' ``val/<digit>/``).

The ATC study's reference set: the first 5 images (sorted by file name) of
every ImageNet validation class, copied into one folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

PathLike = Union[str, Path]
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
REFERENCE_MANIFEST = "reference.json"


def class_folders(val_root: PathLike, num_classes: Optional[int] = None) -> List[Path]:
    """The sorted class folders of a validation split (the first `num_classes`)."""
    root = Path(val_root)
    if not root.is_dir():
        raise ValueError(f"validation folder {root} does not exist (expected <val_root>/<class>/<images>)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"validation folder {root} has no class folders")
    if num_classes is not None:
        if num_classes < 1 or num_classes > len(folders):
            raise ValueError(f"num_classes must be in [1, {len(folders)}] for {root}, got {num_classes}")
        folders = folders[:num_classes]
    return folders


IMAGENET_CLASSES = 1000
CLASS_NAMES_HELP = (
    "a class-names file holds one prompt name per class folder, in sorted folder order: for ImageNet-1k "
    "1,000 names in the standard class-index order (= sorted wnid order), each the full label string the "
    "study used, e.g. line 1 'tench, Tinca tinca', line 2 'goldfish, Carassius auratus' (.txt: one per line; "
    ".json: a list, or {wnid: name}; .py: a file defining one dict {index: name}, as the ATC study's "
    "SD_setup/class_names.py IM_CLASS_DICT)"
)


def _read_names_file(path: Path) -> Any:
    """A list (by folder order) or a dict (folder name or index -> name)
    from a .txt, .json or .py names file. A .py file is parsed, never run:
    it must assign one dict literal (``NAME = {0: '...', ...}``)."""
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if path.suffix == ".py":
        import ast

        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                try:
                    table = ast.literal_eval(node.value)
                except ValueError:
                    break
                if all(isinstance(k, int) for k in table):
                    return [str(table[k]) for k in sorted(table)]
                return {str(k): str(v) for k, v in table.items()}
        raise ValueError(f"class-names file {path} defines no dict literal of names; {CLASS_NAMES_HELP}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def class_names(
    val_root: PathLike, names: Union[None, str, Sequence[str]] = None, num_classes: Optional[int] = None
) -> List[str]:
    """The class names used in the prompts, one per class folder (sorted).

    names: None = the folder names; a list (by sorted folder order); or a
    file (see ``CLASS_NAMES_HELP``): .txt (one name per line, by folder
    order), .json (a list, or a map from folder name, e.g. an ImageNet wnid,
    to class name) or .py (a dict literal {index: name}, parsed, not run).

    Length check: a list must name every class folder of `val_root` (1,000
    for ImageNet) or exactly the first `num_classes`; otherwise ValueError
    with both counts and the expected content.
    """
    folders = class_folders(val_root)
    total = len(folders)
    selected = folders if num_classes is None else class_folders(val_root, num_classes)
    if names is None:
        return [f.name for f in selected]
    source = "the class-names list"
    if isinstance(names, (str, Path)):
        path = Path(names)
        if not path.is_file():
            raise ValueError(f"class-names file {path} does not exist; {CLASS_NAMES_HELP}")
        source = f"class-names file {path}"
        loaded: Any = _read_names_file(path)
        if isinstance(loaded, dict):
            missing = [f.name for f in selected if f.name not in loaded]
            if missing:
                raise ValueError(f"{source} has no name for folders {missing[:5]}; {CLASS_NAMES_HELP}")
            return [str(loaded[f.name]) for f in selected]
        names = loaded
    names = [str(n) for n in names]
    if len(names) not in (total, len(selected)):
        expect = f"{total}" if len(selected) == total else f"{total} (all) or {len(selected)} (num_classes)"
        raise ValueError(
            f"{len(names)} class names for {total} class folders in {val_root}: {source} must hold {expect} "
            f"names; {CLASS_NAMES_HELP}"
        )
    return names[: len(selected)]


def make_reference_set(
    val_root: PathLike, out_dir: PathLike, per_class: int = 5, num_classes: Optional[int] = None
) -> Dict[str, Any]:
    """Copy the first `per_class` images (sorted by name) of each class folder
    into `out_dir` as ``<class>_<file name>`` (built under a temporary name,
    then renamed), with ``reference.json`` listing them. Returns that record."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    folders = class_folders(val_root, num_classes)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    files: List[str] = []
    try:
        for folder in folders:
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not images:
                raise ValueError(f"class folder {folder} holds no images")
            for src in images[:per_class]:
                name = f"{folder.name}_{src.name}"
                shutil.copyfile(src, tmp / name)
                files.append(name)
        record = {"val_root": str(val_root), "per_class": per_class, "classes": [f.name for f in folders], "files": files}
        (tmp / REFERENCE_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record
