"""Code fingerprints for Snakemake's rerun triggers.

Snakemake sees a rule's params and its shell command, not the library code a
job imports. Each job therefore gets a parameter that is a hash of exactly the
source files it runs: the method's module (found by its ``@register`` line)
and the sibling modules it imports, plus the shared code of its stage. Editing
``reduction/tome.py`` changes the ToMe jobs' fingerprint and nothing else.

This module must import nothing heavy (the Snakefile loads it at DAG build).
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional

PACKAGE = Path(__file__).resolve().parent
REDUCTION = PACKAGE / "reduction"
_REGISTER = re.compile(r"""@register\(\s*["']([\w\-]+)["']\s*\)""")
_SIBLING = re.compile(r"^from \.(\w+) import", re.MULTILINE)

#: library code shared by every job of a stage (relative to the package)
STAGE_CODE = {
    "model": ["models/*.py", "reduction/__init__.py", "reduction/base.py", "reduction/registry.py",
              "reduction/ops.py", "patterns.py"],
    "data": ["data/*.py"],
    "train": ["train/*.py", "metrics.py", "tracking.py"],
    "evaluate": ["evaluate/*.py", "metrics.py", "tracking.py"],
    "analysis": ["analysis/*.py"],
    "ots": ["ots/*.py"],
    "benchmark": ["benchmark/*.py"],
    "diffusion": ["diffusion/*.py"],
    "detection": ["detection/*.py"],
    "clca": ["clca/*.py"],
}


@lru_cache(maxsize=None)
def method_files(method: str) -> tuple[Path, ...]:
    """The reduction module registering `method` and the reduction modules it
    imports (transitively); () for the unreduced baseline."""
    if method in (None, "", "none", "deit", "baseline"):
        return ()
    owner: Optional[Path] = None
    for path in sorted(REDUCTION.glob("*.py")):
        if method in _REGISTER.findall(path.read_text()):
            owner = path
            break
    if owner is None:
        known = sorted(n for p in REDUCTION.glob("*.py") for n in _REGISTER.findall(p.read_text()))
        raise ValueError(f"unknown reduction method {method!r}; known methods: {', '.join(known)}")
    seen: list[Path] = []
    todo = [owner]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        for name in _SIBLING.findall(path.read_text()):
            sibling = REDUCTION / f"{name}.py"
            if sibling.exists():
                todo.append(sibling)
    return tuple(sorted(seen))


def known_methods() -> list[str]:
    """Registered method names, read from the sources (no imports)."""
    return sorted(n for p in REDUCTION.glob("*.py") for n in _REGISTER.findall(p.read_text()))


def _stage_files(stages: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for stage in stages:
        for pattern in STAGE_CODE[stage]:
            files.extend(sorted(PACKAGE.glob(pattern)))
    return files


def code_hash(stages: Iterable[str] = (), method: Optional[str] = None, extra: Iterable[str | Path] = ()) -> str:
    """A short hash of the files a job runs: the stages' shared code, the
    method's modules and any `extra` files (e.g. the entry-point script)."""
    files = _stage_files(stages) + list(method_files(method)) + [Path(p) for p in extra]
    digest = hashlib.sha256()
    for path in sorted(set(files)):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
