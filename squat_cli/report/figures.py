"""Figure 2 (sharpness, SQuAT vs LSQ per task) and Figure 3 (joint and SQuAT minus LSQ per task)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from squat_cli.files import atomic_path, write_failure
from squat_cli.glue import PAPER_TASKS, TASKS


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        try:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        except OSError as exc:  # disk full, file-size limit: name the file
            raise write_failure(path, exc) from None


def _bars(ax, tasks, series: dict[str, tuple[list[float], list[float]]]) -> None:
    x = np.arange(len(tasks))
    width = 0.8 / max(len(series), 1)
    for i, (label, (vals, errs)) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, yerr=errs, label=label, capsize=2)
    ax.set_xticks(x, [TASKS[t].display for t in tasks], rotation=30)


def figure2(agg: pd.DataFrame, path: Path, key: str = "ascent/rho=0.05") -> bool:
    """Sharpness of SQuAT vs LSQ per task, one panel per weight bit-width. False if nothing to draw."""
    plt = pyplot()
    data = agg[(agg.metric == f"sharpness:{key}") & agg.method.isin(["lsq", "squat"])]
    if data.empty:
        return False
    bits = sorted(data.wbits.unique())
    fig, axes = plt.subplots(1, len(bits), figsize=(4.5 * len(bits), 3.5), squeeze=False)
    tasks = [t for t in PAPER_TASKS if t in set(data.task)]
    for ax, b in zip(axes[0], bits):
        series = {}
        for method, label in (("lsq", "LSQ"), ("squat", "SQuAT")):
            d = data[(data.method == method) & (data.wbits == b)].set_index("task")
            series[label] = ([d["mean"].get(t, np.nan) for t in tasks], [np.nan_to_num(d["std"].get(t, 0.0)) for t in tasks])
        _bars(ax, tasks, series)
        ax.set_title(f"W{b}: sharpness ({key.split('/')[1]})")
        ax.set_ylabel("L(W_T) - L(W_0)  (lower is flatter)")
        ax.legend()
    save_png(fig, path)
    plt.close(fig)
    return True


def difference_series(pairs: dict[str, pd.DataFrame], wbits: int) -> dict[str, dict[str, list[float]]]:
    """Figure 3's data at one weight width: per comparison (joint - LSQ, SQuAT - LSQ), per task in the paper's
    order, the paired differences of the main metric seed by seed (same task, bits and seed)."""
    out: dict[str, dict[str, list[float]]] = {}
    for key, label in (("joint-vs-lsq", "Joint − LSQ"), ("squat-vs-lsq", "SQuAT (alternate) − LSQ")):
        d = pairs.get(key)
        if d is None or d.empty:
            continue
        d = d[d.wbits == wbits]
        per_task = {t: d[d.task == t].sort_values("seed")["diff"].astype(float).tolist() for t in PAPER_TASKS}
        per_task = {t: v for t, v in per_task.items() if v}
        if per_task:
            out[label] = per_task
    return out


def figure3(pairs: dict[str, pd.DataFrame], path: Path) -> bool:
    """Joint and SQuAT minus LSQ on each task's main metric, one panel per weight width: the bar is the mean of the
    paired differences (same task, bits and seed), the dots the seeds; LSQ is the zero line. False if no pairs."""
    by_bits = {b: s for b in (2, 3, 4, 8) if (s := difference_series(pairs, b))}
    if not by_bits:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(by_bits), figsize=(4.5 * len(by_bits), 3.6), squeeze=False)
    for k, (ax, (b, series)) in enumerate(zip(axes[0], by_bits.items())):
        tasks = [t for t in PAPER_TASKS if any(t in v for v in series.values())]
        x = np.arange(len(tasks))
        width = 0.8 / len(series)
        for i, (label, per_task) in enumerate(series.items()):
            pos = x + (i - (len(series) - 1) / 2) * width
            color = "tab:blue" if label.startswith("Joint") else "tab:orange"
            ax.bar(pos, [np.mean(per_task[t]) if t in per_task else np.nan for t in tasks], width, color=color,
                   alpha=0.6, label=label)
            for p, t in zip(pos, tasks):
                vals = per_task.get(t, [])
                ax.scatter(np.full(len(vals), p), vals, color="black", s=10, zorder=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, [TASKS[t].display for t in tasks], rotation=30)
        ax.set_title(f"W{b}A8: paired difference from LSQ", fontsize=10)
        if k == 0:
            ax.set_ylabel("main metric − LSQ (points)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), bbox_to_anchor=(0.5, 1.0), frameon=False,
               title="bars: mean over seeds; dots: one seed each")
    fig.tight_layout(rect=(0, 0, 1, 0.82))
    save_png(fig, path)
    plt.close(fig)
    return True


def figure_pairs(pairs: dict[str, pd.DataFrame], path: Path) -> bool:
    """Every paired SQuAT - LSQ difference, one dot per seed, per task and bit width: the main metric (C1, with the
    paper's average gain of about +1 point dashed) and sharpness at rho 0.05 (C2; an ascent stopped short: hollow).
    The bar is the mean over the seeds. False if there are no pairs."""
    panels = [(pairs.get("squat-vs-lsq"), "C1: SQuAT − LSQ, main metric (points)", 1.0),
              (pairs.get("sharpness-0.05"), "C2: SQuAT − LSQ, sharpness at rho 0.05 (below 0: flatter)", None)]
    panels = [(d, title, ref) for d, title, ref in panels if d is not None and not d.empty]
    if not panels:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.8), squeeze=False)
    for ax, (d, title, ref) in zip(axes[0], panels):
        groups = [(t, b) for t in PAPER_TASKS for b in sorted(d.wbits.unique()) if len(d[(d.task == t) & (d.wbits == b)])]
        for i, (t, b) in enumerate(groups):
            g = d[(d.task == t) & (d.wbits == b)].sort_values("seed")
            short = g["short"].astype(bool).to_numpy()
            offsets = np.linspace(-0.15, 0.15, len(g)) if len(g) > 1 else np.zeros(1)
            ax.scatter(i + offsets[~short], g["diff"].to_numpy()[~short], color="tab:orange", zorder=3, s=18)
            ax.scatter(i + offsets[short], g["diff"].to_numpy()[short], facecolors="none", edgecolors="tab:orange",
                       zorder=3, s=18)
            if (~short).any():
                ax.hlines(g["diff"].to_numpy()[~short].mean(), i - 0.3, i + 0.3, color="black", linewidth=1.2)
        ax.axhline(0, color="grey", linewidth=0.8)
        if ref is not None:
            ax.axhline(ref, color="tab:blue", linestyle="--", linewidth=0.8, label="paper: about +1")
            ax.legend(loc="best")
        ax.set_xticks(range(len(groups)), [f"{TASKS[t].display}\nW{b}" for t, b in groups])
        ax.set_title(title, fontsize=10)
    save_png(fig, path)
    plt.close(fig)
    return True
