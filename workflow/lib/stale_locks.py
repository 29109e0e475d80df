"""Locks left behind by a Snakemake process that was killed outright.

Snakemake locks the working directory (``.snakemake/locks/``) while it runs
and removes the locks when it exits; a process killed with SIGKILL (or a lost
session, a power loss) leaves them, and the same command then refuses to run
("Directory cannot be locked ... --unlock"). This module makes that rerun
work without guessing: every main Snakemake process of this workflow records
itself (host, pid, process start time) in ``.snakemake/tokenreduction-runs/``
before it can take any lock, and removes its record when it exits. At the
next start the locks are released only when records exist and every one of
them is a process on this host that no longer exists (a pid reused by
another process does not count as alive: its start time differs). Locks of a
run on another host, of a live run, or of unknown origin are left alone and
Snakemake's own message applies.

Plain Python plus psutil (a dependency of Snakemake); no torch.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Optional

import psutil

RUNS_DIR = "tokenreduction-runs"


def _record_of_this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def is_dead(record: dict, host: Optional[str] = None) -> bool:
    """True when ``record`` is a process of this host (``host``) that is gone:
    its pid does not exist, or now belongs to a process started at another time."""
    host = host or socket.gethostname()
    if record.get("host") != host:
        return False
    try:
        pid, started = int(record["pid"]), float(record["started"])
    except (KeyError, TypeError, ValueError):
        return False  # not ours to judge
    try:
        return abs(psutil.Process(pid).create_time() - started) > 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # access denied: it exists
        return False


def release_stale_locks(meta: Path = Path(".snakemake"), host: Optional[str] = None) -> list[Path]:
    """Remove the lock files under ``meta``/locks when every recorded run is
    dead on this host (see the module docstring), then the records of the
    dead runs (kept while locks remain). Returns the lock files removed."""
    runs = meta / RUNS_DIR
    records = []
    for path in sorted(runs.glob("*.json")) if runs.is_dir() else []:
        try:
            records.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            records.append((path, {}))  # unreadable: unknown, so never dead
    dead = [path for path, record in records if is_dead(record, host)]
    locks = sorted((meta / "locks").glob("*.lock")) if (meta / "locks").is_dir() else []
    removed = []
    if locks and records and len(dead) == len(records):
        for lock in locks:
            try:
                lock.unlink()
                removed.append(lock)
            except FileNotFoundError:
                pass
    if locks and not removed:
        return removed  # keep the records that may release these locks later
    for path in dead:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    return removed


def register_run(meta: Path = Path(".snakemake")) -> Path:
    """Record this process as a run of the workflow (written atomically) and
    remove the record when the interpreter exits normally. Returns its path."""
    record = _record_of_this_process()
    runs = meta / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{record['host']}-{record['pid']}.json"
    fd, tmp = tempfile.mkstemp(dir=runs, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)

    def _unregister(path=path):
        try:
            path.unlink()
        except OSError:
            pass

    atexit.register(_unregister)
    return path
