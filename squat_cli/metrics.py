"""GLUE metrics from predictions, with the same definitions as ``evaluate``'s glue metric.

Values are fractions in [0, 1] (correlations in [-1, 1]); reports multiply by 100.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from squat_cli.glue import GlueTask


def _f1(labels: np.ndarray, preds: np.ndarray, classes: int) -> float:
    """Binary F1 of class 1 for two classes (GLUE's MRPC and QQP); macro F1 over the classes beyond."""
    if classes <= 2:
        return float(f1_score(y_true=labels, y_pred=preds))
    return float(f1_score(y_true=labels, y_pred=preds, average="macro", labels=list(range(classes))))


METRIC_FUNCTIONS = {
    "accuracy": lambda y, p, k: float((p == y).mean()),
    "f1": _f1,
    "matthews_correlation": lambda y, p, k: float(matthews_corrcoef(y, p)),
    "pearson": lambda y, p, k: float(pearsonr(p, y)[0]),
    "spearmanr": lambda y, p, k: float(spearmanr(p, y)[0]),
}
"""squat's metric set: name -> (labels, predictions, class count) -> value."""


def split_metrics(task: GlueTask, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics on one dev split. ``preds`` are class ids, or scores for regression."""
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    names = dict.fromkeys(m.removesuffix("_mm") for m in task.metric_names())
    return {m: METRIC_FUNCTIONS[m](labels, preds, task.num_labels) for m in names}


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
