"""The local executor: every job in this process, one after another, in the plan's order."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from squat_cli.sweep import Grid, Job, SweepOutcome, depends_on, execute_job, record, run_key


def run(grid: Grid, root: Path, jobs: list[Job], data_dir: Optional[str] = None, retry_failed: bool = False,
        reporter_factory: Callable[[], Any] = lambda: None, log: Callable[[str], None] = lambda s: None,
        address: Optional[str] = None) -> SweepOutcome:
    if address is not None:
        from squat_cli.errors import SquatError

        raise SquatError("--address joins a Ray cluster: give it with --launcher ray")
    out = SweepOutcome()
    blocked: set[tuple] = set()  # runs that failed or are missing: their dependents wait
    for job in jobs:
        needs = depends_on(job)
        if needs is not None and (("", job.task, "fp", job.seed) in blocked or needs in blocked):
            out.skipped.append(f"{job.id} (needs a run that did not finish)")
            continue
        result = execute_job(grid, job, root, data_dir, retry_failed, reporter_factory(), log, where="local",
                             on_start=lambda job=job: log(f"[{len(out.ran) + 1}] {job.id}"))
        record(out, job, result, log)
        if result.status in ("failed", "busy"):
            blocked.add(run_key(job))
    return out
