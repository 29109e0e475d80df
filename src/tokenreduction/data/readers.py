"""One reader per on-disk dataset format; :func:`build_dataset` dispatches.

Every reader returns an :class:`~tokenreduction.data.base.ImageListDataset`
(``num_classes``, ``multilabel``, ``classes``, ``image_id(i)``), so the
trainer treats all formats alike. Formats (see REFERENCES.md 1.5 and 5.2):

* ``imagenet``: either the torchvision devkit layout (``meta.bin`` or the
  devkit archive in root, plus ``train/`` and ``val/``; read with
  ``torchvision.datasets.ImageNet``) or plain class folders
  ``root/{train,val}/<wnid>/*.JPEG``.
* ``imagefolder``: ``root/<split>/<class>/<image>``; the classes are the sorted
  union of the class folders of all split folders present, so every split
  maps a class to the same index.
* ``nabirds``: ``images/``, ``images.txt``, ``image_class_labels.txt``,
  ``train_test_split.txt``, ``classes.txt``, ``hierarchy.txt``; the classes that
  label images (555 leaves) map to 0..554 in ascending order of their ids;
  ``val`` is the official test split.
* ``coco``: COCO-2014 multi-label: ``{train,val}2014/`` and
  ``annotations/instances_{train,val}2014.json``; images without annotations
  are left out; every annotation (crowd ones too) marks its category present;
  the 80 categories map to 0..79 in ascending order of their ids.
* ``nuswide``: ASL's ``nus_wid_data.csv`` (filepath, label = stringified list of
  names, split train/val); classes = sorted label names of the whole csv (81),
  or the ``classes`` option.
* ``ufgir``: CLCA leaves: ``images/`` plus ``{train,val,test,train_val}.csv``
  with columns ``dir`` (path relative to ``images/``) and ``class_id`` (0-based);
  num_classes = 1 + the largest class_id over the csvs present (or the
  ``num_classes`` option).
* ``digits`` / ``digits_multilabel``: the demo trees of :mod:`.demo`;
  ``digits_ufgir``: the digits in the ``ufgir`` format (same reader).
"""
from __future__ import annotations

import ast
import inspect
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .base import (
    IMG_EXTENSIONS,
    DatasetError,
    ImageListDataset,
    PathLike,
    check_split,
    open_text,
    parse_int,
    read_csv_rows,
    read_pairs,
    require_entries,
    skip_bad_images_default,
)
from .demo import DIGIT_CLASSES, DIGITS_MARKER, MOSAIC_CSV

TRAIN_VAL = ("train", "val")


# ---------------------------------------------------------------- folders
def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return out


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _scan_class_folders(
    root: Path, split: str, label: str, classes: Optional[Sequence[str]], splits: Sequence[str]
) -> ImageListDataset:
    if not root.is_dir():
        raise DatasetError(f"{label} root {root} does not exist; expected {root}/<split>/<class>/<image> folders")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(f"{label} root {root} lacks {split}/; expected {root}/{split}/<class>/<image> folders")
    if classes is None:
        names = set()
        for s in splits:
            if (root / s).is_dir():
                names.update(_class_dirs(root / s))
        classes = sorted(names)
    classes = list(classes)
    if not classes:
        raise DatasetError(f"{label} root {root}: no class folders in {split_dir}")
    index = {c: i for i, c in enumerate(classes)}
    paths, targets = [], []
    for name in _class_dirs(split_dir):
        if name not in index:
            raise DatasetError(f"{label}: class folder {split_dir / name} is not one of the {len(classes)} classes")
        files = _list_images(split_dir / name)
        paths += files
        targets += [index[name]] * len(files)
    return ImageListDataset(paths, targets, num_classes=len(classes), classes=classes, root=root, name=f"{label}:{split}")


def read_imagefolder(root: Path, split: str, classes: Optional[Sequence[str]] = None) -> ImageListDataset:
    check_split("imagefolder", split, ("train", "val", "test"))
    return _scan_class_folders(root, split, "imagefolder", classes, ("train", "val", "test"))


