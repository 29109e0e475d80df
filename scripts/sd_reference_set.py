"""Copy the first N validation images of each class into the FID reference folder."""
import argparse
import json

from tokenreduction.diffusion import make_reference_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--val-root", required=True, help="class-folder validation split: <val-root>/<class>/<image>")
    parser.add_argument("--out", required=True, help="reference folder to write")
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--num-classes", type=int, default=0, help="first N classes (0 = all)")
    args = parser.parse_args()
    record = make_reference_set(args.val_root, args.out, args.per_class, args.num_classes or None)
    print(json.dumps({k: v for k, v in record.items() if k != "files"} | {"num_images": len(record["files"])}))


if __name__ == "__main__":
    main()
