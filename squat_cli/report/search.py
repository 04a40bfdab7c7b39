"""The settings-search table: every run of a settings grid (``<root>/<setting>/<task>/<variant>/seed<k>``).

Every run is listed, finished or not: a diverged run shows as ``failed`` with
its reason, an unfinished one as ``incomplete``. Beside the main dev metric
stand the settings a search varies (read from each run's ``recipe.yaml``,
exactly what ran) and the training time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from squat_cli.errors import SquatError
from squat_cli.files import read_json, staged, write_text
from squat_cli.glue import TASKS
from squat_cli.quant.methods import names_where
from squat_cli.runs import discover
from squat_cli.yaml_safe import read_yaml

SEARCHED = [("train", "lr"), ("quant", "step_lr"), ("sam", "rho"), ("sam", "weight_ste"),
            ("quant", "act_grad_scale"), ("sam", "dropout_replay"), ("train", "epochs")]
SAM_METHODS = names_where(uses_sam=True)
COLUMNS = ["setting", "task", "variant", "seed", "status", "metric", "value", "eval_loss", "train_time_s",
           *[k for _, k in SEARCHED]]


def _recipe(run) -> dict[str, Any]:
    try:
        data = read_yaml(run.recipe_file)
    except SquatError:
        return {}
    return data if isinstance(data, dict) else {}


def search_rows(root: Path) -> pd.DataFrame:
    """One row per run under every setting folder of ``root``."""
    rows = []
    for setting in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        for run in discover(setting):
            if run.task not in TASKS:
                continue
            task = TASKS[run.task]
            recipe = _recipe(run)
            row: dict[str, Any] = {"setting": setting.name, "task": run.task, "variant": run.variant,
                                   "seed": run.seed, "metric": task.main_metric, "value": None,
                                   "eval_loss": None, "train_time_s": None}
            for section, key in SEARCHED:
                row[key] = (recipe.get(section) or {}).get(key)
            if run.variant.split("-w")[0] not in SAM_METHODS:  # SAM settings do not act on these runs
                row.update({k: None for s, k in SEARCHED if s == "sam"})
            if run.is_failed():
                try:
                    why = read_json(run.failed_file).get("error", "")
                except (SquatError, AttributeError):
                    why = ""
                row["status"] = f"failed: {why}" if why else "failed"
            elif not run.is_complete():
                row["status"] = "incomplete"
            else:
                try:
                    m = run.metrics()
                    row.update(status="done", value=100.0 * float(m[task.main_metric]),
                               eval_loss=m.get("eval_loss"), train_time_s=m.get("train_time_s"))
                except (SquatError, KeyError, TypeError, ValueError):
                    row["status"] = "unreadable metrics.json"
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:g}"
    return str(v)


def search_markdown(df: pd.DataFrame) -> str:
    if df.empty:
        return "No search runs found.\n"
    keys = [k for _, k in SEARCHED]
    lines = ["| setting | task | variant | seed | " + " | ".join(keys) + " | status | dev metric | eval loss | train s |",
             "|" + "---|" * (8 + len(keys))]
    for r in df.sort_values(["setting", "task", "variant", "seed"]).itertuples(index=False):
        d = r._asdict()
        metric = f"{d['metric']} {_fmt(d['value'])}" if d["value"] is not None else "-"
        lines.append(f"| {d['setting']} | {d['task']} | {d['variant']} | {d['seed']} | "
                     + " | ".join(_fmt(d[k]) for k in keys)
                     + f" | {d['status']} | {metric} | {_fmt(d['eval_loss'])} | {_fmt(d['train_time_s'])} |")
    done = df[df["status"] == "done"]
    if not done.empty:
        g = done.groupby(["setting", "task", "variant"])["value"]
        lines += ["", "Mean over the finished seeds:", "",
                  "| setting | task | variant | seeds | mean | min | max |", "|---|---|---|---|---|---|---|"]
        for (setting, task, variant), s in g:
            lines.append(f"| {setting} | {task} | {variant} | {len(s)} | {s.mean():.2f} | {s.min():.2f} | "
                         f"{s.max():.2f} |")
    return "\n".join(lines) + "\n"


def write_search(root: Path, folder: Path) -> pd.DataFrame:
    """``search.csv`` and ``search.md`` in ``folder``; returns the rows."""
    df = search_rows(root)
    with staged(folder, "search") as stage:
        write_text(stage / "search.csv", df.to_csv(index=False, float_format="%.6g"))
        write_text(stage / "search.md", search_markdown(df))
    return df
