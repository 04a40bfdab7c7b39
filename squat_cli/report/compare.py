"""Two runs roots side by side: how each paired comparison changes from one grid to the other.

The question of a follow-up grid is often not "does SQuAT beat LSQ" but "does SQuAT - LSQ grow when the schedule
is longer" (or the data larger, or the model another). Both grids ran the same tasks, bit widths and seeds from the
same FP models, so each (task, bits, seed) gives one difference per grid, and their difference (a difference of
differences) is paired too:

    change = (a - b in the grid under study) - (a - b in the reference grid), same task, bits and seed

Each comparison of ``claims`` (C1, C3, C4, and the distillation study's) that has pairs in both roots gets a row per
bit width and one pooled: the mean difference in each grid, the mean change, its 95% bootstrap interval and
Wilcoxon p (``claims.summarize``'s statistics). Each method present in both roots also gets its own change
(method in the grid under study minus the same method in the reference, same task, bits and seed). Only the
(task, bits, seed) cells both grids hold are compared: a cell missing from either is left out and counted.

FP runs: a grid that quantizes the reference's FP models (``sweep.fp_runs``) has none of its own; its comparisons
against FP then use the reference's FP runs (the same models), and the page says so.

What differs between the grids is read from the runs' stored recipes: every recipe key whose value differs
between matched runs (same method, task, bits and seed); the data folder aside (it says where the data lay).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from squat_cli.errors import SquatError
from squat_cli.files import staged, write_text
from squat_cli.report.claims import CLAIMS, KD_COMPARISONS, Summary, main_rows, pairs, summarize
from squat_cli.report.collect import collect

IGNORED_KEYS = ("data.data_dir",)
"""Recipe keys that say where the data lay on the machine that ran, not what ran."""


@dataclass
class Change:
    comparison: str
    bits: str
    n: int
    ref_mean: float
    mean: float
    change: Summary
    left_out: int


@dataclass
class Comparison:
    label: str
    reference_label: str
    changes: list[Change]
    per_seed: pd.DataFrame
    differs: dict[str, tuple[list[Any], list[Any]]]
    fp_from_reference: bool


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; anything but a mapping (an unreadable recipe) -> {}."""
    out: dict[str, Any] = {}
    for k, v in (d.items() if isinstance(d, dict) else ()):
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_differences(mine: list[dict], ref: list[dict]) -> dict[str, tuple[list[Any], list[Any]]]:
    """Recipe keys whose value differs between matched runs: key -> (reference's values, this grid's values)."""
    index = {(r["method"], r["task"], r["wbits"], r["seed"]): _flatten(r["recipe"]) for r in ref}
    found: dict[str, tuple[set, set]] = {}
    for r in mine:
        other = index.get((r["method"], r["task"], r["wbits"], r["seed"]))
        if other is None:
            continue
        flat = _flatten(r["recipe"])
        for key in sorted(set(flat) | set(other)):
            if key in IGNORED_KEYS:
                continue
            a, b = other.get(key), flat.get(key)
            if a != b:
                refs, mines = found.setdefault(key, (set(), set()))
                refs.add(repr(a))
                mines.add(repr(b))
    return {k: (sorted(a), sorted(b)) for k, (a, b) in sorted(found.items())}


