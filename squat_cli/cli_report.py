"""``squat report``: tables and figures from run folders, as subcommands (results, search, variants).

The old spelling (``squat report --out R [--search [--reference ...]]``) still works for one release and says
which subcommand replaces it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from squat_cli.cli_base import _fail, _run, app, console, err_console

report_app = typer.Typer(help="Tables and figures from run folders: results (Tables 1-4, figures, claims), "
                         "search (a settings search), variants (SQuAT variants against reference runs), compare "
                         "(how each paired comparison changes from one grid to another).",
                         no_args_is_help=False, rich_markup_mode=None,
                         context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(report_app, name="report")

RunsOpt = typer.Option(Path("runs"), "--out", "-o", help="Runs root folder.")
ReportsOpt = typer.Option(Path("reports"), "--reports", help="Folder for tables and figures.")
GridOpt = typer.Option(None, "--grid", help="The grid recipe the runs come from: its note heads the report, and "
                       "the claims' verdicts stay provisional until each of its tasks has pairs with all its seeds.")
ReferenceOpt = typer.Option(None, "--reference", help="A runs root with the LSQ and SQuAT runs of the same task, "
                            "bits and seed. Repeatable: a later root's runs replace the same runs of the earlier ones.")
TimingOpt = typer.Option(None, "--timing", help="A runs root of reruns of reference runs, timed beside the variants; "
                         "their training times replace the reference runs' (dev metrics stay the reference's).")


def _need_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        _fail(f"{what} {path} does not exist" + ("; run squat finetune/quantize (or squat sweep) first"
                                                  if what == "runs folder" else ""))


@report_app.command("results", epilog="Example: squat report results --out runs --reports reports")
def results(out: Path = RunsOpt, reports: Path = ReportsOpt, grid: Optional[Path] = GridOpt) -> None:
    """Tables 1-4 (CSV, Markdown), Figures 2-3 (PNG) and the paired claims, beside the paper's numbers."""
    _need_dir(out, "runs folder")
    _results(out, reports, grid)


@report_app.command("search", epilog="Example: squat report search --out runs/search --reports reports/search")
def search(out: Path = RunsOpt, reports: Path = ReportsOpt) -> None:
    """A settings search (one runs root per setting under --out): search.csv and search.md, every run."""
    _need_dir(out, "runs folder")
    write_search_report(out, reports)


@report_app.command("variants", epilog="Example: squat report variants --out runs/variants --reference runs "
                    "--reports reports/variants")
def variants(out: Path = RunsOpt, reports: Path = ReportsOpt, reference: list[Path] = ReferenceOpt,
             timing: Optional[Path] = TimingOpt) -> None:
    """SQuAT variants (a settings search under --out) against the reference runs: variants.md/.csv/.png, and the
    search table."""
    _need_dir(out, "runs folder")
    if not reference:
        _fail("--reference: give the runs root of the LSQ and SQuAT runs to compare with")
    _variants(out, reports, list(reference), timing)


@report_app.command("compare", epilog="Example: squat report compare --out runs/long --reference runs "
                    "--label '8 epochs' --reference-label '2 epochs' --reports reports/long")
def compare(out: Path = RunsOpt, reports: Path = ReportsOpt,
            reference: Optional[Path] = typer.Option(None, "--reference", help="The runs root to compare with: the "
                                                     "same tasks, bits and seeds from the same FP models."),
            label: str = typer.Option("", "--label", help="What --out's grid is called on the page (default: its "
                                      "folder name)."),
            reference_label: str = typer.Option("", "--reference-label", help="What the reference grid is called "
                                                "(default: its folder name).")) -> None:
    """Each paired comparison (SQuAT - LSQ, ..., and each method's own score) in --out against --reference, and how
    it changes, paired by task, bits and seed: compare.md and compare.csv."""
    _need_dir(out, "runs folder")
    if reference is None:
        _fail("--reference: give the runs root to compare with")
    _need_dir(reference, "reference runs folder")
    from squat_cli.report.compare import write_compare

    c = _run(write_compare, out, reference, reports, label, reference_label)
    for ch in c.changes:
        if ch.bits == "all" or len({x.bits for x in c.changes if x.comparison == ch.comparison}) == 1:
            s, sign = ch.change, "" if ch.comparison.endswith("(same method)") else "+"
            console.print(f"{ch.comparison} [{ch.bits}]: {ch.ref_mean:{sign}.2f} -> {ch.mean:{sign}.2f}, change "
                          f"{s.mean:+.2f} "
                          f"[{s.lo:+.2f}, {s.hi:+.2f}] over {ch.n} pairs", highlight=False, markup=False)
    console.print(f"compare -> {reports / 'compare.md'}", highlight=False, markup=False)


