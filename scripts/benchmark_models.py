"""Throughput or FLOPs of one backbone's configured models against the unreduced baseline.

    python scripts/benchmark_models.py throughput --model NAME --model-kwargs JSON --specs JSON \
        --img-size 224 --batch-sizes 1 2 4 --warmup 10 --runs 100 --throw-out 0.25 --out throughput.csv
    python scripts/benchmark_models.py flops --model NAME --model-kwargs JSON --specs JSON --img-size 224 --out flops.csv
"""
import argparse
import json
import platform
import sys

import torch

from tokenreduction.benchmark import ModelSpec, benchmark_throughput, build_models, model_flops
from tokenreduction.io import atomic_path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"device {name!r} asked for but torch sees no CUDA device")
    return torch.device(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["throughput", "flops"])
    parser.add_argument("--backbone", default="")
    parser.add_argument("--model", required=True, help="timm model name")
    parser.add_argument("--model-kwargs", default="{}", help="JSON of timm keyword arguments")
    parser.add_argument("--specs", required=True, help="JSON list of ModelSpec fields (label, method, keep_rate, ...)")
    parser.add_argument("--img-size", type=int, required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--throw-out", type=float, default=0.25)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    specs = [ModelSpec.from_dict(s) for s in json.loads(args.specs)]
    models = build_models(args.model, specs, json.loads(args.model_kwargs), seed=args.seed)
    by_label = {s.label: s for s in specs}
    baseline = next((s.label for s in specs if s.is_baseline), "baseline")
    print(f"{args.mode}: {len(models)} models of {args.model} ({args.backbone}); torch {torch.__version__},"
          f" {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", flush=True)
    if args.mode == "flops":
        table = model_flops(models, args.img_size, baseline=baseline, specs=by_label, backbone=args.backbone)
    else:
        device = resolve_device(args.device)
        if device.type == "cuda":
            print(f"device: {torch.cuda.get_device_name(device)}", flush=True)
        table = benchmark_throughput(
            models, args.img_size, args.batch_sizes, baseline=baseline, warmup=args.warmup, runs=args.runs,
            throw_out=args.throw_out, device=device, dtype=args.dtype, specs=by_label, backbone=args.backbone,
            log=lambda msg: print(msg, flush=True),
        )
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    print(table.to_string(max_cols=12), file=sys.stdout)


if __name__ == "__main__":
    main()