def _with_fp(results: pd.DataFrame, reference: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    if not results.empty and (results.method == "fp").any():
        return results, False
    fp = reference[reference.method == "fp"] if not reference.empty else reference
    if fp.empty:
        return results, False
    return pd.concat([results, fp], ignore_index=True), True


def compare_roots(root: Path, reference: Path, label: str = "", reference_label: str = "") -> Comparison:
    mine = collect(Path(root))
    ref = collect(Path(reference))
    if mine.results.empty:
        raise SquatError(f"no finished runs under {root}")
    if ref.results.empty:
        raise SquatError(f"no finished runs under {reference}")
    results, fp_from_reference = _with_fp(mine.results, ref.results)
    comparisons: list[tuple[str, str, str]] = []
    for _, a, b, metric, name in CLAIMS + KD_COMPARISONS:  # C4's pairs come again as KD's "every width": once
        if metric == "main" and (a, b) not in {(x, y) for _, x, y in comparisons}:
            comparisons.append((name.replace(", main dev metric (points)", ""), a, b))
    comparisons += [(f"{m} (same method)", m, m) for m in sorted(set(mine.results.method) & set(ref.results.method))
                    if m != "fp"]
    changes: list[Change] = []
    seeds: list[pd.DataFrame] = []
    keys = ["task", "wbits", "seed"]
    for name, a, b in comparisons:
        if a == b:  # one method's own score in the two grids
            p_mine, p_ref = _main_values(results, a), _main_values(ref.results, a)
        else:
            p_mine, p_ref = pairs(results, a, b), pairs(ref.results, a, b)
            p_mine, p_ref = p_mine[keys + ["diff"]], p_ref[keys + ["diff"]]
        if p_mine.empty or p_ref.empty:
            continue
        both = p_mine.merge(p_ref, on=keys, suffixes=("", "_ref"))
        if both.empty:
            continue
        both = both.assign(change=both["diff"] - both["diff_ref"])
        seeds.append(both[keys + ["diff_ref", "diff", "change"]].assign(comparison=name))
        for s in summarize("", name, both[keys + ["change"]].rename(columns={"change": "diff"}).assign(short=False)):
            g = both if s.bits == "all" else both[both.wbits == int(s.bits[1:])]
            p_m = p_mine if s.bits == "all" else p_mine[p_mine.wbits == int(s.bits[1:])]
            p_r = p_ref if s.bits == "all" else p_ref[p_ref.wbits == int(s.bits[1:])]
            changes.append(Change(name, s.bits, s.n, float(g["diff_ref"].mean()), float(g["diff"].mean()), s,
                                  len(p_m) + len(p_r) - 2 * len(g)))
    if not changes:
        raise SquatError(f"no comparison has pairs in both {root} and {reference} (same task, bits and seed)")
    per_seed = pd.concat(seeds, ignore_index=True) if seeds else pd.DataFrame()
    differs = recipe_differences(mine.recipes, ref.recipes)
    return Comparison(label or Path(root).name, reference_label or Path(reference).name, changes, per_seed, differs,
                      fp_from_reference)


def _main_values(results: pd.DataFrame, method: str) -> pd.DataFrame:
    """One row per (task, wbits, seed) of ``method``: its main dev metric as ``diff`` (compared as is)."""
    rows = main_rows(results[results.method == method])
    return rows[["task", "wbits", "seed", "value"]].rename(columns={"value": "diff"})


def _f(v: float) -> str:
    return "-" if v is None or np.isnan(v) else f"{v:+.2f}"


def compare_markdown(c: Comparison) -> str:
    lines = [f"# {c.label} against {c.reference_label}", "",
             "Each comparison is paired by task, bits and seed in both grids; `change` is its difference in "
             f"*{c.label}* minus its difference in *{c.reference_label}*, per (task, bits, seed), with its mean, 95% "
             "bootstrap interval, pairs up / down and two-sided Wilcoxon p. `(same method)` rows compare one "
             "method's own score across the grids. Main dev metric, points.", ""]
    if c.differs:
        lines += ["What differs between the grids' runs (their stored recipes):", ""]
        for key, (a, b) in c.differs.items():
            lines.append(f"- `{key}`: {', '.join(a)} -> {', '.join(b)}")
        lines.append("")
    if c.fp_from_reference:
        lines += [f"*{c.label}* has no FP runs of its own: its comparisons against FP use *{c.reference_label}*'s FP "
                  "runs (the models its runs start from).", ""]
    lines += [f"| comparison | bits | pairs | {c.reference_label} | {c.label} | change | 95% interval | +/- | p | "
              "left out |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ch in c.changes:
        s = ch.change
        p = "-" if np.isnan(s.p) else f"{s.p:.3g}"
        same = ch.comparison.endswith("(same method)")
        ref_mean = f"{ch.ref_mean:.2f}" if same else _f(ch.ref_mean)
        mean = f"{ch.mean:.2f}" if same else _f(ch.mean)
        lines.append(f"| {ch.comparison} | {ch.bits} | {ch.n} | {ref_mean} | {mean} | {_f(s.mean)} | "
                     f"[{_f(s.lo)}, {_f(s.hi)}] | {s.wins}/{s.losses} | {p} | {ch.left_out} |")
    if not c.per_seed.empty:
        lines += ["", "### Per seed: change (reference's difference -> this grid's)", "",
                  "| comparison | task | bits | seed | " + f"{c.reference_label} | {c.label} | change |",
                  "|---|---|---|---|---|---|---|"]
        for r in c.per_seed.sort_values(["comparison", "wbits", "task", "seed"]).itertuples(index=False):
            same = r.comparison.endswith("(same method)")
            fmt = (lambda v: f"{v:.2f}") if same else _f
            lines.append(f"| {r.comparison} | {r.task} | W{r.wbits} | {r.seed} | {fmt(r.diff_ref)} | {fmt(r.diff)} | "
                         f"{_f(r.change)} |")
    return "\n".join(lines) + "\n"


def write_compare(root: Path, reference: Path, reports: Path, label: str = "", reference_label: str = "") \
        -> Comparison:
    """compare.md and compare.csv (one row per comparison, bits) in ``reports``, written whole or not at all."""
    c = compare_roots(root, reference, label, reference_label)
    rows = [{"comparison": ch.comparison, "bits": ch.bits, "pairs": ch.n, "reference_mean": ch.ref_mean,
             "mean": ch.mean, "change": ch.change.mean, "lo": ch.change.lo, "hi": ch.change.hi,
             "up": ch.change.wins, "down": ch.change.losses, "p": ch.change.p, "left_out": ch.left_out}
            for ch in c.changes]
    with staged(Path(reports)) as out:
        write_text(out / "compare.md", compare_markdown(c))
        write_text(out / "compare.csv", pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))
    return c
