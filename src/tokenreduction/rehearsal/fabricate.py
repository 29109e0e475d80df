"""Writers of the rehearsal's stand-ins, each in the real on-disk format that
:mod:`tokenreduction.data.readers` (or timm, or mmdet) reads.

``fabricate_<kind>(root, splits, seed)`` writes a small data set of that kind
under ``root``: ``splits`` maps a split name to its image count. Images are
JPEGs of varying sizes (so the readers' transforms resize and crop as on the
real sets) whose colour depends on the class. Every writer leaves ``root`` in
the exact layout the reader of the kind requires (see its docstring in
readers.py); :func:`fabricate` writes one stand-in of the rehearsal plan and
stamps it, so an unchanged stand-in is not written again.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from .standin import REPO_ROOT, is_current, stamp_path  # noqa: F401  (is_current re-exported)

PathLike = Union[str, Path]
#: classes of the single-label stand-ins; labels of the multi-label ones
NUM_CLASSES = 8
#: COCO's 80 category ids (1..90 with the ten unused ids left out) and a few of their names
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in COCO_UNUSED_IDS]
#: COCO's 80 category names, in category-id order (mmdet's CocoDataset selects the categories by name)
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
NUSWIDE_LABELS = ["animal", "beach", "buildings", "clouds", "flowers", "grass", "person", "sky", "sunset", "water"]


def _rng(seed: int, *keys: Any) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(str(k).encode()) for k in keys)])


def _write_jpeg(path: Path, rng: np.random.Generator, label: int) -> None:
    """A JPEG of 48-96 px per side: noise over a colour set by `label`."""
    from PIL import Image

    h, w = (int(v) for v in rng.integers(48, 97, size=2))
    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.float32)
    pixels = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=85)


def _labels(n: int, num_classes: int) -> list[int]:
    """Class of each of n images: every class present, in turn."""
    return [i % num_classes for i in range(n)]


def fabricate_imagenet(root: PathLike, splits: dict[str, int], seed: int = 0) -> None:
    """ImageNet as class folders: ``{train,val}/<wnid>/<wnid>_<i>.JPEG``."""
    root = Path(root)
    wnids = [f"n0{1440764 + 17 * c:07d}" for c in range(NUM_CLASSES)]
    for split in ("train", "val"):
        for i, c in enumerate(_labels(splits[split], NUM_CLASSES)):
            _write_jpeg(root / split / wnids[c] / f"{wnids[c]}_{split}_{i}.JPEG", _rng(seed, split, i), c)


def fabricate_imagefolder(root: PathLike, splits: dict[str, int], seed: int = 0) -> None:
    """``<split>/<class>/<image>`` for train and val."""
    root = Path(root)
    for split in ("train", "val"):
        for i, c in enumerate(_labels(splits[split], NUM_CLASSES)):
            _write_jpeg(root / split / f"class{c}" / f"{i}.jpg", _rng(seed, split, i), c)


def fabricate_nabirds(root: PathLike, splits: dict[str, int], seed: int = 0) -> None:
    """NABirds: ``images/<class dir>/<uuid>.jpg`` and the five text files.
    Leaf class ids are sparse and above the parents' (as the real 555 leaves
    among 1011 ids), so the reader's remapping to 0..C-1 runs."""
    root = Path(root)
    parents = [0, 1, 2]
    leaves = [295 + 7 * c for c in range(NUM_CLASSES)]
    images, labels, split_rows = [], [], []
    n = 0
    for split, is_train in (("train", 1), ("val", 0)):
        for i, c in enumerate(_labels(splits[split], NUM_CLASSES)):
            n += 1
            key = f"{n:08x}-0000-4000-8000-{n:012x}"
            rel = f"{leaves[c]:04d}/{key.replace('-', '')}.jpg"
            _write_jpeg(root / "images" / rel, _rng(seed, split, i), c)
            images.append(f"{key} {rel}")
            labels.append(f"{key} {leaves[c]}")
            split_rows.append(f"{key} {is_train}")
    classes = [f"{p} Parent group {p}" for p in parents] + [f"{c} Bird species {c}" for c in leaves]
    hierarchy = [f"{p} 0" for p in parents[1:]] + [f"{c} {parents[1 + k % 2]}" for k, c in enumerate(leaves)]
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split_rows),
        ("classes.txt", classes),
        ("hierarchy.txt", hierarchy),
    ):
        (root / name).write_text("\n".join(lines) + "\n")


