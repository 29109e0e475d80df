"""How envs/install_mmdet.sh builds mmcv's compiled ops on this machine.

    python envs/mmcv_build.py plan MMCV_VERSION      shell assignments: FORCE_CUDA,
                                                      TORCH_CUDA_ARCH_LIST, MMCV_CACHE_KEY, MMCV_BUILD
    python envs/mmcv_build.py check ENV_JSON          refuse a CPU-only build where CUDA is required

Run with the detection environment's own Python, once torch is installed in
it: the build (CUDA or CPU) follows what that torch and this machine have.

- CUDA build (FORCE_CUDA=1) when torch was built for CUDA and nvcc is found
  ($CUDA_HOME/bin/nvcc, else on PATH); the architectures are
  $TORCH_CUDA_ARCH_LIST when set, else the visible GPUs' compute
  capabilities, else the architectures torch itself was built for.
- CPU build (FORCE_CUDA=0) otherwise: mmcv then lacks its CUDA ops
  (MultiScaleDeformableAttention, RoIAlign, NMS on the GPU).
- The cached wheel's key names mmcv, torch, the Python tag, the machine and
  the CUDA version (``cpu`` for a CPU build), so a CUDA rebuild never reuses
  a CPU wheel.
- ``check``: with TOKENREDUCTION_DETECTION_REQUIRE_CUDA=1 (the workflow sets
  it when the detection jobs ask for GPUs) a CPU-only mmcv fails the build
  with one message.

Standard library only at import; torch is imported by the commands.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence


class BuildError(RuntimeError):
    """The detection environment cannot be built or used as asked."""


@dataclass(frozen=True)
class Machine:
    """What decides the build: torch's CUDA version (None: CPU-only torch),
    nvcc's path and version, the visible GPUs' capabilities, and the
    architectures torch was built for (e.g. ['sm_80', 'sm_90'])."""

    torch_version: str
    torch_cuda: Optional[str]
    nvcc: Optional[str]
    nvcc_version: Optional[str]
    capabilities: Sequence[tuple[int, int]]
    torch_archs: Sequence[str]
    python_tag: str
    machine: str


def find_nvcc(env: Mapping[str, str]) -> Optional[str]:
    """nvcc of $CUDA_HOME (or $CUDA_PATH), else the first on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc", path=env.get("PATH"))


def nvcc_version(nvcc: str) -> Optional[str]:
    """'12.4' from `nvcc --version` ('release 12.4, V12.4.131')."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def probe(env: Mapping[str, str]) -> Machine:
    """This machine, as the running Python's torch sees it."""
    import torch

    nvcc = find_nvcc(env)
    caps: list[tuple[int, int]] = []
    if torch.version.cuda and torch.cuda.is_available():
        caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    archs = list(torch.cuda.get_arch_list()) if torch.version.cuda else []
    return Machine(
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        nvcc=nvcc,
        nvcc_version=nvcc_version(nvcc) if nvcc else None,
        capabilities=caps,
        torch_archs=archs,
        python_tag=f"cp{sys.version_info[0]}{sys.version_info[1]}",
        machine=platform.machine(),
    )


def arch_list(machine: Machine, env: Mapping[str, str]) -> str:
    """TORCH_CUDA_ARCH_LIST: the environment's, else the visible GPUs', else torch's own."""
    if env.get("TORCH_CUDA_ARCH_LIST"):
        return env["TORCH_CUDA_ARCH_LIST"]
    if machine.capabilities:
        return ";".join(sorted({f"{major}.{minor}" for major, minor in machine.capabilities}))
    found = sorted({f"{a[3:-1]}.{a[-1]}" for a in machine.torch_archs if re.fullmatch(r"sm_\d{2,3}", a)},
                   key=lambda v: tuple(int(x) for x in v.split(".")))
    if not found:
        raise BuildError(
            "CUDA build of mmcv: no GPU visible and torch names no architectures; "
            "set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0')"
        )
    return ";".join(found)


def plan(mmcv: str, machine: Machine, env: Mapping[str, str]) -> dict[str, str]:
    """The build's environment and the wheel cache key."""
    cuda = bool(machine.torch_cuda) and machine.nvcc is not None
    if cuda and machine.nvcc_version and machine.torch_cuda:
        if machine.nvcc_version.split(".")[0] != machine.torch_cuda.split(".")[0]:
            raise BuildError(
                f"nvcc {machine.nvcc} is CUDA {machine.nvcc_version} but torch {machine.torch_version} "
                f"was built for CUDA {machine.torch_cuda}: point CUDA_HOME at a CUDA {machine.torch_cuda.split('.')[0]}.x toolkit"
            )
    flavour = f"cu{(machine.nvcc_version or machine.torch_cuda).replace('.', '')}" if cuda else "cpu"
    out = {
        "FORCE_CUDA": "1" if cuda else "0",
        "MMCV_BUILD": flavour,
        "MMCV_CACHE_KEY": f"mmcv-{mmcv}-torch-{machine.torch_version}-{machine.python_tag}-{machine.machine}-{flavour}",
    }
    if cuda:
        out["TORCH_CUDA_ARCH_LIST"] = arch_list(machine, env)
        out["CUDA_HOME"] = str(Path(machine.nvcc).parent.parent)
    return out


def check(env_json: Mapping, env: Mapping[str, str]) -> None:
    """Refuse a CPU-only mmcv where the detection jobs need CUDA."""
    if env.get("TOKENREDUCTION_DETECTION_REQUIRE_CUDA") != "1":
        return
    build = env_json.get("mmcv_build")
    if build is None or build == "cpu":
        raise BuildError(
            f"the detection jobs ask for GPUs but mmcv was built without CUDA (build: {build or 'unknown'}): "
            "its CUDA ops (MultiScaleDeformableAttention, RoIAlign, NMS) are missing. Build the detection "
            "environment where torch sees CUDA and nvcc is found (CUDA_HOME), e.g. under the slurm profile "
            "the detection_env job on a GPU node; delete the environment folder to rebuild it"
        )


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(args) == 2 and args[0] == "plan":
            for name, value in plan(args[1], probe(os.environ), os.environ).items():
                print(f"{name}={shlex.quote(value)}")
            return 0
        if len(args) == 2 and args[0] == "check":
            check(json.loads(Path(args[1]).read_text()), os.environ)
            return 0
    except BuildError as err:
        print(f"envs/mmcv_build.py: {err}", file=sys.stderr)
        return 1
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
