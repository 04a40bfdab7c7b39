"""The paper's claims as paired comparisons: per-seed differences, a bootstrap interval and a signed-rank test.

Runs are paired by (task, W/A, seed): two methods with the same seed start
from the same FP run and see the same data order, so their difference removes
the FP model's seed-to-seed variation.

- C1: SQuAT minus LSQ, main dev metric, per bit width and pooled.
- C2: SQuAT minus LSQ, sharpness at each radius (negative: SQuAT flatter),
  with the difference in starting loss L(W0) beside it; pairs where either
  ascent stopped inside the ball are left out and counted.
- C3: joint minus LSQ and joint minus SQuAT, main dev metric.
- C4: SQuAT minus the FP model of the same seed, main dev metric, at W3 and W4.
- Cost: mean training time (steps only) per method and bit width, and its
  ratio to LSQ's on the same tasks.

Interval: percentile bootstrap of the mean difference (10,000 resamples of the
pairs, fixed seed). Test: two-sided Wilcoxon signed-rank over the pairs
(scipy), with the count of pairs won and lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from squat_cli.quant.methods import KD_SUFFIX
from squat_cli.tasks import lookup

BOOTSTRAP = 10_000
CLAIMS = [
    ("C1", "squat", "lsq", "main", "SQuAT - LSQ, main dev metric (points)"),
    ("C3", "joint", "lsq", "main", "joint - LSQ, main dev metric (points)"),
    ("C3", "joint", "squat", "main", "joint - SQuAT, main dev metric (points)"),
    ("C4", "squat", "fp", "main", "SQuAT - FP (same seed), main dev metric (points)"),
]
KD_COMPARISONS = [
    ("KD", "lsq+kd", "lsq", "main", "LSQ+KD - LSQ, main dev metric (points)"),
    ("KD", "squat+kd", "squat", "main", "SQuAT+KD - SQuAT, main dev metric (points)"),
    ("KD", "squat+kd", "lsq+kd", "main", "SQuAT+KD - LSQ+KD (C1 under distillation), main dev metric (points)"),
    ("KD", "lsq", "fp", "main", "LSQ - FP (same seed), main dev metric (points)"),
    ("KD", "squat", "fp", "main", "SQuAT - FP (same seed), every width, main dev metric (points)"),
    ("KD", "lsq+kd", "fp", "main", "LSQ+KD - FP (same seed), main dev metric (points)"),
    ("KD", "squat+kd", "fp", "main", "SQuAT+KD - FP (same seed), main dev metric (points)"),
]
"""The distillation study's paired comparisons, made when the runs hold distilled methods (``+kd``)."""
SHARP_KEYS = ("ascent/rho=0.01", "ascent/rho=0.05")


@dataclass
class Summary:
    claim: str
    comparison: str
    bits: str
    n: int
    mean: float
    lo: float
    hi: float
    wins: int
    losses: int
    p: float
    excluded: int = 0


def main_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The rows of each task's main dev metric."""
    main = {t: lookup(t).main_metric for t in results.task.unique() if lookup(t) is not None} \
        if not results.empty else {}
    return results[results.apply(lambda r: main.get(r["task"]) == r["metric"], axis=1)] if not results.empty \
        else results


