"""Dataset readers on tiny fabricated copies of each on-disk format, the demo
digit makers, and the transforms."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from tokenreduction.data import (
    DATASET_KINDS,
    BadImageError,
    DatasetError,
    build_dataset,
    build_transform,
    make_digits_dataset,
    make_digits_mosaic_dataset,
)
from tokenreduction.data.demo import load_digit_arrays, render_digit, stratified_val_mask


def write_image(path: Path, size=(12, 10), value: int = 0, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)
    return path


def write_lines(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def targets(ds):
    return [ds[i][1] for i in range(len(ds))]


# ------------------------------------------------------------ image folders
def make_folder_tree(root: Path) -> None:
    for split, layout in {"train": {"cat": 2, "dog": 3}, "val": {"cat": 1, "eel": 1}}.items():
        for cls, n in layout.items():
            for i in range(n):
                write_image(root / split / cls / f"{split}_{cls}_{i}.png", value=10 * i, mode="L")


def test_imagefolder_reads_classes_targets_and_ids(tmp_path):
    make_folder_tree(tmp_path)
    tr = build_dataset("imagefolder", tmp_path, "train")
    va = build_dataset("imagefolder", tmp_path, "val")
    assert tr.classes == va.classes == ["cat", "dog", "eel"]  # union over splits: same index everywhere
    assert tr.num_classes == 3 and not tr.multilabel
    assert len(tr) == 5 and len(va) == 2
    assert targets(tr) == [0, 0, 1, 1, 1]
    assert targets(va) == [0, 2]
    assert [tr.image_id(i) for i in range(2)] == ["train_cat_0", "train_cat_1"]
    img, _ = tr[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (12, 10)


def test_image_ids_fall_back_to_relative_path_when_stems_collide(tmp_path):
    for cls in ("a", "b"):
        write_image(tmp_path / "train" / cls / "0.png")
    ds = build_dataset("imagefolder", tmp_path, "train")
    assert [ds.image_id(i) for i in range(2)] == ["train__a__0", "train__b__0"]


def test_imagenet_plain_folders(tmp_path):
    for split in ("train", "val"):
        for wnid in ("n02", "n01"):
            write_image(tmp_path / split / wnid / f"{wnid}_{split}.JPEG")
    ds = build_dataset("imagenet", tmp_path, "val")
    assert ds.classes == ["n01", "n02"] and ds.num_classes == 2
    assert targets(ds) == [0, 1]
    assert [ds.image_id(i) for i in range(2)] == ["n01_val", "n02_val"]


def test_imagenet_devkit_layout_uses_meta_bin(tmp_path):
    wnid_to_classes = {"n01": ("tench", "Tinca tinca"), "n02": ("goldfish",)}
    torch.save((wnid_to_classes, ["n02", "n01"]), tmp_path / "meta.bin")
    for split in ("train", "val"):
        for wnid in ("n01", "n02"):
            write_image(tmp_path / split / wnid / f"{wnid}_{split}_0.JPEG")
    ds = build_dataset("imagenet", tmp_path, "train")
    assert ds.classes == ["tench", "goldfish"] and ds.wnids == ["n01", "n02"]
    assert targets(ds) == [0, 1]
    assert ds.image_id(1) == "n02_train_0"
    (tmp_path / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(DatasetError, match="lacks val/"):
        build_dataset("imagenet", tmp_path, "val")


# ------------------------------------------------------------ NABirds
NAB_IMAGES = [  # (image id, class id, is_train)
    ("aa-1", 817, 1),
    ("bb-2", 295, 1),
    ("cc-3", 1000, 0),
    ("dd-4", 817, 0),
    ("ee-5", 1000, 1),
]


def make_nabirds(root: Path) -> None:
    for key, cls, _ in NAB_IMAGES:
        write_image(root / "images" / f"{cls:04d}" / f"{key.replace('-', '')}.jpg")
    write_lines(root / "images.txt", [f"{k} {c:04d}/{k.replace('-', '')}.jpg" for k, c, _ in NAB_IMAGES])
    write_lines(root / "image_class_labels.txt", [f"{k} {c}" for k, c, _ in NAB_IMAGES])
    write_lines(root / "train_test_split.txt", [f"{k} {t}" for k, _, t in NAB_IMAGES])
    # parent classes 0 and 7 label no image: they are not among the classes
    write_lines(root / "classes.txt", ["0 Birds", "7 Perching Birds", "295 Wood Duck", "817 House Sparrow", "1000 Blue Jay (adult)"])
    write_lines(root / "hierarchy.txt", ["7 0", "295 0", "817 7", "1000 7"])


def test_nabirds_sorted_remap_and_splits(tmp_path):
    make_nabirds(tmp_path)
    tr = build_dataset("nabirds", tmp_path, "train")
    va = build_dataset("nabirds", tmp_path, "val")
    assert tr.num_classes == va.num_classes == 3
    assert tr.source_class_ids == [295, 817, 1000]  # ascending ids -> 0, 1, 2
    assert tr.classes == ["Wood Duck", "House Sparrow", "Blue Jay (adult)"]
    assert targets(tr) == [1, 0, 2]  # aa (817), bb (295), ee (1000) in images.txt order
    assert targets(va) == [2, 1]  # cc (1000), dd (817)
    assert [tr.image_id(i) for i in range(3)] == ["aa1", "bb2", "ee5"]
    assert tr.paths[0] == tmp_path / "images" / "0817" / "aa1.jpg"


def test_nabirds_missing_file_and_malformed_lines(tmp_path):
    make_nabirds(tmp_path)
    (tmp_path / "hierarchy.txt").unlink()
    with pytest.raises(DatasetError) as e:
        build_dataset("nabirds", tmp_path, "train")
    assert str(tmp_path) in str(e.value) and "lacks hierarchy.txt" in str(e.value) and "images.txt" in str(e.value)
    write_lines(tmp_path / "hierarchy.txt", ["7 0"])
    write_lines(tmp_path / "train_test_split.txt", [f"{k} 2" for k, _, _ in NAB_IMAGES])
    with pytest.raises(DatasetError, match="train_test_split.txt:1"):
        build_dataset("nabirds", tmp_path, "train")


# ------------------------------------------------------------ COCO
def make_coco(root: Path, split: str = "val") -> None:
    images = [(42, "COCO_val2014_000000000042.jpg"), (7, "COCO_val2014_000000000007.jpg"), (9, "COCO_val2014_000000000009.jpg")]
    for _, name in images:
        write_image(root / f"{split}2014" / name)
    anns = [  # image 9 has none; image 42 has category 3 twice
        {"id": 1, "image_id": 42, "category_id": 3, "area": 10.0},
        {"id": 2, "image_id": 42, "category_id": 90, "area": 5000.0},
        {"id": 3, "image_id": 42, "category_id": 3, "area": 20.0},
        {"id": 4, "image_id": 7, "category_id": 1, "area": 1.0},
    ]
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    data = {"images": [{"id": i, "file_name": n} for i, n in images], "annotations": anns, "categories": cats}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(data))


def test_coco_multilabel_drops_unannotated_images(tmp_path):
    make_coco(tmp_path)
    ds = build_dataset("coco", tmp_path, "val")
    assert ds.multilabel and ds.num_classes == 3
    assert ds.classes == ["person", "car", "toothbrush"]  # category ids 1, 3, 90 ascending
    assert len(ds) == 2 and ds.coco_image_ids == [7, 42]
    assert [ds.image_id(i) for i in range(2)] == ["COCO_val2014_000000000007", "COCO_val2014_000000000042"]
    t = targets(ds)
    assert all(x.dtype == torch.float32 and x.shape == (3,) for x in t)
    assert torch.equal(t[0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(t[1], torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(DatasetError, match="lacks train2014/"):
        build_dataset("coco", tmp_path, "train")


def test_coco_unknown_category_is_an_error(tmp_path):
    make_coco(tmp_path)
    p = tmp_path / "annotations" / "instances_val2014.json"
    data = json.loads(p.read_text())
    data["annotations"].append({"id": 5, "image_id": 9, "category_id": 55})
    p.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="unknown category_id 55"):
        build_dataset("coco", tmp_path, "val")


# ------------------------------------------------------------ NUS-WIDE
def make_nuswide(root: Path) -> None:
    rows = [
        ("images/a.jpg", "['sky', 'clouds']", "train"),
        ("images/b.jpg", "['animal']", "val"),
        ("images/c.jpg", "[]", "train"),
        ("images/d.jpg", "['clouds', 'water']", "val"),
    ]
    for fp, _, _ in rows:
        write_image(root / fp)
    write_csv(root / "nus_wid_data.csv", ["filepath", "label", "split"], rows)


def test_nuswide_classes_and_multihot(tmp_path):
    make_nuswide(tmp_path)
    tr = build_dataset("nuswide", tmp_path, "train")
    va = build_dataset("nuswide", tmp_path, "val")
    assert tr.classes == va.classes == ["animal", "clouds", "sky", "water"]  # sorted over the whole csv
    assert tr.num_classes == 4 and tr.multilabel
    assert [tr.image_id(i) for i in range(len(tr))] == ["a", "c"]
    assert torch.equal(torch.stack(targets(tr)), torch.tensor([[0.0, 1, 1, 0], [0, 0, 0, 0]]))
    assert torch.equal(torch.stack(targets(va)), torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 1]]))
    fixed = build_dataset("nuswide", tmp_path, "val", classes=["water", "animal", "clouds", "sky", "zebra"])
    assert fixed.num_classes == 5
    assert torch.equal(torch.stack(targets(fixed)), torch.tensor([[0.0, 1, 0, 0, 0], [1, 0, 1, 0, 0]]))
    with pytest.raises(DatasetError, match="'sky' is not one of the 2 classes"):
        build_dataset("nuswide", tmp_path, "train", classes=["clouds", "animal"])


def test_nuswide_malformed_csv(tmp_path):
    write_csv(tmp_path / "nus_wid_data.csv", ["filepath", "labels", "split"], [("a.jpg", "['sky']", "train")])
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['label'\]"):
        build_dataset("nuswide", tmp_path, "train")
    write_csv(tmp_path / "nus_wid_data.csv", ["filepath", "label", "split"], [("a.jpg", "sky", "train")])
    with pytest.raises(DatasetError, match="nus_wid_data.csv:2"):
        build_dataset("nuswide", tmp_path, "train")


# ------------------------------------------------------------ UFGIR
UFGIR_ROWS = {
    "train": [("c0/1.png", 0), ("c2/2.png", 2)],
    "val": [("c1/3.png", 1)],
    "test": [("c0/4.png", 0), ("c1/5.png", 1), ("c2/6.png", 2)],
}


def make_ufgir(root: Path) -> None:
    for rows in UFGIR_ROWS.values():
        for d, _ in rows:
            write_image(root / "images" / d)
    for split, rows in UFGIR_ROWS.items():
        write_csv(root / f"{split}.csv", ["dir", "class_id"], rows)
    write_csv(root / "train_val.csv", ["dir", "class_id"], UFGIR_ROWS["train"] + UFGIR_ROWS["val"])


def test_ufgir_splits(tmp_path):
    make_ufgir(tmp_path)
    expected = dict(UFGIR_ROWS, train_val=UFGIR_ROWS["train"] + UFGIR_ROWS["val"])
    for split, rows in expected.items():
        ds = build_dataset("ufgir", tmp_path, split)
        assert ds.num_classes == 3 and not ds.multilabel
        assert targets(ds) == [c for _, c in rows]
        assert [ds.image_id(i) for i in range(len(ds))] == [Path(d).stem for d, _ in rows]
        assert ds.paths[0] == tmp_path / "images" / rows[0][0]
    with pytest.raises(DatasetError, match="class_id 2 outside 0..1"):
        build_dataset("ufgir", tmp_path, "train", num_classes=2)
    with pytest.raises(DatasetError, match="unknown split"):
        build_dataset("ufgir", tmp_path, "holdout")


def test_ufgir_malformed_csv(tmp_path):
    make_ufgir(tmp_path)
    write_csv(tmp_path / "val.csv", ["path", "class_id"], [("c1/3.png", 1)])
    with pytest.raises(DatasetError, match="val.csv lacks column"):
        build_dataset("ufgir", tmp_path, "train")  # every csv is read to count classes
    write_csv(tmp_path / "val.csv", ["dir", "class_id"], [("c1/3.png", "one")])
    with pytest.raises(DatasetError, match="'one' is not an integer"):
        build_dataset("ufgir", tmp_path, "val")


# ------------------------------------------------------------ errors
@pytest.mark.parametrize("kind", DATASET_KINDS)
def test_missing_root_names_the_path(tmp_path, kind):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        build_dataset(kind, root, "train")
    assert str(root) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_build_dataset_rejects_bad_kind_split_and_option(tmp_path):
    make_folder_tree(tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        build_dataset("cifar", tmp_path, "train")
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        build_dataset("imagefolder", tmp_path, "dev")
    with pytest.raises(DatasetError, match=r"no option\(s\) \['colour'\]"):
        build_dataset("imagefolder", tmp_path, "train", colour=True)
    with pytest.raises(DatasetError, match="lacks test/"):
        build_dataset("imagefolder", tmp_path, "test")


def test_missing_image_file_is_a_dataset_error(tmp_path):
    make_ufgir(tmp_path)
    (tmp_path / "images" / "c1" / "3.png").unlink()
    ds = build_dataset("ufgir", tmp_path, "val")
    with pytest.raises(DatasetError, match="3.png not found"):
        ds[0]


# ------------------------------------------------------------ demo digits
@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return make_digits_dataset(tmp_path_factory.mktemp("d") / "digits", img_size=16, val_fraction=0.2, seed=0)


def test_digits_counts_balance_and_pixels(digits_dir):
    images, labels = load_digit_arrays()
    tr = build_dataset("digits", digits_dir, "train")
    va = build_dataset("digits", digits_dir, "val")
    assert len(tr) + len(va) == len(labels) == 1797
    assert tr.num_classes == va.num_classes == 10 and tr.classes == [str(d) for d in range(10)]
    counts = np.bincount(labels, minlength=10)
    assert np.array_equal(np.bincount(va.targets, minlength=10), np.rint(counts * 0.2).astype(int))
    assert np.array_equal(np.bincount(tr.targets, minlength=10), counts - np.rint(counts * 0.2).astype(int))
    assert not {tr.image_id(i) for i in range(len(tr))} & {va.image_id(i) for i in range(len(va))}
    for ds in (tr, va):  # each file is the upscaled digit its name (source index) points to, with its label
        for i in (0, len(ds) // 2, len(ds) - 1):
            src = int(ds.image_id(i))
            img, y = ds[i]
            assert y == labels[src]
            arr = np.asarray(img)
            assert arr.shape == (16, 16, 3)
            assert np.array_equal(arr[:, :, 0], render_digit(images[src], 16))
    assert not list(digits_dir.parent.glob(".*tmp*"))  # the temporary build folder was renamed away


def test_digits_deterministic_and_refuses_foreign_folder(digits_dir, tmp_path):
    again = make_digits_dataset(tmp_path / "digits", img_size=16, val_fraction=0.2, seed=0)
    files = sorted(p.relative_to(digits_dir) for p in digits_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((digits_dir / f).read_bytes() == (again / f).read_bytes() for f in files)
    _, labels = load_digit_arrays()
    assert not np.array_equal(stratified_val_mask(labels, 0.2, 0), stratified_val_mask(labels, 0.2, 1))
    foreign = tmp_path / "foreign"
    write_lines(foreign / "notes.txt", ["mine"])
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        make_digits_dataset(foreign)
    with pytest.raises(DatasetError, match="lacks manifest.csv"):
        build_dataset("digits", foreign, "train")


def read_mosaic_csv(root: Path):
    with open(root / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_mosaic_labels_match_the_digits_placed(tmp_path):
    root = make_digits_mosaic_dataset(tmp_path / "m", img_size=32, num_images=40, digits_per_image=(1, 3), seed=3, cell_size=16)
    images, labels = load_digit_arrays()
    rows = read_mosaic_csv(root)
    assert len(rows) == 40 and [r["split"] for r in rows] == ["train"] * 32 + ["val"] * 8
    tr = build_dataset("digits_multilabel", root, "train")
    va = build_dataset("digits_multilabel", root, "val")
    assert (len(tr), len(va)) == (32, 8) and tr.multilabel and tr.num_classes == 10
    is_val = stratified_val_mask(labels, 0.2, 3)
    for ds, split_rows in ((tr, rows[:32]), (va, rows[32:])):
        for i, r in enumerate(split_rows):
            cells = [int(c) for c in r["cells"].split()]
            sources = [int(s) for s in r["sources"].split()]
            placed = [c for c in cells if c >= 0]
            assert 1 <= len(placed) <= 3
            assert cells == [int(labels[s]) if s >= 0 else -1 for s in sources]
            expected = torch.zeros(10)
            expected[placed] = 1.0
            img, y = ds[i]
            assert torch.equal(y, expected)
            arr = np.asarray(img)[:, :, 0]
            for c, s in enumerate(sources):  # the pixels hold exactly the recorded digits
                q, p = divmod(c, 2)
                cell = arr[q * 16:(q + 1) * 16, p * 16:(p + 1) * 16]
                want = render_digit(images[s], 16) if s >= 0 else np.zeros((16, 16), np.uint8)
                assert np.array_equal(cell, want)
            assert all(is_val[s] == (ds is va) for s in sources if s >= 0)  # no digit leaks across splits


def test_mosaic_cells_sit_in_the_corners_and_overlap_by_maximum(tmp_path):
    from tokenreduction.data.demo import MOSAIC_CELL_FRACTION

    images, _ = load_digit_arrays()
    root = make_digits_mosaic_dataset(tmp_path / "m", img_size=32, num_images=30, digits_per_image=(1, 4), seed=5)
    cell = round(32 * MOSAIC_CELL_FRACTION)
    assert cell == 20  # the demo's default: digits of 20 px in a 32-px mosaic
    for r in read_mosaic_csv(root):
        sources = [int(x) for x in r["sources"].split()]
        want = np.zeros((32, 32), np.uint8)
        for c, src in enumerate(sources):
            if src >= 0:
                q, p = divmod(c, 2)
                block = want[q * 12:q * 12 + 20, p * 12:p * 12 + 20]
                np.maximum(block, render_digit(images[src], 20), out=block)
        assert np.array_equal(np.asarray(Image.open(root / r["file"]))[:, :, 0], want)
    with pytest.raises(ValueError, match="cell_size"):
        make_digits_mosaic_dataset(tmp_path / "bad", img_size=32, cell_size=15)


def test_mosaic_deterministic(tmp_path):
    kw = dict(img_size=16, num_images=12, digits_per_image=(0, 4))
    a = make_digits_mosaic_dataset(tmp_path / "a", seed=1, **kw)
    b = make_digits_mosaic_dataset(tmp_path / "b", seed=1, **kw)
    c = make_digits_mosaic_dataset(tmp_path / "c", seed=2, **kw)
    names = sorted(p.name for p in (a / "images").iterdir())
    assert len(names) == 12
    assert all((a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in names)
    assert (a / "labels.csv").read_bytes() == (b / "labels.csv").read_bytes()
    assert (a / "labels.csv").read_bytes() != (c / "labels.csv").read_bytes()
    # a folder the maker made is replaced whole by a new build
    make_digits_mosaic_dataset(a, seed=2, img_size=16, num_images=5, digits_per_image=(0, 4))
    assert sorted(p.name for p in (a / "images").iterdir()) == [f"{i}.png" for i in range(5)]
    assert len(read_mosaic_csv(a)) == 5
    with pytest.raises(ValueError, match="digits_per_image"):
        make_digits_mosaic_dataset(tmp_path / "d", digits_per_image=(2, 5))


# ------------------------------------------------------------ transforms
def half_red(w: int, h: int, red_cols: int) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, :red_cols, 0] = 255
    return Image.fromarray(arr)


@pytest.mark.parametrize("kind", ["imagenet", "nabirds", "digits", "ufgir", "coco", "nuswide", "digits_multilabel"])
@pytest.mark.parametrize("is_train", [True, False])
def test_transform_output_shape(kind, is_train):
    torch.manual_seed(0)
    tf = build_transform(is_train, 32, kind, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, cutout=0.5, trivial_augment=True)
    x = tf(half_red(50, 40, 10))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_eval_transforms_resize_crop_or_squash():
    img = half_red(64, 32, 16)  # red in the left quarter
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    # default: shorter side -> int(32 / 0.875) = 36, width 72, center crop cuts 20 columns per side: no red left
    x = build_transform(False, 32, "imagenet", mean=mean, std=std, interpolation="bilinear")(img)
    assert x[0].max() < 0.05
    # multi-label: squash to 32x32, no crop: the left quarter (8 columns) stays red
    x = build_transform(False, 32, "coco", mean=mean, std=std, interpolation="bilinear")(img)
    assert torch.all(x[0, :, :7] > 0.95) and torch.all(x[0, :, 9:] < 0.05)
    # ufgir: square resize to 36x36 (left 9 columns red) then center crop 32: 2 columns cut, 7 red columns left
    x = build_transform(False, 32, "ufgir", mean=mean, std=std, interpolation="bilinear")(img)
    assert torch.all(x[0, :, :6] > 0.95) and torch.all(x[0, :, 8:] < 0.05)
    # imagenet statistics by default
    x = build_transform(False, 32, "coco")(Image.new("RGB", (32, 32), (0, 0, 0)))
    assert torch.allclose(x[:, 0, 0], torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]), atol=1e-5)


def test_transform_rejects_unknown_option():
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_transform(True, 32, "imagenet", randaug="m9")


# ------------------------------------------------------------ corrupt and missing files
def corrupt(path: Path, how: str) -> Path:
    """Damage an image file in place: 'garbage' (not an image), 'truncated'
    (the first half of a valid file), 'empty'."""
    data = path.read_bytes()
    path.write_bytes({"garbage": b"this is not an image" * 10, "truncated": data[: len(data) // 2], "empty": b""}[how])
    return path


def write_noise_image(path: Path, size=(64, 64), seed: int = 0) -> Path:
    """A JPEG of random pixels: large enough that half of it is a truncated image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, quality=95)
    return path


