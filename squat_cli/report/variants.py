"""Method variants against reference runs: accuracy, sharpness and cost side by side, with a verdict.

A variants root holds one runs root per variant (``<root>/<variant>/<task>/<method>-wXaY/seed<k>``, the layout
``squat sweep`` writes for a recipe with ``settings``). The reference runs (another runs root, e.g. the
replication grid) give the two anchors of the same task, bits and seed: the ``baseline`` method (cost 1x) and
the ``target`` method whose result the variants try to keep at a lower cost.

Verdict per variant (the rule of docs/efficient-squat.md, fixed before any run):

- it **keeps the target's result within seed noise** if the mean of its paired differences (variant minus
  target, same task, bits and seed) is above minus the target's seed standard deviation (pooled over the bit
  widths: the root mean of the per-(task, bits) variances) and the 95% bootstrap interval of that mean
  contains 0;
- it **meets the cost goal** if the median over its runs of the ratio of its training time to the baseline run
  of the same task, bits and seed is at most ``goal``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from squat_cli.errors import SquatError
from squat_cli.files import staged, write_text
from squat_cli.glue import TASKS
from squat_cli.report.claims import bootstrap_ci, pairs
from squat_cli.report.collect import collect
from squat_cli.report.figures import pyplot, save_png

SHARP_KEYS = ("ascent/rho=0.01", "ascent/rho=0.05")
RUN_COLUMNS = ["method", "task", "wbits", "abits", "seed", "value", "train_time_s", *SHARP_KEYS, "short"]


@dataclass
class VariantVerdict:
    method: str
    pairs: int
    mean: float
    lo: float
    hi: float
    noise: float
    cost: float
    within_noise: Optional[bool]
    """None when it cannot be told: no pairs, or the target has fewer than two seeds in a cell (no noise)."""
    meets_cost: bool


def variant_results(root: Path, reference: Path | Sequence[Path], methods: tuple[str, ...],
                    timing: Optional[Path] = None) -> pd.DataFrame:
    """The long results table (``collect``'s layout) of every variant, each named by its folder, plus the
    reference runs of ``methods`` at the tasks, bit widths and seeds the variants ran. ``timing``: a runs root of
    reruns of reference runs (same recipe, timed beside the variants): their training times replace the reference
    runs' (see ``retime``). Several reference roots: a run of a later root (same method, task, bits and seed)
    replaces the earlier roots' whole, its own time included (``timing`` retimes the first root's runs only)."""
    frames = []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        res = collect(folder).results
        if not res.empty:
            frames.append(res.assign(method=folder.name))
    if not frames:
        raise SquatError(f"no finished variant runs under {root} (expected {root}/<variant>/<task>/...)")
    mine = pd.concat(frames, ignore_index=True)
    if set(mine.method) & set(methods):
        raise SquatError(f"a variant folder under {root} is named like a reference method ({', '.join(methods)})")
    roots = [Path(reference)] if isinstance(reference, (str, Path)) else [Path(r) for r in reference]
    keys = mine[["task", "wbits", "abits", "seed"]].drop_duplicates()

    def reference_runs(at: Path) -> pd.DataFrame:
        res = collect(at).results
        return res[res.method.isin(methods)].merge(keys, on=["task", "wbits", "abits", "seed"])

    ref = reference_runs(roots[0])
    if timing is not None:
        ref = retime(ref, collect(timing).results)
    for later in roots[1:]:
        ref = replace_runs(ref, reference_runs(later), later)
    return pd.concat([mine, ref], ignore_index=True)


def replace_runs(ref: pd.DataFrame, new: pd.DataFrame, source: Path) -> pd.DataFrame:
    """``ref`` with every run that ``new`` holds (same method, task, bits and seed) taken whole from ``new``, and a
    ``replaced`` row per such run (its value: 1.0) naming ``source``. A ``rerun_same`` row of a replaced run goes:
    that timing rerun repeated a run no longer in the table."""
    if new.empty:
        return ref
    runs = new[RUN_KEY].drop_duplicates()
    hit = pd.MultiIndex.from_frame(ref[RUN_KEY]).isin(pd.MultiIndex.from_frame(runs))
    marks = runs.assign(metric="replaced", value=1.0, short=False, source=str(source))
    return pd.concat([ref[~hit], new, marks], ignore_index=True)


RUN_KEY = ["method", "task", "wbits", "abits", "seed"]


def retime(ref: pd.DataFrame, reruns: pd.DataFrame) -> pd.DataFrame:
    """``ref`` with the training time of every run that ``reruns`` repeats (same method, task, bits and seed)
    taken from the rerun, and a ``rerun_same`` row per such run: 1.0 if the rerun's main dev metric equals the
    reference's to 1e-9 points (the same run, timed again), else 0.0. Dev metrics and sharpness stay the
    reference's."""
    def main(frame: pd.DataFrame) -> pd.Series:
        keep = [TASKS[t].main_metric == m for t, m in zip(frame.task, frame.metric)]
        return frame[keep].set_index(RUN_KEY)["value"]

    times = reruns[reruns.metric == "train_time_s"].set_index(RUN_KEY)
    ref_main, rerun_main = main(ref), main(reruns)
    out, extra = ref.copy(), []
    for i, row in out[out.metric == "train_time_s"].iterrows():
        key = tuple(row[k] for k in RUN_KEY)
        if key not in times.index:
            continue
        new = times.loc[[key]].iloc[0]
        out.loc[i, ["value", "short"]] = [float(new["value"]), bool(new["short"])]
        same = key in rerun_main.index and key in ref_main.index and \
            abs(float(rerun_main.loc[[key]].iloc[0]) - float(ref_main.loc[[key]].iloc[0])) <= 1e-9
        extra.append({**dict(zip(RUN_KEY, key)), "metric": "rerun_same", "value": float(same), "loss0": None,
                      "short": False, "delta": None})
    return pd.concat([out, pd.DataFrame(extra, columns=out.columns)], ignore_index=True) if extra else out


