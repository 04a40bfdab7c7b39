"""Sharpness jobs: which trained runs to score, and scoring one run into its ``sharpness.json``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from squat_cli.batching import eval_loader
from squat_cli.errors import RunError
from squat_cli.files import write_json
from squat_cli.progress import Reporter
from squat_cli.run_model import load_run_model
from squat_cli.runs import RunDir, discover
from squat_cli.task_data import encoded_splits


def sharpness_runs(runs_root: Path, run_path: Optional[Path], settings, force: bool) -> list[RunDir]:
    """The runs to measure: ``run_path`` alone, or every complete run without a score for these settings."""
    if run_path is not None:
        run = RunDir(Path(run_path))
        if not run.path.is_dir():
            raise RunError(f"no run folder at {run.path}")
        if not run.is_complete():
            raise RunError(f"{run.path} is not a complete run (no metrics.json)")
        return [run]
    if not Path(runs_root).is_dir():
        raise RunError(f"runs folder {runs_root} does not exist")
    todo = []
    for run in discover(runs_root):
        if not run.is_complete() or not (run.model_dir / "config.json").is_file():
            continue
        if not force and settings.key() in run.sharpness_scores():
            continue
        todo.append(run)
    return todo


def measure_sharpness(run: RunDir, settings, data_dir: Optional[str] = None, reporter: Optional[Reporter] = None) -> dict:
    """Score one run and store it in its ``sharpness.json`` under ``settings.key()``."""
    from squat_cli.sharpness import ascent_sharpness, keskar_sharpness
    from squat_cli.sharpness_settings import reached_edge

    started = time.perf_counter()
    model, tokenizer, recipe, task = load_run_model(run)
    split = settings.split if settings.split == "train" else task.dev_splits[0]
    enc = encoded_splits(task, recipe.data, tokenizer, {split: (settings.examples, settings.seed)}, data_dir)[split]
    loader, _ = eval_loader(enc, settings.batch_size, tokenizer.pad_token_id)
    batches = list(loader)
    torch.manual_seed(settings.seed)
    if settings.method == "keskar":
        res = keskar_sharpness(model, batches, settings.rho, settings.subspace, settings.maxiter, settings.seed)
    else:
        rep = reporter or Reporter()
        rep.start(settings.steps, f"sharpness {run.task}/{run.variant}/seed{run.seed}")
        try:
            res = ascent_sharpness(model, batches, settings.rho, settings.steps, settings.lr,
                                   on_step=lambda t, loss: rep.update(t, loss=loss, ex_s=0.0), step=settings.step)
        finally:
            rep.stop()
    entry = {"score": res.score, "loss0": res.loss0, "loss_final": res.loss_final, "delta_norm": res.delta_norm,
             "reached_edge": reached_edge(res.delta_norm, settings.rho) if settings.method == "ascent" else None,
             "trajectory": res.trajectory, "settings": settings.to_dict(),
             "time_s": round(time.perf_counter() - started, 2)}  # wall time, model and data loading included
    current = run.sharpness_scores()  # an unreadable file is rewritten
    current[settings.key()] = entry
    write_json(run.sharpness_file, current)
    return entry