#: one fabricated dataset per reader that reads images: (kind, maker, split, path of one of its images)
IMAGE_READERS = {
    "imagefolder": (make_folder_tree, "train", "train/dog/train_dog_1.png"),
    "nabirds": (make_nabirds, "train", "images/0295/bb2.jpg"),
    "coco": (make_coco, "val", "val2014/COCO_val2014_000000000042.jpg"),
    "nuswide": (make_nuswide, "val", "images/d.jpg"),
    "ufgir": (make_ufgir, "test", "images/c1/5.png"),
}


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
@pytest.mark.parametrize("kind", sorted(IMAGE_READERS))
def test_corrupt_image_names_the_file_and_the_dataset(tmp_path, kind, how, monkeypatch):
    monkeypatch.delenv("TOKENREDUCTION_SKIP_BAD_IMAGES", raising=False)
    maker, split, rel = IMAGE_READERS[kind]
    maker(tmp_path)
    bad = tmp_path / rel
    suffix = bad.suffix
    write_noise_image(bad.with_suffix(".jpg"))
    if suffix != ".jpg":
        bad.with_suffix(".jpg").rename(bad)  # PIL reads the content, whatever the name
    corrupt(bad, how)
    ds = build_dataset(kind, tmp_path, split)
    index = ds.paths.index(bad)
    with pytest.raises(BadImageError) as e:
        ds[index]
    msg = str(e.value)
    assert str(bad) in msg and ds.name in msg and "corrupt or truncated" in msg
    assert "skip_bad_images" in msg  # how to skip instead
    assert e.value.path == bad and isinstance(e.value, DatasetError)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no decoder traceback chained
    good = [i for i in range(len(ds)) if i != index]
    assert all(isinstance(ds[i][0], Image.Image) for i in good)  # the others still read


