"""Datasets of the studies and the embedded demo datasets.

``build_dataset(kind, root, split, transform=None)`` reads one of
:data:`DATASET_KINDS` from disk and returns a torch Dataset with
``num_classes``, ``multilabel``, ``classes``, ``image_id(i)``, where
``dataset[i] = (transform(PIL RGB image), target)``: an int for single-label
kinds, a float32 multi-hot tensor (num_classes,) for multi-label kinds
(coco, nuswide, digits_multilabel). ``build_transform`` gives the matching
train/eval transforms; ``make_digits_dataset`` / ``make_digits_mosaic_dataset``
write the demo datasets from scikit-learn's bundled digits.
"""
from .base import BadImageError, DatasetError, ImageListDataset
from .demo import make_digits_dataset, make_digits_mosaic_dataset
from .readers import DATASET_KINDS, build_dataset
from .transforms import MULTILABEL_KINDS, build_transform

__all__ = [
    "BadImageError",
    "DATASET_KINDS",
    "DatasetError",
    "ImageListDataset",
    "MULTILABEL_KINDS",
    "build_dataset",
    "build_transform",
    "make_digits_dataset",
    "make_digits_mosaic_dataset",
]
