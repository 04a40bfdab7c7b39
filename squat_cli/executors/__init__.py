"""Sweep executors: how a planned grid's jobs run. One file per executor, each a function
``run(grid, root, jobs, data_dir=, retry_failed=, reporter_factory=, log=, address=) -> SweepOutcome`` that runs
every job through ``sweep.execute_job`` in dependency order (an FP run, then its quantized runs, then their
scores). ``local`` runs them one at a time in this process; ``ray`` as Ray tasks on a cluster."""

from __future__ import annotations

from typing import Callable

from squat_cli.errors import SquatError

EXECUTORS = ("local", "ray")


def get_executor(name: str) -> Callable:
    if name == "local":
        from squat_cli.executors.local import run

        return run
    if name == "ray":
        from squat_cli.executors.ray_executor import run

        return run
    raise SquatError(f"--launcher: {name!r} is not one of {', '.join(EXECUTORS)}")
