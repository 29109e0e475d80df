"""Collect every run's metrics into one CSV, plot accuracy per method, and
write each method's drop from the unreduced model."""
import argparse
import json

from tokenreduction.summary import plot_accuracy, summarise_runs, write_accuracy_drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", required=True, help="JSON list of run dicts (dataset, backbone, method, keep_rate, seed)")
    parser.add_argument("--metrics", nargs="+", required=True, help="metrics.json of each run, in the order of --runs")
    parser.add_argument("--table", required=True)
    parser.add_argument("--keep-rate-plot", required=True)
    parser.add_argument("--gflops-plot", required=True)
    parser.add_argument("--baseline", default="deit", help="name of the unreduced method the drops are taken from")
    parser.add_argument("--drop-table", help="CSV of each method's drop from the baseline per keep rate")
    parser.add_argument("--drop-plot", help="bar chart of the same drops")
    args = parser.parse_args()
    if (args.drop_table is None) != (args.drop_plot is None):
        parser.error("--drop-table and --drop-plot go together")
    table = summarise_runs(json.loads(args.runs), args.metrics, args.table)
    plot_accuracy(table, "keep_rate", args.keep_rate_plot, baseline=args.baseline)
    plot_accuracy(table, "gflops", args.gflops_plot, baseline=args.baseline)
    if args.drop_table:
        drops = write_accuracy_drop(table, args.drop_table, args.drop_plot, baseline=args.baseline)
        print(drops.to_string(index=False))


if __name__ == "__main__":
    main()
