"""FID (clean-fid) of one experiment's generations against the reference set."""
import argparse
import json
import sys

from tokenreduction.diffusion import MissingWeightsError, compute_fid
from tokenreduction.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", required=True, help="reference image folder")
    parser.add_argument("--generated", required=True, help="generated image folder")
    parser.add_argument("--timing", required=True, help="timing JSON written by sd_generate.py")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--extractor", default="inception", help="inception | pixels (demo, no download)")
    parser.add_argument("--mode", default="clean", help="clean | legacy_tensorflow")
    parser.add_argument("--inception-weights", default="", help="path to inception-2015-12-05.pt ('' = clean-fid's)")
    parser.add_argument("--pixel-dim", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        result = compute_fid(
            args.reference, args.generated, extractor=args.extractor, mode=args.mode,
            inception_weights=args.inception_weights or None,
            device=None if args.device == "auto" else args.device, pixel_dim=args.pixel_dim,
            progress_every=args.progress_every,
        )
    except MissingWeightsError as e:
        sys.exit(f"error: {e}")
    with open(args.timing) as f:
        timing = json.load(f)
    result.update(
        experiment=args.experiment, time_mean=timing["time_mean"], time_std=timing["time_std"],
        merge=timing["merge"], steps=timing["steps"], device=timing["device"],
    )
    write_json(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
