"""A fabricated COCO-format instance-segmentation set for the embedded demo.

Each image shows a few filled shapes (rectangles, ellipses, triangles) on a
noisy background. Every shape is drawn from its polygon, so the polygon is
the exact instance mask; the box is the polygon's extent. Written as PNG
images plus ``annotations/instances_{split}.json`` in COCO's layout:

    root/{split}/000000.png ...
    root/annotations/instances_{split}.json

Needs numpy and Pillow only (both present in the detection environment).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

CATEGORIES = ("rectangle", "ellipse", "triangle")


def shape_polygon(kind: str, cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    """(K, 2) polygon vertices (x, y) of a shape centred at (cx, cy) with
    half-extents (w, h) before rotation by `angle` radians."""
    if kind == "rectangle":
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]], dtype=np.float64)
    elif kind == "ellipse":
        t = np.linspace(0.0, 2.0 * math.pi, 24, endpoint=False)
        pts = np.stack([w * np.cos(t), h * np.sin(t)], axis=1)
    elif kind == "triangle":
        pts = np.array([[0.0, -h], [w, h], [-w, h]], dtype=np.float64)
    else:
        raise ValueError(f"unknown shape {kind!r}; use one of {', '.join(CATEGORIES)}")
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return pts @ rot.T + np.array([cx, cy])


def polygon_area(poly: np.ndarray) -> float:
    """Shoelace area of a (K, 2) polygon."""
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def make_shapes_coco(
    root: str | Path,
    splits: Sequence[str] = ("train", "val"),
    num_images: int = 8,
    image_size: int = 128,
    max_shapes: int = 3,
    seed: int = 0,
) -> dict:
    """Write the fabricated set under `root`; returns {split: annotation path}.

    Every split gets `num_images` images of `image_size` px with 1..max_shapes
    shapes each (clipped to the image). Deterministic for a given seed."""
    from PIL import Image, ImageDraw

    if num_images < 1 or image_size < 32 or max_shapes < 1:
        raise ValueError("need num_images >= 1, image_size >= 32 and max_shapes >= 1")
    root = Path(root)
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)]
    out = {}
    for split in splits:
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(num_images):
            background = rng.integers(0, 60, size=(image_size, image_size, 3), dtype=np.uint8)
            img = Image.fromarray(background)
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(1, max_shapes + 1))):
                cat = int(rng.integers(len(CATEGORIES)))
                w, h = rng.uniform(0.08, 0.25, size=2) * image_size
                cx, cy = rng.uniform(0.25, 0.75, size=2) * image_size
                poly = shape_polygon(CATEGORIES[cat], cx, cy, w, h, rng.uniform(0, math.pi))
                poly = np.clip(poly, 0, image_size - 1)
                colour = tuple(int(v) for v in rng.integers(100, 256, size=3))
                draw.polygon([tuple(p) for p in poly], fill=colour)
                x0, y0 = poly.min(0)
                x1, y1 = poly.max(0)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": cat + 1,
                        "segmentation": [poly.round(2).reshape(-1).tolist()],
                        "area": polygon_area(poly),
                        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                        "iscrowd": 0,
                    }
                )
            name = f"{i:06d}.png"
            img.save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
        ann_path = root / "annotations" / f"instances_{split}.json"
        ann_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ann_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        tmp.replace(ann_path)
        out[split] = str(ann_path)
    return out
