"""A verdict on each of the paper's claims C1-C4, by decision rules fixed before the results they judge.

Every rule works on cells of paired differences (``claims.pairs``: same task,
bits and seed) and the 95% percentile bootstrap interval of a cell's mean
difference (``claims.bootstrap_ci``). A cell is *for* the claim when its whole
interval lies on the claim's side of 0, *against* it when its whole interval
lies on the other side, and *undecided* otherwise. A claim made for every cell
("at W2, W3 and W4", "on every task") then reads:

- ``holds``: every cell for it;
- ``partly``: some cells for it, not all;
- ``contradicted``: no cell for it and at least one against;
- ``not shown``: every cell undecided.

- C1, SQuAT beats LSQ at W2, W3 and W4: cells are bit widths, pairs SQuAT -
  LSQ over tasks and seeds, "for" above 0. The pooled interval is shown, and
  whether it holds the paper's "about 1 point".
- C2, SQuAT's minima are flatter than LSQ's at rho 0.01 and 0.05 on every
  task: cells are (task, radius), pairs SQuAT - LSQ sharpness over bit widths
  and seeds whose ascents both reached the ball's edge, "for" below 0. The mean
  difference in starting loss L(W0) is shown beside it.
- C3, joint SAM+LSQ underperforms the alternating update, and often LSQ
  itself: cells are the bit widths joint ran at, pairs joint - SQuAT, "for"
  below 0; the second half is stated as a count (joint under LSQ in k of n
  pairs; "often" when k >= n / 2).
- C4, at W3/W4 SQuAT sometimes beats the FP model: cells are (task, bits) at
  W3 and W4, pairs SQuAT - FP of the same seed. It holds when at least one
  cell's mean is above 0 ("sometimes"); cells whose interval lies above 0 are
  counted beside it. Otherwise ``not observed``.

A verdict is ``provisional`` while any cell it rests on has fewer pairs per
task than ``min_seeds`` (the grid's seed count), or while a task that has runs
in the folder (its FP runs, say, early in a grid), or that the grid holds
(``expected``, when the report knows its grid), has no pairs for the claim. The percentile bootstrap is
narrow for few pairs: a cell of 3 pairs is "for" only when all 3 are on the
claim's side, which is weak evidence on its own; the pairs are shown so that a
reader can weigh it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from squat_cli.report.claims import SHARP_KEYS, bootstrap_ci, pairs

PAPER_GAIN = 1.0  # C1's "about 1 point on average"


@dataclass
class ClaimVerdict:
    claim: str
    verdict: str
    evidence: str
    provisional: bool


@dataclass
class Cell:
    label: str
    n: int
    mean: float
    lo: float
    hi: float
    side: str  # "for", "against" or "undecided"


def cell(label: str, diffs: np.ndarray, sign: int) -> Cell:
    """``sign`` +1: the claim says the difference is above 0; -1: below 0."""
    d = np.asarray(diffs, dtype=float)
    lo, hi = bootstrap_ci(d)
    side = "undecided"
    if len(d) and (lo > 0 if sign > 0 else hi < 0):
        side = "for"
    elif len(d) and (hi < 0 if sign > 0 else lo > 0):
        side = "against"
    return Cell(label, len(d), float(d.mean()) if len(d) else float("nan"), lo, hi, side)


def combine(cells: list[Cell]) -> str:
    sides = [c.side for c in cells]
    if not cells:
        return "no data"
    if all(s == "for" for s in sides):
        return "holds"
    if "for" in sides:
        return "partly"
    return "contradicted" if "against" in sides else "not shown"


def _few_seeds(df: pd.DataFrame, min_seeds: int) -> bool:
    """A (task, bits) group of pairs with fewer seeds than the grid's."""
    if df.empty:
        return True
    return bool((df.groupby(["task", "wbits"])["seed"].nunique() < min_seeds).any())


def _missing_tasks(results: pd.DataFrame, found: pd.DataFrame, expected: tuple[str, ...] = ()) -> bool:
    """A task with runs in the folder, or one the grid holds (``expected``), with no pairs for the claim (yet)."""
    return bool((set(results.task) | set(expected)) - set(found.task)) if len(found) else True


def _cells_text(cells: list[Cell], digits: int = 2) -> str:
    return "; ".join(f"{c.label} {c.mean:+.{digits}f} [{c.lo:+.{digits}f}, {c.hi:+.{digits}f}] (n={c.n}, {c.side})"
                     for c in cells)


def c1(results: pd.DataFrame, min_seeds: int, expected: tuple[str, ...] = ()) -> ClaimVerdict:
    p = pairs(results, "squat", "lsq")
    cells = [cell(f"W{b}", p[p.wbits == b]["diff"].to_numpy(), +1) for b in sorted(p.wbits.unique())]
    text = _cells_text(cells)
    if len(p):
        lo, hi = bootstrap_ci(p["diff"].to_numpy(dtype=float))
        inside = "inside" if lo <= PAPER_GAIN <= hi else "outside"
        text += (f". Pooled over {len(p)} pairs: {p['diff'].mean():+.2f} [{lo:+.2f}, {hi:+.2f}]; the paper's "
                 f"+{PAPER_GAIN:g} is {inside} it")
    return ClaimVerdict("C1", combine(cells), text, _few_seeds(p, min_seeds) or _missing_tasks(results, p, expected))