def read_imagenet(root: Path, split: str) -> ImageListDataset:
    check_split("imagenet", split, TRAIN_VAL)
    devkit = (root / "meta.bin").is_file() or (root / "ILSVRC2012_devkit_t12.tar.gz").is_file()
    if not devkit:
        return _scan_class_folders(root, split, "ImageNet", None, TRAIN_VAL)
    require_entries(root, [f"{split}/"], "ImageNet", "meta.bin (or ILSVRC2012_devkit_t12.tar.gz), train/<wnid>/, val/<wnid>/")
    from torchvision.datasets import ImageNet

    try:
        tv = ImageNet(str(root), split=split)
    except (RuntimeError, OSError, ValueError) as e:  # corrupt meta.bin, unreadable archive
        raise DatasetError(f"ImageNet root {root}: torchvision could not read it: {e}") from None
    ds = ImageListDataset(
        [p for p, _ in tv.samples],
        [t for _, t in tv.samples],
        num_classes=len(tv.classes),
        classes=[names[0] for names in tv.classes],
        root=root,
        name=f"ImageNet:{split}",
    )
    ds.wnids = list(tv.wnids)
    return ds


# ---------------------------------------------------------------- NABirds
NABIRDS_LAYOUT = "images/, images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, hierarchy.txt"


def read_nabirds(root: Path, split: str) -> ImageListDataset:
    check_split("nabirds", split, TRAIN_VAL)
    needed = ["images/", "images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "hierarchy.txt"]
    require_entries(root, needed, "NABirds", NABIRDS_LAYOUT)
    images = {k: (n, v) for n, k, v in read_pairs(root / "images.txt")}
    labels_file = root / "image_class_labels.txt"
    labels = {k: parse_int(v, labels_file, n, "class id") for n, k, v in read_pairs(labels_file)}
    split_file = root / "train_test_split.txt"
    is_train = {}
    for n, k, v in read_pairs(split_file):
        if v not in ("0", "1"):
            raise DatasetError(f"{split_file}:{n}: is_training_image must be 0 or 1, got {v!r}")
        is_train[k] = v == "1"
    classes_file = root / "classes.txt"
    names = {parse_int(k, classes_file, n, "class id"): v for n, k, v in read_pairs(classes_file)}

    used = sorted(set(labels.values()))  # ascending ids -> 0..C-1 (not the reference's unordered set)
    missing = [c for c in used if c not in names]
    if missing:
        raise DatasetError(f"{classes_file} lacks class id(s) {missing[:5]} used in {labels_file}")
    remap = {c: i for i, c in enumerate(used)}
    want_train = split == "train"
    paths, targets, ids = [], [], []
    for key, (n, rel) in images.items():
        if key not in labels:
            raise DatasetError(f"{labels_file} has no label for image {key} (images.txt line {n})")
        if key not in is_train:
            raise DatasetError(f"{split_file} has no split for image {key} (images.txt line {n})")
        if is_train[key] == want_train:
            paths.append(root / "images" / rel)
            targets.append(remap[labels[key]])
    ds = ImageListDataset(
        paths, targets, num_classes=len(used), classes=[names[c] for c in used], root=root, name=f"NABirds:{split}"
    )
    ds.source_class_ids = used
    return ds


# ---------------------------------------------------------------- COCO
COCO_LAYOUT = "train2014/, val2014/, annotations/instances_train2014.json, annotations/instances_val2014.json"


def read_coco(root: Path, split: str) -> ImageListDataset:
    check_split("coco", split, TRAIN_VAL)
    ann_rel = f"annotations/instances_{split}2014.json"
    require_entries(root, [f"{split}2014/", ann_rel], "COCO", COCO_LAYOUT)
    ann_file = root / ann_rel
    with open_text(ann_file) as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{ann_file} is not valid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file} holds a JSON {type(data).__name__}, expected an object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file} lacks the '{key}' list")
    try:
        cat_ids = sorted(int(c["id"]) for c in data["categories"])
        cat_name = {int(c["id"]): c.get("name", str(c["id"])) for c in data["categories"]}
        files = {int(im["id"]): im["file_name"] for im in data["images"]}
        pairs = [(a.get("id"), int(a["image_id"]), int(a["category_id"])) for a in data["annotations"]]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"lacks the field {e}" if isinstance(e, KeyError) else f"has a malformed entry ({e})"
        raise DatasetError(f"{ann_file} {what}; expected COCO instances format") from None
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    present: dict[int, set] = {}
    for ann_id, img, cat in pairs:
        if cat not in cat_index:
            raise DatasetError(f"{ann_file}: annotation {ann_id} has unknown category_id {cat}")
        if img not in files:
            raise DatasetError(f"{ann_file}: annotation {ann_id} refers to unknown image_id {img}")
        present.setdefault(img, set()).add(cat_index[cat])
    image_ids = sorted(present)  # images with no annotation are left out
    targets = np.zeros((len(image_ids), len(cat_ids)), dtype=np.uint8)
    for row, img in enumerate(image_ids):
        targets[row, sorted(present[img])] = 1
    ds = ImageListDataset(
        [root / f"{split}2014" / files[i] for i in image_ids],
        targets,
        num_classes=len(cat_ids),
        multilabel=True,
        classes=[cat_name[c] for c in cat_ids],
        root=root,
        name=f"COCO:{split}",
    )
    ds.coco_image_ids = image_ids
    ds.category_ids = cat_ids
    return ds


