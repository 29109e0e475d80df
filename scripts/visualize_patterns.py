"""Draw the reduction patterns of many runs on the same validation images:
one row per run (method, keep rate, backbone), one column per image and
stage; pruned patches black, merged groups coloured with white borders.

Reads each run's ``patterns.npz`` and ``metrics.json`` (for the split) from
the evaluate stage, and the images from the dataset, transformed as the
evaluation transformed them.
"""
import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np


def load_rows(patterns, metrics, labels):
    rows, splits = [], set()
    for pat_path, met_path, label in zip(patterns, metrics, labels):
        with np.load(pat_path) as npz:
            composed = npz["composed"]
            blocks = [int(b) for b in npz["stage_blocks"]]
            ids = [str(v) for v in npz["image_ids"]]
            grid = tuple(int(v) for v in npz["grid"])
        met = json.loads(Path(met_path).read_text())
        splits.add(met.get("split") or "val")
        kept = met.get("tokens_kept") or []
        suffix = " → ".join(str(k) for k in kept)
        rows.append(
            {
                "label": f"{label}\ntokens {suffix}" if suffix else label,
                "composed": composed,
                "blocks": blocks,
                "ids": ids,
                "grid": grid,
                "path": pat_path,
            }
        )
    return rows, splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", required=True, help="dataset kind (as in the config)")
    parser.add_argument("--root", required=True, help="dataset root")
    parser.add_argument("--img-size", type=int, required=True)
    parser.add_argument("--manifest", help="JSON file {patterns: [...], metrics: [...], labels: [...]} "
                        "(what the workflow passes; replaces the three lists below)")
    parser.add_argument("--patterns", nargs="+", help="patterns.npz of each run")
    parser.add_argument("--metrics", nargs="+", help="metrics.json of each run (same order)")
    parser.add_argument("--labels", nargs="+", help="row label of each run (same order)")
    parser.add_argument("--num-images", type=int, default=3)
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", required=True, help="the figure (.png)")
    args = parser.parse_args()
    lists = ("patterns", "metrics", "labels")
    if args.manifest is not None:
        if any(getattr(args, name) is not None for name in lists):
            parser.error("--manifest replaces --patterns, --metrics and --labels: give one or the other")
        from tokenreduction.manifest import ManifestError, load_manifest

        try:
            manifest = load_manifest(args.manifest, lists)
        except ManifestError as err:
            sys.exit(str(err))
        for name in lists:
            setattr(args, name, [str(v) for v in manifest[name]])
    elif any(getattr(args, name) is None for name in lists):
        parser.error("give --manifest, or --patterns, --metrics and --labels")
    if not len(args.patterns) == len(args.metrics) == len(args.labels):
        sys.exit(
            f"--patterns ({len(args.patterns)}), --metrics ({len(args.metrics)}) and --labels "
            f"({len(args.labels)}) must name the same runs"
        )
    if args.num_images < 1:
        sys.exit(f"--num-images must be >= 1, got {args.num_images}")

    import matplotlib

    matplotlib.use("Agg")
    import torch

    from tokenreduction.data import build_dataset, build_transform
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from tokenreduction.visualization import pattern_grid

    rows, splits = load_rows(args.patterns, args.metrics, args.labels)
    rows = [r for r in rows if r["blocks"]]  # unreduced runs have nothing to draw
    if not rows:
        sys.exit("none of the runs reduces tokens: nothing to draw")
    if len(splits) != 1:
        sys.exit(f"the runs were evaluated on different splits {sorted(splits)}: their images differ")
    grids = {r["grid"] for r in rows}
    if len(grids) != 1:
        sys.exit(f"the runs have different patch grids {sorted(grids)}; draw them in separate figures")
    # images spread over those every run stored (splits are often sorted by class)
    stored = min(r["composed"].shape[1] for r in rows)
    picks = sorted({int(round(v)) for v in np.linspace(0, stored - 1, min(args.num_images, stored))})
    n = len(picks)
    ids = [rows[0]["ids"][i] for i in picks]
    for r in rows[1:]:
        theirs = [r["ids"][i] for i in picks]
        if theirs != ids:
            sys.exit(f"{r['path']} holds other images ({theirs}) than {rows[0]['path']} ({ids})")
    for r in rows:
        r["composed"] = r["composed"][:, picks]

    split = splits.pop()
    ds = build_dataset(args.kind, args.root, split, build_transform(False, args.img_size, args.kind))
    position = {ds.image_id(i): i for i in range(len(ds))}
    missing = [i for i in ids if i not in position]
    if missing:
        sys.exit(f"images {missing} of the patterns are not in split {split!r} of {args.root}")
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    images = []
    for image_id in ids:
        x, _ = ds[position[image_id]]
        images.append((x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())

    fig = pattern_grid(images, rows, rows[0]["grid"], title=args.title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)
    print(f"{len(rows)} runs x {n} images ({split}: {', '.join(ids)}) -> {out}", flush=True)


if __name__ == "__main__":
    main()
