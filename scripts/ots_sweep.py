"""Off-the-shelf sweep: one backbone, one method and schedule, every r of the
sweep; writes the sweep table (CSV)."""
import argparse
import json

from tokenreduction.ots import preset_from_spec, sweep, write_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", required=True, help="backbone entry as JSON (see tokenreduction.ots.preset_from_spec)")
    parser.add_argument("--method", required=True, help="registered method, or none")
    parser.add_argument("--method-kwargs", default="{}", help="method options as JSON")
    parser.add_argument("--label", required=True, help="name of the method in the table (the config's variant)")
    parser.add_argument("--schedule", required=True, help="constant, decrease, increase or an inflection in [-1, 1]")
    parser.add_argument("--r", type=int, nargs="+", required=True)
    parser.add_argument("--kind", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--throughput-batch", type=int, default=0, help="0 skips the throughput measurement")
    parser.add_argument("--max-images", type=int, default=0, help="0 evaluates the whole split")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        schedule = float(args.schedule)
    except ValueError:
        schedule = args.schedule
    table = sweep(
        preset_from_spec(json.loads(args.backbone)),
        args.method,
        args.r,
        schedule,
        dataset=args.kind,
        data_root=args.root,
        split=args.split,
        label=args.label,
        method_kwargs=json.loads(args.method_kwargs) or None,
        batch_size=args.batch_size,
        throughput_batch=args.throughput_batch,
        num_workers=args.num_workers,
        max_images=args.max_images or None,
    )
    write_table(table, args.out)


if __name__ == "__main__":
    main()
