"""Make a demo dataset, or check a real one, and write its manifest."""
import argparse

from tokenreduction.data.prepare import prepare_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--img-size", type=int, required=True)
    parser.add_argument("--manifest", required=True)
    args = parser.parse_args()
    prepare_dataset(args.kind, args.root, args.img_size, args.manifest)


if __name__ == "__main__":
    main()
