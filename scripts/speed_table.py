"""Join the throughput and FLOPs tables of every backbone into the speed table (achieved / FLOPs-implied speed-up)."""
import argparse

import pandas as pd

from tokenreduction.benchmark import speed_table
from tokenreduction.benchmark.plots import plot_throughput
from tokenreduction.io import atomic_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--throughput", nargs="+", required=True, help="throughput CSV per backbone")
    parser.add_argument("--flops", nargs="+", required=True, help="FLOPs CSV per backbone")
    parser.add_argument("--batch-size", type=int, default=0, help="headline batch size (0: the largest measured)")
    parser.add_argument("--table", required=True)
    parser.add_argument("--plot", required=True, help="PNG: images/s against batch size per backbone")
    args = parser.parse_args()
    throughput = pd.concat([pd.read_csv(p) for p in args.throughput], ignore_index=True)
    flops = pd.concat([pd.read_csv(p) for p in args.flops], ignore_index=True)
    table = speed_table(throughput, flops, args.batch_size or None)
    with atomic_path(args.table) as tmp:
        table.to_csv(tmp, index=False)
    plot_throughput(throughput, args.plot)
    print(table.to_string())


if __name__ == "__main__":
    main()
