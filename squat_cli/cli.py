"""The ``squat`` command line: parse options, load a recipe, call the core. Nothing else lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from squat_cli.cli_base import (
    DataOpt,
    EpochsOpt,
    ForceOpt,
    OutOpt,
    RecipeOpt,
    ResumeOpt,
    SeedOpt,
    SetOpt,
    TaskOpt,
    _fail,
    _run,
    app,
    console,
    err_console,
)
from squat_cli.errors import SquatError
from squat_cli.quant import methods


def _summary(title: str, metrics: dict, run_path: Path, skipped: bool) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("task", "method", "wbits", "abits", "seed"):
        if key in metrics:
            table.add_row(key, str(metrics[key]))
    from squat_cli.glue import get_task

    task = get_task(metrics.get("task", "cola"))
    for key in task.metric_names():
        if key in metrics:
            table.add_row(key, f"{100 * metrics[key]:.2f}")
    fp = metrics.get("fp_metrics")
    if fp and task.main_metric in fp:
        table.add_row(f"FP {task.main_metric}", f"{100 * fp[task.main_metric]:.2f}")
    for key in ("eval_loss", "steps", "wall_time_s"):
        if metrics.get(key) is not None:
            v = metrics[key]
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    console.print(f"{'already done, skipped (use --force to rerun)' if skipped else 'run folder'}: {run_path}")


@app.command(epilog="Example: squat finetune --task cola --model packaged-minilm --set train.epochs=1")
def finetune(
    task: Optional[str] = TaskOpt,
    recipe: Optional[Path] = RecipeOpt,
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Hub id or local folder (default bert-base-uncased); packaged-minilm = all-MiniLM-L6-v2."
    ),
    data_dir: Optional[Path] = DataOpt,
    out: Path = OutOpt,
    seed: Optional[int] = SeedOpt,
    epochs: Optional[float] = EpochsOpt,
    set_: Optional[list[str]] = SetOpt,
    force: bool = ForceOpt,
    resume: bool = ResumeOpt,
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow code from the model repo to run."),
) -> None:
    """Fine-tune a full-precision model on a GLUE task into runs/<task>/fp/seed<k>/."""
    from squat_cli import training
    from squat_cli.progress import RichReporter
    from squat_cli.recipe import load_recipe

    overrides = {"data.task": task, "model.name_or_path": model, "data.data_dir": str(data_dir) if data_dir else None,
                 "train.seed": seed, "train.epochs": epochs, "model.trust_remote_code": trust_remote_code or None}
    rec = _run(load_recipe, recipe, overrides, set_)
    res = _run(training.finetune, rec, out, force=force, reporter=RichReporter(err_console), resume=resume)
    _summary("finetune", res.metrics, res.run.path, res.skipped)


@app.command(epilog="Example: squat quantize --task rte --method squat --wbits 2 --abits 8 --rho 0.1")
def quantize(
    task: Optional[str] = TaskOpt,
    method: Optional[str] = typer.Option(None, "--method", help=f"{methods.help_text()} (default squat)."),
    wbits: Optional[int] = typer.Option(None, "--wbits", help="Weight bits, 2..8 (default 4)."),
    abits: Optional[int] = typer.Option(None, "--abits", help="Activation bits, 2..32; 32 = not quantized (default 8)."),
    rho: Optional[float] = typer.Option(None, "--rho", help="SAM radius (default: 0.1 for 2/3-bit, 0.15 for 4-bit)."),
    recipe: Optional[Path] = RecipeOpt,
    from_: Optional[Path] = typer.Option(None, "--from", help="FP run folder to start from (default runs/<task>/fp/seed<k>)."),
    data_dir: Optional[Path] = DataOpt,
    out: Path = OutOpt,
    seed: Optional[int] = SeedOpt,
    epochs: Optional[float] = EpochsOpt,
    set_: Optional[list[str]] = SetOpt,
    force: bool = ForceOpt,
    resume: bool = ResumeOpt,
    distill: bool = typer.Option(False, "--distill", help="Distil from the FP run (the recommended setting of "
                                 "docs/distillation.md; the recipe's distill section or --set distill.* refine it)."),
) -> None:
    """Quantize an FP run (QAT with LSQ/SQuAT/baselines, or PTQ) into runs/<task>/<method>-w<W>a<A>/seed<k>/."""
    from squat_cli import training
    from squat_cli.progress import RichReporter
    from squat_cli.recipe import DISTILL_DEFAULTS, QUANTIZE_DEFAULTS, load_recipe

    if abits is None and method in methods.METHODS and methods.get_method(method).weight_only:
        abits = 32  # a weight-only method (GOBO) keeps activations in FP32
    overrides = {"data.task": task, "quant.method": method, "quant.wbits": wbits, "quant.abits": abits,
                 "sam.rho": rho, "data.data_dir": str(data_dir) if data_dir else None, "train.seed": seed,
                 "train.epochs": epochs}
    rec = _run(load_recipe, recipe, overrides, set_, base={**QUANTIZE_DEFAULTS, **(DISTILL_DEFAULTS if distill else {})})
    res = _run(training.quantize, rec, out, from_path=from_, force=force, reporter=RichReporter(err_console),
               resume=resume)
    _summary("quantize", res.metrics, res.run.path, res.skipped)


@app.command(epilog="Example: squat sharpness --rho 0.05 --out runs")
def sharpness(
    rho: float = typer.Option(..., "--rho", help="Radius of the L2 ball (paper: 0.01 and 0.05)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Measure this run folder only."),
    out: Path = OutOpt,
    method: str = typer.Option("ascent", "--method", help="ascent (Algorithm 2) or keskar (L-BFGS-B in a box)."),
    steps: int = typer.Option(10, "--steps", help="Ascent steps."),
    lr: float = typer.Option(0.5, "--lr", help="Ascent step: a fraction of rho (normalized) or the gradient's "
                             "multiplier (raw)."),
    step: str = typer.Option("normalized", "--step", help="ascent: normalized (steps of lr*rho along the "
                             "gradient; reaches the ball's edge) or raw (Algorithm 2 as printed)."),
    examples: int = typer.Option(256, "--examples", help="Examples the loss is measured on."),
    split: str = typer.Option("train", "--split", help="train or dev."),
    seed: int = typer.Option(0, "--seed", help="Seed for the example sample (and keskar's subspace)."),
    subspace: int = typer.Option(10, "--subspace", help="keskar: random subspace dimension."),
    data_dir: Optional[Path] = DataOpt,
    force: bool = typer.Option(False, "--force", help="Measure again runs that already have this score."),
) -> None:
    """Measure how flat each trained model is; scores go to sharpness.json in each run folder."""
    from squat_cli import sharpness_jobs
    from squat_cli.progress import RichReporter
    from squat_cli.sharpness_settings import SharpnessSettings

    settings = _run(SharpnessSettings(rho=rho, method=method, steps=steps, lr=lr, examples=examples, split=split,
                                      seed=seed, subspace=subspace, step=step).validate, lambda key: f"--{key}")
    todo = _run(sharpness_jobs.sharpness_runs, out, run, settings, force)
    if not todo:
        console.print(f"nothing to measure: every complete run under {out} has {settings.key()}")
        return
    table = Table(title=f"sharpness ({settings.key()})")
    for col in ("run", "score", "L(W0)", "L(W_T)", "||delta_T||"):
        table.add_column(col, justify="right" if col != "run" else "left")
    damaged = []
    for r in todo:
        try:
            e = sharpness_jobs.measure_sharpness(r, settings, str(data_dir) if data_dir else None, RichReporter(err_console))
        except SquatError as exc:
            if run is not None:  # the one run asked for
                _fail(str(exc))
            damaged.append((r, str(exc)))
            continue
        short = "" if e.get("reached_edge") in (True, None) else " (inside the ball)"
        table.add_row(f"{r.task}/{r.variant}/seed{r.seed}", f"{e['score']:.5f}", f"{e['loss0']:.4f}",
                      f"{e['loss_final']:.4f}", f"{e['delta_norm']:.4g}{short}")
    console.print(table)
    for r, why in damaged:  # as the report does: list them, measure the rest
        err_console.print(f"skipped {r.path}: {why}", highlight=False, soft_wrap=True)


@app.command(epilog="Example: squat report --out runs --reports reports")
def report(
    out: Path = OutOpt,
    reports: Path = typer.Option(Path("reports"), "--reports", help="Folder for tables and figures."),
    search: bool = typer.Option(False, "--search", help="--out holds a settings search (one runs root per "
                                "setting): write search.csv and search.md, every run with its settings."),
    reference: Optional[list[Path]] = typer.Option(None, "--reference", help="With --search: --out holds SQuAT "
                                                   "variants; compare them with this runs root's LSQ and SQuAT runs "
                                                   "of the same task, bits and seed (variants.md/.csv/.png). "
                                                   "Repeatable: a later root's runs replace the same runs of the "
                                                   "earlier ones."),
    timing: Optional[Path] = typer.Option(None, "--timing", help="With --reference: a runs root of reruns of "
                                          "reference runs, timed beside the variants; their training times "
                                          "replace the reference runs' (dev metrics stay the reference's)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="The grid recipe the runs come from: its note heads "
                                        "the report, and the claims' verdicts stay provisional until each of its "
                                        "tasks has pairs with all its seeds."),
) -> None:
    """Tables 1-4 (CSV, Markdown) and Figures 2-3 (PNG) from every run folder, beside the paper's numbers."""
    from squat_cli.report.build import write_report

    if not out.is_dir():
        _fail(f"runs folder {out} does not exist; run squat finetune/quantize (or squat sweep) first")
    reference = list(reference or [])
    if reference and not search:
        _fail("--reference compares variants: give it with --search")
    if grid is not None and search:
        _fail("--grid names the grid of a results report; a --search report does not use it")
    for ref in reference:
        if not ref.is_dir():
            _fail(f"reference runs folder {ref} does not exist")
    if timing is not None and not reference:
        _fail("--timing retimes reference runs: give it with --search --reference")
    if timing is not None and not timing.is_dir():
        _fail(f"timing runs folder {timing} does not exist")
    if search:
        _write_search(out, reports)
        if reference:
            _write_variants(out, reference, reports, timing)
        return
    if grid is not None:
        from squat_cli import sweep as S

        g = _run(S.load_grid, grid)
        rep = _run(write_report, out, reports, g.sweep.note, tuple(g.tasks), len(g.seeds))
    else:
        rep = _run(write_report, out, reports)
    print_report(rep)