def run_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per run: main dev metric, training time, sharpness scores, whether an ascent stopped short."""
    rows = []
    for (method, task, wbits, abits, seed), g in results.groupby(["method", "task", "wbits", "abits", "seed"]):
        by = dict(zip(g.metric, g.value))
        shared = g[(g.metric == "train_time_s") & g["short"].fillna(False).astype(bool)]
        if len(shared):  # timed while other work shared the CPU: no cost figure
            by.pop("train_time_s")
        short = bool(g[g.metric.str.startswith("sharpness:")]["short"].fillna(False).astype(bool).any())
        rows.append({"method": method, "task": task, "wbits": wbits, "abits": abits, "seed": seed,
                     "value": by.get(TASKS[task].main_metric), "train_time_s": by.get("train_time_s"),
                     **{k: by.get(f"sharpness:{k}") for k in SHARP_KEYS}, "short": short})
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def seed_noise(runs: pd.DataFrame, method: str) -> float:
    """Pooled seed standard deviation of ``method``'s main metric: root mean of its per-(task, bits) variances."""
    v = runs[runs.method == method].groupby(["task", "wbits"])["value"].var(ddof=1).dropna()
    return float(np.sqrt(v.mean())) if len(v) else float("nan")


def cost_ratio(runs: pd.DataFrame, method: str, baseline: str) -> float:
    """Median over ``method``'s runs of train time / the ``baseline`` run's of the same task, bits and seed."""
    on = ["task", "wbits", "seed"]
    both = runs[runs.method == method].merge(runs[runs.method == baseline], on=on, suffixes=("", "_b"))
    r = (both["train_time_s"] / both["train_time_s_b"]).dropna()
    return float(r.median()) if len(r) else float("nan")


def verdicts(results: pd.DataFrame, target: str, baseline: str, goal: float) -> list[VariantVerdict]:
    runs = run_table(results)
    noise = seed_noise(runs, target)
    out = []
    for method in sorted(set(runs.method) - {target, baseline}):
        d = pairs(results, method, target)["diff"].to_numpy(dtype=float)
        mean = float(d.mean()) if len(d) else float("nan")
        lo, hi = bootstrap_ci(d)
        cost = cost_ratio(runs, method, baseline)
        within = None if not len(d) or np.isnan(noise) else bool(mean > -noise and lo <= 0 <= hi)
        out.append(VariantVerdict(method, len(d), mean, lo, hi, noise, cost, within, bool(cost <= goal)))
    return out


