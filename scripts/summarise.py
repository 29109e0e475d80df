"""Collect every run's metrics into one CSV, plot accuracy per method, and
write each method's drop from the unreduced model.

The runs and their metrics files come from ``--manifest`` (a JSON file
{"runs": [...], "metrics": [...]}, what the workflow passes: no command line
grows with the number of runs) or from ``--runs`` and ``--metrics``."""
import argparse
import json
import sys

from tokenreduction.manifest import ManifestError, load_manifest
from tokenreduction.summary import plot_accuracy, summarise_runs, write_accuracy_drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", help="JSON file {runs: [run dicts], metrics: [metrics.json of each run]}")
    parser.add_argument("--runs", help="JSON list of run dicts (dataset, backbone, method, keep_rate, seed)")
    parser.add_argument("--metrics", nargs="+", help="metrics.json of each run, in the order of --runs")
    parser.add_argument("--table", required=True)
    parser.add_argument("--keep-rate-plot", required=True)
    parser.add_argument("--gflops-plot", required=True)
    parser.add_argument("--baseline", default="deit", help="name of the unreduced method the drops are taken from")
    parser.add_argument("--drop-table", help="CSV of each method's drop from the baseline per keep rate")
    parser.add_argument("--drop-plot", help="bar chart of the same drops")
    args = parser.parse_args()
    if (args.drop_table is None) != (args.drop_plot is None):
        parser.error("--drop-table and --drop-plot go together")
    if args.manifest is not None:
        if args.runs is not None or args.metrics is not None:
            parser.error("--manifest replaces --runs and --metrics: give one or the other")
        try:
            manifest = load_manifest(args.manifest, ("runs", "metrics"))
        except ManifestError as err:
            sys.exit(str(err))
        runs, metrics = manifest["runs"], manifest["metrics"]
    elif args.runs is None or args.metrics is None:
        parser.error("give --manifest, or --runs and --metrics")
    else:
        runs, metrics = json.loads(args.runs), args.metrics
    table = summarise_runs(runs, metrics, args.table)
    plot_accuracy(table, "keep_rate", args.keep_rate_plot, baseline=args.baseline)
    plot_accuracy(table, "gflops", args.gflops_plot, baseline=args.baseline)
    if args.drop_table:
        drops = write_accuracy_drop(table, args.drop_table, args.drop_plot, baseline=args.baseline)
        print(drops.to_string(index=False))


if __name__ == "__main__":
    main()