def pairs(results: pd.DataFrame, a: str, b: str, metric: str = "main") -> pd.DataFrame:
    """One row per (task, wbits, seed) holding both methods: value_a, value_b, diff = a - b.

    ``b == "fp"`` pairs each run of ``a`` with the FP run of its seed (whatever its bits).
    ``metric``: ``main`` (the task's main metric) or a sharpness key (``ascent/rho=0.05``).
    """
    if results.empty:
        return pd.DataFrame(columns=["task", "wbits", "seed", "value_a", "value_b", "diff", "short", "loss0_diff"])
    df = main_rows(results) if metric == "main" else results[results.metric == f"sharpness:{metric}"]
    cols = ["task", "wbits", "seed", "value", "loss0", "short"]
    left = df[df.method == a][cols].rename(columns={"value": "value_a", "loss0": "loss0_a", "short": "short_a"})
    right = df[df.method == b][cols].rename(columns={"value": "value_b", "loss0": "loss0_b", "short": "short_b"})
    if b == "fp":
        right = right.drop(columns="wbits")
        merged = left.merge(right, on=["task", "seed"])
    else:
        merged = left.merge(right, on=["task", "wbits", "seed"])
    merged["diff"] = merged["value_a"] - merged["value_b"]
    merged["short"] = merged["short_a"].fillna(False).astype(bool) | merged["short_b"].fillna(False).astype(bool)
    merged["loss0_diff"] = pd.to_numeric(merged["loss0_a"], errors="coerce") - pd.to_numeric(merged["loss0_b"],
                                                                                             errors="coerce")
    out = merged[["task", "wbits", "seed", "value_a", "value_b", "diff", "short", "loss0_diff"]]
    return out.sort_values(["wbits", "task", "seed"]).reset_index(drop=True)


