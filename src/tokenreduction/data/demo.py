"""Demo datasets made from scikit-learn's bundled handwritten digits.

``load_digits`` ships 1797 grey 8x8 images (values 0..16) of the digits 0-9
inside scikit-learn, so the demo pipeline needs no download.

* :func:`make_digits_dataset` writes an image-folder tree
  ``out_dir/{train,val}/<digit>/<index>.png`` (RGB, upscaled to ``img_size``,
  ``<index>`` = position in ``load_digits``), split per class so both splits
  keep the class balance; ``out_dir/manifest.csv`` (file, label, split,
  source_index) is written last and marks the tree complete. Read back with
  kind ``"digits"``.
* :func:`make_digits_mosaic_dataset` writes multi-label mosaics: a 2x2 grid of
  cells (in the four corners, 20 px of 32 by default, overlapping a little in
  the middle), each a digit or blank, as ``out_dir/images/<n>.png`` plus
  ``out_dir/labels.csv`` (file, labels = the distinct digits space-separated,
  split, cells = the digit in each cell row-major or -1, sources = the
  ``load_digits`` index drawn into each cell or -1), written last. Train
  mosaics draw only train digits of the stratified split, val mosaics only val
  digits. Read back with kind ``"digits_multilabel"``.

* :func:`make_digits_ufgir_dataset` writes the digits in the UFGIR leaves
  format (CLCA): ``out_dir/images/<digit>/<index>.png`` plus ``train.csv``,
  ``val.csv``, ``test.csv`` and ``train_val.csv`` (columns ``dir``,
  ``class_id``), ``train_val.csv`` written last. Read back with kind
  ``"ufgir"`` (or the demo kind ``"digits_ufgir"``, made by the DAG).

All are deterministic given their arguments: the tree is built in a temporary
sibling directory and renamed into place, so an interrupted run never leaves
``out_dir`` looking complete.
"""
from __future__ import annotations

import csv
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
from PIL import Image

from .base import DatasetError, PathLike

DIGITS_MARKER = "manifest.csv"
MOSAIC_CSV = "labels.csv"
DIGIT_CLASSES = [str(d) for d in range(10)]
#: default side of a mosaic's digit, as a fraction of the mosaic's side
MOSAIC_CELL_FRACTION = 0.625


@functools.lru_cache(maxsize=1)
def _digits_cached() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits: (1797, 8, 8) float images in 0..16, (1797,) int labels (copies)."""
    images, labels = _digits_cached()
    return images.copy(), labels.copy()


def render_digit(pixels: np.ndarray, size: int) -> np.ndarray:
    """(8, 8) digit in 0..16 -> (size, size) uint8 grey image (bilinear upscale)."""
    arr = np.clip(np.rint(np.asarray(pixels, dtype=np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR))


def stratified_val_mask(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Bool mask (N,): True for the round(n_c * val_fraction) images of each class c
    chosen by a seeded permutation; classes are visited in sorted order."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        mask[idx[: int(round(len(idx) * val_fraction))]] = True
    return mask


def _save_png(arr: np.ndarray, path: Path) -> None:
    """Write an RGB PNG atomically (temporary name, then rename)."""
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


def _build_atomically(out_dir: PathLike, marker: str, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` (which must write ``marker`` last) in a temporary
    sibling of ``out_dir``, then replace ``out_dir`` with it. An existing
    ``out_dir`` is replaced only if it is empty or holds ``marker``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / marker).exists())):
        raise DatasetError(f"{out_dir} exists and was not made by this maker (no {marker}); refusing to overwrite it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def make_digits_dataset(out_dir: PathLike, img_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the digits as ``out_dir/{train,val}/<digit>/<index>.png``; returns ``out_dir``.

    The split is stratified by class (:func:`stratified_val_mask`).
    """
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    images, labels = load_digit_arrays()
    is_val = stratified_val_mask(labels, val_fraction, seed)

    def write(tmp: Path) -> None:
        rows = []
        for split in ("train", "val"):
            for d in DIGIT_CLASSES:
                (tmp / split / d).mkdir(parents=True)
        for i in range(len(labels)):
            split = "val" if is_val[i] else "train"
            rel = f"{split}/{labels[i]}/{i}.png"
            _save_png(render_digit(images[i], img_size), tmp / rel)
            rows.append([rel, int(labels[i]), split, i])
        _write_csv(tmp / DIGITS_MARKER, ["file", "label", "split", "source_index"], rows)

    return _build_atomically(out_dir, DIGITS_MARKER, write)


