"""Write the whole report: tables (CSV + Markdown), figures (PNG), and a header on the setup."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from squat_cli.files import staged, write_text
from squat_cli.quant.methods import names_where
from squat_cli.report.claims import claim_summaries, claims_markdown, cost_table, pairs_csv, per_seed_markdown
from squat_cli.report.collect import Collected, collect
from squat_cli.report.compute import compute_markdown, compute_table
from squat_cli.report.figures import figure2, figure3, figure_pairs
from squat_cli.report.stepsizes import step_size_markdown, step_size_table
from squat_cli.report.tables import Table, aggregate, build_tables, to_csv, to_markdown
from squat_cli.report.verdicts import all_verdicts, verdicts_markdown

SAM_QUANTIZED = names_where(uses_sam=True, quantizes=True)
"""The quantized methods whose runs take a SAM radius (the paper's rho)."""
PAPER_SETUP = {
    "model": "bert-base-uncased",
    "fp_epochs": 5.0,
    "qat_epochs": 32.0,
    "wbits": [2, 3, 4],
    "abits": [8],
    "seeds": 3,
}


@dataclass
class Report:
    folder: Path
    tables: list[Table]
    header: list[str]
    skipped: list[tuple[str, str]]
    figures: list[Path]
    note: Optional[str] = None


def _get(recipe: dict, *keys: str) -> Any:
    node: Any = recipe
    for k in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(k)
    return node


def setup_differences(col: Collected) -> list[str]:
    """One line per way the collected runs differ from the paper's setup (empty list: none found)."""
    if not col.recipes:
        return []
    out = []
    fp = [r for r in col.recipes if r["method"] == "fp"]
    qat = [r for r in col.recipes if r["method"] != "fp"]
    models = sorted({str(_get(r["recipe"], "model", "name_or_path")) for r in col.recipes})
    if models != [PAPER_SETUP["model"]]:
        out.append(f"model: {', '.join(models)} (paper: {PAPER_SETUP['model']})")

    def epochs(rs):
        vals = set()
        for r in rs:
            steps = _get(r["recipe"], "train", "max_steps")
            ep = _get(r["recipe"], "train", "epochs")
            if steps:
                vals.add(f"{steps} steps")
            elif isinstance(ep, (int, float)):
                vals.add(f"{ep:g} epoch{'' if ep == 1 else 's'}")
        return sorted(vals)

    if fp and epochs(fp) and epochs(fp) != [f"{PAPER_SETUP['fp_epochs']:g} epochs"]:
        out.append(f"FP fine-tuning: {', '.join(epochs(fp))} (paper: 5 epochs)")
    if qat and epochs(qat) and epochs(qat) != [f"{PAPER_SETUP['qat_epochs']:g} epochs"]:
        out.append(f"QAT: {', '.join(epochs(qat))} (paper: 32 epochs)")
    subsets = sorted({str(_get(r["recipe"], "data", "train_subset")) for r in col.recipes} - {"None"})
    if subsets:
        out.append(f"training data: subsets of {', '.join(subsets)} examples (paper: full training sets)")
    evals = sorted({str(_get(r["recipe"], "data", "eval_subset")) for r in col.recipes} - {"None"})
    if evals:
        out.append(f"dev data: subsets of {', '.join(evals)} examples (paper: full dev sets)")
    wb = sorted({r["wbits"] for r in qat if r["method"] in ("lsq", "squat")})
    if wb and wb != PAPER_SETUP["wbits"]:
        out.append(f"weight bits: {', '.join(f'W{b}' for b in wb)} (paper: W2, W3, W4)")
    ab = sorted({r["abits"] for r in qat if r["method"] in ("lsq", "squat")})
    if ab and ab != PAPER_SETUP["abits"]:
        out.append(f"activation bits: {', '.join(f'A{b}' for b in ab)} (paper: A8)")
    seeds: dict[tuple, set] = {}
    for r in col.recipes:
        seeds.setdefault((r["task"], r["method"], r["wbits"]), set()).add(r["seed"])
    counts = sorted({len(s) for s in seeds.values()})
    if counts != [PAPER_SETUP["seeds"]]:
        out.append(f"seeds per cell: {', '.join(map(str, counts))} (paper: 3)")
    rhos = sorted({(r["wbits"], _get(r["recipe"], "sam", "rho")) for r in qat if r["method"] in SAM_QUANTIZED})
    paper_rho = {2: 0.1, 3: 0.1, 4: 0.15}
    odd = [f"W{b}: {rho}" for b, rho in rhos if rho is not None and paper_rho.get(b) != rho]
    if odd:
        out.append(f"SAM rho: {', '.join(odd)} (paper: 0.1 for W2/W3, 0.15 for W4)")
    bf16 = sorted({r["method"] for r in col.recipes if _get(r["recipe"], "train", "precision") == "bf16"})
    if bf16:
        out.append(f"bf16 autocast in training ({', '.join(bf16)}; paper: fp32)")
    grouped = sorted({r["method"] for r in col.recipes if _get(r["recipe"], "train", "group_by_length")})
    if grouped:
        out.append(f"batches grouped by length ({', '.join(grouped)}; paper: random batches)")
    tasks = sorted({r["task"] for r in col.recipes})
    if len(tasks) < 8:
        out.append(f"tasks: {', '.join(tasks)} only (paper: 8 GLUE tasks)")
    return out


def write_report(runs_root: Path, folder: Path, note: Optional[str] = None, grid_tasks: tuple[str, ...] = (),
                 grid_seeds: int = 3) -> Report:
    """The whole report of ``runs_root`` into ``folder``; ``note`` is printed first (a grid's ``sweep.note``).

    ``grid_tasks`` / ``grid_seeds``: the grid the runs belong to, when known; the claims' verdicts stay
    provisional until every one of its tasks has pairs with that many seeds."""
    col = collect(runs_root)
    tables = build_tables(col.results)
    header = setup_differences(col)
    with staged(folder) as stage:  # the whole set or nothing: an interruption leaves the previous report
        parts = ["# squat results", ""]
        if note:
            parts += [f"> {note}", ""]
        if header:
            parts += ["**This grid differs from the paper's setup** — do not compare it as a replication:", ""]
            parts += [f"- {line}" for line in header] + [""]
        elif not col.results.empty:
            parts += ["Setup matches the paper's (model, epochs, data, bits, seeds).", ""]
        parts += ["Metrics in percent; `paper` is the published number, `Δ` ours minus paper; "
                  "`n` counts seeds; `-` marks a missing run.", ""]
        for t in tables:
            md = to_markdown(t)
            write_text(stage / f"{t.name}.md", md)
            write_text(stage / f"{t.name}.csv", to_csv(t))
            parts += [md, ""]
        agg = aggregate(col.results)
        figures = []
        if figure2(agg, stage / "fig2_sharpness.png"):
            figures.append(folder / "fig2_sharpness.png")
        claims, pair_tables = claim_summaries(col.results)
        if figure3(pair_tables, stage / "fig3_joint_vs_alternate.png"):
            figures.append(folder / "fig3_joint_vs_alternate.png")
        parts += [f"![{p.stem}]({p.name})" for p in figures]
        if figure_pairs(pair_tables, stage / "fig_pairs.png"):
            figures.append(folder / "fig_pairs.png")
            parts += ["![fig_pairs](fig_pairs.png)"]
        if claims:
            verdicts = all_verdicts(col.results, grid_seeds, grid_tasks)
            md = (verdicts_markdown(verdicts, grid_seeds, grid_tasks) + "\n" + claims_markdown(claims, cost_table(col.results))
                  + "\n" + per_seed_markdown(pair_tables))
            write_text(stage / "claims.md", md)
            write_text(stage / "pairs.csv", pairs_csv(pair_tables))
            parts += ["", md]
        steps_md = step_size_markdown(step_size_table(col.results))
        if steps_md:
            write_text(stage / "stepsizes.md", steps_md)
            parts += ["", steps_md]
        compute_md = compute_markdown(compute_table(col.results))
        if compute_md:
            write_text(stage / "compute.md", compute_md)
            parts += ["", compute_md]
        if col.skipped:
            parts += ["", "### Skipped runs", ""] + [f"- `{w}`: {why}" for w, why in col.skipped]
        write_text(stage / "report.md", "\n".join(parts) + "\n")
    return Report(folder, tables, header, col.skipped, figures, note)
