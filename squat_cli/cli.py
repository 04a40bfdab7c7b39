"""The ``squat`` command line: parse options, load a recipe, call the core. Nothing else lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from squat_cli.errors import SquatError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="squat",
    help=(
        "Low-bit BERT that keeps its accuracy: fine-tune on GLUE, then quantize with "
        "SQuAT (sharpness- and quantization-aware training).\n\n"
        "Example:\n\n"
        "  squat finetune --task rte --model packaged-minilm --data-dir glue/\n\n"
        "  squat quantize --task rte --method squat --wbits 2 --abits 8"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

RecipeOpt = typer.Option(None, "--recipe", "-r", help="YAML recipe; options below override it.")
SetOpt = typer.Option(None, "--set", help="Override any recipe field: --set train.lr=1e-5 (repeatable).")
TaskOpt = typer.Option(None, "--task", "-t", help="GLUE task: cola sst2 mrpc stsb qqp mnli qnli rte wnli.")
DataOpt = typer.Option(None, "--data-dir", help="GLUE folder in its original layout (else $SQUAT_DATA_DIR, else the hub).")
OutOpt = typer.Option(Path("runs"), "--out", "-o", help="Runs root folder.")
SeedOpt = typer.Option(None, "--seed", help="Random seed (also names the run folder seed<k>).")
ForceOpt = typer.Option(False, "--force", help="Rerun even if the run folder holds a finished run.")
EpochsOpt = typer.Option(None, "--epochs", help="Training epochs.")


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run(fn, *args, **kwargs) -> Any:
    """Call the core; a ``SquatError`` becomes one line on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except SquatError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", code=130)


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
) -> None:
    """Fine-tune a full-precision model on a GLUE task into runs/<task>/fp/seed<k>/."""
    from squat_cli import jobs
    from squat_cli.progress import RichReporter
    from squat_cli.recipe import load_recipe

    overrides = {"data.task": task, "model.name_or_path": model, "data.data_dir": str(data_dir) if data_dir else None,
                 "train.seed": seed, "train.epochs": epochs}
    rec = _run(load_recipe, recipe, overrides, set_)
    res = _run(jobs.finetune, rec, out, force=force, reporter=RichReporter(err_console))
    _summary("finetune", res.metrics, res.run.path, res.skipped)


@app.command(epilog="Example: squat quantize --task rte --method squat --wbits 2 --abits 8 --rho 0.1")
def quantize(
    task: Optional[str] = TaskOpt,
    method: Optional[str] = typer.Option(None, "--method", help="lsq, joint, squat, fp-sam, q8bert or ptq (default squat)."),
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
) -> None:
    """Quantize an FP run (QAT with LSQ/SQuAT/baselines, or PTQ) into runs/<task>/<method>-w<W>a<A>/seed<k>/."""
    from squat_cli import jobs
    from squat_cli.progress import RichReporter
    from squat_cli.recipe import QUANTIZE_DEFAULTS, load_recipe

    overrides = {"data.task": task, "quant.method": method, "quant.wbits": wbits, "quant.abits": abits,
                 "sam.rho": rho, "data.data_dir": str(data_dir) if data_dir else None, "train.seed": seed,
                 "train.epochs": epochs}
    rec = _run(load_recipe, recipe, overrides, set_, base=QUANTIZE_DEFAULTS)
    res = _run(jobs.quantize, rec, out, from_path=from_, force=force, reporter=RichReporter(err_console))
    _summary("quantize", res.metrics, res.run.path, res.skipped)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except SquatError as exc:  # pragma: no cover - _run catches these first
        err_console.print(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
