"""Build the demo's tiny random-weight Stable Diffusion pipeline and save it
with save_pretrained (loaded back by sd_generate.py through from_pretrained)."""
import argparse

from tokenreduction.diffusion import save_tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="pipeline folder to write")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args()
    save_tiny_pipeline(args.out, args.img_size, args.seed)
    print(f"tiny pipeline saved to {args.out}")


if __name__ == "__main__":
    main()