def bootstrap_ci(diffs: np.ndarray, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    if len(diffs) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.choice(diffs, size=(BOOTSTRAP, len(diffs)), replace=True).mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def wilcoxon_p(diffs: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    nz = diffs[diffs != 0]
    if len(nz) < 2:
        return float("nan")
    return float(wilcoxon(nz).pvalue)


def summarize(claim: str, comparison: str, df: pd.DataFrame) -> list[Summary]:
    """One row per bit width, and one pooled over all of them (when there are several)."""
    if df.empty:
        return []
    groups = [(f"W{b}", df[df.wbits == b]) for b in sorted(df.wbits.unique())]
    if len(groups) > 1:
        groups.append(("all", df))
    out = []
    for label, g in groups:
        excluded = int(g["short"].sum())
        d = g[~g["short"]]["diff"].to_numpy(dtype=float)
        lo, hi = bootstrap_ci(d)
        out.append(Summary(claim, comparison, label, len(d), float(d.mean()) if len(d) else float("nan"), lo, hi,
                           int((d > 0).sum()), int((d < 0).sum()), wilcoxon_p(d), excluded))
    return out


def claim_summaries(results: pd.DataFrame) -> tuple[list[Summary], dict[str, pd.DataFrame]]:
    """Every summary row, and the per-pair tables (keyed by a short name) they come from."""
    rows: list[Summary] = []
    tables: dict[str, pd.DataFrame] = {}
    for claim, a, b, metric, label in CLAIMS:
        p = pairs(results, a, b, metric)
        if claim == "C4":
            p = p[p.wbits.isin([3, 4])]
        tables[f"{a}-vs-{b}"] = p
        rows += summarize(claim, label, p)
    for key in SHARP_KEYS:
        p = pairs(results, "squat", "lsq", key)
        tables[f"sharpness-{key.split('=')[1]}"] = p
        rows += summarize("C2", f"SQuAT - LSQ, sharpness at rho {key.split('=')[1]} (negative: SQuAT flatter)", p)
    if not results.empty and results.method.str.endswith(KD_SUFFIX).any():
        for claim, a, b, metric, label in KD_COMPARISONS:
            p = pairs(results, a, b, metric)
            tables[f"kd:{a}-vs-{b}"] = p
            rows += summarize(claim, label, p)
    return rows, tables


def cost_table(results: pd.DataFrame) -> pd.DataFrame:
    """Median training time (s) per method and W/A, and the median over (task, seed) pairs of its ratio to the LSQ
    run of the same task, bits and seed (``vs_lsq``; with distilled runs, ``vs_plain``: a ``+kd`` method's ratio to
    the same method without distillation). Runs recorded as sharing the CPU (``cpu_share``) or whose fused kernels
    fell back to the eager ops (``fused_kernels``) are left out and counted; medians keep a slowed run that was not
    recorded as such from moving either figure much."""
    t = results[results.metric == "train_time_s"] if not results.empty else results
    if t.empty:
        return pd.DataFrame(columns=["method", "wbits", "abits", "runs", "train_s", "vs_lsq", "contended"])
    flagged = t["short"].fillna(False).astype(bool)
    left_out = t[flagged].groupby(["method", "wbits", "abits"]).size()
    every = t[["method", "wbits", "abits"]].drop_duplicates()  # a cell whose runs were all left out keeps its row
    t = t[~flagged]
    g = t.groupby(["method", "wbits", "abits"])["value"].agg(runs="count", train_s="median").reset_index()
    g = every.merge(g, on=["method", "wbits", "abits"], how="left").fillna({"runs": 0}).astype({"runs": int})
    g = g.sort_values(["method", "wbits", "abits"]).reset_index(drop=True)

    def ratio(method: str, wbits: int, other: str) -> float:
        mine = t[(t.method == method) & (t.wbits == wbits)]
        base = t[(t.method == other) & (t.wbits == wbits)]
        both = mine.merge(base, on=["task", "seed"], suffixes=("", "_base"))
        return float((both["value"] / both["value_base"]).median()) if len(both) else float("nan")

    g["vs_lsq"] = [ratio(r.method, r.wbits, "lsq") for r in g.itertuples(index=False)]
    if g.method.str.endswith(KD_SUFFIX).any():  # the teacher's cost: each distilled run against its plain twin
        g["vs_plain"] = [ratio(r.method, r.wbits, r.method.removesuffix(KD_SUFFIX)) if r.method.endswith(KD_SUFFIX)
                         else float("nan") for r in g.itertuples(index=False)]
    g["contended"] = [int(left_out.get((r.method, r.wbits, r.abits), 0)) for r in g.itertuples(index=False)]
    return g


def _f(v: float, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:+.{digits}f}"


def claims_markdown(rows: list[Summary], cost: pd.DataFrame) -> str:
    lines = ["### Paired comparisons (same task, bits and seed)", "",
             "Mean difference over the pairs, 95% bootstrap interval, the number of pairs with a positive / "
             "negative difference, two-sided Wilcoxon signed-rank p. Sharpness pairs whose ascent stopped inside "
             "the ball are left out (`excl.`).", "",
             "| claim | comparison | bits | pairs | mean | 95% interval | +/- | p | excl. |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        digits = 5 if "sharpness" in r.comparison else 2
        p = "-" if np.isnan(r.p) else f"{r.p:.3g}"
        lines.append(f"| {r.claim} | {r.comparison} | {r.bits} | {r.n} | {_f(r.mean, digits)} | "
                     f"[{_f(r.lo, digits)}, {_f(r.hi, digits)}] | {r.wins}/{r.losses} | {p} | {r.excluded} |")
    if not cost.empty:
        kd = "vs_plain" in cost.columns
        lines += ["", "### Cost: training time per run (steps only, this machine)", "",
                  "| method | W/A | runs | median train s | vs LSQ (median of per-run ratios, same task and seed) "
                  + ("| +KD vs the same method without (same ratio) " if kd else "")
                  + "| left out (CPU shared or unfused) |",
                  "|---|---|---|---|---|" + ("---|" if kd else "") + "---|"]
        for r in cost.itertuples(index=False):
            ratio = "-" if np.isnan(r.vs_lsq) else f"{r.vs_lsq:.2f}x"
            plain = ("- | " if np.isnan(r.vs_plain) else f"{r.vs_plain:.2f}x | ") if kd else ""
            secs = "-" if np.isnan(r.train_s) else f"{r.train_s:.0f}"
            lines.append(f"| {r.method} | {r.wbits}/{r.abits} | {r.runs} | {secs} | {ratio} | {plain}"
                         f"{r.contended} |")
    return "\n".join(lines) + "\n"


def per_seed_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """Every paired difference, one row per (comparison, task, bits) and one column per seed, with the row's mean.

    Sharpness cells show the difference in starting loss L(W0) beside the score's difference; a pair whose ascent
    stopped inside the ball is marked † (it is left out of the summaries)."""
    labels = {f"{a}-vs-{b}": (claim, label) for claim, a, b, _, label in CLAIMS}
    labels.update({f"kd:{a}-vs-{b}": (claim, label) for claim, a, b, _, label in KD_COMPARISONS})
    labels.update({f"sharpness-{k.split('=')[1]}": ("C2", f"SQuAT - LSQ, sharpness at rho {k.split('=')[1]}")
                   for k in SHARP_KEYS})
    frames = [t for t in tables.values() if not t.empty]
    if not frames:
        return ""
    seeds = sorted({int(s) for t in frames for s in t.seed})
    lines = ["### Per-seed paired differences", "",
             "Each cell is one pair (same task, bits and seed: the same FP start and data order). Sharpness cells "
             "give the difference in L(W0) in brackets; † marks a pair whose ascent stopped inside the ball.", "",
             "| claim | comparison | task | bits | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---|---|---|---|" + "---|" * (len(seeds) + 1)]
    for name, t in tables.items():
        if t.empty:
            continue
        claim, label = labels.get(name, ("", name))
        sharp = name.startswith("sharpness")
        digits = 4 if sharp else 2
        for (task, bits), g in t.groupby(["task", "wbits"], sort=True):
            cells = []
            for s in seeds:
                row = g[g.seed == s]
                if row.empty:
                    cells.append("-")
                    continue
                r = row.iloc[0]
                cell = _f(float(r["diff"]), digits)
                if sharp:
                    cell += f" (L0 {_f(float(r['loss0_diff']), 4)})"
                cells.append(cell + (" †" if bool(r["short"]) else ""))
            usable = g[~g["short"].astype(bool)]["diff"].to_numpy(dtype=float)
            mean = _f(float(usable.mean()), digits) if len(usable) else "-"
            lines.append(f"| {claim} | {label} | {task} | W{bits} | " + " | ".join(cells) + f" | {mean} |")
    lines += [""] + start_loss_correlations(tables)
    return "\n".join(lines) + "\n"


def _constant(x: np.ndarray) -> bool:
    return bool(np.ptp(x) <= 1e-9 * max(1.0, float(np.abs(x).max())))


def start_loss_correlations(tables: dict[str, pd.DataFrame]) -> list[str]:
    """One line per radius: Pearson r between the sharpness difference and the L(W0) difference over the usable
    pairs. A high r says the sharper model of a pair is mostly the one that starts from a higher loss."""
    out = []
    for key in SHARP_KEYS:
        t = tables.get(f"sharpness-{key.split('=')[1]}")
        if t is None or t.empty:
            continue
        u = t[~t["short"].astype(bool)].dropna(subset=["diff", "loss0_diff"])
        if len(u) < 3 or any(_constant(u[c].to_numpy(dtype=float)) for c in ("diff", "loss0_diff")):
            continue  # no spread (rounding aside): no correlation to give
        r = float(np.corrcoef(u["diff"].astype(float), u["loss0_diff"].astype(float))[0, 1])
        out.append(f"- rho {key.split('=')[1]}: over {len(u)} pairs, the sharpness difference and the L(W0) "
                   f"difference correlate with Pearson r = {r:+.2f}.")
    return out


def pairs_csv(tables: dict[str, pd.DataFrame]) -> str:
    frames = [t.assign(comparison=name) for name, t in tables.items() if not t.empty]
    if not frames:
        return "comparison,task,wbits,seed,value_a,value_b,diff,short,loss0_diff\n"
    df = pd.concat(frames)[["comparison", "task", "wbits", "seed", "value_a", "value_b", "diff", "short",
                            "loss0_diff"]]
    return df.to_csv(index=False, float_format="%.6g")
