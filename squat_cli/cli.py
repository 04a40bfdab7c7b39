"""The ``squat`` command line: parse options, load a recipe, call the core. Nothing else lives here."""

from __future__ import annotations

import os
import signal
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
from squat_cli.errors import SquatError, Terminated
from squat_cli.quant import methods


def _summary(title: str, metrics: dict, run_path: Path, skipped: bool) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("task", "method", "wbits", "abits", "seed"):
        if key in metrics:
            table.add_row(key, str(metrics[key]))
    from squat_cli.tasks import get_task

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
    embedding_bits: Optional[int] = typer.Option(None, "--embedding-bits", help="LSQ family and PTQ: quantize the "
                                                 "word embeddings too, at 2..8 bits (default: FP32)."),
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
                 "quant.embedding_bits": embedding_bits, "sam.rho": rho,
                 "data.data_dir": str(data_dir) if data_dir else None, "train.seed": seed, "train.epochs": epochs}
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
    launcher: str = typer.Option("local", "--launcher", help="local (one job at a time, this process) or ray "
                                 "(Ray tasks: one job per GPU, many nodes; pip install 'squat[ray]')."),
    address: Optional[str] = typer.Option(None, "--address", help="ray: the cluster to join (auto, ray://host:port); "
                                          "default: $RAY_ADDRESS, else Ray starts on this machine."),
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
    from squat_cli.executors import run_sweep

    res = _run(run_sweep, grid, out, jobs, dd, retry_failed, lambda: RichReporter(err_console),
               lambda msg: err_console.print(msg, highlight=False, markup=False), launcher=launcher,
               address=address)
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
            write_search_report(out, reports)
        else:
            print_report(_run(write_report, out, reports, grid.sweep.note, tuple(grid.tasks), len(grid.seeds)))
    if res.failed:
        raise typer.Exit(1)


from squat_cli import cli_export, cli_report  # noqa: E402,F401  (register export, evaluate and report after the commands above)
from squat_cli.cli_report import print_report, write_search_report  # noqa: E402


def _terminate(signum, frame) -> None:
    raise Terminated()


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _terminate)  # clean up as on Ctrl-C: no half-written output stays behind
    try:
        app()
    except SquatError as exc:  # pragma: no cover - _run catches these first
        err_console.print(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
