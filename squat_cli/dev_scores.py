"""A model's scores on its task's dev sets: predictions in the examples' order, then the task's metrics.

The read side: training (``train/loop.py``), ``squat evaluate`` (``evaluation.py``) and the exports' checks
call it; it knows nothing of optimizers or run folders.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
from torch import nn

from squat_cli.batching import eval_loader
from squat_cli.data import Encoded
from squat_cli.glue import GlueTask
from squat_cli.metrics import task_metrics


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module, task: GlueTask, dev: dict[str, Encoded], batch_size: int, pad_id: int,
    device: torch.device, autocast: Callable = contextlib.nullcontext,
) -> dict[str, float]:
    """Main and auxiliary metrics on every dev split, plus the mean dev loss (``eval_loss``)."""
    was_training = model.training
    model.eval()
    by_split = {}
    losses, counts = 0.0, 0
    try:
        for split, enc in dev.items():
            loader, order = eval_loader(enc, batch_size, pad_id)
            outs = []
            for batch in loader:
                batch = to_device(batch, device)
                with autocast():
                    out = model(**batch)
                losses += float(out.loss.float()) * len(batch["labels"])
                counts += len(batch["labels"])
                logits = out.logits.float()
                outs.append(logits.squeeze(-1) if task.is_regression else logits.argmax(-1))
            pred_sorted = torch.cat(outs).cpu().numpy()
            preds = np.empty_like(pred_sorted)
            preds[order.numpy()] = pred_sorted
            by_split[split] = (preds, enc.labels.numpy())
    finally:
        model.train(was_training)
    metrics = task_metrics(task, by_split)
    metrics["eval_loss"] = losses / max(counts, 1)
    return metrics
