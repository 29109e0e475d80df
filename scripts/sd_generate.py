"""Generate one experiment's images with a diffusion pipeline (sd15, sdxl or
pixart; optionally with token merging) and record the time per image."""
import argparse
import json

from tokenreduction.diffusion import MODELS, class_names, generate_images, load_pipeline
from tokenreduction.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", required=True, help="diffusers pipeline folder or hub name")
    parser.add_argument("--model", default="sd15", choices=list(MODELS),
                        help="pipeline kind: sd15 (SD 1.x/2.x), sdxl, pixart (diffusion.model)")
    parser.add_argument("--val-root", required=True, help="class folders that give the classes (sorted)")
    parser.add_argument("--class-names", default=None, help="JSON list, or a .txt/.json file (default: folder names)")
    parser.add_argument("--num-classes", type=int, default=0, help="first N classes (0 = all)")
    parser.add_argument("--images-per-class", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seed-scheme", default="study", choices=["study", "unique"],
                        help='study: base + int(f"{class}{image}") (the ATC study); unique: base + class x n + image')
    parser.add_argument("--attention", default="default", choices=["default", "flash", "keep"],
                        help="UNet attention processor: diffusers' default (the study), flash (AttnProcessor2_0), keep")
    parser.add_argument("--progress-every", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--merge", default="{}", help="JSON apply_patch options; merge_fn none = no merging")
    parser.add_argument("--out-images", required=True)
    parser.add_argument("--out-timing", required=True)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    names_arg = args.class_names
    if names_arg and names_arg.lstrip().startswith("["):
        names_arg = json.loads(names_arg)
    names = class_names(args.val_root, names_arg, args.num_classes or None)
    pipe = load_pipeline(args.pipeline, args.device, args.dtype, args.model)
    record = generate_images(
        pipe, names, args.out_images, images_per_class=args.images_per_class, steps=args.steps,
        guidance=args.guidance, img_size=args.img_size, seed=args.seed, merge=json.loads(args.merge),
        seed_scheme=args.seed_scheme, attn_processor=args.attention, progress_every=args.progress_every,
    )
    record["pipeline"] = args.pipeline
    record["model"] = args.model
    write_json(args.out_timing, record)
    print(f"{record['num_images']} images, {record['time_mean']:.3f} +- {record['time_std']:.3f} s per image"
          f" ({record['attn_processor']}, seeds {record['seed_scheme']});"
          f" merged tokens per block: {record['merged_tokens']}")


if __name__ == "__main__":
    main()