def summary_table(runs: pd.DataFrame, target: str, baseline: str) -> pd.DataFrame:
    """One row per method and bit width: its runs' mean dev metric and seed standard deviation, the mean paired
    difference to the ``baseline`` run of the same task, bits and seed, mean sharpness, median training time and
    median ratio of it to the baseline run's. Baseline first, then the target, then the variants."""
    on = ["task", "wbits", "seed"]
    base = runs[runs.method == baseline][on + ["value"]]
    order = {m: i for i, m in enumerate([baseline, target])}
    rows = []
    for (method, wbits, abits), g in runs.groupby(["method", "wbits", "abits"]):
        both = g.merge(base, on=on, suffixes=("", "_b"))
        diff = (both["value"] - both["value_b"]).dropna()
        rows.append({"method": method, "wbits": wbits, "abits": abits, "runs": len(g),
                     "mean": g["value"].mean(), "sd": g["value"].std(ddof=1) if len(g) > 1 else float("nan"),
                     "vs_baseline": diff.mean() if len(diff) else float("nan"),
                     **{k: g[k].astype(float).mean() for k in SHARP_KEYS},
                     "train_time_s": g["train_time_s"].astype(float).median(),
                     "ratio": cost_ratio(runs[runs.wbits == wbits], method, baseline),
                     "_order": order.get(method, 2)})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    return out.sort_values(["wbits", "_order", "method"]).drop(columns="_order").reset_index(drop=True)


