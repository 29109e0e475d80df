"""Image transforms per dataset kind.

Three families:

* **default** (imagenet, imagefolder, nabirds, digits): train = timm
  ``create_transform(is_training=True, ...)`` with every augmentation keyword
  (``auto_augment='rand-m9-mstd0.5-inc1'``, ``re_prob=0.25``, ``color_jitter``,
  ``hflip``, ``scale``...) passed through; eval = resize the shorter side to
  ``int(img_size / crop_pct)``, center crop ``img_size``, ToTensor, normalize.
* **ufgir** (CLCA's leaves datasets): square resize to ``int(img_size / crop_pct)``
  then random crop + horizontal flip (train) or center crop (eval); optional
  ``trivial_augment=True`` (TrivialAugmentWide) and ``auto_augment`` string.
* **multi-label** (coco, nuswide, digits_multilabel, ASL style): squash-resize to
  ``img_size x img_size`` with no crop; train adds optional ``cutout`` (fraction
  of the side, ASL's CutoutPIL uses 0.5) and ``auto_augment`` string.

:func:`train_augmentation` gives the reference's training augmentation per
kind (the trainer uses it): random erasing in mode "pixel" and colour jitter 0.3
on single-label kinds; Cutout 0.5 and no random erasing on COCO and NUS-WIDE.

The demo digits (kind ``digits``) train with a mild random resized crop and
:class:`ZoomOut` (the digit shrunk into a corner, as the mosaics hold it).

All end with ToTensor + Normalize(mean, std) (ImageNet statistics by default);
``re_prob > 0`` adds random erasing to every train family. Keywords that a family
does not use are accepted and ignored, so one augmentation dict can serve all
kinds; a keyword no family knows raises ValueError.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

MULTILABEL_KINDS = frozenset({"coco", "nuswide", "digits_multilabel"})
UFGIR_KINDS = frozenset({"ufgir", "digits_ufgir"})

_TIMM_KEYS = frozenset(inspect.signature(create_transform).parameters) - {
    "input_size", "is_training", "interpolation", "mean", "std", "crop_pct",
}
_EXTRA_KEYS = frozenset({"cutout", "trivial_augment", "zoom_out", "zoom_out_scale", "zoom_out_grid"})


def _interp(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise ValueError(f"unknown interpolation {name!r}; use bilinear, bicubic or nearest") from None


class Cutout:
    """Fill one random square (side ``factor`` x image side, clipped at the
    border) of a PIL image with a random colour (ASL's CutoutPIL)."""

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        ch, cw = int(self.factor * h + 0.5), int(self.factor * w + 0.5)
        yc, xc = int(torch.randint(0, h, ())), int(torch.randint(0, w, ()))
        y0, y1 = max(0, yc - ch // 2), min(h, yc + ch // 2)
        x0, x1 = max(0, xc - cw // 2), min(w, xc + cw // 2)
        colour = tuple(int(v) for v in torch.randint(0, 256, (3,)))
        img = img.copy()
        ImageDraw.Draw(img).rectangle([x0, y0, x1, y1], fill=colour)
        return img

    def __repr__(self) -> str:
        return f"Cutout(factor={self.factor})"


class ZoomOut:
    """With probability ``p``, shrink a PIL image by a factor drawn uniformly
    from ``scale`` and paste it on a canvas of the original size filled with
    ``fill``; otherwise return it unchanged (PIL image in, same size out).

    ``grid`` 1: at a uniformly random position. ``grid`` g > 1: at one of g x g
    anchors spread evenly from the top-left to the bottom-right corner (g = 2:
    the four corners), moved towards the centre by a random part of the room
    left when the image is smaller than its cell (side / g).

    The demo pretrains on digits that fill the 32-px image, while its mosaics
    hold them at 20 px in the four corners: zoomed-out copies teach the
    backbone the digits at both sizes.
    """

    def __init__(self, p: float = 0.5, scale: Sequence[float] = (0.5, 1.0), fill: int = 0,
                 interpolation: InterpolationMode = InterpolationMode.BILINEAR, grid: int = 1) -> None:
        lo, hi = (float(v) for v in scale)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"zoom_out probability must be in [0, 1], got {p}")
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"zoom_out_scale must satisfy 0 < lo <= hi <= 1, got {tuple(scale)}")
        if int(grid) < 1:
            raise ValueError(f"zoom_out_grid must be a positive integer, got {grid}")
        self.p, self.scale, self.fill, self.interpolation = float(p), (lo, hi), int(fill), interpolation
        self.grid = int(grid)

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p <= 0.0 or float(torch.rand(())) >= self.p:
            return img
        lo, hi = self.scale
        s = lo + (hi - lo) * float(torch.rand(()))
        w, h = img.size
        sw, sh = max(1, round(w * s)), max(1, round(h * s))
        small = T.functional.resize(img, [sh, sw], interpolation=self.interpolation)
        if self.grid == 1:  # anywhere
            x0 = int(torch.randint(0, w - sw + 1, ()))
            y0 = int(torch.randint(0, h - sh + 1, ()))
        else:  # one of grid x grid anchors spread from corner to corner, nudged towards the centre
            r, q = divmod(int(torch.randint(0, self.grid * self.grid, ())), self.grid)
            x0 = self._place(q, w, sw)
            y0 = self._place(r, h, sh)
        canvas = Image.new(img.mode, (w, h), (self.fill,) * len(img.getbands()))
        canvas.paste(small, (x0, y0))
        return canvas

    def _place(self, i: int, side: int, size: int) -> int:
        """Offset of anchor ``i`` of ``grid`` along a side: anchors run from 0
        to side - size; an image smaller than its cell (side / grid) moves a
        random amount of the free room towards the centre."""
        anchor = round(i * (side - size) / (self.grid - 1))
        room = max(side // self.grid - size, 0)
        nudge = int(torch.randint(0, room + 1, ())) if room else 0
        centre = (self.grid - 1) / 2
        return anchor + (nudge if i < centre else -nudge if i > centre else 0)

    def __repr__(self) -> str:
        return f"ZoomOut(p={self.p}, scale={self.scale}, fill={self.fill}, grid={self.grid})"


def _auto_augment(spec: str, img_size: int, mean: Sequence[float], interpolation: str):
    params = dict(
        translate_const=int(img_size * 0.45),
        img_mean=tuple(min(255, round(255 * m)) for m in mean),
        interpolation=Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR,
    )
    return rand_augment_transform(spec, params) if spec.startswith("rand") else auto_augment_transform(spec, params)


#: the single-label demo kind (scikit-learn's digits)
DIGIT_KINDS = ("digits",)

#: zoom-out of the digits' training images (:class:`ZoomOut`): the
#: probability, the range of the shrink factor and the grid of positions. The
#: demo's mosaics hold the digits at 20 of 32 px in the four corners
#: (:data:`~tokenreduction.data.demo.MOSAIC_CELL_FRACTION`), so the backbone
#: the DAG pretrains on the digits also sees them at that size and there:
#: without it the mosaic task stays near chance.
DIGITS_ZOOM_OUT = 0.3
DIGITS_ZOOM_OUT_SCALE = (0.55, 0.63)
DIGITS_ZOOM_OUT_GRID = 2

#: Cutout the reference applies to every training image of these kinds
#: (ASL's CutoutPIL with cutout_factor 0.5, before RandAugment)
REFERENCE_CUTOUT = {"coco": 0.5, "nuswide": 0.5}


def train_augmentation(
    kind: str,
    *,
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    color_jitter: float = 0.3,
    cutout: Optional[float] = None,
    zoom_out: Optional[float] = None,
) -> dict:
    """The :func:`build_transform` keywords of the training transform of
    `kind`, as the reference ("Which Tokens to Use?") builds it per dataset kind.

    Single-label kinds: timm's transform with ``auto_augment``, colour jitter
    (``color_jitter``, effective when auto-augment is off, as on NABirds) and
    random erasing (``reprob``, mode ``re_mode``, ``re_count`` boxes; the
    reference's defaults 0.25, "pixel", 1). Multi-label kinds: squash resize,
    Cutout (``cutout``; None = :data:`REFERENCE_CUTOUT` of the kind: 0.5 on
    COCO and NUS-WIDE, none on the demo mosaics; 0 = off), then
    ``auto_augment``; never random erasing (the reference has none there).
    The demo digits add :class:`ZoomOut` with probability ``zoom_out`` (None =
    :data:`DIGITS_ZOOM_OUT`; 0 = off).
    """
    if kind in MULTILABEL_KINDS:
        factor = REFERENCE_CUTOUT.get(kind, 0.0) if cutout is None else float(cutout)
        return {"auto_augment": auto_augment, "cutout": factor or None}
    aug = {
        "auto_augment": auto_augment,
        "re_prob": reprob,
        "re_mode": re_mode,
        "re_count": re_count,
        "color_jitter": color_jitter,
    }
    if kind in DIGIT_KINDS:
        p = DIGITS_ZOOM_OUT if zoom_out is None else float(zoom_out)
        if p:
            aug.update(zoom_out=p, zoom_out_scale=DIGITS_ZOOM_OUT_SCALE, zoom_out_grid=DIGITS_ZOOM_OUT_GRID)
    return aug


def build_transform(
    is_train: bool,
    img_size: int,
    kind: str = "imagenet",
    *,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    **aug,
):
    """Transform PIL RGB image -> float tensor (3, img_size, img_size) for ``kind``.

    ``aug``: timm ``create_transform`` keywords (auto_augment, re_prob, re_mode,
    re_count, color_jitter, hflip, vflip, scale, ratio, ...) plus ``cutout``
    (multi-label) and ``trivial_augment`` (ufgir); used only when ``is_train``.
    """
    img_size = int(img_size)
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    unknown = sorted(set(aug) - _TIMM_KEYS - _EXTRA_KEYS)
    if unknown:
        raise ValueError(f"unknown augmentation option(s) {unknown}")
    mode = _interp(interpolation)
    normalize = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    re_prob = float(aug.get("re_prob", 0.0) or 0.0)
    erase = [RandomErasing(re_prob, mode=aug.get("re_mode", "const"), max_count=aug.get("re_count", 1), device="cpu")] if re_prob > 0 else []
    aa = aug.get("auto_augment")

    if kind in MULTILABEL_KINDS:
        ops = [T.Resize((img_size, img_size), interpolation=mode)]
        if is_train:
            if aug.get("cutout"):
                ops.append(Cutout(float(aug["cutout"])))
            if aa:
                ops.append(_auto_augment(aa, img_size, mean, interpolation))
            return T.Compose(ops + normalize + erase)
        return T.Compose(ops + normalize)

    if kind in UFGIR_KINDS:
        resize = int(img_size / crop_pct)
        ops = [T.Resize((resize, resize), interpolation=mode)]
        if is_train:
            ops += [T.RandomCrop(img_size), T.RandomHorizontalFlip(float(aug.get("hflip", 0.5)))]
            if aug.get("trivial_augment"):
                ops.append(T.TrivialAugmentWide(interpolation=mode))
            if aa:
                ops.append(_auto_augment(aa, img_size, mean, interpolation))
            return T.Compose(ops + normalize + erase)
        return T.Compose(ops + [T.CenterCrop(img_size)] + normalize)

    if kind in DIGIT_KINDS:
        # 8x8 digits upscaled: a flip or a small random crop changes the class
        # or loses the digit, so only a mild scale jitter and no flip
        if is_train:
            ops = [T.RandomResizedCrop(img_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), interpolation=mode)]
            if aug.get("zoom_out"):
                ops.append(ZoomOut(float(aug["zoom_out"]), aug.get("zoom_out_scale", (0.5, 1.0)), interpolation=mode,
                                   grid=int(aug.get("zoom_out_grid", 1))))
            return T.Compose(ops + normalize + erase)
        return T.Compose([T.Resize((img_size, img_size), interpolation=mode)] + normalize)

    if is_train:
        timm_aug = {k: v for k, v in aug.items() if k in _TIMM_KEYS}
        return create_transform(
            img_size, is_training=True, interpolation=interpolation, mean=tuple(mean), std=tuple(std), **timm_aug
        )
    return T.Compose(
        [T.Resize(int(img_size / crop_pct), interpolation=mode), T.CenterCrop(img_size)] + normalize
    )
