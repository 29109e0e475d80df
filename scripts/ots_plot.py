"""Collect the sweep tables of one backbone into its CSV and plot accuracy
against GFLOPs (one line per method and schedule)."""
import argparse

from tokenreduction.ots import collect_tables, plot_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweeps", nargs="+", required=True, help="sweep CSVs of one backbone")
    parser.add_argument("--table", required=True)
    parser.add_argument("--plot", required=True)
    args = parser.parse_args()
    plot_sweep(collect_tables(args.sweeps, args.table), args.plot)


if __name__ == "__main__":
    main()
