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


def class_names(
    val_root: PathLike, names: Union[None, str, Sequence[str]] = None, num_classes: Optional[int] = None
) -> List[str]:
    """The class names used in the prompts, one per class folder (sorted).

    names: None = the folder names; a list (by sorted folder order); or a
    file: .txt (one name per line, by folder order) or .json (a list, or a
    map from folder name, e.g. an ImageNet wnid, to class name).
    """
    folders = class_folders(val_root, num_classes)
    if names is None:
        return [f.name for f in folders]
    if isinstance(names, (str, Path)):
        path = Path(names)
        if not path.is_file():
            raise ValueError(f"class-names file {path} does not exist")
        if path.suffix == ".json":
            loaded: Any = json.loads(path.read_text())
        else:
            loaded = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if isinstance(loaded, dict):
            missing = [f.name for f in folders if f.name not in loaded]
            if missing:
                raise ValueError(f"class-names file {path} has no name for folders {missing[:5]}")
            return [str(loaded[f.name]) for f in folders]
        names = loaded
    names = [str(n) for n in names]
    if len(names) < len(folders):
        raise ValueError(f"{len(names)} class names for {len(folders)} class folders in {val_root}")
    return names[: len(folders)]


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
