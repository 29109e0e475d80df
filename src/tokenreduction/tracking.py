"""What long jobs report while they run: progress lines in their log and the
Weights & Biases run they belong to. Shared by the trainer and the evaluator
(both import it; it imports neither).

Progress: under Snakemake stderr is not a TTY, so a progress bar never shows;
:class:`ProgressLog` prints plain lines (step, images done, images/s, ETA) to
stdout at most every ``every_steps`` steps or ``every_seconds`` seconds, so
``tail -f`` on a job's log tells how far it is.

W&B: :func:`wandb_settings` names a run after its run path (the output folder
relative to the working directory, e.g.
``results/finetune/coco/small/evit/kr0.7/seed0``), derives a stable id from that
path (a requeued or resumed job continues the same run with
``resume="allow"``), groups runs by dataset and backbone, and sets the job type
and tags (method, keep rate or r, budget).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, TextIO, Union

#: the DAG's output folders of training-like stages (results/<stage>/...)
STAGE_FOLDERS = ("pretrain", "finetune", "mae", "ots")


def format_duration(seconds: float) -> str:
    """3725.2 -> '1:02:05'."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


class ProgressLog:
    """Plain progress lines for logs.

    ``update(step, images)`` is called after each step with the steps and
    images done so far (counting from this process's start, or from
    ``start_step`` when resumed); a line is printed when ``every_steps`` steps
    passed since the last line or ``every_seconds`` elapsed, and on the last
    step. A line reads ``<label> step 12/60 (20%), images 768, 53.1 img/s,
    ETA 0:00:57`` plus any ``extra`` text."""

    def __init__(
        self,
        label: str,
        total_steps: Optional[int],
        every_steps: int = 50,
        every_seconds: float = 60.0,
        start_step: int = 0,
        stream: Optional[TextIO] = None,
        clock=time.monotonic,
    ) -> None:
        if every_steps < 1 or every_seconds <= 0:
            raise ValueError("every_steps must be >= 1 and every_seconds > 0")
        self.label = label
        self.total_steps = total_steps
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.start_step = start_step
        self.stream = stream
        self.clock = clock
        self.t0 = clock()
        self._last_t = self.t0
        self._last_step = start_step
        self.lines = 0

    def line(self, step: int, images: int, extra: str = "") -> str:
        """The text of a progress line at `step` with `images` done in this process."""
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = images / elapsed
        parts = [f"{self.label} step {step}"]
        if self.total_steps:
            parts[0] += f"/{self.total_steps} ({100.0 * step / self.total_steps:.0f}%)"
        parts.append(f"images {images}")
        parts.append(f"{rate:.1f} img/s")
        done_here = step - self.start_step
        if self.total_steps and done_here > 0:
            eta = elapsed / done_here * max(self.total_steps - step, 0)
            parts.append(f"ETA {format_duration(eta)}")
        text = ", ".join(parts)
        return f"{text}, {extra}" if extra else text

    def update(self, step: int, images: int, extra: str = "") -> bool:
        """Print a line when due; True when one was printed."""
        now = self.clock()
        last = self.total_steps is not None and step >= self.total_steps
        due = step - self._last_step >= self.every_steps or now - self._last_t >= self.every_seconds
        if not (due or last) or step == self._last_step:
            return False
        print(self.line(step, images, extra), file=self.stream, flush=True)
        self._last_t, self._last_step = now, step
        self.lines += 1
        return True


# ----------------------------------------------------------------- W&B
def run_path(out_dir: Union[str, Path]) -> str:
    """The run's name: `out_dir` relative to the working directory (POSIX
    separators), or its absolute path when it lies elsewhere."""
    p = Path(out_dir).resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def run_id(path: str) -> str:
    """A stable W&B run id (16 hex digits) derived from a run path."""
    return hashlib.sha1(path.encode()).hexdigest()[:16]


def _budget_tags(cfg: Mapping[str, Any]) -> list[str]:
    tags = []
    if cfg.get("r") is not None:
        tags.append(f"r{cfg['r']}")
    elif cfg.get("keep_rate") is not None:
        tags.append(f"kr{cfg['keep_rate']}")
    if cfg.get("budget"):
        tags.append(f"budget:{cfg['budget']}")
    return tags


def wandb_settings(out_dir: Union[str, Path], cfg: Mapping[str, Any], job_type: Optional[str] = None) -> dict[str, Any]:
    """Keyword arguments of ``wandb.init`` for the run written to `out_dir`
    under the training config `cfg` (a TrainConfig as a dict).

    name: the run path; id: :func:`run_id` of it; group: ``<dataset>/<backbone>``
    (from the DAG's ``<stage>/<dataset>/<backbone>/...`` layout when the path
    has it, else the config's dataset kind and timm model); job_type: the
    stage folder (pretrain, finetune, mae) unless given; tags: method (or
    "none"), keep rate or r, budget, tuning when not full."""
    name = run_path(out_dir)
    parts = Path(name).parts
    stage = next((p for p in reversed(parts) if p in STAGE_FOLDERS), None)
    if stage is not None:
        after = parts[len(parts) - 1 - list(reversed(parts)).index(stage) + 1 :]
    else:
        after = ()
    if stage in ("finetune", "mae") and len(after) >= 2:
        group = f"{after[0]}/{after[1]}"
    elif stage == "pretrain" and after:  # results/pretrain/<backbone>
        group = f"{cfg.get('dataset')}/{after[0]}"
    else:
        group = f"{cfg.get('dataset')}/{cfg.get('model')}"
    tags = [str(cfg.get("method") or "none")] + _budget_tags(cfg)
    if cfg.get("tuning") not in (None, "full"):
        tags.append(f"tuning:{cfg['tuning']}")
    return {
        "project": cfg.get("wandb_project"),
        "name": name,
        "id": run_id(name),
        "group": group,
        "job_type": job_type or stage or "finetune",
        "tags": tags,
        "resume": "allow",
    }


def wandb_available() -> bool:
    return importlib.util.find_spec("wandb") is not None


def start_wandb(settings: Mapping[str, Any], config: Optional[Mapping[str, Any]] = None, dir: Optional[Union[str, Path]] = None):
    """``wandb.init(**settings)`` (offline unless WANDB_MODE says otherwise),
    or None when no project is set or wandb is not installed."""
    if not settings.get("project") or not wandb_available():
        return None
    import wandb

    kwargs = dict(settings)
    if dir is not None:
        Path(dir).mkdir(parents=True, exist_ok=True)
        kwargs["dir"] = str(dir)
    return wandb.init(config=dict(config) if config else None, mode=os.environ.get("WANDB_MODE", "offline"), **kwargs)
