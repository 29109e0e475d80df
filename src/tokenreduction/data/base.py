"""Shared pieces of the dataset readers: the error types, the list-of-files
dataset every reader returns, and small file-format helpers.

A file a reader cannot use raises one :class:`DatasetError` naming the file
(and, for images, the dataset): a missing annotation or split file, a
malformed or undecodable one, a missing, corrupt or truncated image. Bad
images can instead be skipped (``skip_bad_images``, off by default; the
workflow's ``data.skip_bad_images`` sets :data:`SKIP_BAD_IMAGES_ENV`): each one
is logged with the running count and replaced by the next readable image.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

PathLike = Union[str, os.PathLike]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: environment variable giving the default of ``skip_bad_images`` (1/0,
#: true/false, yes/no, on/off); the workflow sets it from ``data.skip_bad_images``
SKIP_BAD_IMAGES_ENV = "TOKENREDUCTION_SKIP_BAD_IMAGES"

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset root, or a file in it, is missing or malformed."""


class BadImageError(DatasetError):
    """An image file listed by a dataset is missing, unreadable, corrupt or
    truncated. ``path`` is the file and ``reason`` the short cause (both None
    when rebuilt from a message alone, as torch's DataLoader workers do)."""

    def __init__(self, message: str, path: Optional[PathLike] = None, reason: Optional[str] = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.reason = reason


def skip_bad_images_default() -> bool:
    """``skip_bad_images`` when not given: the value of :data:`SKIP_BAD_IMAGES_ENV`
    (unset or empty: False)."""
    raw = os.environ.get(SKIP_BAD_IMAGES_ENV, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise DatasetError(f"environment variable {SKIP_BAD_IMAGES_ENV}={raw!r} is not one of 1/0, true/false, yes/no, on/off")


def load_rgb(path: PathLike, dataset: Optional[str] = None) -> Image.Image:
    """Open and fully decode an image file as a PIL RGB image.

    Raises :class:`BadImageError` naming the file (and ``dataset`` when given)
    if it is absent, unreadable, not an image, corrupt or truncated, never
    the decoder's own exception from deep inside PIL.
    """
    where = f"{dataset}: " if dataset else ""
    hint = f" (set data.skip_bad_images: true, or {SKIP_BAD_IMAGES_ENV}=1, to skip bad images)"
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise BadImageError(f"{where}image file {path} not found{hint}", path, "not found") from None
    except OSError as e:  # a folder, no permission
        reason = f"cannot be opened: {e.strerror or e}"
        raise BadImageError(f"{where}image file {path} {reason}{hint}", path, reason) from None
    try:
        with f:
            img = Image.open(f)
            return img.convert("RGB")  # decodes every pixel: truncation shows here
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... on bad data
        if isinstance(e, UnidentifiedImageError):  # its message repeats the path
            reason = "is corrupt or truncated: not a file PIL can identify as an image"
        else:
            reason = f"is corrupt or truncated: {type(e).__name__}: {e}"
        raise BadImageError(f"{where}image file {path} {reason}{hint}", path, reason) from None


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

    An image that cannot be read raises :class:`BadImageError` naming the file
    and the dataset; with ``skip_bad_images`` it is logged (a warning with the
    count skipped so far by this process) and replaced by the next readable
    image of the list, with that image's target, so the length and the batch
    shapes stay fixed. ``skipped`` lists the files skipped by this process.
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
        skip_bad_images: bool = False,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.skip_bad_images = bool(skip_bad_images)
        self._bad: dict[int, str] = {}  # index -> reason, for the files skipped by this process
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

    @property
    def skipped(self) -> list[Path]:
        """The image files this process skipped as unreadable, in index order."""
        return [self.paths[i] for i in sorted(self._bad)]

    def _load(self, index: int) -> tuple[int, Image.Image]:
        """(index actually read, its image): ``index`` itself, or with
        ``skip_bad_images`` the next readable one (wrapping around)."""
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                return i, load_rgb(self.paths[i], self.name)
            except BadImageError as err:
                if not self.skip_bad_images:
                    raise
                self._bad[i] = err.reason or str(err)
                log.warning(
                    "%s: skipped bad image %s (%s); %d bad image(s) skipped so far by this process",
                    self.name, self.paths[i], self._bad[i], len(self._bad),
                )
        raise DatasetError(f"{self.name}: none of its {n} image files is readable (all {len(self._bad)} skipped)")

    def __getitem__(self, index: int):
        index, img = self._load(index)
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
    with open_text(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                parts = line.split(maxsplit=1)
                if len(parts) != 2:
                    raise DatasetError(f"{path}:{lineno}: expected '<id> <value>', got {line!r}")
                out.append((lineno, parts[0], parts[1].strip()))
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path} is not UTF-8 text (corrupt?): {e}") from None
    return out


def read_csv_rows(path: Path, columns: Sequence[str]) -> list[tuple[int, dict]]:
    """CSV rows as dicts (with their line numbers); the header must hold ``columns``."""
    with open_text(path, newline="") as f:
        try:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise DatasetError(f"{path} lacks column(s) {missing}; has {header}, expected {list(columns)}")
            rows = [(reader.line_num, row) for row in reader]
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path} is not UTF-8 text (corrupt?): {e}") from None
        except csv.Error as e:
            raise DatasetError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    for lineno, row in rows:
        short = [c for c in columns if row.get(c) is None]
        if short:
            raise DatasetError(f"{path}:{lineno}: row has no value for column(s) {short} (truncated file?)")
    return rows


def open_text(path: Path, newline: Optional[str] = None):
    """``open(path)`` for reading UTF-8 text; a file that is missing or cannot
    be opened raises DatasetError naming it."""
    try:
        return open(path, encoding="utf-8", newline=newline)
    except FileNotFoundError:
        raise DatasetError(f"annotation file {path} not found") from None
    except OSError as e:
        raise DatasetError(f"annotation file {path} cannot be opened: {e.strerror or e}") from None


def parse_int(value: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise DatasetError(f"{path}:{lineno}: {what} {value!r} is not an integer") from None


def check_split(kind: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise DatasetError(f"{kind}: unknown split {split!r}; expected one of {list(allowed)}")
