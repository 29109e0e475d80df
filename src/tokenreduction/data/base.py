"""Shared pieces of the dataset readers: the error type, the list-of-files
dataset every reader returns, and small file-format helpers.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

PathLike = Union[str, os.PathLike]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset root, or a file in it, is missing or malformed."""


def load_rgb(path: PathLike) -> Image.Image:
    """Open an image file as a PIL RGB image (raises DatasetError if absent)."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image file {path} not found") from None


def stable_ids(paths: Sequence[Path], base: Path) -> list[str]:
    """One id per image: the file stem; if two stems collide, the path relative
    to ``base`` without suffix, with separators replaced by ``__``."""
    ids = [p.stem for p in paths]
    if len(set(ids)) == len(ids):
        return ids
    ids = []
    for p in paths:
        try:
            rel = p.relative_to(base)
        except ValueError:
            rel = p
        ids.append("__".join(rel.with_suffix("").parts))
    seen: dict[str, int] = {}
    out = []
    for i in ids:  # the same file listed twice: keep ids unique
        k = seen.get(i, 0)
        seen[i] = k + 1
        out.append(i if k == 0 else f"{i}_dup{k}")
    return out


class ImageListDataset(Dataset):
    """Images given as a list of files plus their targets.

    ``targets`` is an int array (N,) for single-label data, or a 0/1 array
    (N, num_classes) for multi-label data, where ``__getitem__`` returns a
    float32 multi-hot tensor. ``image(index)`` is ``transform(PIL RGB image)``
    (the PIL image itself when ``transform`` is None).
    """

    def __init__(
        self,
        paths: Sequence[PathLike],
        targets: Union[Sequence[int], np.ndarray],
        *,
        num_classes: int,
        multilabel: bool = False,
        classes: Optional[Sequence[str]] = None,
        root: Optional[PathLike] = None,
        ids: Optional[Sequence[str]] = None,
        transform: Optional[Callable] = None,
        name: str = "dataset",
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.root = Path(root) if root is not None else None
        self.num_classes = int(num_classes)
        self.multilabel = bool(multilabel)
        self.classes = list(classes) if classes is not None else None
        self.transform = transform
        self.name = name
        n = len(self.paths)
        if self.multilabel:
            t = np.asarray(targets, dtype=np.uint8).reshape(n, -1) if n else np.zeros((0, num_classes), np.uint8)
            if t.shape != (n, self.num_classes):
                raise DatasetError(f"{name}: multi-hot targets have shape {t.shape}, expected ({n}, {num_classes})")
        else:
            t = np.asarray(targets, dtype=np.int64).reshape(-1)
            if t.shape[0] != n:
                raise DatasetError(f"{name}: {t.shape[0]} targets for {n} images")
            if n and (t.min() < 0 or t.max() >= self.num_classes):
                raise DatasetError(f"{name}: label {int(t.min() if t.min() < 0 else t.max())} outside 0..{num_classes - 1}")
        self.targets = t
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise DatasetError(f"{name}: {len(self.classes)} class names for {num_classes} classes")
        self.ids = list(ids) if ids is not None else stable_ids(self.paths, self.root or Path("/"))
        if len(self.ids) != n:
            raise DatasetError(f"{name}: {len(self.ids)} image ids for {n} images")

    def __len__(self) -> int:
        return len(self.paths)

    def target(self, index: int) -> Union[int, torch.Tensor]:
        if self.multilabel:
            return torch.from_numpy(self.targets[index].astype(np.float32))
        return int(self.targets[index])

    def __getitem__(self, index: int):
        img = load_rgb(self.paths[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.target(index)

    def image_id(self, index: int) -> str:
        """Stable id of image ``index`` (its file stem, see :func:`stable_ids`)."""
        return self.ids[index]

    def __repr__(self) -> str:
        kind = "multi-label" if self.multilabel else "single-label"
        return f"{type(self).__name__}({self.name}, {len(self)} images, {self.num_classes} classes, {kind}, root={self.root})"


# ----------------------------------------------------------------- file helpers
def require_entries(root: Path, needed: Iterable[str], label: str, layout: str) -> None:
    """Every name in ``needed`` (a trailing '/' marks a folder) must exist under
    ``root``; otherwise raise one DatasetError naming the first missing one and
    the expected ``layout``."""
    if not root.is_dir():
        state = "is not a directory" if root.exists() else "does not exist"
        raise DatasetError(f"{label} root {root} {state}; expected {layout}")
    for name in needed:
        p = root / name.rstrip("/")
        ok = p.is_dir() if name.endswith("/") else p.is_file()
        if not ok:
            raise DatasetError(f"{label} root {root} lacks {name}; expected {layout}")


def read_pairs(path: Path) -> list[tuple[int, str, str]]:
    """Lines ``<key> <value...>`` -> (line number, key, value); blank lines skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise DatasetError(f"{path}:{lineno}: expected '<id> <value>', got {line!r}")
            out.append((lineno, parts[0], parts[1].strip()))
    return out


def read_csv_rows(path: Path, columns: Sequence[str]) -> list[tuple[int, dict]]:
    """CSV rows as dicts (with their line numbers); the header must hold ``columns``."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise DatasetError(f"{path} lacks column(s) {missing}; has {header}, expected {list(columns)}")
        return [(reader.line_num, row) for row in reader]


def parse_int(value: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DatasetError(f"{path}:{lineno}: {what} {value!r} is not an integer") from None


def check_split(kind: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise DatasetError(f"{kind}: unknown split {split!r}; expected one of {list(allowed)}")
