"""``squat evaluate``: score a run folder, a packed export or an ONNX export on its task's dev sets.

The dev data, sequence length, batch size and precision are the run's own
(from its recipe, or from the export's manifest), so a packed export of a run
gives the run's dev metrics exactly; ``--data-dir`` only says where the GLUE
files are. Metrics are written in the layout of the run's ``metrics.json``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from squat_cli.dev_scores import evaluate
from squat_cli.errors import RunError
from squat_cli.export.folder import MANIFEST_FILE, source_settings, source_task
from squat_cli.export.formats import FORMATS, detect
from squat_cli.files import check_not_a_file_of, check_output_file, write_json
from squat_cli.runs import RunDir
from squat_cli.task_data import dev_sets

EVAL_FILE = "eval_metrics.json"


@dataclass
class Scored:
    metrics: dict[str, Any]
    written: Path
    reference: Optional[dict[str, Any]]
    """The source run's dev metrics (None when unknown)."""


def _autocast(precision: str) -> Callable:
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


@dataclass
class Scorable:
    """A model ready to score text as its run scored its dev sets: the runner, its tokenizer and task, and the
    run's settings (data, batch size, precision)."""

    model: Any
    tokenizer: Any
    task: Any
    settings: dict[str, Any]
    reference: Optional[dict[str, Any]]
    folder: Path
    kind: str

    def autocast(self) -> Callable:
        return _autocast(self.settings["precision"])


def open_scorable(path: Path, precision: Optional[str] = None) -> Scorable:
    """A run folder, a packed export or an ONNX export, loaded and checked. ``precision`` (``fp32`` or ``bf16``)
    overrides the run's evaluation precision; ONNX graphs run in FP32."""
    if precision not in (None, "fp32", "bf16"):
        raise RunError(f"--precision: {precision!r} is not one of fp32, bf16")
    path = Path(path)
    kind = detect(path)
    if kind == "run":
        from squat_cli.run_model import load_run_model

        run = RunDir(path)
        if run.is_failed():
            raise RunError(f"{path} is a failed run (FAILED.json)")
        model, tokenizer, recipe, _ = load_run_model(run)
        settings = {"task": recipe.data.task, "data": asdict(recipe.data), "precision": recipe.train.precision,
                    "eval_batch_size": recipe.train.eval_batch_size}
        reference = run.metrics()
        folder = path
    else:
        fmt = FORMATS[kind]
        model, tokenizer, manifest = fmt.load(path)
        folder = fmt.folder(path)
        settings = dict(source_settings(manifest, folder / MANIFEST_FILE))
        if fmt.runs_in is not None:
            settings["precision"] = fmt.runs_in
        reference = settings.get("dev_metrics")
    if precision is not None and (kind == "run" or FORMATS[kind].runs_in is None):
        settings = {**settings, "precision": precision}
    task = source_task(settings)  # a user task's definition is stored inline in its data settings
    return Scorable(model, tokenizer, task, settings, reference, folder, kind)


def evaluate_path(path: Path, data_dir: Optional[str] = None, out: Optional[Path] = None,
                  precision: Optional[str] = None) -> Scored:
    """Load what ``path`` holds, score it on the dev sets, write the metrics (default ``<folder>/eval_metrics.json``).

    ``precision`` (``fp32`` or ``bf16``) overrides the run's evaluation precision; ONNX graphs run in FP32."""
    s = open_scorable(path, precision)
    model, tokenizer, task, settings, folder, kind = s.model, s.tokenizer, s.task, s.settings, s.folder, s.kind
    path = Path(path)
    written = Path(out) if out is not None else folder / EVAL_FILE
    check_output_file(written, "--out")
    check_not_a_file_of(written, "--out", folder, replaceable=EVAL_FILE)
    dev = dev_sets(task, settings["data"], tokenizer, data_dir)
    m = evaluate(model, task, dev, int(settings["eval_batch_size"]), tokenizer.pad_token_id, torch.device("cpu"),
                 _autocast(settings["precision"]))
    metrics = {"task": task.name, **{k: m[k] for k in task.metric_names()}, "main_metric": task.main_metric,
               "eval_loss": m["eval_loss"], "dev_sizes": {s: len(e) for s, e in dev.items()},
               "evaluated": str(path), "format": kind, "precision": settings["precision"]}
    write_json(written, metrics)
    return Scored(metrics, written, s.reference)
