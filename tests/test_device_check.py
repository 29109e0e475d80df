"""No silent CPU fallback (issue 25): a job that asked for a GPU fails at once
where CUDA is not usable, naming the node, the visible devices, and the torch
and driver versions; the workflow passes cuda/cpu from each job's GPU request."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from tokenreduction.train.runtime import CudaUnavailableError, Runtime, resolve_device
from workflow_utils import REPO, planned_commands, snakemake

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the error path needs a machine without CUDA")


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_request_without_cuda_fails_naming_node_devices_and_versions(device, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(CudaUnavailableError) as err:
        resolve_device(device)
    message = str(err.value)
    assert f"node {socket.gethostname()}" in message
    assert "CUDA_VISIBLE_DEVICES=3" in message
    assert f"torch {torch.__version__}" in message
    assert f"CUDA {torch.version.cuda or 'none'}" in message
    assert "NVIDIA driver" in message
    with pytest.raises(CudaUnavailableError):
        Runtime(device)


@needs_no_cuda
def test_empty_visible_devices_is_named_as_the_reason(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(CudaUnavailableError, match="CUDA_VISIBLE_DEVICES is empty"):
        resolve_device("cuda")


def test_cpu_and_auto(capsys):
    assert resolve_device("cpu") == torch.device("cpu")
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert f"device: auto -> {dev.type}" in capsys.readouterr().err  # auto is never silent
    with pytest.raises(ValueError, match="expected cpu, cuda"):
        resolve_device("tpu")


@needs_no_cuda
def test_train_script_with_cuda_fails_before_touching_data(tmp_path):
    """train.py --device cuda on a CPU node: the CUDA error, before the data
    (whose root does not exist) is even looked at, and no traceback."""
    spec = {"model": "vit_tiny_patch16_224", "model_kwargs": {"depth": 2}, "dataset": "imagenet",
            "data_root": str(tmp_path / "missing"), "img_size": 32, "epochs": 1, "seed": 0}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--spec", json.dumps(spec),
         "--final", str(tmp_path / "run" / "final.pth"), "--device", "cuda"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "CUDA is not usable" in proc.stderr and socket.gethostname() in proc.stderr, proc.stderr[-2000:]
    assert "missing" not in proc.stderr.split("CUDA is not usable")[0]
    assert not (tmp_path / "run").exists() and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_workflow_passes_the_device_from_each_jobs_gpu_request(tmp_path):
    out = snakemake(["-n", "-p"], tmp_path).stdout  # the demo: no GPUs
    train = [cmd for rule, cmd in planned_commands(out) if rule in ("finetune", "pretrain")]
    assert train and all("--device cpu" in cmd and '"device": "auto"' not in cmd for cmd in train)
    out = snakemake(["-n", "-p", "--set-resources", "finetune:gpu=1"], tmp_path).stdout
    commands = planned_commands(out)
    assert all("--device cuda" in cmd and '"device": "cuda"' in cmd for rule, cmd in commands if rule == "finetune")
    assert all("--device cpu" in cmd for rule, cmd in commands if rule == "pretrain")
