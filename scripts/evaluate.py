"""Evaluate one trained model: metrics, reduction patterns, CLS features."""
import argparse

from tokenreduction.evaluate import evaluate
from tokenreduction.train.runtime import CudaUnavailableError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--kind", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--img-size", type=int, required=True)
    parser.add_argument("--split", default=None, help="default: the split the run validated on (test with train_trainval)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-pattern-images", type=int, default=256)
    parser.add_argument("--throughput-batch", type=int, default=0, help="0 skips the throughput measurement")
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--patterns", required=True)
    parser.add_argument("--features", required=True)
    parser.add_argument("--device", default="auto",
                        help="cpu | cuda | cuda:N | auto (the workflow passes cuda when the job asked for a GPU, "
                             "cpu when not); a CUDA device that is not usable fails at once")
    args = parser.parse_args()
    try:
        metrics = evaluate(
            checkpoint=args.checkpoint,
            dataset=args.kind,
            data_root=args.root,
            split=args.split,
            img_size=args.img_size,
            batch_size=args.batch_size,
            num_pattern_images=args.num_pattern_images,
            throughput_batch=args.throughput_batch,
            out_metrics=args.metrics,
            out_patterns=args.patterns,
            out_features=args.features,
            device=args.device,
        )
    except CudaUnavailableError as err:
        raise SystemExit(str(err)) from None
    print(f"{metrics['metric']} {metrics['value']:.2f} on {metrics['num_images']} images of {metrics['split']}", flush=True)


if __name__ == "__main__":
    main()
