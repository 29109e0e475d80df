"""Where a training process runs: device, torchrun ranks, RNG states, signals."""
from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .sampling import SIGNALS


class CudaUnavailableError(RuntimeError):
    """A job asked for a CUDA device that this process cannot use."""


def driver_version() -> str:
    """The NVIDIA kernel driver's version, from /proc or nvidia-smi; 'none'
    where neither answers (no driver on this node)."""
    proc_file = Path("/proc/driver/nvidia/version")
    try:
        first = proc_file.read_text().splitlines()[0]
        for word in first.split():
            if word[:1].isdigit() and "." in word:
                return word
    except (OSError, IndexError):
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "none"


def cuda_environment() -> str:
    """Where this process runs, for a CUDA error: node, visible devices, torch
    and the CUDA it was built for, and the driver's version."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "unset" if visible is None else (repr(visible) if visible.strip() == "" else visible)
    return (
        f"node {socket.gethostname()}, CUDA_VISIBLE_DEVICES={shown}, torch {torch.__version__} "
        f"(built for CUDA {torch.version.cuda or 'none: a CPU-only build'}), NVIDIA driver {driver_version()}"
    )


def cuda_problem() -> Optional[str]:
    """Why CUDA cannot be used here, or None when it can: torch's own warning
    (e.g. a driver too old for this build) when it gives one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    if available and count > 0:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() == "":
        reason = "CUDA_VISIBLE_DEVICES is empty: no GPU is visible to this job"
    elif torch.version.cuda is None:
        reason = "this torch is a CPU-only build"
    else:
        reason = "torch.cuda.is_available() is False"
    details = "; ".join(str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip())
    return reason + (f" ({details})" if details else "")


def resolve_device(device: str, index: Optional[int] = None) -> torch.device:
    """The torch device of ``device``: 'cpu', 'cuda', 'cuda:N' or 'auto'.

    A CUDA device that is not usable raises :class:`CudaUnavailableError`
    at once, naming the node, the visible devices, and the torch and driver
    versions: a job that asked for a GPU never trains on the CPU. 'auto'
    takes CUDA when usable and says on stderr which device it took (the
    workflow never passes 'auto': it decides from each job's GPU request).
    ``index`` (a torchrun local rank) replaces the device's own index.
    """
    if device == "auto":
        problem = cuda_problem()
        chosen = "cpu" if problem else "cuda"
        print(f"device: auto -> {chosen}" + (f" ({problem}; {cuda_environment()})" if problem else ""),
              file=sys.stderr, flush=True)
        device = chosen
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device {device!r}: expected cpu, cuda, cuda:N or auto")
    problem = cuda_problem()
    if problem is None:
        wanted = dev.index if index is None else index
        count = torch.cuda.device_count()
        if (wanted or 0) >= count:
            problem = f"device index {wanted} asked for but only {count} CUDA device(s) are visible"
        dev = torch.device("cuda", wanted or 0)
    if problem is not None:
        raise CudaUnavailableError(
            f"device {device!r} asked for but CUDA is not usable: {problem}. Where: {cuda_environment()}"
        )
    return dev


class Runtime:
    """Device and ranks of this process (torchrun sets WORLD_SIZE, RANK,
    LOCAL_RANK); initialises the process group under torchrun."""

    def __init__(self, device: str = "auto") -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        self.device = resolve_device(device, self.local_rank if self.distributed else None)
        use_cuda = self.device.type == "cuda"
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        self.is_main = self.rank == 0
        if self.is_main:  # every job's log says where it ran
            print(f"device: {self.device} ({self.world_size} process(es))", file=sys.stderr, flush=True)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states, as tensors and plain Python values only (so the
    checkpoint loads with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` (numpy's state may also be the tuple numpy returns)."""
    random.setstate(state["python"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np_state = (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                    np_state["has_gauss"], np_state["cached_gaussian"])
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA, bf16 on CPU, or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


class SignalFlag:
    """Records SIGTERM/SIGUSR1 instead of dying; restores the old handlers."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "SignalFlag":
        for sig in SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
