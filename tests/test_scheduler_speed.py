"""workflow/lib/scheduler_speed.py: Snakemake's input-size survey is skipped
exactly when no selector reads it, and runs otherwise."""
from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("scheduler_speed", ROOT / "workflow" / "lib" / "scheduler_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _FakeJobScheduler:
    def __init__(self, selector):
        self._scheduler = selector
        self.surveyed = []

    async def update_input_sizes(self, jobs):
        self.surveyed.append(list(jobs))


def _greedy(omit: bool):
    from snakemake.scheduling.greedy import Scheduler, SchedulerSettings

    selector = Scheduler.__new__(Scheduler)  # Snakemake's own class; only its settings matter here
    selector.settings = SchedulerSettings(omit_prioritize_by_temp_and_input=omit)
    return selector


def _ilp():
    from snakemake.scheduling.milp import Scheduler

    return Scheduler.__new__(Scheduler)


@pytest.mark.parametrize(
    ("make_selector", "skipped"),
    [(lambda: _greedy(True), True), (lambda: _greedy(False), False), (_ilp, False)],
    ids=["greedy-by-priority", "greedy-with-size-tiebreak", "ilp"],
)
def test_survey_skipped_only_when_unread(make_selector, skipped):
    speed = _load()
    cls = type("JobScheduler", (_FakeJobScheduler,), {})
    assert speed.install(cls) is True
    assert speed.install(cls) is True  # idempotent: wrapped once
    scheduler = cls(make_selector())
    asyncio.run(scheduler.update_input_sizes(["job"]))
    assert scheduler.surveyed == ([] if skipped else [["job"]])
    assert speed.sizes_unread(scheduler) is skipped


def test_installs_on_snakemakes_job_scheduler():
    """The wrapper finds its target on the installed Snakemake (not dead code)."""
    from snakemake.scheduling.job_scheduler import JobScheduler

    speed = _load()
    original = JobScheduler.update_input_sizes
    try:
        assert speed.install() is True
        assert getattr(JobScheduler.update_input_sizes, speed.MARK) is True
        assert JobScheduler.update_input_sizes.__wrapped__ is original
    finally:
        JobScheduler.update_input_sizes = original


def test_without_the_method_nothing_changes():
    speed = _load()
    cls = type("Other", (), {})
    assert speed.install(cls) is False
    assert not hasattr(cls, "update_input_sizes")


def test_workflow_profile_selects_what_the_skip_needs():
    profile = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    assert profile["scheduler"] == "greedy"
    assert profile["scheduler-greedy-omit-prioritize-by-temp-and-input"] is True
