"""Job manifests: the lists a job reads from a file instead of its command line.

A job that aggregates every run (the summary, the pattern grids, the
detection table) gets its list of runs and files through a JSON file that the
workflow's ``manifest`` rule writes (``workflow/rules/manifest.smk``), so that
no command line grows with the number of runs (Linux refuses a single
argument over 128 KiB). Plain Python: no torch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence, Union


class ManifestError(ValueError):
    """A manifest file that is missing, not JSON, or lacks a list it must hold."""


def load_manifest(path: Union[str, Path], lists: Sequence[str]) -> dict[str, Any]:
    """The JSON object in ``path``; each key of ``lists`` must hold a list, and
    all of them the same number of entries (entry i of each belongs to run i)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ManifestError(f"manifest {path}: cannot be read ({err.strerror})") from None
    except ValueError as err:
        raise ManifestError(f"manifest {path}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"manifest {path}: holds a {type(data).__name__}, not a JSON object")
    lengths = {}
    for key in lists:
        value = data.get(key)
        if not isinstance(value, list):
            raise ManifestError(f"manifest {path}: key {key!r} must hold a list")
        lengths[key] = len(value)
    if len(set(lengths.values())) > 1:
        raise ManifestError(f"manifest {path}: lists of different lengths {lengths}")
    return data
