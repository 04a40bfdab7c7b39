"""Read every run folder into one long table; say which runs were skipped and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from squat_cli.errors import SquatError
from squat_cli.files import read_json
from squat_cli.runs import discover, parse_variant
from squat_cli.sharpness_settings import reached_edge
from squat_cli.tasks import task_of_run
from squat_cli.yaml_safe import read_yaml

SHARPNESS_KEYS = {"table3": "ascent/rho=0.01", "table4": "ascent/rho=0.05"}
STEP_SIZE_KEYS = {"mean_wstep_init": "step:weight:init", "mean_wstep_final": "step:weight:final",
                  "mean_astep_init": "step:act:init", "mean_astep_final": "step:act:final"}
"""metrics.json's mean step sizes (over the quantized layers, at the start and the end of QAT) -> metric names."""
CONTENDED_SHARE = 0.75  # a run that got less of its threads' time than this shared the CPU: its time is no cost


def contended(metrics: dict, below: float = CONTENDED_SHARE) -> bool:
    """Whether the run's training shared the CPU with other work (its ``cpu_share`` under ``below``); False if
    unrecorded."""
    share = metrics.get("cpu_share")
    return isinstance(share, (int, float)) and share < below


def slowed(metrics: dict) -> bool:
    """Whether the run's fused LSQ kernels fell back to the (slower) eager ops (its ``fused_kernels``): its steps
    were not the steps its method costs; False if unrecorded, "on" or "off" (a whole run unfused by choice)."""
    state = metrics.get("fused_kernels")
    return isinstance(state, str) and state.startswith("fell back")


CONTENDED_FILE = "contended.json"
"""In a runs root: which runs shared the CPU, for the runs' times to be no cost. ``{"runs": {"<task>/<variant>/
seed<k>": "why"}}`` names runs that recorded no ``cpu_share`` (made before it was recorded); an optional
``"cpu_share_below": S`` (in (0, 1]) replaces the default threshold for the root's recorded shares (a study whose
protocol counts any share under 0.9 as shared)."""


@dataclass
class KnownContended:
    runs: dict[str, str] = field(default_factory=dict)
    below: float = CONTENDED_SHARE

    def __contains__(self, run: str) -> bool:
        return run in self.runs


def known_contended(root: Path) -> KnownContended:
    """What ``root/contended.json`` says (the defaults without the file); a damaged file is an error naming it."""
    path = Path(root) / CONTENDED_FILE
    if not path.is_file():
        return KnownContended()
    data = read_json(path)
    runs = data.get("runs", {}) if isinstance(data, dict) else None
    below = data.get("cpu_share_below", CONTENDED_SHARE) if isinstance(data, dict) else None
    if not isinstance(runs, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in runs.items()) \
            or isinstance(below, bool) or not isinstance(below, (int, float)) or not 0 < below <= 1:
        raise SquatError(f"{path}: expected {{\"runs\": {{\"<task>/<variant>/seed<k>\": \"why\"}}, "
                         "\"cpu_share_below\": a share in (0, 1] (optional)}")
    return KnownContended(runs, float(below))


def stopped_short(key: str, entry: dict) -> bool:
    """An ascent score whose final perturbation stayed inside the ball (||delta_T|| < rho); False if unrecorded."""
    if not key.startswith("ascent/"):
        return False
    if isinstance(entry.get("reached_edge"), bool):
        return not entry["reached_edge"]
    if not isinstance(entry.get("delta_norm"), (int, float)):
        return False  # not recorded: cannot tell
    return not reached_edge(float(entry["delta_norm"]), float(key.split("=", 1)[1]))


