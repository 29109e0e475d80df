"""How the detection environment builds mmcv (envs/mmcv_build.py, issue 25
item 4): CUDA ops where this machine's torch and nvcc allow, the wheel cache
keyed by mmcv, torch, Python, machine and CUDA version, and a GPU detection
config refusing a CPU-only build. Tested on CPU: the decisions, the cache key,
the generated build environment, and the error path."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from workflow_utils import REPO

SCRIPT = REPO / "envs" / "mmcv_build.py"


def _load():
    spec = importlib.util.spec_from_file_location("mmcv_build_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mb = _load()


def machine(**kw):
    base = dict(torch_version="2.13.0+cu124", torch_cuda="12.4", nvcc="/opt/cuda/bin/nvcc", nvcc_version="12.4",
                capabilities=[(8, 0), (8, 0)], torch_archs=["sm_50", "sm_80", "sm_90"], python_tag="cp311",
                machine="x86_64")
    base.update(kw)
    return mb.Machine(**base)


def test_cuda_build_takes_the_visible_gpus_architectures():
    got = mb.plan("2.1.0", machine(), {})
    assert got["FORCE_CUDA"] == "1" and got["TORCH_CUDA_ARCH_LIST"] == "8.0" and got["CUDA_HOME"] == "/opt/cuda"
    assert got["MMCV_CACHE_KEY"] == "mmcv-2.1.0-torch-2.13.0+cu124-cp311-x86_64-cu124"


def test_without_a_visible_gpu_the_architectures_are_torchs_own_and_the_env_wins():
    assert mb.plan("2.1.0", machine(capabilities=[]), {})["TORCH_CUDA_ARCH_LIST"] == "5.0;8.0;9.0"
    assert mb.plan("2.1.0", machine(), {"TORCH_CUDA_ARCH_LIST": "9.0a"})["TORCH_CUDA_ARCH_LIST"] == "9.0a"
    with pytest.raises(mb.BuildError, match="TORCH_CUDA_ARCH_LIST"):
        mb.plan("2.1.0", machine(capabilities=[], torch_archs=[]), {})


def test_cpu_build_where_torch_or_nvcc_lacks_cuda_and_its_key_says_cpu():
    for m in (machine(torch_cuda=None, torch_version="2.13.0+cpu"), machine(nvcc=None, nvcc_version=None)):
        got = mb.plan("2.1.0", m, {})
        assert got["FORCE_CUDA"] == "0" and "TORCH_CUDA_ARCH_LIST" not in got
        assert got["MMCV_CACHE_KEY"].endswith("-cpu") and got["MMCV_BUILD"] == "cpu"
    # a CPU and a CUDA build never share a cached wheel
    assert mb.plan("2.1.0", machine(), {})["MMCV_CACHE_KEY"] != mb.plan("2.1.0", machine(nvcc=None), {})["MMCV_CACHE_KEY"]


def test_nvcc_of_another_cuda_major_is_refused():
    with pytest.raises(mb.BuildError, match="CUDA 11.8 but torch .* CUDA 12.4"):
        mb.plan("2.1.0", machine(nvcc_version="11.8"), {})


def test_gpu_detection_refuses_a_cpu_only_build():
    mb.check({"mmcv_build": "cpu"}, {})  # not required: the demo's CPU detection
    mb.check({"mmcv_build": "cu124"}, {"TOKENREDUCTION_DETECTION_REQUIRE_CUDA": "1"})
    for build in ({"mmcv_build": "cpu"}, {}):
        with pytest.raises(mb.BuildError, match="ask for GPUs but mmcv was built without CUDA"):
            mb.check(build, {"TOKENREDUCTION_DETECTION_REQUIRE_CUDA": "1"})


def _plan_in_shell(env):
    """`eval "$(python envs/mmcv_build.py plan 2.1.0)"` as install_mmdet.sh runs it."""
    cmd = f'eval "$({sys.executable} {SCRIPT} plan 2.1.0)"; echo "$FORCE_CUDA|$MMCV_CACHE_KEY|${{TORCH_CUDA_ARCH_LIST:-}}"'
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split("|")


def test_generated_build_environment_on_this_machine(tmp_path):
    import torch

    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST")}
    env["PATH"] = f"{tmp_path}:/usr/bin:/bin"  # no nvcc
    force, key, archs = _plan_in_shell(env)
    assert force == "0" and key.endswith("-cpu") and torch.__version__ in key and archs == ""
    if torch.version.cuda is None:
        return
    # an nvcc of torch's CUDA: a CUDA build with torch's architectures
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {torch.version.cuda}, V{torch.version.cuda}.1'\n")
    nvcc.chmod(0o755)
    env["CUDA_HOME"] = str(tmp_path / "cuda")
    force, key, archs = _plan_in_shell(env)
    assert force == "1" and key.endswith("-cu" + torch.version.cuda.replace(".", "")) and archs


def test_install_script_takes_its_flags_from_the_plan():
    text = (REPO / "envs" / "install_mmdet.sh").read_text()
    assert "FORCE_CUDA=0" not in text and "FORCE_CUDA=$FORCE_CUDA" in text
    assert 'envs/mmcv_build.py plan "$MMCV"' in text and "envs/mmcv_build.py check" in text
    proc = subprocess.run([sys.executable, str(SCRIPT), "check", "/nonexistent.json"], capture_output=True, text=True)
    assert proc.returncode != 0


def test_check_command_fails_with_one_message(tmp_path):
    stamp = tmp_path / "env.json"
    stamp.write_text(json.dumps({"mmcv": "2.1.0", "mmcv_build": "cpu"}))
    env = {**os.environ, "TOKENREDUCTION_DETECTION_REQUIRE_CUDA": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "check", str(stamp)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "built without CUDA" in proc.stderr and "Traceback" not in proc.stderr
    env["TOKENREDUCTION_DETECTION_REQUIRE_CUDA"] = "0"
    assert subprocess.run([sys.executable, str(SCRIPT), "check", str(stamp)], env=env).returncode == 0