def make_digits_mosaic_dataset(
    out_dir: PathLike,
    img_size: int = 32,
    num_images: int = 1000,
    digits_per_image: Tuple[int, int] = (1, 3),
    seed: int = 0,
    val_fraction: float = 0.2,
    cell_size: Optional[int] = None,
) -> Path:
    """Write ``num_images`` 2x2 digit mosaics (``img_size`` px, cells of
    ``cell_size``) with multi-label targets; returns ``out_dir``.

    Each mosaic holds k digits, k uniform in ``digits_per_image`` (inclusive,
    at most 4), in k distinct random cells; the other cells are black. The last
    round(num_images * val_fraction) mosaics form the val split.
    ``cell_size`` (default ``round(img_size * MOSAIC_CELL_FRACTION)``, 20 px
    of 32): the side of each digit; the four cells sit in the four corners,
    so cells larger than ``img_size // 2`` overlap in a middle band, where the
    brighter pixel wins (the digits' blank margins mostly meet there). Digits
    at a quarter of the image (16 of 32 px) are too small for the demo's tiny
    ViTs (patch 4) to tell apart well; 20 px are recognisable.
    """
    lo, hi = (int(v) for v in digits_per_image)
    if not 0 <= lo <= hi <= 4:
        raise ValueError(f"digits_per_image must satisfy 0 <= lo <= hi <= 4, got {digits_per_image}")
    if img_size < 2:
        raise ValueError(f"img_size must be at least 2, got {img_size}")
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    images, labels = load_digit_arrays()
    is_val = stratified_val_mask(labels, val_fraction, seed)
    pools = {"train": np.flatnonzero(~is_val), "val": np.flatnonzero(is_val)}
    n_val = int(round(num_images * val_fraction))
    cell = round(img_size * MOSAIC_CELL_FRACTION) if cell_size is None else int(cell_size)
    if not img_size // 2 <= cell <= img_size:
        raise ValueError(f"cell_size must be in [img_size // 2, img_size] = [{img_size // 2}, {img_size}], got {cell_size}")
    far = img_size - cell  # offset of the second row / column
    rng = np.random.default_rng(seed + 1)
    digit_cache: dict[int, np.ndarray] = {}

    def write(tmp: Path) -> None:
        (tmp / "images").mkdir()
        rows = []
        width = len(str(num_images - 1))
        for n in range(num_images):
            split = "val" if n >= num_images - n_val else "train"
            k = int(rng.integers(lo, hi + 1))
            cells = rng.permutation(4)[:k]
            sources = [-1] * 4
            for c in cells:
                sources[int(c)] = int(rng.choice(pools[split]))
            canvas = np.zeros((img_size, img_size), dtype=np.uint8)
            for c, s in enumerate(sources):
                if s < 0:
                    continue
                if s not in digit_cache:
                    digit_cache[s] = render_digit(images[s], cell)
                r, q = divmod(c, 2)
                block = canvas[r * far:r * far + cell, q * far:q * far + cell]
                np.maximum(block, digit_cache[s], out=block)
            digits = [int(labels[s]) if s >= 0 else -1 for s in sources]
            present = sorted({d for d in digits if d >= 0})
            rel = f"images/{n:0{width}d}.png"
            _save_png(canvas, tmp / rel)
            rows.append([rel, " ".join(map(str, present)), split, " ".join(map(str, digits)), " ".join(map(str, sources))])
        _write_csv(tmp / MOSAIC_CSV, ["file", "labels", "split", "cells", "sources"], rows)

    return _build_atomically(out_dir, MOSAIC_CSV, write)


UFGIR_MARKER = "train_val.csv"


def make_digits_ufgir_dataset(
    out_dir: PathLike,
    img_size: int = 32,
    per_class: int = 100,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Path:
    """Write a UFGIR-format copy of the digits (the first `per_class` images
    of each digit in ``load_digits`` order); returns ``out_dir``.

    Per class, a seeded permutation puts round(n * test_fraction) images in
    test, round(n * val_fraction) in val and the rest in train; train_val is
    train followed by val, as the leaves datasets ship it.
    """
    if img_size < 1 or per_class < 3:
        raise ValueError(f"img_size must be >= 1 and per_class >= 3, got {img_size}, {per_class}")
    if not (0.0 < val_fraction < 1.0 and 0.0 < test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(f"val_fraction and test_fraction must be in (0, 1) and sum below 1, got {val_fraction}, {test_fraction}")
    images, labels = load_digit_arrays()
    rng = np.random.default_rng(seed)
    splits: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in range(len(DIGIT_CLASSES)):
        idx = np.flatnonzero(labels == c)[:per_class]
        idx = idx[rng.permutation(len(idx))]
        n_test, n_val = int(round(len(idx) * test_fraction)), int(round(len(idx) * val_fraction))
        splits["test"].extend(int(i) for i in idx[:n_test])
        splits["val"].extend(int(i) for i in idx[n_test:n_test + n_val])
        splits["train"].extend(int(i) for i in idx[n_test + n_val:])

    def write(tmp: Path) -> None:
        for d in DIGIT_CLASSES:
            (tmp / "images" / d).mkdir(parents=True)
        for i in sorted(i for part in splits.values() for i in part):
            _save_png(render_digit(images[i], img_size), tmp / "images" / f"{labels[i]}/{i}.png")
        rows = {s: [[f"{labels[i]}/{i}.png", int(labels[i])] for i in sorted(idx)] for s, idx in splits.items()}
        for s in ("train", "val", "test"):
            _write_csv(tmp / f"{s}.csv", ["dir", "class_id"], rows[s])
        _write_csv(tmp / UFGIR_MARKER, ["dir", "class_id"], rows["train"] + rows["val"])

    return _build_atomically(out_dir, UFGIR_MARKER, write)
