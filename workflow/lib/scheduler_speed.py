"""Skip Snakemake's input-size survey when nothing reads it.

Before every scheduling round (one per finished job), Snakemake's
``JobScheduler.update_input_sizes`` stats every input file of every ready job,
so a study with hundreds of ready fine-tunes pays O(ready jobs x inputs) file
system calls per finished job: at study width this is quadratic, and it was
the Snakemake process's largest cost in the ATC rehearsal (py-spy: ~70% of
its main thread, ~2 s of CPU per job, one core busy with it). The sizes feed
exactly two readers:

* the ILP selector (``--scheduler ilp``), for the sizes of temp() inputs;
* the greedy selector's job reward, a tie-break after the job's priority,
  unless ``--scheduler-greedy-omit-prioritize-by-temp-and-input`` is set.

The workflow profile (profiles/default/config.yaml) selects the greedy
selector with that option, so the sizes are computed and never read. ``install``
wraps the method so that it returns at once in exactly that case and runs
Snakemake's own code otherwise (ILP, or greedy with the size tie-break): the
jobs selected are the same either way. Nothing is changed when Snakemake's
scheduler no longer has the method (a later version).
"""
from __future__ import annotations

import functools
import inspect

MARK = "_tokenreduction_skips_unread_sizes"


def sizes_unread(job_scheduler) -> bool:
    """True when ``job_scheduler``'s selectors never read the input sizes: its
    selector is Snakemake's greedy one, with the size tie-break switched off."""
    selector = getattr(job_scheduler, "_scheduler", None)
    settings = getattr(selector, "settings", None)
    return (
        type(selector).__module__ == "snakemake.scheduling.greedy"
        and getattr(settings, "omit_prioritize_by_temp_and_input", False) is True
    )


def install(job_scheduler_class=None) -> bool:
    """Wrap ``JobScheduler.update_input_sizes`` (idempotent). Returns whether the
    wrapper is in place."""
    if job_scheduler_class is None:
        try:
            from snakemake.scheduling.job_scheduler import JobScheduler as job_scheduler_class
        except ImportError:
            return False
    original = getattr(job_scheduler_class, "update_input_sizes", None)
    if original is None or not inspect.iscoroutinefunction(original):
        return False
    if getattr(original, MARK, False):
        return True

    @functools.wraps(original)
    async def update_input_sizes(self, jobs):
        if sizes_unread(self):
            return None
        return await original(self, jobs)

    setattr(update_input_sizes, MARK, True)
    job_scheduler_class.update_input_sizes = update_input_sizes
    return True