def _f(v, fmt: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def _yes_no(v: Optional[bool]) -> str:
    return "-" if v is None else ("yes" if v else "no")


def reference_note(results: pd.DataFrame, timing: Optional[Path]) -> list[str]:
    """The lines that say which reference runs come from later reference roots, which runs' times come from
    reruns, and whether the reruns repeated them."""
    lines = []
    replaced = results[results.metric == "replaced"]
    for source, g in (replaced.groupby("source", sort=False) if "source" in replaced else ()):
        names = ", ".join(f"{m} W{w} seed {s}" for m, w, s in g[["method", "wbits", "seed"]].itertuples(index=False))
        lines += [f"{len(g)} reference runs come from `{source}` ({names}), with their own dev metrics, "
                  "sharpness and training times.", ""]
    if timing is None:
        return lines
    same = results[results.metric == "rerun_same"]
    if same.empty:
        return [*lines, f"No reference run was rerun under `{timing}`: every time is the reference's own.", ""]
    names = ", ".join(f"{m} W{w} seed {s}" for m, w, s in same[["method", "wbits", "seed"]].itertuples(index=False))
    return [*lines, f"Training times of {len(same)} reference runs come from their reruns under `{timing}` "
            f"({names}); {int(same.value.sum())} of {len(same)} reruns gave the reference's dev metric exactly. Dev metrics "
            "and sharpness stay the reference's.", ""]


def variants_markdown(runs: pd.DataFrame, found: list[VariantVerdict], target: str, baseline: str, goal: float,
                      note: Optional[list[str]] = None) -> str:
    lines = [*(note or []), "### Per method and bit width", "",
             f"Mean and seed standard deviation of the dev metric; vs {baseline}: mean paired difference to the "
             f"{baseline} run of the same task, bits and seed (points); sharpness: mean over the runs; time: median "
             f"training time of the steps and median per-run ratio to {baseline}'s.", "",
             f"| method | W/A | runs | dev metric | vs {baseline} | sharpness 0.01 | sharpness 0.05 | train s | "
             f"vs {baseline} time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary_table(runs, target, baseline).itertuples(index=False):
        lines.append(f"| {r.method} | {r.wbits}/{r.abits} | {r.runs} | {_f(r.mean)} ± {_f(r.sd)} | "
                     f"{_f(r.vs_baseline, '+.2f')} | {_f(r[7], '.5f')} | {_f(r[8], '.5f')} | "
                     f"{_f(r.train_time_s, '.0f')} | {_f(r.ratio)}x |")
    lines += ["", "### Every run", "",
             "| method | task | W/A | seed | dev metric | train s | vs " + baseline + " | sharpness 0.01 | "
             "sharpness 0.05 |", "|---|---|---|---|---|---|---|---|---|"]
    base = runs[runs.method == baseline].set_index(["task", "wbits", "seed"])["train_time_s"]
    for r in runs.sort_values(["wbits", "method", "task", "seed"]).itertuples(index=False):
        b = base.get((r.task, r.wbits, r.seed))
        ratio = f"{r.train_time_s / b:.2f}x" if b and pd.notna(b) and pd.notna(r.train_time_s) else "-"
        flag = " (ascent short)" if r.short else ""
        lines.append(f"| {r.method} | {r.task} | {r.wbits}/{r.abits} | {r.seed} | {_f(r.value)} | "
                     f"{_f(r.train_time_s, '.0f')} | {ratio} | {_f(r[7], '.5f')} | {_f(r[8], '.5f')}{flag} |")
    lines += ["", f"### Verdict (vs {target}; cost vs {baseline}, goal <= {goal:g}x)", "",
              f"Paired difference: variant minus {target}, same task, bits and seed (points); noise: {target}'s "
              "pooled seed standard deviation; cost: median over the variant's runs of its training time over the "
              f"{baseline} run's.", "",
              "| variant | pairs | mean difference | 95% interval | noise | within noise | cost | meets cost goal |",
              "|---|---|---|---|---|---|---|---|"]
    for v in found:
        lines.append(f"| {v.method} | {v.pairs} | {_f(v.mean, '+.2f')} | [{_f(v.lo, '+.2f')}, {_f(v.hi, '+.2f')}] | "
                     f"{_f(v.noise)} | {_yes_no(v.within_noise)} | {_f(v.cost)}x | "
                     f"{'yes' if v.meets_cost else 'no'} |")
    both = [v.method for v in found if v.within_noise and v.meets_cost]
    lines += ["", f"Variants that do both: {', '.join(both) if both else 'none'}."]
    return "\n".join(lines) + "\n"


def variants_figure(runs: pd.DataFrame, path: Path, target: str, baseline: str) -> bool:
    """Train time (x) against the dev metric (y), one point per run; colour per method, marker per bit width."""
    pts = runs.dropna(subset=["value", "train_time_s"])
    if pts.empty:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = [baseline, target] + sorted(set(pts.method) - {baseline, target})
    markers = dict(zip(sorted(pts.wbits.unique()), "os^Dv"))
    for i, method in enumerate(m for m in order if m in set(pts.method)):
        for wbits, g in pts[pts.method == method].groupby("wbits"):
            ax.scatter(g.train_time_s, g.value, color=f"C{i}", marker=markers[wbits], s=36,
                       label=f"{method} W{wbits}")
    tasks = sorted(pts.task.unique())
    ax.set_xlabel("training time of the steps (s, this machine)")
    ax.set_ylabel(f"dev {', '.join(TASKS[t].main_metric for t in tasks)} ({', '.join(tasks)})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_png(fig, path)
    plt.close(fig)
    return True


def write_variants(root: Path, reference: Path | Sequence[Path], folder: Path, target: str = "squat", baseline: str = "lsq",
                   goal: float = 1.3, timing: Optional[Path] = None) -> list[VariantVerdict]:
    """``variants.csv`` (every run), ``variants.md`` (runs and verdicts) and ``variants.png`` in ``folder``."""
    results = variant_results(root, reference, (target, baseline), timing)
    runs = run_table(results)
    found = verdicts(results, target, baseline, goal)
    with staged(folder, "variants") as stage:
        write_text(stage / "variants.csv", runs.to_csv(index=False, float_format="%.6g"))
        write_text(stage / "variants.md", variants_markdown(runs, found, target, baseline, goal,
                                                            reference_note(results, timing)))
        variants_figure(runs, stage / "variants.png", target, baseline)
    return found
