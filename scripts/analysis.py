"""The analysis stages: compare, collate, correlate, token-stats, heatmaps."""
import argparse
import json

from tqdm import tqdm

from tokenreduction.analysis import stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("compare", help="compare every pair of runs of a dataset along one axis")
    p.add_argument("--summary", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--axis", required=True)
    p.add_argument("--eval-dir", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("collate", help="one row per pair with the metric difference")
    p.add_argument("--summary", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--axis", required=True)
    p.add_argument("--compare", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("correlate", help="rank correlations of the metric difference with each measure")
    p.add_argument("--collated", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--figure", required=True)
    p = sub.add_parser("token-stats", help="token depth statistics and heatmaps of a dataset's runs")
    p.add_argument("--summary", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--eval-dir", required=True)
    p.add_argument("--depths", required=True, help="JSON object: backbone -> number of blocks")
    p.add_argument("--out", required=True)
    p.add_argument("--figure", required=True)
    p = sub.add_parser("heatmaps", help="compare global pruning patterns (depth heatmaps)")
    p.add_argument("--token-stats", nargs="+", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()

    if args.step == "compare":
        stage.compare_runs(args.summary, args.dataset, args.axis, args.eval_dir, args.out, progress=tqdm)
    elif args.step == "collate":
        stage.collate(args.summary, args.dataset, args.axis, args.compare, args.out)
    elif args.step == "correlate":
        stage.correlate_axis(args.collated, args.out, args.figure)
    elif args.step == "token-stats":
        stage.token_stats(args.summary, args.dataset, args.eval_dir, json.loads(args.depths), args.out, args.figure)
    else:
        stage.compare_heatmaps(args.token_stats, args.out)


if __name__ == "__main__":
    main()
