"""Clustering back ends of ATC (SciPy, scikit-learn, fastcluster, batched ATC, cuML): time and agreement with SciPy.

    python scripts/benchmark_clustering.py --backends scipy sklearn fastcluster atc --sizes 196 \
        --batch-sizes 64 --linkages single average complete --out clustering.csv
"""
import argparse

import torch

from tokenreduction.benchmark.clustering import BACKENDS, benchmark_clustering, get_backends
from tokenreduction.io import atomic_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="points (tokens) per image, N")
    parser.add_argument("--batch-sizes", type=int, nargs="+", required=True, help="images per call, B")
    parser.add_argument("--linkages", nargs="+", default=["single", "complete", "average"])
    parser.add_argument("--keep-rate", type=float, default=0.7, help="K = int(keep_rate * N) clusters")
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--throw-out", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    table = benchmark_clustering(
        get_backends(args.backends), args.sizes, args.batch_sizes, args.linkages, keep_rate=args.keep_rate,
        feature_dim=args.feature_dim, warmup=args.warmup, runs=args.runs, throw_out=args.throw_out,
        log=lambda msg: print(msg, flush=True),
    )
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    bad = table[(table.status == "ok") & ~table.agrees.astype(bool)]
    for _, row in bad.iterrows():
        print(f"DISAGREEMENT: {row.backend} ({row.linkage}, N={row.num_points}, B={row.batch_size}):"
              f" {row.agreement:.2%} of images match SciPy, mean ARI {row.ari:.3f}", flush=True)


if __name__ == "__main__":
    main()