@report_app.callback(invoke_without_command=True)
def report(
    ctx: typer.Context,
    out: Path = RunsOpt,
    reports: Path = ReportsOpt,
    search: bool = typer.Option(False, "--search", help="Old spelling of `squat report search`."),
    reference: Optional[list[Path]] = typer.Option(None, "--reference", help="Old spelling: with --search, "
                                                   "`squat report variants --reference`."),
    timing: Optional[Path] = typer.Option(None, "--timing", help="Old spelling: with --reference."),
    grid: Optional[Path] = GridOpt,
) -> None:
    """Tables and figures from run folders: `squat report results|search|variants|compare` (the old flags still
    work)."""
    if ctx.invoked_subcommand is not None:
        return
    reference = list(reference or [])
    if reference and not search:
        _fail("--reference compares variants: give it with --search")
    if grid is not None and search:
        _fail("--grid names the grid of a results report; a --search report does not use it")
    if timing is not None and not reference:
        _fail("--timing retimes reference runs: give it with --search --reference")
    new = "variants" if reference else ("search" if search else "results")
    err_console.print(f"notice: `squat report` without a subcommand is deprecated and goes in the next release; "
                      f"use `squat report {new}`", highlight=False)
    _need_dir(out, "runs folder")
    if reference:
        _variants(out, reports, reference, timing)
    elif search:
        write_search_report(out, reports)
    else:
        _results(out, reports, grid)


def _results(out: Path, reports: Path, grid: Optional[Path]) -> None:
    from squat_cli.report.build import write_report

    if grid is not None:
        from squat_cli import sweep as S

        g = _run(S.load_grid, grid)
        rep = _run(write_report, out, reports, g.sweep.note, tuple(g.tasks), len(g.seeds))
    else:
        rep = _run(write_report, out, reports)
    print_report(rep)


def _variants(out: Path, reports: Path, reference: list[Path], timing: Optional[Path]) -> None:
    for ref in reference:
        _need_dir(ref, "reference runs folder")
    if timing is not None:
        _need_dir(timing, "timing runs folder")
    write_search_report(out, reports)
    from squat_cli.report.variants import write_variants

    found = _run(write_variants, out, reference, reports, timing=timing)
    for v in found:
        console.print(f"{v.method}: {v.mean:+.2f} points vs squat ({v.pairs} pairs), {v.cost:.2f}x lsq; "
                      f"within noise: {'-' if v.within_noise is None else ('yes' if v.within_noise else 'no')}, cost goal: "
                      f"{'yes' if v.meets_cost else 'no'}")
    console.print(f"variants -> {reports / 'variants.md'}")


def write_search_report(out: Path, reports: Path) -> None:
    from squat_cli.report.search import write_search

    df = _run(write_search, out, reports)
    done = int((df["status"] == "done").sum()) if not df.empty else 0
    console.print(f"search: {len(df)} runs ({done} finished) -> {reports / 'search.md'}")


def print_report(rep) -> None:
    from squat_cli.report.tables import cell_text

    if rep.note:
        console.print(f"[bold]{rep.note}[/]", highlight=False)
    if rep.header:
        console.print("[bold yellow]This grid differs from the paper's setup:[/]")
        for line in rep.header:
            console.print(f"  - {line}", highlight=False)
    t1 = rep.tables[0]
    table = Table(title=t1.title)
    table.add_column("method")
    table.add_column("W/A")
    shown = [c for c in t1.columns if not t1.frame.empty and t1.frame[f"{c}_n"].sum() > 0]
    for c in shown:
        table.add_column(c, justify="right")
    for _, row in t1.frame.iterrows():
        table.add_row(row["method"], row["W/A"], *[cell_text(row, c, 2) for c in shown])
    console.print(table)
    for where, why in rep.skipped:
        err_console.print(f"skipped {where}: {why}", highlight=False)
    console.print(f"report: {rep.folder / 'report.md'}; figures: {', '.join(str(p) for p in rep.figures) or 'none'}")
