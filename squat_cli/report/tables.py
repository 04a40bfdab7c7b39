"""Tables 1-4: mean +- std over seeds per cell, the paper's number beside it, and the difference.

Main/auxiliary metrics are in percent (x100), sharpness raw. ``std`` is the
sample standard deviation (ddof=1; empty for a single seed); ``n`` counts the
seeds of the cell. Missing cells are "-", never filled in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from squat_cli.glue import PAPER_TASKS, TASKS
from squat_cli.quant import methods
from squat_cli.report.collect import SHARPNESS_KEYS
from squat_cli.report.paper import paper_value
from squat_cli.tasks import lookup

method_label = methods.label
"""Display name of a table row's method (``qbert-mp3`` at W2: ``Q-BERT MP 2/3``)."""
SHORT_MARK = "†"
"""Marks a sharpness cell holding scores whose ascent stopped inside the ball, followed by their count."""
AUX_COLUMNS = [("mrpc", "f1", "MRPC F1"), ("stsb", "spearmanr", "STS-B Spearman"), ("qqp", "f1", "QQP F1"),
               ("mnli", "accuracy_mm", "MNLI-mm")]


@dataclass
class Table:
    name: str
    title: str
    frame: pd.DataFrame
    """Wide: one row per method and bits; per column ``c``: c, c_std, c_n, c_paper, c_diff."""
    columns: list[str]
    """Display names of the value columns, in order."""
    digits: int


