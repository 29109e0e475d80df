"""Collect every run's metrics into one CSV and plot accuracy per method."""
import argparse
import json

from tokenreduction.summary import plot_accuracy, summarise_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", required=True, help="JSON list of run dicts (dataset, backbone, method, keep_rate, seed)")
    parser.add_argument("--metrics", nargs="+", required=True, help="metrics.json of each run, in the order of --runs")
    parser.add_argument("--table", required=True)
    parser.add_argument("--keep-rate-plot", required=True)
    parser.add_argument("--gflops-plot", required=True)
    args = parser.parse_args()
    table = summarise_runs(json.loads(args.runs), args.metrics, args.table)
    plot_accuracy(table, "keep_rate", args.keep_rate_plot)
    plot_accuracy(table, "gflops", args.gflops_plot)


if __name__ == "__main__":
    main()