@dataclass
class Collected:
    results: pd.DataFrame
    """One row per (run, metric): task, method, wbits, abits, seed, metric, value, loss0, short (the value is not
    representative: a sharpness ascent that stopped inside the ball, or a train time measured while other work
    shared the CPU or after the fused kernels fell back to the eager ops), delta (the ascent's final ||delta_T||,
    where recorded). Metrics: the task's GLUE metrics (in percent), ``train_time_s``, ``time:fit`` / ``time:job``
    (the training loop's and the whole job's wall time), ``sharpness:<key>`` and ``time:sharpness`` per score,
    ``step:weight|act:init|final`` (mean step sizes)."""
    recipes: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def collect(root: Path) -> Collected:
    rows: list[dict[str, Any]] = []
    recipes: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    shared = known_contended(root)
    for run in discover(root):
        where = str(run.path)
        try:
            method, wbits, abits = parse_variant(run.variant)
        except SquatError as exc:
            skipped.append((where, str(exc)))
            continue
        task = task_of_run(run)  # GLUE's by name, or a user task from the definition the run's recipe stores
        if task is None:
            skipped.append((where, f"unknown task folder {run.task!r}"))
            continue
        if run.is_failed():
            skipped.append((where, "failed (FAILED.json)"))
            continue
        if not run.is_complete():
            skipped.append((where, "incomplete (no metrics.json)"))
            continue
        try:
            metrics = run.metrics()
            if not isinstance(metrics, dict):
                raise SquatError(f"{run.metrics_file}: not a JSON object")
        except SquatError as exc:
            skipped.append((where, str(exc)))
            continue
        missing = [k for k in task.metric_names() if not isinstance(metrics.get(k), (int, float))]
        if missing:
            skipped.append((where, f"metrics.json lacks {', '.join(missing)}"))
            continue
        base = {"task": run.task, "method": method, "wbits": wbits, "abits": abits, "seed": run.seed}
        busy = contended(metrics, shared.below) or f"{run.task}/{run.variant}/seed{run.seed}" in shared \
            or slowed(metrics)
        for k in task.metric_names():
            rows.append({**base, "metric": k, "value": 100.0 * float(metrics[k]), "loss0": None, "short": False,
                         "delta": None})
        if isinstance(metrics.get("train_time_s"), (int, float)) and metrics.get("steps"):
            rows.append({**base, "metric": "train_time_s", "value": float(metrics["train_time_s"]), "loss0": None,
                         "short": busy, "delta": None})
        for key, name in (("wall_time_s", "time:fit"), ("job_time_s", "time:job")):
            if isinstance(metrics.get(key), (int, float)):
                rows.append({**base, "metric": name, "value": float(metrics[key]), "loss0": None,
                             "short": bool(metrics.get("steps")) and busy, "delta": None})
        for key, name in STEP_SIZE_KEYS.items():
            if isinstance(metrics.get(key), (int, float)):
                rows.append({**base, "metric": name, "value": float(metrics[key]), "loss0": None, "short": False,
                             "delta": None})
        if run.sharpness_file.is_file():
            try:
                sharp = read_json(run.sharpness_file)
                for key, entry in sharp.items():
                    delta = entry.get("delta_norm")
                    rows.append({**base, "metric": f"sharpness:{key}", "value": float(entry["score"]),
                                 "loss0": float(entry["loss0"]), "short": stopped_short(key, entry),
                                 "delta": float(delta) if isinstance(delta, (int, float)) else None})
                    if isinstance(entry.get("time_s"), (int, float)):
                        rows.append({**base, "metric": "time:sharpness", "value": float(entry["time_s"]),
                                     "loss0": None, "short": False, "delta": None})
            except (SquatError, KeyError, TypeError, ValueError, AttributeError):
                skipped.append((str(run.sharpness_file), "unreadable sharpness.json (metrics still used)"))
        try:
            recipes.append({**base, "recipe": read_yaml(run.recipe_file)})
        except SquatError:
            recipes.append({**base, "recipe": {}})
    cols = ["task", "method", "wbits", "abits", "seed", "metric", "value", "loss0", "short", "delta"]
    return Collected(pd.DataFrame(rows, columns=cols), recipes, skipped)
