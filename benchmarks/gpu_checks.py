"""The GPU checks of issue 25, as one command for a session lent a GPU machine.

    PYTHONPATH=src python3 benchmarks/gpu_checks.py --out gpu_checks.json     # on the GPU machine
    .venv/bin/python benchmarks/gpu_checks.py --out gpu_checks.json            # where the project's venv is
    .venv/bin/python benchmarks/gpu_checks.py --cpu-rehearsal --methods tome,evit   # a CPU rehearsal (tests)

Parts, in order (docs/gpu-checks.md):

1. CUDA, fail fast: ``tokenreduction.train.runtime.resolve_device('cuda')``;
   without a usable CUDA device the script exits 2 at once with that module's
   message (node, visible devices, torch and driver versions).
2. gpu_smoke (``--no-smoke`` leaves it out): the ``gpu_smoke`` rule of
   workflow/rules/cluster.smk, run by snakemake where snakemake is installed,
   else its report reproduced here (host, CUDA_VISIBLE_DEVICES,
   ``nvidia-smi -L``, torch and the devices it sees, the runtime's verdict).
3. Fine-tuning steps: DeiT-S (random init, no download) with every registered
   reduction method plus the CLCA plug-in (on top-K), reduction at the
   which-tokens study's blocks and method options (config/which-tokens.yaml),
   geometric budget, ``--keep-rate`` (0.7). ``--steps`` AdamW steps (the first
   a warm-up, untimed) under the trainer's AMP autocast, cross-entropy on 1000
   classes, one synthetic batch. Per method: ms per step (median), images/s,
   peak CUDA memory, the final loss (must be finite) and the tokens kept per
   stage (``model.reduction_state``) next to the budget's targets.
4. One detection forward (``--no-detection`` leaves it out): the ViT-Adapter
   Mask R-CNN of a detection config, random init, on one synthetic image, on
   CUDA, in the detection environment (.venv-mmdet, which needs mmcv built
   with its CUDA ops): ms per forward (detector and backbone) and peak memory.
   A missing environment or a CPU-only mmcv is a failure, never a CPU run.

A failing method or part is recorded and the others go on; the exit status is
1 when any failed (listed at the end), 2 when CUDA is not usable, else 0.
``--cpu-rehearsal`` runs part 3 on the CPU with a tiny model (batch 2, 1 step,
no smoke, no detection) to test this script; it says so loudly. Without it the
script never runs on the CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
try:  # a machine without the project's venv: run from the checkout
    import tokenreduction  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

DETECTION_TAG = "GPU_CHECKS_DETECTION "
REHEARSAL_BANNER = "*** CPU REHEARSAL: tiny model on the CPU, NOT a GPU check; its figures mean nothing ***"
#: the study's configs, first that names a method wins (method options, reduction_loc)
STUDY_CONFIGS = ("config/which-tokens.yaml", "config/atc.yaml", "config/config.yaml")
#: CLCA plug-in entry: the CLCA study's options (config/clca.yaml, topk-clca)
CLCA_ENTRY = ("topk+clca", "topk", {"ifa_head": True, "clc": True, "num_clr": 1})
TINY_KWARGS = {"embed_dim": 16, "num_heads": 1}


# --- study settings ------------------------------------------------------------------------------

def study_settings() -> tuple[list[int], dict[str, dict]]:
    """reduction_loc of the which-tokens study and {method: options} for every
    registered method, from the study configs (options a method does not take
    are dropped; a method no config names gets none)."""
    import yaml

    from tokenreduction.models import method_options
    from tokenreduction.reduction import list_methods

    loc: Optional[list[int]] = None
    options: dict[str, dict] = {}
    for rel in STUDY_CONFIGS:
        path = REPO / rel
        if not path.is_file():
            continue
        cfg = yaml.safe_load(path.read_text()) or {}
        if loc is None and cfg.get("reduction_loc"):
            loc = [int(b) for b in cfg["reduction_loc"]]
        for entry in (cfg.get("methods") or {}).values():
            method = (entry or {}).get("method")
            if method in list_methods() and method not in options:
                allowed = set(method_options(method))
                options[method] = {k: v for k, v in entry.items() if k in allowed}
    return (loc or [3, 6, 9]), {m: options.get(m, {}) for m in list_methods()}


def method_entries(names: Optional[list[str]]) -> tuple[list[int], list[dict]]:
    """The runs of part 3: every registered method and CLCA, or `names` (any
    name is kept: an unknown one fails at build, as a row)."""
    loc, options = study_settings()
    entries = {m: {"name": m, "method": m, "method_kwargs": kw, "clca": None} for m, kw in options.items()}
    name, method, clca = CLCA_ENTRY
    entries[name] = {"name": name, "method": method, "method_kwargs": options.get(method, {}), "clca": clca}
    if names is None:
        return loc, list(entries.values())
    return loc, [entries.get(n, {"name": n, "method": n, "method_kwargs": {}, "clca": None}) for n in names]


# --- part 1 and 2: CUDA and gpu_smoke ------------------------------------------------------------

def check_cuda(device: str) -> torch.device:
    from tokenreduction.train.runtime import resolve_device

    return resolve_device(device)


def smoke_reproduced() -> str:
    """The gpu_smoke rule's report, made here (no snakemake)."""
    from tokenreduction.train.runtime import CudaUnavailableError, cuda_environment, resolve_device

    lines = [
        f"host={socket.gethostname()} slurm_job={os.environ.get('SLURM_JOB_ID', 'none')} "
        f"slurm_job_gpus={os.environ.get('SLURM_JOB_GPUS', 'none')} "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}"
    ]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        lines.append(out.stdout.strip() if out.returncode == 0 else "nvidia-smi: not available")
    except (OSError, subprocess.SubprocessError):
        lines.append("nvidia-smi: not available")
    n = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(i) for i in range(n)]
    lines.append(f"torch {torch.__version__} sees {n} CUDA device(s) {names}")
    try:
        lines.append(f"usable: {resolve_device('cuda')} {cuda_environment()}")
    except CudaUnavailableError as err:
        raise RuntimeError(str(err)) from None
    return "\n".join(lines)