def test_skip_bad_images_replaces_each_bad_image_and_logs_the_count(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("TOKENREDUCTION_SKIP_BAD_IMAGES", raising=False)
    for i in range(5):
        write_image(tmp_path / "train" / "a" / f"{i}.png", value=40 * i)
    corrupt(tmp_path / "train" / "a" / "1.png", "garbage")
    ds = build_dataset("imagefolder", tmp_path, "train")
    skipping = build_dataset("imagefolder", tmp_path, "train", skip_bad_images=True)
    (tmp_path / "train" / "a" / "3.png").unlink()  # listed at build time, gone when read
    assert not ds.skip_bad_images  # off by default
    with pytest.raises(BadImageError, match="1.png"):
        ds[1]
    caplog.set_level("WARNING", logger="tokenreduction.data.base")
    pixels = [skipping[i][0].getpixel((0, 0))[0] for i in range(5)]
    # 1 -> 2 and 3 -> 4 (the next readable image); 4 -> 4; the good ones unchanged
    assert pixels == [0, 80, 80, 160, 160]
    assert skipping.skipped == [tmp_path / "train" / "a" / "1.png", tmp_path / "train" / "a" / "3.png"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # once per bad file, not per read
    assert "1.png" in warnings[0] and "1 bad image(s) skipped so far" in warnings[0] and "imagefolder:train" in warnings[0]
    assert "3.png" in warnings[1] and "not found" in warnings[1] and "2 bad image(s) skipped so far" in warnings[1]
    skipping[1]
    assert len(caplog.records) == 2


def test_skip_bad_images_from_the_environment_and_all_bad(tmp_path, monkeypatch):
    write_image(tmp_path / "train" / "a" / "0.png")
    corrupt(tmp_path / "train" / "a" / "0.png", "empty")
    monkeypatch.setenv("TOKENREDUCTION_SKIP_BAD_IMAGES", "1")
    ds = build_dataset("imagefolder", tmp_path, "train")
    assert ds.skip_bad_images
    with pytest.raises(DatasetError, match="none of its 1 image files is readable"):
        ds[0]
    assert not build_dataset("imagefolder", tmp_path, "train", skip_bad_images=False).skip_bad_images
    monkeypatch.setenv("TOKENREDUCTION_SKIP_BAD_IMAGES", "0")
    assert not build_dataset("imagefolder", tmp_path, "train").skip_bad_images
    monkeypatch.setenv("TOKENREDUCTION_SKIP_BAD_IMAGES", "maybe")
    with pytest.raises(DatasetError, match="TOKENREDUCTION_SKIP_BAD_IMAGES='maybe'"):
        build_dataset("imagefolder", tmp_path, "train")


def test_bad_image_error_survives_a_dataloader_worker(tmp_path, monkeypatch):
    """torch re-raises a worker's exception from its message alone: still a
    DatasetError that names the file."""
    monkeypatch.delenv("TOKENREDUCTION_SKIP_BAD_IMAGES", raising=False)
    make_ufgir(tmp_path)
    corrupt(tmp_path / "images" / "c1" / "3.png", "garbage")
    ds = build_dataset("ufgir", tmp_path, "val", transform=lambda im: torch.zeros(1))
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1)
    with pytest.raises(BadImageError, match="3.png is corrupt or truncated"):
        next(iter(loader))


# one reader per annotation/split file it needs: (kind, maker, split, file removed)
ANNOTATION_FILES = [
    ("nabirds", make_nabirds, "train", "images.txt"),
    ("nabirds", make_nabirds, "train", "train_test_split.txt"),
    ("coco", make_coco, "val", "annotations/instances_val2014.json"),
    ("nuswide", make_nuswide, "train", "nus_wid_data.csv"),
    ("ufgir", make_ufgir, "val", "val.csv"),
]


@pytest.mark.parametrize("kind,maker,split,rel", ANNOTATION_FILES)
def test_missing_annotation_file_names_the_expected_path(tmp_path, kind, maker, split, rel):
    maker(tmp_path)
    (tmp_path / rel).unlink()
    with pytest.raises(DatasetError) as e:
        build_dataset(kind, tmp_path, split)
    assert f"lacks {rel}" in str(e.value) and str(tmp_path) in str(e.value)


@pytest.mark.parametrize("kind,maker,split,rel", ANNOTATION_FILES)
def test_truncated_or_binary_annotation_file_names_the_file(tmp_path, kind, maker, split, rel):
    maker(tmp_path)
    path = tmp_path / rel
    path.write_bytes(b"\xff\xfe\x00\x9c garbage \x80\x81")
    with pytest.raises(DatasetError) as e:
        build_dataset(kind, tmp_path, split)
    assert str(path) in str(e.value)
    maker(tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2 + 3])  # cut mid-line
    try:
        build_dataset(kind, tmp_path, split)
    except DatasetError as err:
        assert str(path) in str(err)
    else:  # a line-based file cut mid-line may still parse (fewer rows); a JSON file never does
        assert kind != "coco"


