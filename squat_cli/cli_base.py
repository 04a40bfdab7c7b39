"""What every ``squat`` command shares: the Typer app, the consoles, common options, and errors as one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from squat_cli.errors import SquatError, Terminated
from squat_cli.files import public_path

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
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"squat {version('squat')}")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
            console.print("squat (not installed)")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Low-bit BERT that keeps its accuracy."""

RecipeOpt = typer.Option(None, "--recipe", "-r", help="YAML recipe; options below override it.")
SetOpt = typer.Option(None, "--set", help="Override any recipe field: --set train.lr=1e-5 (repeatable).")
TaskOpt = typer.Option(None, "--task", "-t", help="GLUE task: cola sst2 mrpc stsb qqp mnli qnli rte wnli.")
DataOpt = typer.Option(None, "--data-dir", help="GLUE folder in its original layout (else $SQUAT_DATA_DIR, else the hub).")
OutOpt = typer.Option(Path("runs"), "--out", "-o", help="Runs root folder.")
SeedOpt = typer.Option(None, "--seed", help="Random seed (also names the run folder seed<k>).")
ForceOpt = typer.Option(False, "--force", help="Rerun even if the run folder holds a finished run.")
ResumeOpt = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint.")
EpochsOpt = typer.Option(None, "--epochs", help="Training epochs.")


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run(fn, *args, **kwargs) -> Any:
    """Call the core; a ``SquatError`` becomes one line on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except SquatError as exc:
        _fail(public_path(str(exc)))
    except Terminated:
        _fail("terminated", code=143)
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    except OSError as exc:  # disk full, permissions, a file where a folder should be
        where = f"{public_path(exc.filename)}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or type(exc).__name__}")