def _write_search(out: Path, reports: Path) -> None:
    from squat_cli.report.search import write_search

    df = _run(write_search, out, reports)
    done = int((df["status"] == "done").sum()) if not df.empty else 0
    console.print(f"search: {len(df)} runs ({done} finished) -> {reports / 'search.md'}")


def _write_variants(out: Path, reference: list[Path], reports: Path, timing: Optional[Path] = None) -> None:
    from squat_cli.report.variants import write_variants

    found = _run(write_variants, out, reference, reports, timing=timing)
    for v in found:
        console.print(f"{v.method}: {v.mean:+.2f} points vs squat ({v.pairs} pairs), {v.cost:.2f}x lsq; "
                      f"within noise: {'-' if v.within_noise is None else ('yes' if v.within_noise else 'no')}, cost goal: "
                      f"{'yes' if v.meets_cost else 'no'}")
    console.print(f"variants -> {reports / 'variants.md'}")


@app.command(epilog="Example: squat sweep recipes/demo.yaml --data-dir glue/ --shard 0/2")
def sweep(
    recipe: Path = typer.Argument(..., help="Grid recipe (recipes/paper.yaml, recipes/demo.yaml)."),
    out: Path = OutOpt,
    data_dir: Optional[Path] = DataOpt,
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: run worker i's share of n (chains by task and seed)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan with each job's status; run nothing."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run again jobs marked failed."),
    reports: Path = typer.Option(Path("reports"), "--reports", help="Where the report goes after the sweep."),
    no_report: bool = typer.Option(False, "--no-report", help="Do not write the report at the end."),
) -> None:
    """Run a whole grid (FP runs, quantized runs, sharpness) in dependency order; finished work is skipped."""
    from squat_cli import sweep as S
    from squat_cli.progress import RichReporter

    grid = _run(S.load_grid, recipe)
    i, n = _run(S.parse_shard, shard)
    jobs = S.shard(S.plan(grid), i, n)
    dd = str(data_dir) if data_dir else None
    if dry_run:
        table = Table(title=f"plan: {len(jobs)} jobs" + (f" (shard {i}/{n})" if n > 1 else ""))
        table.add_column("#", justify="right")
        table.add_column("job")
        table.add_column("status")
        for k, (job_id, status) in enumerate(S.describe(grid, jobs, out), 1):
            table.add_row(str(k), job_id, status)
        console.print(table)
        return
    res = _run(S.run_sweep, grid, out, jobs, dd, retry_failed, lambda: RichReporter(err_console),
               lambda msg: err_console.print(msg, highlight=False))
    console.print(f"sweep: {len(res.ran)} ran, {len(res.skipped)} already done or waiting, "
                  f"{len(res.failed)} failed, {len(res.busy)} running elsewhere")
    for job_id, why in res.failed:
        err_console.print(f"failed {job_id}: {why}", highlight=False)
    if res.warnings:
        err_console.print(f"{len(res.warnings)} finished run(s) were made with another recipe (listed above)",
                          highlight=False)
    if not no_report and out.is_dir():
        from squat_cli.report.build import write_report

        if grid.settings:
            _write_search(out, reports)
        else:
            print_report(_run(write_report, out, reports, grid.sweep.note, tuple(grid.tasks), len(grid.seeds)))
    if res.failed:
        raise typer.Exit(1)


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


from squat_cli import cli_export  # noqa: E402,F401  (registers export and evaluate after the commands above)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except SquatError as exc:  # pragma: no cover - _run catches these first
        err_console.print(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
