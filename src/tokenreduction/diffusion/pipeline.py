"""Diffusion pipelines: tiny random-weight ones for the demo and tests,
loading (the same ``from_pretrained`` path for both), and the study's
generation protocol with per-image timing.

Models (``model``, the config's ``diffusion.model``): ``sd15``
(``StableDiffusionPipeline``: SD 1.x and 2.x checkpoints), ``sdxl``
(``StableDiffusionXLPipeline``), ``pixart`` (``PixArtAlphaPipeline`` or
``PixArtSigmaPipeline``). A local folder's ``model_index.json`` must name a
pipeline class of the chosen model; the patch finds the pipeline's ``unet``
or ``transformer``.

Protocol (ATC study, ``sd_generate.py``): prompt "A high quality photograph
of a <class>." for every class, `images_per_class` images each, a fixed seed
per (class, image), `steps` denoising steps, classifier-free guidance
`guidance`, one image per pipeline call, the wall time of each call recorded.

Seeds (``seed_scheme``): ``"study"`` (default) seeds a ``torch.Generator`` on
the generation device with ``base + int(f"{class}{image}")``, exactly as the
study, so every image gets the study's initial noise (CUDA and CPU
generators draw different numbers from the same seed, so the device matters).
``"unique"`` (this project's earlier scheme) uses base + class x
images_per_class + image, which never collides (the study's formula maps
class 1 image 11 and class 11 image 1 to the same seed once there are more
than 10 images per class); it also seeds a device generator.

Attention (``attn_processor``): ``"default"`` (the study without
``--use_flash_attn``) switches the UNet to diffusers' default attention
processor (``set_default_attn_processor``), ``"flash"`` to
``AttnProcessor2_0`` (PyTorch scaled-dot-product attention, the study's
``--use_flash_attn``), ``"keep"`` leaves whatever the pipeline loaded with.

Progress: a line per ``progress_every`` seconds (and at the end) to stdout,
which the rule sends to its log: images done, images/s, ETA.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .patch import apply_patch, patch_state, remove_patch, reseed
from .tiny import build_tiny_pipeline

PathLike = Union[str, Path]
PROMPT = "A high quality photograph of a {}."
SEED_SCHEMES = ("study", "unique")
ATTN_PROCESSORS = ("default", "flash", "keep")
TINY_MARKER = "model_index.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


MODEL_PIPELINES = {
    "sd15": ("StableDiffusionPipeline",),
    "sdxl": ("StableDiffusionXLPipeline",),
    "pixart": ("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
}
MODELS = tuple(MODEL_PIPELINES)


def check_model(model: str) -> str:
    if model not in MODEL_PIPELINES:
        raise ValueError(f"unknown diffusion model {model!r}; use one of {', '.join(MODELS)}")
    return model


def backbone(pipe: Any) -> torch.nn.Module:
    """The denoising network of a pipeline: its ``unet`` or ``transformer``."""
    for attr in ("unet", "transformer"):
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def save_tiny_pipeline(out_dir: PathLike, img_size: int = 64, seed: int = 0, model: str = "sd15") -> Path:
    """Build the tiny pipeline of `model` (:func:`.tiny.build_tiny_pipeline`)
    and ``save_pretrained`` it to `out_dir` (built in a temporary sibling
    folder, then renamed)."""
    check_model(model)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        build_tiny_pipeline(img_size, seed, model).save_pretrained(str(tmp))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_device(device: Optional[str] = None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    """auto: float16 on a GPU (the study), float32 on the CPU."""
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _folder_pipeline_class(folder: Path, model: str) -> str:
    """The pipeline class a local folder's model_index.json names, checked
    against `model`."""
    index = folder / TINY_MARKER
    if not index.exists():
        raise ValueError(f"pipeline folder {folder} has no {TINY_MARKER}: not a diffusers pipeline folder")
    class_name = json.loads(index.read_text()).get("_class_name")
    if class_name not in MODEL_PIPELINES[model]:
        raise ValueError(
            f"pipeline folder {folder} holds a {class_name}, but diffusion.model {model!r} loads "
            f"{' or '.join(MODEL_PIPELINES[model])}; set diffusion.model to match the folder"
        )
    return class_name


def load_pipeline(source: PathLike, device: Optional[str] = None, dtype: Optional[str] = None,
                  model: str = "sd15"):
    """The `model` pipeline (see the module docstring) by ``from_pretrained``
    from a local folder (read offline; its model_index.json must name a
    pipeline class of `model`) or a hub name (e.g.
    ``stable-diffusion-v1-5/stable-diffusion-v1-5``; uses the Hugging Face
    cache, downloading if allowed). Returns the pipeline on the device,
    progress bars off, no safety checker (as the study)."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    check_model(model)
    diffusers_logging.disable_progress_bar()  # as the study: logs get our progress lines instead
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers ships with the diffusion env
        pass
    dev = resolve_device(device)
    source = str(source)
    local = Path(source).exists()
    if not local and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise ValueError(
            f"pipeline {source!r} is neither an existing folder nor a hub name (owner/name)"
        )
    class_name = _folder_pipeline_class(Path(source), model) if local else MODEL_PIPELINES[model][0]
    extra = {"safety_checker": None, "requires_safety_checker": False} if model == "sd15" else {}
    pipe = getattr(diffusers, class_name).from_pretrained(
        source, dtype=resolve_dtype(dtype, dev), local_files_only=local, **extra,  # sd15: no image blacked out
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def image_seed(base_seed: int, class_index: int, image_index: int, images_per_class: int,
               scheme: str = "study") -> int:
    """The fixed seed of one image.

    "study": base + int(f"{class}{image}") (the ATC study's; it collides once
    images_per_class > 10, e.g. (1, 11) and (11, 1)); "unique": base + class x
    images_per_class + image (unique per (class, image))."""
    if scheme == "study":
        return int(base_seed) + int(f"{int(class_index)}{int(image_index)}")
    if scheme == "unique":
        return int(base_seed) + int(class_index) * int(images_per_class) + int(image_index)
    raise ValueError(f"unknown seed scheme {scheme!r}; use one of {', '.join(SEED_SCHEMES)}")


def set_attention(pipe: Any, attn_processor: str = "default") -> str:
    """Switch the backbone's attention processor as the study does: "default"
    (diffusers' default processor), "flash" (AttnProcessor2_0, PyTorch SDPA)
    or "keep" (unchanged). Returns the processor class name now in use."""
    if attn_processor not in ATTN_PROCESSORS:
        raise ValueError(f"unknown attention processor {attn_processor!r}; use one of {', '.join(ATTN_PROCESSORS)}")
    net = backbone(pipe)
    if attn_processor == "default":
        net.set_default_attn_processor()
    elif attn_processor == "flash":
        from diffusers.models.attention_processor import AttnProcessor2_0

        net.set_attn_processor(AttnProcessor2_0())
    names = sorted({type(p).__name__ for p in net.attn_processors.values()})
    return "+".join(names)


class ProgressLog:
    """Progress lines for logs (tqdm stays silent without a terminal): call
    ``update(n)`` as work is done; a line "<desc>: done/total <unit>, rate
    <unit>/s, ETA" is printed when ``every_s`` seconds have passed since the
    last one, and at completion. ``printer`` receives each line."""

    def __init__(self, total: int, desc: str, unit: str = "images", every_s: float = 30.0, printer=None):
        self.total, self.desc, self.unit, self.every_s = int(total), desc, unit, float(every_s)
        self.done = 0
        self.lines: List[str] = []
        self._printer = printer or (lambda line: print(line, flush=True))
        self._start = time.perf_counter()
        self._last = self._start

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            elapsed = now - self._start
            rate = self.done / elapsed if elapsed > 0 else float("inf")
            eta = (self.total - self.done) / rate if rate > 0 and np.isfinite(rate) else 0.0
            line = (f"{self.desc}: {self.done}/{self.total} {self.unit}, {rate:.3g} {self.unit}/s, "
                    f"elapsed {elapsed:.0f} s, ETA {max(eta, 0.0):.0f} s")
            self.lines.append(line)
            self._printer(line)


def _call_parameters(pipe: Any) -> set:
    import inspect

    return set(inspect.signature(type(pipe).__call__).parameters)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_images(
    pipe: Any,
    class_names: Sequence[str],
    out_dir: PathLike,
    images_per_class: int = 2,
    steps: int = 50,
    guidance: float = 7.5,
    img_size: int = 512,
    seed: int = 0,
    merge: Optional[Dict[str, Any]] = None,
    warmup: bool = True,
    seed_scheme: str = "study",
    attn_processor: str = "default",
    progress_every: float = 30.0,
    printer=None,
) -> Dict[str, Any]:
    """Generate `images_per_class` images per class into `out_dir` as
    ``<class index:04d>_<image:02d>.png`` (folder built under a temporary name,
    then renamed) and return the timing record.

    merge: apply_patch options (merge_fn "none" or absent = no merging; ToMe's
    random destinations only with use_rand true, off by default as in the
    study). Each image's initial noise comes from a generator on the
    pipeline's device seeded by :func:`image_seed` (``seed_scheme``), and the
    merge generator is reseeded with the same seed. ``attn_processor``: see
    :func:`set_attention`. One untimed 1-step call warms the pipeline up
    first (if `warmup`). Timing: wall seconds of each pipeline call (GPU
    synchronised), mean and population std. Progress lines every
    ``progress_every`` seconds (``printer``, default print).
    """
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be >= 1, got {images_per_class}")
    if not class_names:
        raise ValueError("no classes to generate")
    if seed_scheme not in SEED_SCHEMES:
        raise ValueError(f"unknown seed scheme {seed_scheme!r}; use one of {', '.join(SEED_SCHEMES)}")
    device = pipe.device
    attention = set_attention(pipe, attn_processor)
    merge = dict(merge or {})
    merge_fn = merge.pop("merge_fn", "none")
    remove_patch(pipe)
    if merge_fn not in (None, "none"):
        apply_patch(pipe, merge_fn=merge_fn, **merge)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))

    # PixArt would round the size to its aspect-ratio bins (generate at img_size exactly) and
    # rewrite the prompt when optional packages are installed (keep the prompt as written)
    accepted = _call_parameters(pipe)
    extra = {k: False for k in ("use_resolution_binning", "clean_caption") if k in accepted}

    def call(prompt: str, s: int, num_steps: int):
        generator = torch.Generator(device=device).manual_seed(s)
        reseed(pipe, s)
        return pipe(
            prompt, num_inference_steps=num_steps, guidance_scale=guidance, height=img_size,
            width=img_size, generator=generator, output_type="pil", **extra,
        ).images[0]

    times: List[float] = []
    files: List[str] = []
    seeds: List[int] = []
    progress = ProgressLog(len(class_names) * images_per_class, "generate", "images", progress_every, printer)
    try:
        if warmup:
            call(PROMPT.format(class_names[0]), int(seed), 1)
        for c, name in enumerate(class_names):
            prompt = PROMPT.format(name)
            for i in range(images_per_class):
                s = image_seed(seed, c, i, images_per_class, seed_scheme)
                _sync(device)
                start = time.perf_counter()
                image = call(prompt, s, steps)
                _sync(device)
                times.append(time.perf_counter() - start)
                fname = f"{c:04d}_{i:02d}.png"
                image.save(tmp / fname)
                files.append(fname)
                seeds.append(s)
                progress.update()
        state = patch_state(pipe)
        tokens = {k: list(v) for k, v in state.tokens.items()} if state is not None else {}
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        remove_patch(pipe)
    arr = np.asarray(times)
    return {
        "time_mean": float(arr.mean()),
        "time_std": float(arr.std()),
        "times": [float(t) for t in times],
        "num_images": len(files),
        "files": files,
        "classes": list(class_names),
        "prompt": PROMPT,
        "steps": int(steps),
        "guidance": float(guidance),
        "img_size": int(img_size),
        "seed": int(seed),
        "seed_scheme": seed_scheme,
        "seeds": seeds,
        "attn_processor": attention,
        "device": str(device),
        "dtype": str(backbone(pipe).dtype).replace("torch.", ""),
        "pipeline_class": type(pipe).__name__,
        "merge": {"merge_fn": merge_fn or "none", **merge},
        "merged_tokens": tokens,
    }
