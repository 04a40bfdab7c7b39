"""The ``squat export``, ``squat evaluate`` and ``squat predict`` commands: ship a trained run, score what was
shipped, and run it on new text."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from squat_cli.cli_base import DataOpt, _fail, _run, app, console, err_console
from squat_cli.export.formats import FORMATS, get_format


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def print_size_report(manifest: dict) -> None:
    size = manifest["size"]
    table = Table(title="export size (quantized layers: weight + bias + steps, against FP32)")
    table.add_column("layer")
    table.add_column("bits", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("FP32 bytes", justify="right")
    table.add_column("ratio", justify="right")
    for name, row in size["quantized_layers"].items():
        table.add_row(name, str(manifest["layers"][name]["bits"]), _kb(row["bytes"]), _kb(row["fp32_bytes"]),
                      f"1/{1 / row['ratio']:.1f}")
    console.print(table)
    console.print(f"quantized layers: {_kb(size['quantized_layers_bytes'])} of {_kb(size['quantized_layers_fp32_bytes'])} "
                  f"FP32 (1/{1 / size['quantized_layers_ratio']:.1f}); whole file: {_kb(size['file_bytes'])} of "
                  f"{_kb(size['fp32_checkpoint_bytes'])} FP32 (1/{1 / size['file_ratio']:.2f})", highlight=False)


@app.command(epilog="Example: squat export runs/stsb/squat-w2a8/seed1 --format packed")
def export(
    run: Path = typer.Argument(..., metavar="RUN", help="A finished quantized run folder."),
    format_: str = typer.Option("packed", "--format", "-f", help="; ".join(f"{f.name}: {f.help}"
                                                                          for f in FORMATS.values()) + "."),
    to: Optional[Path] = typer.Option(None, "--to", help="Export folder (default RUN/export/<format>)."),
    weight_type: Optional[str] = typer.Option(None, "--weight-type", help="onnx: int8 or int4 QDQ weight codes "
                                              "(default int4 for <= 4-bit runs, else int8), or nbits: onnxruntime's "
                                              "MatMulNBits low-bit kernels (2/4/8-bit fields; 3-bit codes in 4)."),
    accuracy_level: Optional[int] = typer.Option(None, "--accuracy-level", help="onnx nbits: 4 (default; the kernel "
                                                 "quantizes activations to int8 per block) or 0 (FP32 compute, the "
                                                 "run's activation steps: the exact graph)."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="onnx nbits and quantized embeddings: the "
                                             "largest block of weights sharing a scale (16..256, default 128)."),
) -> None:
    """Write a run as a real low-bit model: packed 2/3/4/8-bit codes, or an ONNX graph."""
    fmt = _run(get_format, format_)
    given = {"weight_type": weight_type, "accuracy_level": accuracy_level, "block_size": block_size}
    for key, value in given.items():
        if value is not None and key not in fmt.options:
            _fail(f"--{key.replace('_', '-')}: an option of --format onnx")
    manifest = _run(fmt.export, run, to, **{k: v for k, v in given.items() if v is not None})
    if "quantized_layers" in manifest["size"]:
        print_size_report(manifest)
    else:
        size = manifest["size"]
        ratio = size["fp32_checkpoint_bytes"] / size["file_bytes"]
        console.print(f"ONNX graph: {size['file_bytes'] / 1024:,.1f} KiB, 1/{ratio:.2f} of the FP32 checkpoint "
                      f"({manifest['weight_type']} weights, opset {manifest['opset']})", highlight=False)
    where = to or run / "export" / fmt.name
    console.print(f"export folder: {where}", highlight=False)


@app.command(epilog="Example: squat evaluate runs/stsb/squat-w2a8/seed1/export/packed --data-dir glue/")
def evaluate(
    path: Path = typer.Argument(..., metavar="PATH", help="A packed export folder, an ONNX file or folder, or a run folder."),
    data_dir: Optional[Path] = DataOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Metrics file (default <folder>/eval_metrics.json)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 or bf16 (default: the run's; ONNX: fp32)."),
) -> None:
    """Score an exported model (or a run) on its task's dev sets, as the run itself was scored."""
    from squat_cli.evaluation import evaluate_path
    from squat_cli.tasks import get_task

    res = _run(evaluate_path, path, str(data_dir) if data_dir else None, out, precision)
    m, ref = res.metrics, res.reference or {}
    task = get_task(m["task"])
    table = Table(title=f"evaluate ({m['format']}, {m['precision']})")
    table.add_column("metric")
    table.add_column("this model", justify="right")
    table.add_column("the run", justify="right")
    for key in (*task.metric_names(), "eval_loss"):
        scale = 1 if key == "eval_loss" else 100
        mine = f"{scale * m[key]:.4f}" if key == "eval_loss" else f"{scale * m[key]:.2f}"
        theirs = ref.get(key)
        table.add_row(key, mine, "" if theirs is None else (f"{theirs:.4f}" if key == "eval_loss" else f"{100 * theirs:.2f}"))
    console.print(table)
    console.print(f"metrics: {res.written}", highlight=False)


@app.command(epilog="Example: squat predict runs/rte/lsq-w4a8/seed1/export/onnx --input new.csv --output preds.jsonl")
def predict(
    model: Path = typer.Argument(..., metavar="MODEL", help="A run folder, a packed export or an ONNX export."),
    input_: str = typer.Option("-", "--input", "-i", help="CSV, TSV or JSON Lines with the task's text columns "
                               "(other columns pass through); - reads stdin (JSON Lines unless --input-format)."),
    output: str = typer.Option("-", "--output", "-o", help="JSON Lines of predictions; - writes stdout."),
    input_format: Optional[str] = typer.Option(None, "--input-format", help="csv, tsv or jsonl (default: by the "
                                               "input's suffix)."),
) -> None:
    """Label new text: one JSON line per input row with the label and class probabilities (or the score)."""
    import sys

    from squat_cli.predict import predict_file

    progress = None
    if sys.stderr.isatty():  # a count on long inputs, quiet when piped
        from squat_cli.progress import RowCounter

        progress = RowCounter(err_console)
    try:
        n = _run(predict_file, model, input_, output, input_format, progress)
    finally:
        if progress is not None:
            progress.stop()
    if output != "-":
        err_console.print(f"{n} rows -> {output}", highlight=False)