# ---------------------------------------------------------------- NUS-WIDE
def _parse_label_list(value: str, path: Path, lineno: int) -> list[str]:
    try:
        names = ast.literal_eval(value.strip()) if value.strip() else []
    except (ValueError, SyntaxError):
        names = None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{path}:{lineno}: label {value!r} is not a list of names like \"['sky', 'clouds']\"")
    return list(names)


def read_nuswide(root: Path, split: str, classes: Optional[Sequence[str]] = None, csv_name: str = "nus_wid_data.csv") -> ImageListDataset:
    check_split("nuswide", split, TRAIN_VAL)
    require_entries(root, [csv_name], "NUS-WIDE", f"{csv_name} (columns filepath, label, split) and the images it lists")
    csv_path = root / csv_name
    rows = read_csv_rows(csv_path, ["filepath", "label", "split"])
    parsed = [(n, r["filepath"], _parse_label_list(r["label"], csv_path, n), r["split"].strip()) for n, r in rows]
    for n, _, _, s in parsed:
        if s not in TRAIN_VAL:
            raise DatasetError(f"{csv_path}:{n}: split {s!r} is not 'train' or 'val'")
    if classes is None:
        classes = sorted({name for _, _, names, _ in parsed for name in names})
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    chosen = [p for p in parsed if p[3] == split]
    targets = np.zeros((len(chosen), len(classes)), dtype=np.uint8)
    for row, (n, _, names, _) in enumerate(chosen):
        for name in names:
            if name not in index:
                raise DatasetError(f"{csv_path}:{n}: label {name!r} is not one of the {len(classes)} classes")
            targets[row, index[name]] = 1
    return ImageListDataset(
        [root / fp for _, fp, _, _ in chosen],
        targets,
        num_classes=len(classes),
        multilabel=True,
        classes=classes,
        root=root,
        name=f"NUS-WIDE:{split}",
    )


# ---------------------------------------------------------------- UFGIR
UFGIR_SPLITS = {"train": "train.csv", "val": "val.csv", "test": "test.csv", "train_val": "train_val.csv"}


def read_ufgir(root: Path, split: str, images_dir: str = "images", num_classes: Optional[int] = None) -> ImageListDataset:
    check_split("ufgir", split, tuple(UFGIR_SPLITS))
    layout = f"{images_dir}/ and train.csv, val.csv, test.csv, train_val.csv (columns dir, class_id)"
    require_entries(root, [f"{images_dir}/", UFGIR_SPLITS[split]], "UFGIR", layout)
    tables = {}
    for s, fname in UFGIR_SPLITS.items():
        path = root / fname
        if path.is_file():
            rows = read_csv_rows(path, ["dir", "class_id"])
            tables[s] = [(r["dir"], parse_int(r["class_id"], path, n, "class_id"), n) for n, r in rows]
    if num_classes is None:
        num_classes = 1 + max((c for t in tables.values() for _, c, _ in t), default=-1)
    for s, t in tables.items():
        for _, c, n in t:
            if not 0 <= c < num_classes:
                raise DatasetError(f"{root / UFGIR_SPLITS[s]}:{n}: class_id {c} outside 0..{num_classes - 1}")
    chosen = tables[split]
    return ImageListDataset(
        [root / images_dir / d for d, _, _ in chosen],
        [c for _, c, _ in chosen],
        num_classes=num_classes,
        root=root / images_dir,
        name=f"UFGIR:{split}",
    )


