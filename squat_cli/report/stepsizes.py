"""How the learned step sizes moved during QAT: mean over layers at the start and the end, per method and cell.

A diagnostic beside the claims: a method whose weight step sizes grow while
another's shrink quantizes more coarsely at the end of training. Values are
the runs' own ``mean_wstep_*`` / ``mean_astep_*`` (mean over the quantized
layers), averaged over seeds; ``grew`` counts the seeds whose final value is
above the start.
"""

from __future__ import annotations

import pandas as pd

from squat_cli.quant.methods import names_where, order
from squat_cli.report.tables import method_label

KINDS = (("weight", "weight step"), ("act", "activation step"))


def step_size_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, method, wbits, abits, kind) of the methods that train (PTQ's step sizes never move):
    seeds, mean start, mean end, mean relative change, grew."""
    cols = ["task", "method", "wbits", "abits", "kind", "seeds", "init", "final", "change", "grew"]
    if results.empty:
        return pd.DataFrame(columns=cols)
    steps = results[results.metric.str.startswith("step:") & ~results.method.isin(names_where(post_training=True))]
    if steps.empty:
        return pd.DataFrame(columns=cols)
    parts = steps.metric.str.split(":", expand=True)
    wide = steps.assign(kind=parts[1], when=parts[2]).pivot_table(
        index=["task", "method", "wbits", "abits", "seed", "kind"], columns="when", values="value").reset_index()
    wide = wide.dropna(subset=["init", "final"])
    wide["change"] = wide["final"] / wide["init"] - 1.0
    wide["grew"] = wide["final"] > wide["init"]
    g = wide.groupby(["task", "method", "wbits", "abits", "kind"]).agg(
        seeds=("seed", "count"), init=("init", "mean"), final=("final", "mean"), change=("change", "mean"),
        grew=("grew", "sum")).reset_index()
    g["_o"] = g.method.map(order)
    return g.sort_values(["task", "kind", "wbits", "_o"]).drop(columns="_o").reset_index(drop=True)[cols]


def step_size_markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return ""
    lines = ["### Learned step sizes during QAT (mean over quantized layers and seeds)", "",
             "`change`: mean over seeds of end / start - 1; `grew`: seeds whose step size ended above its start.",
             "", "| task | step | method | W/A | seeds | start | end | change | grew |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples(index=False):
        kind = dict(KINDS)[r.kind] if r.kind in dict(KINDS) else r.kind
        lines.append(f"| {r.task} | {kind} | {method_label(r.method, r.wbits)} | {r.wbits}/{r.abits} | {r.seeds} | "
                     f"{r.init:.5f} | {r.final:.5f} | {round(100 * r.change, 1) + 0.0:+.1f}% | {int(r.grew)}/{r.seeds} |")
    return "\n".join(lines) + "\n"
