"""benchmarks/gpu_checks.py (issue 25's GPU checks) on a machine without a GPU:
it refuses the CPU with the runtime module's message, its CPU rehearsal runs
the fine-tuning part end to end, and a failing method is a row, not a stop."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_checks.py"
#: the rehearsal's input: 64 px, so 4 x 4 = 16 patch tokens
IMG, PATCHES, KEEP = 64, 16, 0.7


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_checks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def geometric_kept(keep_rate: float, patches: int, stages: int) -> list[int]:
    """The which-tokens study's geometric budget: stage s keeps
    floor(keep_rate ** (s + 1) * P) patch tokens."""
    return [int(math.floor(keep_rate ** (s + 1) * patches + 1e-9)) for s in range(stages)]


def table_rows(stdout: str) -> dict[str, str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method "))
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or line.startswith("("):
            break
        rows[line.split()[0]] = line
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is not usable")
def test_refuses_without_cuda_quickly():
    out = run_script("--no-detection", timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    # tokenreduction.train.runtime's message: what was asked, why not, and where
    assert "device 'cuda' asked for but CUDA is not usable" in out.stderr, out.stderr
    assert "CUDA_VISIBLE_DEVICES=" in out.stderr and "NVIDIA driver" in out.stderr, out.stderr
    assert "== fine-tuning" not in out.stdout  # nothing ran on the CPU


def test_cpu_rehearsal_rows_losses_and_tokens(tmp_path):
    out_json = tmp_path / "checks.json"
    out = run_script("--cpu-rehearsal", "--methods", "tome,topk,kmedoids", "--img-size", str(IMG),
                     "--out", str(out_json))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("CPU REHEARSAL") == 2 and "NOT a GPU check" in out.stdout
    assert "gpu_smoke" not in out.stdout and "detection" not in out.stdout
    rows = table_rows(out.stdout)
    assert sorted(rows) == ["kmedoids", "tome", "topk"], out.stdout
    want = geometric_kept(KEEP, PATCHES, 3)
    assert want == [11, 7, 5]
    for name, line in rows.items():
        assert "FAILED" not in line, line
        assert f"{'/'.join(map(str, want))} ({'/'.join(map(str, want))})" in line, line
    report = json.loads(out_json.read_text())
    assert report["cpu_rehearsal"] is True and report["failures"] == []
    assert report["finetune"]["reduction_loc"] == [3, 6, 9] and report["finetune"]["budget"] == "geometric"
    for row in report["finetune"]["rows"]:
        assert math.isfinite(row["final_loss"]) and row["error"] is None
        assert row["tokens_kept"] == want and row["targets"] == want and row["stage_blocks"] == [3, 6, 9]
        assert row["ms_per_step"] > 0 and row["images_per_s"] > 0 and row["peak_mem_mib"] is None
    kmedoids = next(r for r in report["finetune"]["rows"] if r["name"] == "kmedoids")
    assert kmedoids["method_kwargs"] == {"cluster_iters": 3}  # the study's options (config/which-tokens.yaml)


def test_failing_method_is_reported_and_others_run():
    out = run_script("--cpu-rehearsal", "--methods", "nosuchmethod,tome", "--img-size", str(IMG))
    assert out.returncode == 1, out.stdout + out.stderr
    rows = table_rows(out.stdout)
    assert "FAILED" in rows["nosuchmethod"] and "unknown reduction method 'nosuchmethod'" in rows["nosuchmethod"]
    assert "FAILED" not in rows["tome"]
    failures = out.stdout.split("FAILURES:")[1]
    assert "method nosuchmethod: ValueError" in failures and "method tome" not in failures


def test_every_method_and_clca_listed():
    from tokenreduction.reduction import list_methods

    module = load_module()
    loc, entries = module.method_entries(None)
    names = [e["name"] for e in entries]
    assert loc == [3, 6, 9]
    assert set(list_methods()) <= set(names) and "topk+clca" in names and len(names) == len(list_methods()) + 1
    by_name = {e["name"]: e for e in entries}
    assert by_name["evit"]["method_kwargs"] == {"fuse_token": True}
    assert by_name["topk+clca"]["clca"] and by_name["topk+clca"]["method"] == "topk"


def test_detection_without_environment_is_a_failure(tmp_path):
    module = load_module()
    args = Namespace(mmdet_python=str(tmp_path / "none" / "bin" / "python"))
    with pytest.raises(RuntimeError, match="no detection environment"):
        module.run_detection(args)
    env = tmp_path / "venv"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    (env / "tokenreduction-env.json").write_text(json.dumps({"mmcv_build": "cpu"}))
    with pytest.raises(RuntimeError, match="CPU-only build"):
        module.run_detection(Namespace(mmdet_python=str(env / "bin" / "python")))