def fabricate_coco(root: PathLike, splits: dict[str, int], seed: int = 0) -> None:
    """COCO 2014 multi-label: ``{train,val}2014/COCO_<split>2014_<id>.jpg`` and
    ``annotations/instances_{train,val}2014.json`` with the 80 real category
    ids; every image carries 1-3 categories (one annotation a crowd one), and
    one image per split has no annotation (the reader leaves it out)."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": cid, "name": f"category{cid}", "supercategory": "thing"} for cid in COCO_CATEGORY_IDS]
    ann_id = 0
    for split in ("train", "val"):
        rng = _rng(seed, "coco", split)
        images, annotations = [], []
        for i in range(splits[split] + 1):  # + the unannotated image
            image_id = 100000 * (split == "val") + 3 * i + 9
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            first = i % NUM_CLASSES
            _write_jpeg(root / f"{split}2014" / name, _rng(seed, split, i), first)
            images.append({"id": image_id, "file_name": name, "width": 64, "height": 64})
            if i == splits[split]:
                continue
            cats = {first, *(int(c) for c in rng.integers(0, NUM_CLASSES, size=int(rng.integers(0, 3))))}
            for k, c in enumerate(sorted(cats)):
                ann_id += 1
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[c * 10],
                    "iscrowd": int(k == 1), "bbox": [0, 0, 8, 8], "area": 64.0,
                })
        data = {"info": {"description": "tokenreduction rehearsal stand-in"}, "images": images,
                "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))


def fabricate_nuswide(root: PathLike, splits: dict[str, int], seed: int = 0) -> None:
    """NUS-WIDE, ASL's variant: ``nus_wid_data.csv`` (filepath, label = a
    stringified list of names, split) and the images it lists."""
    root = Path(root)
    rows = []
    for split in ("train", "val"):
        rng = _rng(seed, "nuswide", split)
        for i in range(splits[split]):
            first = i % len(NUSWIDE_LABELS)
            names = sorted({NUSWIDE_LABELS[first], *(NUSWIDE_LABELS[int(c)] for c in rng.integers(0, len(NUSWIDE_LABELS), size=int(rng.integers(0, 3))))})
            rel = f"images/{split}_{i:05d}.jpg"
            _write_jpeg(root / rel, _rng(seed, split, i), first)
            rows.append({"filepath": rel, "label": str(names), "split": split})
    with open(root / "nus_wid_data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)


def fabricate_ufgir(root: PathLike, splits: dict[str, int], seed: int = 0) -> None:
    """A UFGIR leaves set: ``images/<class>/<i>.jpg`` and
    ``{train,val,test,train_val}.csv`` (columns dir, class_id)."""
    root = Path(root)
    for split in ("train", "val", "test", "train_val"):
        rows = []
        for i, c in enumerate(_labels(splits[split], NUM_CLASSES)):
            rel = f"{c + 1}/{split}_{i}.jpg"
            _write_jpeg(root / "images" / rel, _rng(seed, split, i), c)
            rows.append({"dir": rel, "class_id": c})
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["dir", "class_id"])
            writer.writeheader()
            writer.writerows(rows)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a binary (H, W) mask (column-major runs,
    starting with a run of zeros), as its crowd annotations hold."""
    flat = mask.flatten(order="F").astype(np.uint8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"counts": runs, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def fabricate_coco_instances(root: PathLike, splits: dict[str, int], seed: int = 0) -> None:
    """COCO 2017 instances in their layout: ``{train,val}2017/<id:012d>.jpg``
    and ``annotations/instances_{train,val}2017.json`` with COCO's 80 category
    ids and names. Each image (COCO's sizes / 8) shows 1-3 filled shapes, each
    annotated with its polygon (the exact mask), its box and area; each split
    has one crowd annotation (uncompressed RLE, as COCO's) and one image
    without annotations. `splits`: annotated images per split."""
    from PIL import Image, ImageDraw

    from ..detection.data import CATEGORIES, polygon_area, shape_polygon

    root = Path(root)
    categories = [{"id": cid, "name": name, "supercategory": "object"} for cid, name in zip(COCO_CATEGORY_IDS, COCO_CLASSES)]
    ann_id = 0
    for split in ("train", "val"):
        rng = _rng(seed, "coco2017", split)
        images, annotations = [], []
        for i in range(splits[split] + 1):  # + one image without annotations
            image_id = 139 + 1000 * (split == "val") + 7 * i
            w, h = int(rng.integers(56, 81)), int(rng.integers(48, 81))
            pixels = rng.integers(0, 70, size=(h, w, 3), dtype=np.uint8)
            img = Image.fromarray(pixels)
            draw = ImageDraw.Draw(img)
            name = f"{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            for k in range(int(rng.integers(1, 4)) if i < splits[split] else 0):
                shape = CATEGORIES[(i + k) % len(CATEGORIES)]
                half = rng.uniform(0.12, 0.3, size=2) * (w, h)
                centre = rng.uniform(0.3, 0.7, size=2) * (w, h)
                poly = np.clip(shape_polygon(shape, *centre, *half, rng.uniform(0, np.pi)), 0, (w - 1, h - 1))
                draw.polygon([tuple(p) for p in poly], fill=tuple(int(v) for v in rng.integers(110, 256, size=3)))
                x0, y0 = poly.min(0)
                x1, y1 = poly.max(0)
                ann_id += 1
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[(7 * i + 3 * k) % 80],
                    "segmentation": [poly.round(2).reshape(-1).tolist()], "area": polygon_area(poly),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "iscrowd": 0,
                })
            if i == 0:  # a crowd region (a rectangle) as COCO annotates crowds
                mask = np.zeros((h, w), dtype=bool)
                mask[h // 2: h - 2, 2: w // 3] = True
                ann_id += 1
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[0],
                    "segmentation": _uncompressed_rle(mask), "area": float(mask.sum()),
                    "bbox": [2.0, float(h // 2), float(w // 3 - 2), float(h - 2 - h // 2)], "iscrowd": 1,
                })
            (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
            img.save(root / f"{split}2017" / name, format="JPEG", quality=90)
        data = {"info": {"description": "tokenreduction rehearsal stand-in of COCO 2017"}, "licenses": [],
                "images": images, "annotations": annotations, "categories": categories}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))


