"""Detection stage entry point (runs in the detection environment).

    detection.py make-data --root DIR [--num-images 8 --image-size 128 --seed 0]
    detection.py train     --config C --work-dir W --final F.pth [run options]
    detection.py eval      --config C --work-dir W --checkpoint F.pth --out metrics.json [run options]
    detection.py benchmark --config C --work-dir W --checkpoint F.pth --out bench.json [run options]
    detection.py summary   --runs RUNS_JSON --out table.csv

Run options: --linkage, --keep-rate, --data-root, --load-from, --cumulative-iters,
--batch-size, --seed, --launcher, --cfg-options key=value ... (see
tokenreduction.detection.run.build_config).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

if importlib.util.find_spec("tokenreduction") is None:  # conda env: the repository's source
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _write_json(path: str, data: dict) -> None:
    tmp = Path(path + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _config(args):
    from tokenreduction.detection.run import build_config

    options = dict(kv.split("=", 1) for kv in args.cfg_options or [])
    return build_config(
        args.config,
        args.work_dir,
        linkage=args.linkage,
        keep_rate=args.keep_rate,
        data_root=args.data_root,
        load_from=args.load_from,
        cumulative_iters=args.cumulative_iters,
        batch_size=args.batch_size,
        seed=args.seed,
        launcher=args.launcher,
        options={k: _value(v) for k, v in options.items()},
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("make-data")
    data.add_argument("--root", required=True)
    data.add_argument("--num-images", type=int, default=8)
    data.add_argument("--image-size", type=int, default=128)
    data.add_argument("--seed", type=int, default=0)
    summary = sub.add_parser("summary")
    runs = summary.add_mutually_exclusive_group(required=True)
    runs.add_argument("--runs", help="JSON list of {size, method, keep_rate, metrics, benchmark}")
    runs.add_argument("--manifest", help="JSON file {runs: [the same list]} (what the workflow passes)")
    summary.add_argument("--out", required=True)
    for name in ("train", "eval", "benchmark"):
        p = sub.add_parser(name)
        p.add_argument("--config", required=True)
        p.add_argument("--work-dir", required=True)
        p.add_argument("--linkage")
        p.add_argument("--keep-rate", type=float,
                       help="fraction of the current tokens kept at each reduction location; 1 = unreduced")
        p.add_argument("--data-root")
        p.add_argument("--load-from")
        p.add_argument("--cumulative-iters", type=int, default=1)
        p.add_argument("--batch-size", type=int)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--launcher", default="none", choices=["none", "pytorch", "slurm"])
        p.add_argument("--cfg-options", nargs="*")
        if name == "train":
            p.add_argument("--final", required=True)
        else:
            p.add_argument("--checkpoint", required=True)
            p.add_argument("--out", required=True)
        if name == "benchmark":
            p.add_argument("--bench-batch", type=int, default=1)
            p.add_argument("--runs", type=int, default=20)
            p.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)

    if args.command == "make-data":
        from tokenreduction.detection.data import make_shapes_coco

        paths = make_shapes_coco(args.root, num_images=args.num_images, image_size=args.image_size, seed=args.seed)
        print(json.dumps(paths))
    elif args.command == "train":
        from tokenreduction.detection.run import train

        train(_config(args), args.final)
    elif args.command == "eval":
        from tokenreduction.detection.run import evaluate

        metrics = evaluate(_config(args), args.checkpoint)
        metrics.update(linkage=args.linkage, keep_rate=args.keep_rate)
        _write_json(args.out, metrics)
        print(json.dumps(metrics))
    elif args.command == "benchmark":
        from tokenreduction.detection.run import benchmark

        result = benchmark(_config(args), args.checkpoint, args.bench_batch, args.runs, args.warmup)
        result.update(linkage=args.linkage, keep_rate=args.keep_rate)
        _write_json(args.out, result)
        print(json.dumps(result))
    else:
        from tokenreduction.detection.run import SUMMARY_COLUMNS, summary_rows

        if args.manifest is not None:
            from tokenreduction.manifest import ManifestError, load_manifest

            try:
                runs = load_manifest(args.manifest, ("runs",))["runs"]
            except ManifestError as err:
                sys.exit(str(err))
        else:
            runs = json.loads(args.runs)
        rows = summary_rows(runs)
        tmp = Path(args.out + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
