"""FID between a reference folder and a generation folder, through clean-fid.

Feature extractors (each a callable from a (B, 3, 299, 299) batch in 0..255,
as clean-fid resizes it, to (B, D) features):

* ``inception``: clean-fid's Inception-V3 TorchScript
  (``inception-2015-12-05.pt``), the standard FID. clean-fid downloads it on
  first use; offline, point ``inception_weights`` at a copy (see docs/diffusion.md).
  With no path configured, clean-fid's own cache location is used
  (:data:`CLEANFID_DEFAULT`) and it downloads there if it can.
* ``pixels``: a small fixed extractor for the demo and tests that needs no
  download: the image average-pooled to a grid, then a fixed seeded random
  projection to ``dim`` features. Its FIDs are not comparable with published
  Inception FIDs and are labelled as such.

FID itself is clean-fid's: features of every image of both folders (the
reference folder first), their means and covariances, and the Fréchet
distance ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)). The extractor
is wrapped to print progress lines (images done of both folders, images/s,
ETA) to the log.
"""
from __future__ import annotations

import csv
import json
import platform
import urllib.error
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

PathLike = Union[str, Path]
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CLEANFID_DEFAULT = Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE
MODES = ("clean", "legacy_tensorflow")
EXTRACTORS = ("inception", "pixels")
TABLE_COLUMNS = ("experiment", "fid", "time_mean", "time_std", "feature_extractor")


class MissingWeightsError(FileNotFoundError):
    """The Inception weights file is not where the config says."""


def missing_weights_message(path: PathLike) -> str:
    return (
        f"Inception weights for FID not found: {path}. Download {INCEPTION_FILE} from {INCEPTION_URL} "
        f"on a machine with internet access and put it at {path} (or set diffusion.fid.inception_weights "
        f"in the config to where the file is)."
    )


class _ProgressExtractor:
    """The feature extractor clean-fid calls, counting images for progress lines."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], progress) -> None:
        self.model, self.progress = model, progress

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.model(batch)
        self.progress.update(int(batch.shape[0]))
        return out

    def eval(self):  # clean-fid may call .eval() on a custom extractor
        if hasattr(self.model, "eval"):
            self.model.eval()
        return self


class PixelFeatures(nn.Module):
    """Demo FID features: average-pool the image to grid x grid, scale to
    [0, 1], project with a fixed Gaussian matrix (seeded) to `dim` features."""

    def __init__(self, dim: int = 8, grid: int = 4, seed: int = 0):
        super().__init__()
        if dim < 1 or grid < 1:
            raise ValueError(f"dim and grid must be >= 1, got dim={dim}, grid={grid}")
        self.grid = grid
        g = torch.Generator().manual_seed(seed)
        in_dim = 3 * grid * grid
        self.register_buffer("proj", torch.randn(in_dim, dim, generator=g) / in_dim**0.5)

    @property
    def label(self) -> str:
        return f"pixels-pool{self.grid}-proj{self.proj.shape[1]} (demo extractor, not Inception)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(x.float() / 255.0, self.grid).flatten(1)
        return pooled @ self.proj.to(pooled.device)


def inception_extractor(
    weights: Optional[PathLike], device: torch.device, mode: str = "clean"
) -> Tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """clean-fid's InceptionV3W loaded without download from `weights` (the
    file ``inception-2015-12-05.pt`` or a folder holding it). Raises
    MissingWeightsError naming the expected file when it is absent."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = Path(weights).expanduser()
    if path.is_dir() or path.suffix != ".pt":
        path = path / INCEPTION_FILE
    if path.name != INCEPTION_FILE:
        raise ValueError(f"clean-fid loads Inception weights from a file named {INCEPTION_FILE}; rename {path}")
    if not path.is_file():
        raise MissingWeightsError(missing_weights_message(path))
    model = InceptionV3W(str(path.parent), download=False, resize_inside=(mode == "legacy_tensorflow"))
    model = model.to(device).eval()
    return model, f"inception-v3 ({path})"


