"""Collect the experiments' FID results into one CSV
(experiment, fid, time_mean, time_std, feature_extractor)."""
import argparse

from tokenreduction.diffusion import fid_table
from tokenreduction.diffusion.fid import read_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fid", nargs="+", required=True, help="FID JSON files written by sd_fid.py")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = [read_json(path) for path in args.fid]
    fid_table(rows, args.out)
    for row in rows:
        print(f"{row['experiment']}: FID {row['fid']:.3f}, {row['time_mean']:.3f} s/image ({row['feature_extractor']})")


if __name__ == "__main__":
    main()
