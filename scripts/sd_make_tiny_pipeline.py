"""Build the demo's tiny random-weight diffusion pipeline (sd15, sdxl or
pixart layout) and save it with save_pretrained (loaded back by
sd_generate.py through from_pretrained)."""
import argparse

from tokenreduction.diffusion import MODELS, save_tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="pipeline folder to write")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--model", default="sd15", choices=list(MODELS), help="the pipeline layout (diffusion.model)")
    args = parser.parse_args()
    save_tiny_pipeline(args.out, args.img_size, args.seed, args.model)
    print(f"tiny {args.model} pipeline saved to {args.out}")


if __name__ == "__main__":
    main()
