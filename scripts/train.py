"""Train (pretrain or fine-tune) one model from a JSON spec of TrainConfig fields."""
import argparse
import json
from pathlib import Path

from tokenreduction.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="TrainConfig fields as a JSON object")
    parser.add_argument("--final", required=True, help="path of final.pth; its folder receives every output")
    args = parser.parse_args()
    # a job rerun because its parameters changed starts afresh; a retried or
    # requeued job with the same parameters resumes from checkpoint_last.pth
    train(TrainConfig.from_dict(json.loads(args.spec)), Path(args.final).parent, on_config_change="restart")


if __name__ == "__main__":
    main()
