"""What is running now, from the runs root's job log (``sweep.JOB_LOG``): every worker writes there, so any
executor's driver can show it."""

from __future__ import annotations

import json
from pathlib import Path

from squat_cli.sweep import JOB_LOG


def running_jobs(root: Path) -> dict[str, str]:
    """Job id -> where it runs, for every job started and not yet ended (by its last attempt)."""
    path = Path(root) / JOB_LOG
    if not path.is_file():
        return {}
    state: dict[str, tuple[str, str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        state[e.get("job", "")] = (e.get("event", ""), str(e.get("where", "")))
    return {job: where for job, (event, where) in state.items() if event == "start"}