def run_smoke(timeout: float) -> dict:
    """Run the gpu_smoke rule (snakemake next to this Python or on PATH), else
    reproduce its report. Returns {how, report, seconds}; raises on failure."""
    start = time.perf_counter()
    bindir = str(Path(sys.executable).parent)
    snakemake = shutil.which("snakemake", path=bindir + os.pathsep + os.environ.get("PATH", ""))
    if snakemake is None:
        report = smoke_reproduced()
        return {"how": "reproduced (no snakemake here)", "report": report, "seconds": time.perf_counter() - start}
    with tempfile.TemporaryDirectory(prefix="gpu_checks_smoke_") as tmp:
        cmd = [snakemake, "gpu_smoke", "--cores", "1", "--resources", "gpu=1", "--forcerun", "gpu_smoke",
               "--configfile", "config/config.yaml", "--config", f"results={tmp}"]
        try:
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"snakemake gpu_smoke ran past {timeout:.0f} s") from None
        report_file = Path(tmp) / "cluster" / "gpu_smoke.txt"
        if out.returncode != 0 or not report_file.is_file():
            log = Path(tmp) / "logs" / "gpu_smoke.log"  # the rule's own log: the runtime's message
            lines = (log.read_text() if log.is_file() else "").strip().splitlines()
            said = [line for line in lines if "CUDA" in line] or (out.stderr or out.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"snakemake gpu_smoke exited {out.returncode}: " + " | ".join(said[-3:]))
        report = report_file.read_text().strip()
    return {"how": "snakemake gpu_smoke", "report": report, "seconds": time.perf_counter() - start}


# --- part 3: fine-tuning steps -------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, dict):
        return out["logits"]
    return out


def finetune_steps(entry: dict, *, model_name: str, model_kwargs: dict, keep_rate: float, loc: list[int],
                   device: torch.device, batch_size: int, img_size: int, steps: int, amp: bool) -> dict:
    """`steps` AdamW steps of one method on one synthetic batch; the figures."""
    from tokenreduction.train.runtime import autocast, seed_all
    from tokenreduction.train.spec import ModelSpec

    seed_all(0)
    spec = ModelSpec(model=model_name, model_kwargs=dict(model_kwargs), num_classes=1000, method=entry["method"],
                     keep_rate=keep_rate, reduction_loc=loc, budget="geometric",
                     method_kwargs=dict(entry["method_kwargs"]), clca=entry["clca"])
    model = spec.build().to(device).train()  # pretrained=False: random init, no download
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(device)
    labels = torch.randint(0, 1000, (batch_size,), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], None
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = _logits(model(images))
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _sync(device)
        times.append(time.perf_counter() - start)
    final_loss = float(loss.detach())
    state = getattr(model, "reduction_state", None)
    stages = list(getattr(state, "stages", []) or [])
    timed = times[1:] if len(times) > 1 else times  # the first step is the warm-up
    ms = 1000.0 * statistics.median(timed)
    row = {
        "name": entry["name"], "method": entry["method"], "clca": bool(entry["clca"]),
        "method_kwargs": entry["method_kwargs"], "ms_per_step": ms, "images_per_s": batch_size / (ms / 1000.0),
        "timed_steps": len(timed), "peak_mem_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                                                    if device.type == "cuda" else None),
        "final_loss": final_loss, "tokens_kept": [int(s.tokens_out) for s in stages],
        "targets": [int(s.target) for s in stages], "stage_blocks": [int(s.block) for s in stages], "error": None,
    }
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"final loss is {final_loss}")
    return row