# ---------------------------------------------------------------- demo digits
def read_digits(root: Path, split: str) -> ImageListDataset:
    check_split("digits", split, TRAIN_VAL)
    require_entries(root, [DIGITS_MARKER, f"{split}/"], "digits", f"{{train,val}}/<digit>/*.png and {DIGITS_MARKER} (made by make_digits_dataset)")
    return _scan_class_folders(root, split, "digits", DIGIT_CLASSES, TRAIN_VAL)


def read_digits_multilabel(root: Path, split: str) -> ImageListDataset:
    check_split("digits_multilabel", split, TRAIN_VAL)
    require_entries(root, [MOSAIC_CSV, "images/"], "digits_multilabel", f"images/ and {MOSAIC_CSV} (made by make_digits_mosaic_dataset)")
    csv_path = root / MOSAIC_CSV
    chosen = [(n, r) for n, r in read_csv_rows(csv_path, ["file", "labels", "split"]) if r["split"] == split]
    targets = np.zeros((len(chosen), 10), dtype=np.uint8)
    for row, (n, r) in enumerate(chosen):
        for tok in r["labels"].split():
            d = parse_int(tok, csv_path, n, "label")
            if not 0 <= d < 10:
                raise DatasetError(f"{csv_path}:{n}: label {d} outside 0..9")
            targets[row, d] = 1
    return ImageListDataset(
        [root / r["file"] for _, r in chosen],
        targets,
        num_classes=10,
        multilabel=True,
        classes=DIGIT_CLASSES,
        root=root,
        name=f"digits_multilabel:{split}",
    )


READERS: dict[str, Callable[..., ImageListDataset]] = {
    "digits": read_digits,
    "digits_multilabel": read_digits_multilabel,
    "imagenet": read_imagenet,
    "imagefolder": read_imagefolder,
    "nabirds": read_nabirds,
    "coco": read_coco,
    "nuswide": read_nuswide,
    "ufgir": read_ufgir,
    "digits_ufgir": read_ufgir,  # the demo leaves: UFGIR format, made by the DAG
}
DATASET_KINDS = tuple(READERS)


def build_dataset(
    kind: str, root: PathLike, split: str, transform=None, *, skip_bad_images: Optional[bool] = None, **options
) -> ImageListDataset:
    """Read dataset ``kind`` at ``root`` for ``split``; ``dataset[i] = (transform(image), target)``.

    ``options`` go to the reader: ``classes`` (imagefolder, nuswide),
    ``csv_name`` (nuswide), ``images_dir`` and ``num_classes`` (ufgir).
    Raises DatasetError (a ValueError) naming the file on a missing or
    malformed dataset, annotation or split file; reading a missing, corrupt
    or truncated image raises BadImageError (a DatasetError) naming the file
    and the dataset, unless ``skip_bad_images`` (default: the environment
    variable TOKENREDUCTION_SKIP_BAD_IMAGES, else False), which logs and
    replaces each bad image (see :class:`ImageListDataset`).
    """
    if kind not in READERS:
        raise DatasetError(f"unknown dataset kind {kind!r}; expected one of {list(DATASET_KINDS)}")
    reader = READERS[kind]
    accepted = [p for p in inspect.signature(reader).parameters if p not in ("root", "split")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetError(f"dataset kind {kind!r} takes no option(s) {unknown}; it accepts {accepted}")
    if root is None or str(root) == "":
        raise DatasetError(f"dataset kind {kind!r}: no root given")
    skip = skip_bad_images_default() if skip_bad_images is None else bool(skip_bad_images)
    ds = reader(Path(root).expanduser(), split, **options)
    ds.skip_bad_images = skip
    ds.transform = transform
    ds.kind = kind
    ds.split = split
    return ds
