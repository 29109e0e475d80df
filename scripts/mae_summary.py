"""One table of the MAE fine-tuning runs and their evaluation metrics."""
import argparse
import json

from tokenreduction.ots import summarise_mae_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", required=True, help="JSON list of run dicts, in the order of --metrics")
    parser.add_argument("--metrics", nargs="+", required=True)
    parser.add_argument("--table", required=True)
    args = parser.parse_args()
    summarise_mae_runs(json.loads(args.runs), args.metrics, args.table)


if __name__ == "__main__":
    main()
