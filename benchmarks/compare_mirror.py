"""analysis_compare's models axis: every ordered pair compared on its own vs
each unordered pair compared once and mirrored (compare_patterns_both,
compare_features_both), side by side in one run, on the CLCA study's grid for
one dataset (fabricated evaluation files, tests/full_width.py: 19 methods x 5
keep rates x 2 backbones + baselines, 448 px, 80 images).

    .venv/bin/python benchmarks/compare_mirror.py [--pairs 600] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import full_width as fw  # noqa: E402
import pandas as pd  # noqa: E402

from tokenreduction.analysis import compare, stage  # noqa: E402


def fabricate(root: Path) -> pd.DataFrame:
    config = yaml.safe_load((REPO / "config" / "clca.yaml").read_text())
    exp = config["experiments"][0]
    rows, written = [], {}
    for backbone in exp["backbones"]:
        for method, rate in [("deit", "1")] + [(m, str(r)) for m in exp["methods"] for r in exp["keep_rates"]]:
            run = f"d/{backbone}/{method}/kr{float(rate):g}/seed1"
            job = {"wildcards": {"dataset": "soyageing", "backbone": backbone, "method": method, "keep_rate": rate,
                                 "seed": "1"},
                   "outputs": [f"eval/{run}/{n}" for n in ("metrics.json", "patterns.npz", "cls_features.npz")]}
            for p in job["outputs"]:
                (root / p).parent.mkdir(parents=True, exist_ok=True)
            fw.write_evaluation(config, job, root, written)
            rows.append({"dataset": "d", "backbone": backbone, "capacity": config["backbones"][backbone]["capacity"],
                         "method": method, "keep_rate": float(rate), "seed": 1, "metric": 70.0})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=600, help="ordered pairs timed (both orders of pairs/2)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="compare_mirror_"))
    runs = stage.runs_table(fabricate(root), "d")
    todo = compare.pairs(runs, "models", match=("seed",)).to_dict("records")
    cache: dict = {}

    def get(run, name):
        if (run, name) not in cache:
            cache[(run, name)] = stage._load(root / "eval", run, name)
        return cache[(run, name)]

    seen, unordered = set(), []
    for r in todo:
        if (r["run_b"], r["run_a"]) not in seen:
            seen.add((r["run_a"], r["run_b"]))
            unordered.append((r["run_a"], r["run_b"]))
    unordered = unordered[: args.pairs // 2]
    for a, b in unordered:  # load every file before timing
        get(a, "patterns.npz"), get(a, "cls_features.npz"), get(b, "patterns.npz"), get(b, "cls_features.npz")
    warnings.simplefilter("ignore")
    for rep in range(2):
        t = time.perf_counter()
        for pair in unordered:
            for a, b in (pair, pair[::-1]):
                compare.compare_patterns(get(a, "patterns.npz"), get(b, "patterns.npz"), names=(a, b), hc_true="a")
                compare.compare_features(get(a, "cls_features.npz"), get(b, "cls_features.npz"), names=(a, b))
        each = time.perf_counter() - t
        t = time.perf_counter()
        for a, b in unordered:
            compare.compare_patterns_both(get(a, "patterns.npz"), get(b, "patterns.npz"), names=(a, b), hc_true="a")
            compare.compare_features_both(get(a, "cls_features.npz"), get(b, "cls_features.npz"), names=(a, b))
        mirrored = time.perf_counter() - t
        print(f"round {rep + 1}: {2 * len(unordered)} ordered pairs: each order {each:.1f} s, "
              f"once and mirrored {mirrored:.1f} s, ratio {each / mirrored:.2f}")


if __name__ == "__main__":
    main()