def fabricate_detection_config(path: PathLike, text: str) -> None:
    """The stand-in mmdet config (text from standin.detection_standin_config_text), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fabricate_detection_checkpoint(path: PathLike, config: str, python: str, seed: int = 0) -> None:
    """A ViT-Adapter 3x detector checkpoint of the stand-in model of mmdet
    config `config`, in mmdet's release format, written by the detection
    environment's `python` (the model is defined with mmcv and mmdet, which
    the main environment lacks): :mod:`.detection_checkpoint`. A missing
    ``<venv>/bin/python`` is built first by envs/install_mmdet.sh (what the
    DAG's detection_env job runs)."""
    if not Path(python).exists():
        venv = Path(python).parent.parent
        if Path(python).parent.name != "bin":
            raise RuntimeError(f"the detection interpreter {python} does not exist; the rehearsal writes its "
                               "ViT-Adapter checkpoints with it (run envs/install_mmdet.sh)")
        print(f"rehearsal: building the detection environment {venv} (envs/install_mmdet.sh), "
              "which writes the ViT-Adapter stand-in checkpoints", flush=True)
        subprocess.run(["bash", str(REPO_ROOT / "envs" / "install_mmdet.sh"), str(venv)], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([python, "-m", "tokenreduction.rehearsal.detection_checkpoint", str(config), str(path),
                           "--seed", str(seed)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"writing the detection stand-in checkpoint {path} with {python} failed:\n{proc.stderr[-3000:]}")


def _timm_state(model: str, model_kwargs: dict, seed: int) -> dict:
    """The state dict of timm `model` built with `model_kwargs`, random init."""
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model(model, pretrained=False, **model_kwargs).state_dict()


def _save(obj: Any, path: PathLike) -> None:
    """torch.save to `path`, atomically."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fabricate_timm_weights(path: PathLike, model: str, model_kwargs: dict, seed: int = 0) -> None:
    """The state dict of timm `model` (narrowed by `model_kwargs`, random
    init, its pretrained head of 1000 classes) as timm's loader reads a local
    pretrained file."""
    _save(_timm_state(model, model_kwargs, seed), path)


#: timm VisionTransformer block names -> SWAG's (``encoder.layers.layer_<i>.``)
SWAG_BLOCK_NAMES = {
    "norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "self_attention.in_proj_weight",
    "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
    "mlp.fc1": "mlp.linear_1", "mlp.fc2": "mlp.linear_2",
}
SWAG_TOP_NAMES = {
    "cls_token": "class_token", "patch_embed.proj.weight": "conv_proj.weight", "patch_embed.proj.bias": "conv_proj.bias",
    "norm.weight": "encoder.ln.weight", "norm.bias": "encoder.ln.bias",
    "head.weight": "head.layers.head.weight", "head.bias": "head.layers.head.bias",
}


def fabricate_swag_weights(path: PathLike, model: str, model_kwargs: dict, seed: int = 0) -> None:
    """A SWAG in1k checkpoint (the ``*_in1k.torch`` file SWAG's torch.hub
    entry points fetch): the plain state dict of SWAG's ViT, with its names
    (``encoder.layers.layer_<i>.self_attention.in_proj_weight``, ...), the
    position embedding as (S, 1, D) and a 1000-class head, made from a timm
    `model` (random init) at the preset's resolution."""
    state = {}
    for key, value in _timm_state(model, {**model_kwargs, "num_classes": 1000}, seed).items():
        if key == "pos_embed":
            state["encoder.pos_embedding"] = value.permute(1, 0, 2).contiguous()
        elif key in SWAG_TOP_NAMES:
            state[SWAG_TOP_NAMES[key]] = value
        elif key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            src = next(n for n in SWAG_BLOCK_NAMES if rest == n or rest.startswith(n + "."))
            state[f"encoder.layers.layer_{index}.{SWAG_BLOCK_NAMES[src]}{rest[len(src):]}"] = value
        else:
            raise ValueError(f"{model}: no SWAG name for {key}")
    _save(state, path)


def fabricate_mae_weights(path: PathLike, model: str, model_kwargs: dict, seed: int = 0) -> None:
    """An MAE fine-tuned release checkpoint (``mae_finetuned_vit_*.pth``):
    ``{"model": state}`` in MAE's names (timm's, with ``fc_norm`` for global
    average pooling and a 1000-class head)."""
    _save({"model": _timm_state(model, {**model_kwargs, "num_classes": 1000}, seed)}, path)


def fabricate_diffusion_pipeline(path: PathLike, model: str = "sd15", img_size: int = 64, seed: int = 0) -> None:
    """The tiny random-weight pipeline of diffusers layout `model`, saved as a
    pipeline folder (save_pretrained), as a local copy of the study's is."""
    from ..diffusion import save_tiny_pipeline

    save_tiny_pipeline(path, img_size, seed, model)


def fabricate_class_names(path: PathLike, count: int = NUM_CLASSES) -> None:
    """A class-names file in the format its suffix names: .txt (one name per
    line), .json (a list) or .py (a dict literal {index: name}, as the ATC
    study's SD_setup/class_names.py)."""
    path = Path(path)
    names = [f"stand-in class {i}, rehearsal {i}" for i in range(count)]
    if path.suffix == ".json":
        text = json.dumps(names)
    elif path.suffix == ".py":
        text = "{" + ", ".join(f"{i}: {name!r}" for i, name in enumerate(names)) + "}\n"
    else:
        text = "\n".join(names) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fabricate_inception_weights(path: PathLike, seed: int = 0) -> None:
    """clean-fid's ``inception-2015-12-05.pt`` stand-in: a TorchScript file
    with the interface clean-fid's InceptionV3W uses (``base(x,
    return_features=True)`` on [0, 255] images, ``base.layers(x)`` on
    normalised 299 px images, 2048 features), a small random network inside."""
    import torch
    from torch import nn

    class Layers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)
            self.proj = nn.Linear(8 * 4 * 4, 2048)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4).flatten(1)
            return self.proj(pooled).view(x.shape[0], 2048, 1, 1)

    class Base(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = Layers()

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = nn.functional.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
            return self.layers((x - 128) / 128)

    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.jit.save(torch.jit.script(Base().eval()), str(tmp))
    os.replace(tmp, path)


DATASET_WRITERS: dict[str, Callable[..., None]] = {
    "imagenet": fabricate_imagenet,
    "imagefolder": fabricate_imagefolder,
    "nabirds": fabricate_nabirds,
    "coco": fabricate_coco,
    "nuswide": fabricate_nuswide,
    "ufgir": fabricate_ufgir,
}


WEIGHT_WRITERS: dict[str, Callable[..., None]] = {
    "timm_weights": fabricate_timm_weights,
    "swag_weights": fabricate_swag_weights,
    "mae_weights": fabricate_mae_weights,
}


def fabricate(item: dict[str, Any]) -> None:
    """Write the stand-in of one plan item (from standin.standin_config) and
    stamp it last, so an interrupted write is redone."""
    path = Path(item["path"])
    if item["what"] in ("dataset", "coco_instances"):
        if path.exists():
            shutil.rmtree(path)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        writer = DATASET_WRITERS[item["kind"]] if item["what"] == "dataset" else fabricate_coco_instances
        writer(tmp, item["splits"])
        os.replace(tmp, path)
    elif item["what"] in WEIGHT_WRITERS:
        WEIGHT_WRITERS[item["what"]](path, item["model"], item["model_kwargs"])
    elif item["what"] == "diffusion_pipeline":
        fabricate_diffusion_pipeline(path, item["model"], item["img_size"])
    elif item["what"] == "class_names":
        fabricate_class_names(path, item["count"])
    elif item["what"] == "inception_weights":
        fabricate_inception_weights(path)
    elif item["what"] == "detection_config":
        fabricate_detection_config(path, item["text"])
    elif item["what"] == "detection_checkpoint":
        fabricate_detection_checkpoint(path, item["config"], item["python"])
    else:
        raise ValueError(f"unknown stand-in {item['what']!r}")
    Path(stamp_path(item)).write_text(json.dumps({"fingerprint": item["fingerprint"], **item}, sort_keys=True))