def run_methods(entries: list[dict], args, loc: list[int], device: torch.device) -> list[dict]:
    rows = []
    start = time.perf_counter()
    for entry in entries:
        if args.timeout and time.perf_counter() - start > args.timeout:
            rows.append({"name": entry["name"], "error": f"not run: the part's {args.timeout:.0f} s were spent"})
            continue
        try:
            rows.append(finetune_steps(entry, model_name=args.model, model_kwargs=args.model_kwargs,
                                       keep_rate=args.keep_rate, loc=loc, device=device,
                                       batch_size=args.batch_size, img_size=args.img_size, steps=args.steps,
                                       amp=not args.no_amp))
        except Exception as err:  # noqa: BLE001 - one method's failure is a row, the others go on
            first = (str(err).strip().splitlines() or [""])[0]
            rows.append({"name": entry["name"], "method": entry.get("method"),
                         "error": f"{type(err).__name__}: {first}", "traceback": traceback.format_exc(limit=4)})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row = rows[-1]
        done = f"FAILED {row['error']}" if row["error"] else f"{row['ms_per_step']:.1f} ms/step"
        print(f"  {row['name']}: {done}", file=sys.stderr, flush=True)
    return rows


# --- part 4: detection forward (worker runs in the detection environment) ------------------------

def detection_worker(config: str, height: int, width: int, repeats: int) -> dict:
    """In the detection environment: one ViT-Adapter Mask R-CNN of `config`,
    random init, forward(s) on one synthetic image on CUDA. Never the CPU."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"the detection environment's torch {torch.__version__} (built for CUDA "
            f"{torch.version.cuda or 'none: a CPU-only build'}) sees no CUDA device on {socket.gethostname()} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    import mmcv
    import mmcv.ops

    built_for = mmcv.ops.get_compiling_cuda_version()
    if built_for in ("not available", "", None):
        raise RuntimeError(
            f"mmcv {mmcv.__version__} at {Path(mmcv.__file__).parent} is a CPU-only build: its CUDA ops "
            "(MultiScaleDeformableAttention, RoIAlign, NMS) are missing; build the detection environment with "
            "CUDA first (docs/gpu-checks.md)"
        )
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm

    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(config)  # custom_imports registers the ViT-Adapter
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    device = torch.device("cuda")
    model = revert_sync_batchnorm(model).to(device).eval()
    shape = (height, width)
    meta = dict(img_shape=shape, ori_shape=shape, pad_shape=shape, batch_input_shape=shape,
                scale_factor=(1.0, 1.0), img_id=0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = torch.randn(1, 3, height, width, generator=gen).to(device)

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(max(1, repeats)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return 1000.0 * statistics.median(times)

    torch.cuda.reset_peak_memory_stats()
    results = []
    with torch.no_grad():
        detector_ms = timed(lambda: results.append(model(inputs, [DetDataSample(metainfo=meta)], mode="predict")))
        backbone_ms = timed(lambda: model.backbone(inputs))
    dets = results[-1][0].pred_instances
    return {
        "config": config, "image": [height, width], "detector_ms": detector_ms, "backbone_ms": backbone_ms,
        "peak_mem_mib": torch.cuda.max_memory_allocated() / 2**20, "detections": int(len(dets)),
        "boxes_finite": bool(torch.isfinite(dets.bboxes).all()) if len(dets) else True,
        "tokens_kept": list(getattr(model.backbone, "tokens_kept", [])),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "mmcv": mmcv.__version__,
        "mmcv_cuda": built_for,
    }


def run_detection(args) -> dict:
    """Run :func:`detection_worker` in the detection environment; raises with
    one line when it cannot run there."""
    python = Path(args.mmdet_python)
    if not python.is_absolute():
        python = REPO / python
    if not python.exists():
        raise RuntimeError(f"no detection environment: {python} is missing; build it with CUDA first "
                           "(envs/install_mmdet.sh, docs/gpu-checks.md)")
    env_json = python.parent.parent / "tokenreduction-env.json"
    if env_json.is_file():
        build = json.loads(env_json.read_text()).get("mmcv_build")
        if build == "cpu":
            raise RuntimeError(f"the detection environment's mmcv is a CPU-only build ({env_json}): its CUDA ops "
                               "are missing; rebuild it with CUDA (docs/gpu-checks.md)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [str(python), str(Path(__file__).resolve()), "--detection-worker", "--detection-config",
           args.detection_config, "--detection-image", f"{args.detection_image[0]}x{args.detection_image[1]}",
           "--detection-repeats", str(args.detection_repeats)]
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.detection_timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the detection forward ran past {args.detection_timeout:.0f} s") from None
    for line in out.stdout.splitlines():
        if line.startswith(DETECTION_TAG):
            result = json.loads(line[len(DETECTION_TAG):])
            if result.get("error"):
                raise RuntimeError(result["error"])
            return result
    tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"the detection worker exited {out.returncode} without a result: " + " | ".join(tail))


# --- output --------------------------------------------------------------------------------------

def _mib(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def methods_table(rows: list[dict]) -> str:
    head = f"{'method':<12} {'ms/step':>9} {'img/s':>9} {'peak MiB':>9} {'loss':>8}  tokens kept (targets)"
    lines = [head, "-" * len(head)]
    for row in rows:
        if row.get("error"):
            lines.append(f"{row['name']:<12} FAILED: {row['error']}")
            continue
        kept = "/".join(str(k) for k in row["tokens_kept"]) or "-"
        targets = "/".join(str(k) for k in row["targets"]) or "-"
        lines.append(f"{row['name']:<12} {row['ms_per_step']:>9.1f} {row['images_per_s']:>9.1f} "
                     f"{_mib(row['peak_mem_mib']):>9} {row['final_loss']:>8.4f}  {kept} ({targets})")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per method, the first untimed (5)")
    p.add_argument("--batch-size", type=int, default=None, help="synthetic batch (64)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of the methods (registered names, and 'topk+clca'); default all")
    p.add_argument("--keep-rate", type=float, default=0.7)
    p.add_argument("--model", default=None, help="timm model (deit_small_patch16_224)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--no-amp", action="store_true", help="no autocast (default: the trainer's AMP)")
    p.add_argument("--device", default="cuda", help="CUDA device (cuda, cuda:N)")
    p.add_argument("--no-smoke", action="store_true", help="leave out gpu_smoke")
    p.add_argument("--smoke-timeout", type=float, default=180.0)
    det = p.add_mutually_exclusive_group()
    det.add_argument("--detection", dest="detection", action="store_true", default=True,
                     help="run the detection forward (default)")
    det.add_argument("--no-detection", dest="detection", action="store_false", help="leave out the detection forward")
    p.add_argument("--mmdet-python", default=os.environ.get("TOKENREDUCTION_MMDET_PYTHON", ".venv-mmdet/bin/python"))
    p.add_argument("--detection-config", default="config/detection/vit_adapter_s_0.33x_coco.py")
    p.add_argument("--detection-image", default="800x1344", help="HxW of the synthetic image (multiples of 32)")
    p.add_argument("--detection-repeats", type=int, default=3)
    p.add_argument("--detection-timeout", type=float, default=240.0)
    p.add_argument("--timeout", type=float, default=360.0, help="seconds for the fine-tuning part (0: none)")
    p.add_argument("--out", default=None, help="write every figure as JSON here")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="test this script on the CPU: tiny model, batch 2, 1 step, no smoke, no detection")
    p.add_argument("--detection-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    h, _, w = args.detection_image.partition("x")
    args.detection_image = (int(h), int(w))
    args.model_kwargs = {}
    if args.cpu_rehearsal:
        args.model = args.model or "deit_tiny_patch16_224"
        args.model_kwargs = dict(TINY_KWARGS)
        args.batch_size = args.batch_size or 2
        args.steps = args.steps or 1
        args.no_smoke, args.detection = True, False
    args.model = args.model or "deit_small_patch16_224"
    if args.img_size != 224:  # the model is built for the input's size
        args.model_kwargs["img_size"] = args.img_size
    args.batch_size = args.batch_size or 64
    args.steps = args.steps or 5
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    args.method_names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.detection_worker:
        try:
            result = detection_worker(args.detection_config, *args.detection_image, args.detection_repeats)
        except Exception as err:  # noqa: BLE001 - reported to the parent as one line
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"}
        print(DETECTION_TAG + json.dumps(result), flush=True)
        return 0 if "error" not in result else 1

    started = time.perf_counter()
    report: dict[str, Any] = {"cpu_rehearsal": args.cpu_rehearsal, "failures": []}
    if args.cpu_rehearsal:
        print(REHEARSAL_BANNER, flush=True)
        device = torch.device("cpu")
    else:
        from tokenreduction.train.runtime import CudaUnavailableError

        try:
            device = check_cuda(args.device)
        except CudaUnavailableError as err:
            print(f"gpu_checks: CUDA check FAILED: {err}", file=sys.stderr, flush=True)
            return 2
        print(f"CUDA: {device} {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    report["device"] = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
    report["torch"] = torch.__version__

    if not args.no_smoke:
        print("\n== gpu_smoke ==", flush=True)
        try:
            smoke = run_smoke(args.smoke_timeout)
            print(f"({smoke['how']}, {smoke['seconds']:.1f} s)\n{smoke['report']}", flush=True)
        except Exception as err:  # noqa: BLE001
            smoke = {"error": f"{type(err).__name__}: {err}"}
            report["failures"].append(f"gpu_smoke: {smoke['error']}")
            print(f"gpu_smoke FAILED: {smoke['error']}", flush=True)
        report["smoke"] = smoke

    loc, entries = method_entries(args.method_names)
    print(f"\n== fine-tuning steps: {args.model}{' ' + str(args.model_kwargs) if args.model_kwargs else ''}, "
          f"batch {args.batch_size}x3x{args.img_size}x{args.img_size}, {args.steps} step(s) (first untimed), "
          f"keep rate {args.keep_rate}, blocks {loc}, geometric budget, AMP {'off' if args.no_amp else 'on'} ==",
          flush=True)
    part = time.perf_counter()
    rows = run_methods(entries, args, loc, device)
    print(methods_table(rows), flush=True)
    print(f"({time.perf_counter() - part:.1f} s)", flush=True)
    report["finetune"] = {"model": args.model, "model_kwargs": args.model_kwargs, "batch_size": args.batch_size,
                          "img_size": args.img_size, "steps": args.steps, "keep_rate": args.keep_rate,
                          "reduction_loc": loc, "budget": "geometric", "amp": not args.no_amp,
                          "rows": [{k: v for k, v in r.items() if k != "traceback"} for r in rows]}
    for row in rows:
        if row.get("error"):
            report["failures"].append(f"method {row['name']}: {row['error']}")
            if row.get("traceback"):
                print(f"\n{row['name']}:\n{row['traceback']}", file=sys.stderr)

    if args.detection:
        print(f"\n== detection forward: {args.detection_config}, 1 image "
              f"{args.detection_image[0]}x{args.detection_image[1]} ==", flush=True)
        try:
            det = run_detection(args)
            print(f"detector {det['detector_ms']:.1f} ms, backbone {det['backbone_ms']:.1f} ms, peak "
                  f"{_mib(det['peak_mem_mib'])} MiB, {det['detections']} detections, tokens kept "
                  f"{det['tokens_kept']} ({det['device']}, torch {det['torch']}, mmcv {det['mmcv']} "
                  f"CUDA {det['mmcv_cuda']})", flush=True)
        except Exception as err:  # noqa: BLE001
            det = {"error": f"{type(err).__name__}: {err}"}
            report["failures"].append(f"detection: {det['error']}")
            print(f"detection FAILED: {det['error']}", flush=True)
        report["detection"] = det

    report["seconds"] = time.perf_counter() - started
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out)
    print(f"\ntotal {report['seconds']:.1f} s", flush=True)
    if report["failures"]:
        print("FAILURES:\n" + "\n".join(f"  {f}" for f in report["failures"]), flush=True)
    if args.cpu_rehearsal:
        print(REHEARSAL_BANNER, flush=True)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
