"""Detection stage (ViT-Adapter Mask R-CNN with token merging).

The backbone, configs and runner need the detection environment (mmcv,
mmengine, mmdet), which the main test environment does not have: those
checks run in a subprocess with the detection interpreter
(tests/detection_env_checks.py). Without that interpreter they are skipped,
unless CI is set: CI installs it (envs/install_mmdet.sh) and must run them.
The fabricated data set and the timm-free import are checked here directly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenreduction.detection.data import CATEGORIES, make_shapes_coco, polygon_area, shape_polygon

REPO = Path(__file__).resolve().parents[1]
MMDET_PYTHON = Path(os.environ.get("TOKENREDUCTION_MMDET_PYTHON", REPO / ".venv-mmdet" / "bin" / "python"))
CHECKS = REPO / "tests" / "detection_env_checks.py"


@pytest.fixture
def mmdet_python() -> Path:
    if not MMDET_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the detection environment ({MMDET_PYTHON}): run envs/install_mmdet.sh")
        pytest.skip(f"detection environment not installed ({MMDET_PYTHON}); run envs/install_mmdet.sh")
    return MMDET_PYTHON


def run_checks(python: Path, names: list[str], tmp_path: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [str(python), str(CHECKS), ",".join(names), str(tmp_path)],
        capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path,
    )
    return proc.stdout + "\n" + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def env_checks(tmp_path_factory) -> str:
    """Every check in one detection-environment process (importing mmdet
    dominates the time); each test below asserts its own checks' lines."""
    if not MMDET_PYTHON.exists():
        return ""
    names = ["no_timm", "feature_shapes", "unmerge_merge", "ratio_zero_matches", "bfloat16",
             "pretrained_and_layer_decay", "configs", "train_eval", "released_adapter_keys", "malicious_checkpoint",
             "known_ap"]
    return run_checks(MMDET_PYTHON, names, tmp_path_factory.mktemp("detection_checks"))


def assert_check(output: str, name: str) -> None:
    assert f"check {name}: ok" in output, f"check {name} did not pass:\n{output[-8000:]}"


def test_backbone_feature_maps_have_fpn_shapes_with_and_without_reduction(mmdet_python, env_checks):
    assert_check(env_checks, "feature_shapes")


def test_unmerge_and_merge_match_loops_and_detection_imports_no_timm(mmdet_python, env_checks):
    assert_check(env_checks, "unmerge_merge")
    assert_check(env_checks, "no_timm")


def test_ratio_zero_and_keep_all_match_the_unreduced_backbone(mmdet_python, env_checks):
    assert_check(env_checks, "ratio_zero_matches")
    assert_check(env_checks, "bfloat16")


def test_deit_checkpoint_loading_and_layer_decay(mmdet_python, env_checks):
    assert_check(env_checks, "pretrained_and_layer_decay")


def test_configs_load_and_name_only_registered_types(mmdet_python, env_checks):
    assert_check(env_checks, "configs")


def test_training_iterations_and_coco_evaluation_run_end_to_end(mmdet_python, env_checks):
    assert_check(env_checks, "train_eval")


def test_coco_ap_of_known_cases(mmdet_python, env_checks):
    assert_check(env_checks, "known_ap")


def test_released_vit_adapter_t_and_s_backbones_load_strictly(mmdet_python, env_checks):
    assert_check(env_checks, "released_adapter_keys")


def test_malicious_detection_checkpoint_is_refused_and_runs_nothing(mmdet_python, env_checks):
    assert_check(env_checks, "malicious_checkpoint")


def test_detection_package_imports_without_timm():
    code = (
        "import sys; sys.modules['timm'] = None; sys.modules['torchvision'] = None\n"
        "import tokenreduction, tokenreduction.detection, tokenreduction.reduction\n"
        "from tokenreduction.models import TokenBudget, ReductionContext\n"
        "assert tokenreduction.get_method('atc') and tokenreduction.r_schedule(2, 3) == [2, 2, 2]\n"
        "try:\n    tokenreduction.create_model\nexcept ImportError:\n    print('lazy ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lazy ok" in proc.stdout  # the timm builders load on first use only


def test_fabricated_coco_set(tmp_path):
    paths = make_shapes_coco(tmp_path, num_images=5, image_size=64, seed=3)
    again = make_shapes_coco(tmp_path / "again", num_images=5, image_size=64, seed=3)
    data = json.loads(Path(paths["train"]).read_text())
    assert data == json.loads(Path(again["train"]).read_text())  # deterministic
    assert [c["name"] for c in data["categories"]] == list(CATEGORIES)
    assert len(data["images"]) == 5 and all((tmp_path / "train" / im["file_name"]).exists() for im in data["images"])
    assert {a["image_id"] for a in data["annotations"]} == {1, 2, 3, 4, 5}
    for ann in data["annotations"]:
        poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
        x, y, w, h = ann["bbox"]
        assert poly[:, 0].min() == pytest.approx(x, abs=0.01) and poly[:, 0].max() == pytest.approx(x + w, abs=0.01)
        assert poly[:, 1].min() == pytest.approx(y, abs=0.01) and poly[:, 1].max() == pytest.approx(y + h, abs=0.01)
        assert 0 <= x and x + w <= 63 and 0 < ann["area"] <= w * h + 1e-6
    assert json.loads(Path(paths["val"]).read_text())["images"][0]["width"] == 64
    assert polygon_area(shape_polygon("rectangle", 10, 10, 2, 3, 0.7)) == pytest.approx(24.0)
    assert polygon_area(shape_polygon("triangle", 0, 0, 2, 3, 0.0)) == pytest.approx(12.0)
    with pytest.raises(ValueError, match="unknown shape"):
        shape_polygon("hexagon", 0, 0, 1, 1, 0)
