"""The GLUE task table: one record per task, the only place task facts live.

For each task: the text columns, the label set (``None`` for STS-B's
regression score), the dev splits, the main and auxiliary metrics as the
SQuAT paper reports them, the hub configuration of ``nyu-mll/glue`` and the
layout of GLUE's original TSV files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from squat_cli.errors import DataError


@dataclass(frozen=True)
class TsvLayout:
    """How one task's original GLUE TSV files are laid out.

    Columns are given by header name, or by position for headerless files.
    """

    header: bool
    text_a: str | int
    text_b: str | int | None
    label: str | int
    n_columns: Optional[int] = None
    """Expected fields per row for headerless files (with a header: the header's width)."""


@dataclass(frozen=True)
class GlueTask:
    name: str
    """Canonical lower-case name used on the command line (``sst2``)."""
    folder: str
    """Folder in GLUE's layout (``SST-2``)."""
    hub_config: str
    hub_text_a: str
    hub_text_b: Optional[str]
    labels: Optional[tuple[str, ...]]
    """Label strings in the hub's integer order; None for regression."""
    dev_splits: tuple[str, ...]
    """Our split names; their files are ``<split>.tsv``."""
    hub_dev_splits: tuple[str, ...]
    main_metric: str
    aux_metrics: tuple[str, ...]
    tsv: TsvLayout
    display: str
    score_range: Optional[tuple[float, float]] = None
    """Regression only: the range every gold score lies in (STS-B: 0 to 5)."""
    spec: Optional[str] = None
    """A user task's definition (JSON of ``task_file.TaskSpec``); None for GLUE's tasks."""

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def metric_names(self) -> tuple[str, ...]:
        """Main then auxiliary metric keys, as they appear in metrics.json."""
        return (self.main_metric, *self.aux_metrics)


_PAIR = TsvLayout(header=True, text_a="sentence1", text_b="sentence2", label="label")

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask(
            "cola", "CoLA", "cola", "sentence", None, ("0", "1"),
            ("dev",), ("validation",), "matthews_correlation", (),
            TsvLayout(header=False, text_a=3, text_b=None, label=1, n_columns=4), "CoLA",
        ),
        GlueTask(
            "sst2", "SST-2", "sst2", "sentence", None, ("0", "1"),
            ("dev",), ("validation",), "accuracy", (),
            TsvLayout(header=True, text_a="sentence", text_b=None, label="label"), "SST-2",
        ),
        GlueTask(
            "mrpc", "MRPC", "mrpc", "sentence1", "sentence2", ("0", "1"),
            ("dev",), ("validation",), "accuracy", ("f1",),
            TsvLayout(header=True, text_a="#1 String", text_b="#2 String", label="Quality"), "MRPC",
        ),
        GlueTask(
            "stsb", "STS-B", "stsb", "sentence1", "sentence2", None,
            ("dev",), ("validation",), "pearson", ("spearmanr",),
            TsvLayout(header=True, text_a="sentence1", text_b="sentence2", label="score"), "STS-B", (0.0, 5.0),
        ),
        GlueTask(
            "qqp", "QQP", "qqp", "question1", "question2", ("0", "1"),
            ("dev",), ("validation",), "accuracy", ("f1",),
            TsvLayout(header=True, text_a="question1", text_b="question2", label="is_duplicate"), "QQP",
        ),
        GlueTask(
            "mnli", "MNLI", "mnli", "premise", "hypothesis", ("entailment", "neutral", "contradiction"),
            ("dev_matched", "dev_mismatched"), ("validation_matched", "validation_mismatched"),
            "accuracy", ("accuracy_mm",),
            TsvLayout(header=True, text_a="sentence1", text_b="sentence2", label="gold_label"), "MNLI",
        ),
        GlueTask(
            "qnli", "QNLI", "qnli", "question", "sentence", ("entailment", "not_entailment"),
            ("dev",), ("validation",), "accuracy", (),
            TsvLayout(header=True, text_a="question", text_b="sentence", label="label"), "QNLI",
        ),
        GlueTask(
            "rte", "RTE", "rte", "sentence1", "sentence2", ("entailment", "not_entailment"),
            ("dev",), ("validation",), "accuracy", (), _PAIR, "RTE",
        ),
        GlueTask(
            "wnli", "WNLI", "wnli", "sentence1", "sentence2", ("0", "1"),
            ("dev",), ("validation",), "accuracy", (), _PAIR, "WNLI",
        ),
    )
}

# Order of the paper's tables.
PAPER_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}


def get_task(name: str) -> GlueTask:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[key]