def c2(results: pd.DataFrame, min_seeds: int, expected: tuple[str, ...] = ()) -> ClaimVerdict:
    cells, loss0, left_out, few = [], [], [], False
    for key in SHARP_KEYS:
        p = pairs(results, "squat", "lsq", key)
        rho = key.split("=")[1]
        if len(p) and p["short"].any():
            n = int(p["short"].sum())
            left_out.append(f"{n} pair{'s' if n > 1 else ''} at rho {rho}")
            p = p[~p["short"]]
        few = few or _few_seeds(p, min_seeds) or _missing_tasks(results, p, expected)
        for task in sorted(p.task.unique()):
            t = p[p.task == task]
            cells.append(cell(f"{task} rho {rho}", t["diff"].to_numpy(), -1))
            loss0.append(float(pd.to_numeric(t["loss0_diff"], errors="coerce").mean()))
    text = _cells_text(cells, 4)
    if loss0 and not all(np.isnan(loss0)):
        text += f". Mean L(W0) difference SQuAT - LSQ over the cells: {np.nanmean(loss0):+.4f}"
    if left_out:
        text += ". Left out (an ascent stopped inside the ball): " + ", ".join(left_out)
    return ClaimVerdict("C2", combine(cells), text, few or not cells)


def c3(results: pd.DataFrame, min_seeds: int, expected: tuple[str, ...] = ()) -> ClaimVerdict:
    p = pairs(results, "joint", "squat")
    cells = [cell(f"W{b}", p[p.wbits == b]["diff"].to_numpy(), -1) for b in sorted(p.wbits.unique())]
    text = "joint - SQuAT: " + _cells_text(cells) if cells else "no joint/SQuAT pairs"
    q = pairs(results, "joint", "lsq")
    if len(q):
        k = int((q["diff"] < 0).sum())
        often = "often" if k >= len(q) / 2 else "not often"
        text += f". joint under LSQ in {k} of {len(q)} pairs ({often}), mean {q['diff'].mean():+.2f}"
    return ClaimVerdict("C3", combine(cells), text, _few_seeds(p, min_seeds) or _missing_tasks(results, p, expected))


def c4(results: pd.DataFrame, min_seeds: int, expected: tuple[str, ...] = ()) -> ClaimVerdict:
    p = pairs(results, "squat", "fp")
    p = p[p.wbits.isin([3, 4])] if len(p) else p
    cells = [cell(f"{task} W{b}", g["diff"].to_numpy(), +1) for (b, task), g in p.groupby(["wbits", "task"])]
    above = [c for c in cells if c.mean > 0]
    sure = [c for c in cells if c.side == "for"]
    verdict = "no data" if not cells else ("holds" if above else "not observed")
    text = (f"{len(above)} of {len(cells)} (task, bits) cells have SQuAT's mean above FP's"
            + (f" ({', '.join(c.label for c in above)})" if above else "")
            + f"; {len(sure)} with the whole interval above 0. " + _cells_text(cells))
    return ClaimVerdict("C4", verdict, text, _few_seeds(p, min_seeds) or _missing_tasks(results, p, expected))


def all_verdicts(results: pd.DataFrame, min_seeds: int = 3, expected: tuple[str, ...] = ()) -> list[ClaimVerdict]:
    """``expected``: the tasks of the grid the runs belong to (a verdict stays provisional until each has pairs)."""
    if results.empty:
        return []
    e = tuple(expected)
    return [c1(results, min_seeds, e), c2(results, min_seeds, e), c3(results, min_seeds, e),
            c4(results, min_seeds, e)]


def verdicts_markdown(found: list[ClaimVerdict], min_seeds: int = 3, expected: tuple[str, ...] = ()) -> str:
    lines = ["### Verdicts", "",
             "By the decision rules of `squat_cli/report/verdicts.py`: a cell is "
             "*for* a claim when its 95% bootstrap interval lies wholly on the claim's side of 0, *against* when "
             "wholly on the other side. `provisional`: some cell has fewer than "
             f"{min_seeds} seeds, or a task with runs here"
             + (f" or in the grid ({', '.join(expected)})" if expected else "")
             + " has no pairs for the claim yet.", "",
             "| claim | verdict | evidence (mean [95% interval], pairs) |", "|---|---|---|"]
    for v in found:
        verdict = f"{v.verdict} (provisional)" if v.provisional else v.verdict
        lines.append(f"| {v.claim} | {verdict} | {v.evidence} |")
    return "\n".join(lines) + "\n"
