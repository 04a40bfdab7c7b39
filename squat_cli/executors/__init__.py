"""Sweep executors: how a planned grid's jobs run. One file per executor, each a function
``run(grid, root, jobs, data_dir=, retry_failed=, reporter_factory=, log=, address=) -> SweepOutcome`` that runs
every job through ``sweep.execute_job`` in dependency order (an FP run, then its quantized runs, then their
scores). ``local`` runs them one at a time in this process; ``ray`` as Ray tasks on a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from squat_cli.errors import SquatError
from squat_cli.sweep import Grid, Job, SweepOutcome

EXECUTORS = ("local", "ray")


def get_executor(name: str) -> Callable:
    if name == "local":
        from squat_cli.executors.local import run

        return run
    if name == "ray":
        from squat_cli.executors.ray_executor import run

        return run
    raise SquatError(f"--launcher: {name!r} is not one of {', '.join(EXECUTORS)}")


def run_sweep(
    grid: Grid, root: Path, jobs: list[Job], data_dir: Optional[str] = None, retry_failed: bool = False,
    reporter_factory: Callable[[], Any] = lambda: None, log: Callable[[str], None] = lambda s: None,
    launcher: str = "local", address: Optional[str] = None,
) -> SweepOutcome:
    """Run the jobs with an executor: ``local`` one at a time in this process, ``ray`` as Ray tasks across a
    cluster. Same outcome either way."""
    return get_executor(launcher)(grid, Path(root), jobs, data_dir=data_dir, retry_failed=retry_failed,
                                  reporter_factory=reporter_factory, log=log, address=address)
