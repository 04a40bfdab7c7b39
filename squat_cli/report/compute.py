"""The compute a grid actually spent, from its runs' own records: the figure to set beside the plan's estimate.

Per task and part (FP fine-tuning, QAT: the methods that train, PTQ / GOBO,
sharpness), summed over the runs:

- ``steps``: hours of training steps (``train_time_s``);
- ``evaluations``: hours of the training loop outside its steps, mostly dev
  evaluations (``wall_time_s - train_time_s``);
- ``jobs``: hours of whole jobs (``job_time_s``: model loading, calibration,
  Q-BERT's Hessian, training, evaluations) and of sharpness measurements
  (``sharpness.json``'s ``time_s``), where recorded; ``timed`` says how many.

Runs whose training shared the CPU with other work, or whose fused kernels
fell back to the eager ops, are counted in and counted: they took longer
than the machine alone would.
"""

from __future__ import annotations

import pandas as pd

from squat_cli.quant.methods import names_where

PARTS = (("fp", "FP fine-tuning"), ("qat", "QAT"), ("post", "PTQ / GOBO"), ("sharpness", "sharpness"))
COLUMNS = ["task", "part", "count", "steps_h", "eval_h", "timed", "jobs_h", "contended"]


def _part(method: str) -> str:
    if method == "fp":
        return "fp"
    return "post" if method in names_where(post_training=True) else "qat"


def _seconds(frame: pd.DataFrame, metric: str) -> pd.Series:
    """Seconds of ``metric`` per run (task, method, wbits, abits, seed)."""
    keys = ["task", "method", "wbits", "abits", "seed"]
    return frame[frame.metric == metric].set_index(keys)["value"]


def compute_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per task and part, then the same over all tasks (task ``all``)."""
    if results.empty:
        return pd.DataFrame(columns=COLUMNS)
    keys = ["task", "method", "wbits", "abits", "seed"]
    runs = results[results.metric == "time:fit"][keys + ["value", "short"]].rename(columns={"value": "fit"})
    runs = runs.set_index(keys)
    runs["train"] = _seconds(results, "train_time_s").reindex(runs.index).fillna(0.0)
    runs["job"] = _seconds(results, "time:job").reindex(runs.index)
    runs = runs.reset_index()
    runs["part"] = runs.method.map(_part)
    scores = results[results.metric.str.startswith("sharpness:")]
    times = results[results.metric == "time:sharpness"]
    rows = []
    for task in sorted(set(runs.task) | set(scores.task)) + ["all"]:
        r = runs if task == "all" else runs[runs.task == task]
        for part, _ in PARTS[:3]:
            g = r[r.part == part]
            if len(g):
                rows.append({"task": task, "part": part, "count": len(g), "steps_h": g.train.sum() / 3600,
                             "eval_h": (g.fit - g.train).clip(lower=0).sum() / 3600, "timed": int(g.job.notna().sum()),
                             "jobs_h": g.job.sum(min_count=1) / 3600, "contended": int(g["short"].astype(bool).sum())})
        s = scores if task == "all" else scores[scores.task == task]
        t = times if task == "all" else times[times.task == task]
        if len(s):
            rows.append({"task": task, "part": "sharpness", "count": len(s), "steps_h": float("nan"),
                         "eval_h": float("nan"), "timed": len(t), "jobs_h": t.value.sum(min_count=1) / 3600, "contended": 0})
    return pd.DataFrame(rows, columns=COLUMNS)


def _h(v: float) -> str:
    return "-" if pd.isna(v) else f"{v:.2f}"


def compute_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return ""
    label = dict(PARTS)
    lines = ["### Compute spent (hours, as the runs recorded it)", "",
             "`steps`: training steps; `evaluations`: the rest of the training loop (dev evaluations); `jobs`: "
             "whole jobs (loading, calibration, training, evaluations) and sharpness measurements, summed over the "
             "`timed` ones that recorded it. `shared CPU`: runs whose training shared the CPU with other work "
             "(or ran with its fused kernels fallen back to the eager ops).", "",
             "| task | part | runs / scores | steps | evaluations | timed | jobs | shared CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.task} | {label[r.part]} | {r.count} | {_h(r.steps_h)} | {_h(r.eval_h)} | {r.timed} | "
                     f"{_h(r.jobs_h)} | {r.contended} |")
    return "\n".join(lines) + "\n"
