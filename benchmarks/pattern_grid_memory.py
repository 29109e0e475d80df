"""Peak memory of `pattern_grid` at a study's width: cells kept as uint8 (the
library) against float64 cells (what it kept before), side by side.

The figure holds every cell's pixel array until it is saved. At CLCA's width
(120 runs per dataset, 3 images, up to 3 stages, 448 px on a 28 x 28 grid)
float64 cells made the `pattern_grid` job peak at 10.2 GB (the CLCA rehearsal,
docs/rehearsal.md). Each variant runs in its own process (a fresh peak RSS):
synthetic images and random assignments, rendered and saved as the job does
(PNG at 110 dpi).

    python benchmarks/pattern_grid_memory.py                 # CLCA's width
    python benchmarks/pattern_grid_memory.py --runs 20       # quicker
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import io, json, resource, sys, time
import matplotlib
matplotlib.use("Agg")
import numpy as np
from tokenreduction import visualization

runs, images, stages, size, side, variant = json.loads(sys.argv[1])
if variant == "float64":
    visualization._cell_pixels = lambda rgb: rgb  # the cells as they were kept before
rng = np.random.default_rng(0)
imgs = [rng.random((size, size, 3)) for _ in range(images)]
P = side * side
rows = []
for r in range(runs):
    composed = np.stack([rng.integers(-1, P // (2 ** (s + 1)), size=(images, P)) for s in range(stages)])
    rows.append({"label": f"run {r}", "blocks": list(range(3, 3 + 3 * stages, 3)), "composed": composed})
t0 = time.perf_counter()
fig = visualization.pattern_grid(imgs, rows, (side, side), title="benchmark")
buf = io.BytesIO()
fig.savefig(buf, format="png", dpi=110)
wall = time.perf_counter() - t0
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": wall,
                  "png_bytes": len(buf.getvalue())}))
"""


def measure(args, variant: str) -> dict:
    spec = json.dumps([args.runs, args.images, args.stages, args.img_size, args.grid, variant])
    proc = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{variant}: the child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=120, help="rows: runs of one dataset (CLCA: 120)")
    parser.add_argument("--images", type=int, default=3, help="images per run (visualize.num_images)")
    parser.add_argument("--stages", type=int, default=3, help="reduction stages per run")
    parser.add_argument("--img-size", type=int, default=448)
    parser.add_argument("--grid", type=int, default=28, help="patches per side")
    args = parser.parse_args()
    cells = args.runs * args.images * (1 + args.stages)
    print(f"pattern_grid: {args.runs} runs x {args.images} images x (1 + {args.stages}) cells = {cells} cells "
          f"of {args.img_size} px, grid {args.grid}x{args.grid}")
    started = time.perf_counter()
    results = {variant: measure(args, variant) for variant in ("float64", "uint8")}
    for variant, r in results.items():
        print(f"  {variant:>7} cells: peak RSS {r['peak_mb']:8.0f} MB, render + save {r['wall_s']:6.1f} s, "
              f"PNG {r['png_bytes'] / 1e6:.1f} MB")
    print(f"peak memory ratio float64 / uint8: {results['float64']['peak_mb'] / results['uint8']['peak_mb']:.1f}x "
          f"(both in {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