def aggregate(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std and seed count per (method, wbits, abits, task, metric)."""
    if results.empty:
        return pd.DataFrame(columns=["method", "wbits", "abits", "task", "metric", "mean", "std", "n", "loss0",
                                     "short", "delta"])
    g = results.groupby(["method", "wbits", "abits", "task", "metric"], dropna=False)
    out = g["value"].agg(mean="mean", std=lambda s: s.std(ddof=1) if len(s) > 1 else np.nan, n="count")
    out["loss0"] = g["loss0"].mean()
    # the smallest final ||delta_T|| among the cell's ascents: at rho, every one of them reached the ball's edge
    out["delta"] = pd.to_numeric(results["delta"], errors="coerce").groupby(
        [results[k] for k in ("method", "wbits", "abits", "task", "metric")], dropna=False).min() \
        if "delta" in results else np.nan
    short = results["short"] if "short" in results else pd.Series(False, index=results.index)
    out["short"] = short.fillna(False).astype(bool).groupby(
        [results[k] for k in ("method", "wbits", "abits", "task", "metric")], dropna=False).sum()
    return out.reset_index()


def _row_order(keys: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    def sort_key(k):
        method, wbits, abits = k
        return (0 if method == "fp" else 1, wbits, methods.order(method), abits, method)

    return sorted(set(keys), key=sort_key)


def _build(agg: pd.DataFrame, table: str, title: str, cells: list[tuple[str, str, str]], digits: int) -> Table:
    """``cells``: (task, metric, column name). Rows: every (method, bits) with any run, so gaps show as "-"."""
    keys = [(m, int(w), int(a)) for m, w, a in agg[["method", "wbits", "abits"]].itertuples(index=False)]
    records = []
    for method, wbits, abits in _row_order(keys):
        rec = {"method": method_label(method, wbits), "W/A": f"{wbits}/{abits}", "_method": method,
               "_wbits": wbits}
        for task, metric, col in cells:
            hit = agg[(agg.method == method) & (agg.wbits == wbits) & (agg.abits == abits) & (agg.task == task)
                      & (agg.metric == metric)]
            paper_metric = "sharpness" if metric.startswith("sharpness:") else metric
            paper = paper_value(table, method, wbits, task, paper_metric)
            if hit.empty:
                rec.update({col: np.nan, f"{col}_std": np.nan, f"{col}_n": 0, f"{col}_paper": paper,
                            f"{col}_diff": np.nan, f"{col}_loss0": np.nan, f"{col}_short": 0,
                            f"{col}_delta": np.nan})
                continue
            h = hit.iloc[0]
            rec.update({col: h["mean"], f"{col}_std": h["std"], f"{col}_n": int(h["n"]), f"{col}_paper": paper,
                        f"{col}_diff": (h["mean"] - paper) if paper is not None else np.nan,
                        f"{col}_loss0": h["loss0"], f"{col}_short": int(h["short"]), f"{col}_delta": h["delta"]})
        records.append(rec)
    frame = pd.DataFrame.from_records(records)
    return Table(table, title, frame, [c for _, _, c in cells], digits)


def build_tables(results: pd.DataFrame) -> list[Table]:
    agg = aggregate(results)
    main = [(t, TASKS[t].main_metric, TASKS[t].display if t != "mnli" else "MNLI-m") for t in PAPER_TASKS]
    users = sorted({t for t in agg.task.unique() if t not in TASKS and lookup(t) is not None}) if not agg.empty else []
    main += [(t, lookup(t).main_metric, t) for t in users]  # user tasks: their own columns, no paper number
    tables = [
        _build(agg, "table1", "Table 1: dev-set main metric (mean ± std over seeds)", main, 2),
        _build(agg, "table2", "Table 2: auxiliary metrics", AUX_COLUMNS, 2),
    ]
    for name, key in SHARPNESS_KEYS.items():
        rho = key.split("=")[1]
        cells = [(t, f"sharpness:{key}", TASKS[t].display) for t in PAPER_TASKS] + \
            [(t, f"sharpness:{key}", t) for t in users]
        tables.append(_build(agg, name, f"Table {name[-1]}: sharpness at rho = {rho} (lower is flatter; L0 = loss "
                             "at the trained weights; ‖δ‖ = the smallest final perturbation norm ||delta_T|| among "
                             "the cell's ascents)", cells, 5))
    return tables


def _fmt(v, digits: int, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def cell_text(row: pd.Series, col: str, digits: int, with_paper: bool = True) -> str:
    if not row.get(f"{col}_n"):
        text = "-"
    else:
        text = _fmt(row[col], digits)
        if not np.isnan(row[f"{col}_std"]):
            text += f" ± {_fmt(row[f'{col}_std'], digits)}"
        text += f" (n={int(row[f'{col}_n'])})"
        loss0 = row.get(f"{col}_loss0")
        if loss0 is not None and not (isinstance(loss0, float) and np.isnan(loss0)):
            text += f", L0 {loss0:.3f}"
        delta = row.get(f"{col}_delta")
        if delta is not None and not (isinstance(delta, float) and np.isnan(delta)):
            text += f", ‖δ‖ {delta:.4f}"
        if row.get(f"{col}_short"):
            text += f" {SHORT_MARK}{int(row[f'{col}_short'])}"
    paper = row.get(f"{col}_paper")
    if with_paper and paper is not None and not (isinstance(paper, float) and np.isnan(paper)):
        text += f" · paper {paper:g}"
        if row.get(f"{col}_n"):
            text += f" (Δ {_fmt(row[f'{col}_diff'], digits, signed=True)})"
    return text


def to_markdown(table: Table) -> str:
    if table.frame.empty:
        return f"### {table.title}\n\nNo runs.\n"
    head = "| method | W/A | " + " | ".join(table.columns) + " |"
    sep = "|---|---|" + "---|" * len(table.columns)
    lines = [f"### {table.title}", "", head, sep]
    for _, row in table.frame.iterrows():
        cells = [cell_text(row, c, table.digits) for c in table.columns]
        lines.append(f"| {row['method']} | {row['W/A']} | " + " | ".join(cells) + " |")
    if any(table.frame.get(f"{c}_short", pd.Series(dtype=float)).fillna(0).sum() for c in table.columns):
        lines += ["", f"{SHORT_MARK}k: k of the cell's scores come from an ascent that stopped inside the ball "
                  "(||delta_T|| < rho): they measure a smaller radius and are not comparable."]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    if table.frame.empty:
        return "method,W/A\n"
    cols = ["method", "W/A"]
    for c in table.columns:
        cols += [c, f"{c}_std", f"{c}_n", f"{c}_paper", f"{c}_diff"]
        if table.name in ("table3", "table4"):
            cols += [f"{c}_loss0", f"{c}_short", f"{c}_delta"]
    return table.frame[cols].to_csv(index=False, float_format=f"%.{table.digits + 2}f")