def count_images(folder: PathLike) -> int:
    """Images clean-fid will read from `folder` (recursively)."""
    from cleanfid.utils import EXTENSIONS

    return sum(1 for p in Path(folder).rglob("*") if p.is_file() and p.suffix[1:] in EXTENSIONS)


def compute_fid(
    reference: PathLike,
    generated: PathLike,
    extractor: str = "inception",
    mode: str = "clean",
    inception_weights: Optional[PathLike] = None,
    device: Optional[str] = None,
    batch_size: int = 32,
    pixel_dim: int = 8,
    progress_every: float = 30.0,
    printer=None,
) -> Dict[str, Any]:
    """clean-fid ``compute_fid(reference, generated, mode)`` with the chosen
    feature extractor, explicit device and num_workers=0. Tiny negative
    values from numerical error are clamped to 0. Progress lines every
    ``progress_every`` seconds (``printer``, default print). Returns {fid,
    feature_extractor, mode, num_reference, num_generated}."""
    from cleanfid import fid as cleanfid

    from .pipeline import ProgressLog

    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {extractor!r}; use one of {', '.join(EXTRACTORS)}")
    if mode not in MODES:
        raise ValueError(f"unknown FID mode {mode!r}; use one of {', '.join(MODES)}")
    counts = {}
    for key, folder in (("num_reference", reference), ("num_generated", generated)):
        if not Path(folder).is_dir():
            raise ValueError(f"image folder {folder} does not exist")
        counts[key] = count_images(folder)
        if counts[key] < 2:
            raise ValueError(f"FID needs at least 2 images; {folder} has {counts[key]}")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if extractor == "pixels":
        model = PixelFeatures(pixel_dim).to(dev)
        label = model.label
        if pixel_dim >= min(counts.values()):
            warnings.warn(f"feature dimension {pixel_dim} >= image count {min(counts.values())}: singular covariances")
    else:
        if inception_weights:
            model, label = inception_extractor(inception_weights, dev, mode)
        elif CLEANFID_DEFAULT.is_file():
            model, label = inception_extractor(CLEANFID_DEFAULT, dev, mode)
        else:  # clean-fid builds its own extractor, downloading the weights if it can
            model, label = None, f"inception-v3 (clean-fid download to {CLEANFID_DEFAULT})"
    kwargs = dict(mode=mode, device=dev, num_workers=0, batch_size=batch_size, verbose=False, use_dataparallel=False)
    total = counts["num_reference"] + counts["num_generated"]
    progress = ProgressLog(total, "FID features (reference, then generated)", "images", progress_every, printer)
    try:
        with torch.no_grad():
            if model is None:
                model = cleanfid.build_feature_extractor(mode, dev, use_dataparallel=False)
            extractor_fn = _ProgressExtractor(model, progress)
            value = cleanfid.compute_fid(str(reference), str(generated), custom_feat_extractor=extractor_fn, **kwargs)
    except urllib.error.URLError as e:
        raise MissingWeightsError(
            f"clean-fid could not download its Inception weights ({e.reason}). " + missing_weights_message(CLEANFID_DEFAULT)
        ) from None
    return {"fid": max(0.0, float(value)), "feature_extractor": label, "mode": mode, **counts}


def fid_table(rows: Sequence[Dict[str, Any]], out_csv: PathLike) -> None:
    """Write the CSV (experiment, fid, time_mean, time_std, feature_extractor)
    atomically, rows in the given order."""
    from ..io import atomic_path

    with atomic_path(out_csv) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(TABLE_COLUMNS), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)


def read_json(path: PathLike) -> Dict[str, Any]:
    return json.loads(Path(path).read_text())


__all__ = [
    "EXTRACTORS", "INCEPTION_FILE", "MODES", "MissingWeightsError", "PixelFeatures", "compute_fid",
    "count_images", "fid_table", "inception_extractor", "missing_weights_message", "read_json",
]
