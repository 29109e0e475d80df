"""The data stage of the DAG: make a demo dataset or check a real one, then
write a manifest (kind, root, classes, split sizes) that later stages depend on."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from ..io import write_json

DEMO_MAKERS = ("digits", "digits_multilabel", "digits_ufgir")
#: the splits each kind is read with (train first)
SPLITS = {"ufgir": ("train", "val", "test", "train_val"), "digits_ufgir": ("train", "val", "test", "train_val")}


def prepare_dataset(kind: str, root: Union[str, Path], img_size: int, manifest: Union[str, Path]) -> dict:
    """Make (demo kinds) or open (real kinds) the dataset at `root`, check that
    every split reads, and write `manifest` atomically. Returns the manifest."""
    from . import DATASET_KINDS, build_dataset, make_digits_dataset, make_digits_mosaic_dataset
    from .demo import make_digits_ufgir_dataset

    makers = {
        "digits": make_digits_dataset,
        "digits_multilabel": make_digits_mosaic_dataset,
        "digits_ufgir": make_digits_ufgir_dataset,
    }

    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; known kinds: {', '.join(DATASET_KINDS)}")
    if kind in DEMO_MAKERS:
        makers[kind](root, img_size=img_size)
    splits = {}
    info = {}
    for split in SPLITS.get(kind, ("train", "val")):
        ds = build_dataset(kind, root, split)
        splits[split] = len(ds)
        info = {"num_classes": ds.num_classes, "multilabel": bool(ds.multilabel)}
    data = {"kind": kind, "root": str(root), "img_size": img_size, "splits": splits, **info}
    write_json(manifest, data)
    return data
