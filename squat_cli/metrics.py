"""GLUE metrics from predictions, with the same definitions as ``evaluate``'s glue metric.

Values are fractions in [0, 1] (correlations in [-1, 1]); reports multiply by 100.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from squat_cli.glue import GlueTask


def split_metrics(task: GlueTask, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of one dev split. ``preds`` are class ids, or scores for STS-B."""
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    if task.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, preds))}
    if task.name == "stsb":
        return {
            "pearson": float(pearsonr(preds, labels)[0]),
            "spearmanr": float(spearmanr(preds, labels)[0]),
        }
    out = {"accuracy": float((preds == labels).mean())}
    if task.name in ("mrpc", "qqp"):
        out["f1"] = float(f1_score(y_true=labels, y_pred=preds))
    return out


def task_metrics(task: GlueTask, by_split: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Main and auxiliary metrics of a task from ``{split: (preds, labels)}``.

    MNLI's mismatched accuracy is reported as ``accuracy_mm``.
    """
    out: dict[str, float] = {}
    for split, (preds, labels) in by_split.items():
        values = split_metrics(task, preds, labels)
        if split == "dev_mismatched":
            values = {f"{k}_mm": v for k, v in values.items()}
        out.update(values)
    return out