def test_malformed_coco_entries_name_the_file(tmp_path):
    make_coco(tmp_path)
    p = tmp_path / "annotations" / "instances_val2014.json"
    data = json.loads(p.read_text())
    del data["annotations"][0]["image_id"]
    p.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"instances_val2014.json lacks the field 'image_id'"):
        build_dataset("coco", tmp_path, "val")
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(DatasetError, match="holds a JSON list"):
        build_dataset("coco", tmp_path, "val")


def test_corrupt_checkpoint_names_the_file_in_the_model_loader_and_evaluation(tmp_path):
    """A truncated or non-checkpoint file given to the model builder's loader
    (backbone init) or to evaluation: one CorruptCheckpointError naming it."""
    import timm

    from tokenreduction.evaluate.evaluate import load_for_evaluation
    from tokenreduction.models.vit import load_checkpoint
    from tokenreduction.safe_load import CorruptCheckpointError

    kwargs = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    model = timm.create_model("vit_tiny_patch16_224", **kwargs)
    good = tmp_path / "good.pth"
    torch.save({"model": model.state_dict()}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    make_folder_tree(tmp_path / "data")
    for bad in (cut, text):
        with pytest.raises(CorruptCheckpointError, match=bad.name) as e:
            load_checkpoint(timm.create_model("vit_tiny_patch16_224", **kwargs), bad)
        assert e.value.__cause__ is None
        with pytest.raises(CorruptCheckpointError, match=bad.name):
            load_for_evaluation(bad, "imagefolder", tmp_path / "data", "val", 16, "cpu")


def test_zoom_out_shrinks_the_digit_onto_a_black_canvas():
    from tokenreduction.data.transforms import ZoomOut

    img = Image.new("RGB", (32, 32), (200, 200, 200))  # a "digit" filling the image
    torch.manual_seed(0)
    for _ in range(5):
        out = np.asarray(ZoomOut(1.0, (0.5, 0.5), interpolation=InterpolationMode.NEAREST)(img))[:, :, 0]
        assert out.shape == (32, 32)
        rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
        # one 16x16 block of the grey value, the rest black, anywhere in the canvas
        assert len(rows) == 16 and len(cols) == 16 and np.ptp(rows) == 15 and np.ptp(cols) == 15
        assert (out > 0).sum() == 256 and set(np.unique(out)) == {0, 200}
    # grid 2: the shrunk image sits in one of the four corners (or nudged
    # towards the centre when smaller than a quarter); every corner is used
    corners = set()
    for _ in range(40):
        out = np.asarray(ZoomOut(1.0, (0.625, 0.625), grid=2, interpolation=InterpolationMode.NEAREST)(img))[:, :, 0]
        rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
        assert len(rows) == len(cols) == 20 and rows[0] in (0, 12) and cols[0] in (0, 12)
        corners.add((rows[0], cols[0]))
        out = np.asarray(ZoomOut(1.0, (0.25, 0.25), grid=2, interpolation=InterpolationMode.NEAREST)(img))[:, :, 0]
        rows, cols = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
        # an 8-px image inside its 16-px quadrant: 0..8 from the corner towards the centre
        assert len(rows) == 8 and (rows[0] <= 8 or rows[-1] >= 23) and (cols[0] <= 8 or cols[-1] >= 23)
    assert corners == {(0, 0), (0, 12), (12, 0), (12, 12)}
    assert ZoomOut(0.0)(img) is img  # p = 0: unchanged
    with pytest.raises(ValueError, match="zoom_out_grid"):
        ZoomOut(0.5, grid=0)
    with pytest.raises(ValueError, match="zoom_out_scale"):
        ZoomOut(0.5, (0.0, 1.0))
    with pytest.raises(ValueError, match="probability"):
        ZoomOut(1.5)


def test_digits_training_transform_zooms_out_by_default_only_on_digits():
    from tokenreduction.data import transforms as tfm

    aug = tfm.train_augmentation("digits", auto_augment=None, reprob=0.0)
    assert aug["zoom_out"] == tfm.DIGITS_ZOOM_OUT > 0 and aug["zoom_out_scale"] == tfm.DIGITS_ZOOM_OUT_SCALE
    zooms = [t for t in build_transform(True, 32, "digits", **aug).transforms if isinstance(t, tfm.ZoomOut)]
    assert len(zooms) == 1 and zooms[0].p == tfm.DIGITS_ZOOM_OUT and zooms[0].grid == tfm.DIGITS_ZOOM_OUT_GRID
    assert "zoom_out" not in tfm.train_augmentation("digits", zoom_out=0)
    assert "zoom_out" not in tfm.train_augmentation("imagenet") and "zoom_out" not in tfm.train_augmentation("digits_multilabel")
    # the eval transform never zooms; a digit image zoomed out keeps only a quarter of its pixels lit
    assert not any(isinstance(t, tfm.ZoomOut) for t in build_transform(False, 32, "digits").transforms)
    torch.manual_seed(0)
    full = Image.new("RGB", (32, 32), (255, 255, 255))
    x = build_transform(True, 32, "digits", zoom_out=1.0, zoom_out_scale=(0.5, 0.5), mean=(0, 0, 0), std=(1, 1, 1))(full)
    assert 0.2 < float((x[0] > 0.5).float().mean()) < 0.3
