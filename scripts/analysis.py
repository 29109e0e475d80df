"""The analysis stages: compare, collate, correlate, token-stats, heatmaps, rho-heatmap."""
import argparse
import json
import logging
import time

from tokenreduction.analysis import stage


def progress_lines(items, desc="", every_s=30.0):
    """Yield from `items` and print a line (done/total, rate, ETA) to the log
    about every `every_s` seconds and at the end (tqdm stays silent without a
    terminal)."""
    items = list(items)
    total, start, last = len(items), time.perf_counter(), 0.0
    for i, item in enumerate(items, 1):
        yield item
        now = time.perf_counter() - start
        if now - last >= every_s or i == total:
            last = now
            rate = i / now if now > 0 else float("inf")
            eta = (total - i) / rate if rate > 0 else 0.0
            print(f"{desc}: {i}/{total} pairs, {rate:.2f} pairs/s, ETA {eta:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("compare", help="compare every pair of runs of a dataset along one axis")
    p.add_argument("--summary", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--axis", required=True)
    p.add_argument("--eval-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--pwcca", default="study", choices=["study", "paired"],
                   help="PWCCA normalisation: study (all of A's variates) or paired (this project's variant)")
    p.add_argument("--baseline-rate", default="0.9",
                   help="keep rate the models axis pairs with the unreduced baseline ('none': no such pairs)")
    p = sub.add_parser("collate", help="one row per pair with the metric difference")
    p.add_argument("--summary", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--axis", required=True)
    p.add_argument("--compare", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("correlate", help="rank correlations of the metric difference with each measure")
    p.add_argument("--collated", required=True)
    p.add_argument("--axis", default=None)
    p.add_argument("--out", required=True, help="per-group table (the study's grouping)")
    p.add_argument("--pooled", default=None, help="all pairs pooled, one order per pair")
    p.add_argument("--figure", required=True)
    p = sub.add_parser("rho-heatmap", help="measure x block heatmap of the pooled rho, one panel per axis")
    p.add_argument("--pooled", nargs="+", required=True, help="AXIS=CSV pairs")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)
    p = sub.add_parser("token-stats", help="token depth statistics and heatmaps of a dataset's runs")
    p.add_argument("--summary", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--eval-dir", required=True)
    p.add_argument("--depths", required=True, help="JSON object: backbone -> number of blocks")
    p.add_argument("--out", required=True)
    p.add_argument("--figure", required=True)
    p = sub.add_parser("heatmaps", help="compare global pruning patterns (depth heatmaps)")
    p.add_argument("--token-stats", nargs="+", required=True)
    p.add_argument("--kl-base", type=float, default=2.0, help="log base of KL and JS (the study's: 2)")
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.step == "compare":
        rate = None if str(args.baseline_rate).lower() in ("none", "null", "") else float(args.baseline_rate)
        stage.compare_runs(args.summary, args.dataset, args.axis, args.eval_dir, args.out,
                           progress=progress_lines, pwcca=args.pwcca, baseline_rate=rate)
    elif args.step == "collate":
        stage.collate(args.summary, args.dataset, args.axis, args.compare, args.out)
    elif args.step == "correlate":
        stage.correlate_axis(args.collated, args.out, args.figure, axis=args.axis, out_pooled=args.pooled)
    elif args.step == "rho-heatmap":
        pooled = {}
        for item in args.pooled:
            axis, sep, path = item.partition("=")
            if not sep:
                parser.error(f"--pooled takes AXIS=CSV, got {item!r}")
            pooled[axis] = path
        stage.rho_heatmap(pooled, args.out, args.title)
    elif args.step == "token-stats":
        stage.token_stats(args.summary, args.dataset, args.eval_dir, json.loads(args.depths), args.out, args.figure)
    else:
        stage.compare_heatmaps(args.token_stats, args.out, kl_base=args.kl_base)


if __name__ == "__main__":
    main()
