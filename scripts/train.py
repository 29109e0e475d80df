"""Train (pretrain or fine-tune) one model from a JSON spec of TrainConfig
fields; with --then-evaluate, evaluate the saved model in the same process
(what scripts/evaluate.py does, without a second interpreter start)."""
import argparse
import inspect
import json
import os
from pathlib import Path

from tokenreduction.train import TrainConfig, train
from tokenreduction.train.runtime import CudaUnavailableError


def evaluate_kwargs(text: str) -> dict:
    """The JSON object of --then-evaluate: keyword arguments of
    tokenreduction.evaluate.evaluate other than the checkpoint."""
    from tokenreduction.evaluate import evaluate

    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--then-evaluate: not a JSON object: {e}")
    if not isinstance(kwargs, dict):
        raise SystemExit(f"--then-evaluate: expected a JSON object of evaluate() arguments, got {kwargs!r}")
    known = set(inspect.signature(evaluate).parameters) - {"checkpoint"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise SystemExit(f"--then-evaluate: unknown evaluate() argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("dataset", "data_root"):
        if key not in kwargs:
            raise SystemExit(f"--then-evaluate: {key!r} is required")
    return kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="TrainConfig as a JSON object of its flat keys (TrainConfig.keys())")
    parser.add_argument("--final", required=True, help="path of final.pth; its folder receives every output")
    parser.add_argument("--then-evaluate", default=None, metavar="JSON",
                        help="evaluate final.pth afterwards: tokenreduction.evaluate.evaluate keyword arguments "
                             "(dataset, data_root, out_metrics, out_patterns, out_features, ...) as a JSON object")
    parser.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:N, replacing the spec's device (the workflow passes cuda when the "
                             "job asked for GPUs, cpu when not); a CUDA device that is not usable fails at once")
    args = parser.parse_args()
    spec = json.loads(args.spec)
    if args.device is not None:
        spec["device"] = args.device
    # checked before training, so a bad argument costs no training time
    eval_kwargs = evaluate_kwargs(args.then_evaluate) if args.then_evaluate else None
    # a job rerun because its parameters changed starts afresh; a retried or
    # requeued job with the same parameters resumes from checkpoint_last.pth
    try:
        train(TrainConfig.from_dict(spec), Path(args.final).parent, on_config_change="restart")
    except CudaUnavailableError as err:  # one message, no traceback: the job asked for a GPU it cannot use
        raise SystemExit(str(err)) from None
    if eval_kwargs is not None and int(os.environ.get("RANK", "0")) == 0:  # torchrun: the first process only
        from tokenreduction.evaluate import evaluate

        metrics = evaluate(checkpoint=args.final, **eval_kwargs)
        print(f"{metrics['metric']} {metrics['value']:.2f} on {metrics['num_images']} images of {metrics['split']}",
              flush=True)


if __name__ == "__main__":
    main()
