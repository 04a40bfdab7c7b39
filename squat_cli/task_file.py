"""User-defined tasks: any labelled text data, defined in a small YAML file (or inline in a recipe).

    name: sentiment                 # run folders and report columns use it
    train: data/train.csv           # CSV, TSV, JSON Lines or Parquet (by suffix), relative to this file
    dev: data/dev.csv
    text: [review]                  # one column, or two for sentence pairs
    label: label                    # the label column
    labels: [negative, positive]    # the class order; or `regression: true` for a score
    metrics: [accuracy, f1]         # from accuracy, f1, matthews_correlation, pearson, spearmanr; first = main

A split may also be a hub dataset: ``train: {path: imdb, split: train}`` (``config`` optional).

Files are read with ``datasets``' csv / json / parquet builders. Every row is checked before anything trains:
a missing column (the columns present are listed), a label outside ``labels``, an empty text, a non-numeric
regression target, mixed types, an empty split or an unreadable file are one line naming the file and the row.
When a run starts, its recipe stores the definition inline with absolute paths, so the run folder says what it
was trained on wherever it is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from squat_cli.errors import DataError, RecipeError
from squat_cli.glue import TASKS, GlueTask, TsvLayout
from squat_cli.typed import build

FILE_KINDS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
METRICS = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews_correlation")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass
class SplitSource:
    """A hub dataset split (``path`` is the dataset id), or a file given as a mapping."""

    path: str
    config: Optional[str] = None
    split: Optional[str] = None


@dataclass
class TaskSpec:
    """A user-defined task (see the module docstring); the recipe's ``data.task`` may hold one."""

    name: str
    train: Union[str, SplitSource]
    dev: Union[str, SplitSource]
    text: list[str] = field(default_factory=lambda: ["text"])
    label: str = "label"
    labels: Optional[list[str]] = None
    regression: bool = False
    metrics: Optional[list[str]] = None

    def check(self, where: str = "task") -> "TaskSpec":
        if not NAME_RE.match(self.name):
            raise RecipeError(f"{where}.name: {self.name!r} must be lower-case letters, digits, '_', '-' or '.'")
        if self.name in TASKS:
            raise RecipeError(f"{where}.name: {self.name!r} is a GLUE task's name; choose another")
        if not 1 <= len(self.text) <= 2 or len(set(self.text)) != len(self.text):
            raise RecipeError(f"{where}.text: {self.text} must name one text column, or two for sentence pairs")
        if self.label in self.text:
            raise RecipeError(f"{where}.label: {self.label!r} is also a text column")
        if self.regression == (self.labels is not None):
            raise RecipeError(f"{where}: give labels (the class order) for classification, or regression: true")
        if self.labels is not None and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)):
            raise RecipeError(f"{where}.labels: {self.labels} must list at least two distinct classes")
        allowed = ("pearson", "spearmanr") if self.regression else CLASSIFICATION_METRICS
        for m in self.metrics or []:
            if m not in allowed:
                raise RecipeError(f"{where}.metrics: {m!r} is not one of {', '.join(allowed)} for this task")
        return self

    def main_metrics(self) -> tuple[str, ...]:
        if self.metrics:
            return tuple(dict.fromkeys(self.metrics))
        return ("pearson", "spearmanr") if self.regression else ("accuracy",)


_USER_TASKS: dict[str, GlueTask] = {}
"""User tasks met in this process, by name (reports look a run's task up by its folder name)."""


def _source(value: Union[str, SplitSource], base: Path) -> Union[str, SplitSource]:
    """File paths absolute (relative to the task file's folder); hub ids as given."""
    if isinstance(value, SplitSource):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_spec(spec: TaskSpec, base: Path) -> TaskSpec:
    """The spec with every file path absolute."""
    return TaskSpec(**{**asdict(spec), "train": _source(spec.train, base), "dev": _source(spec.dev, base)})


def read_spec_file(path: Path | str) -> TaskSpec:
    """A task file, checked, with its paths made absolute."""
    from squat_cli.yaml_safe import read_yaml

    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a task file is a mapping (name, train, dev, text, label, labels or regression)")
    spec = spec_from_dict(data, f"{path}")
    return resolve_spec(spec, path.resolve().parent)


def spec_from_dict(data: dict, where: str = "task") -> TaskSpec:
    data = dict(data)
    for split in ("train", "dev"):
        if isinstance(data.get(split), dict):
            data[split] = build(SplitSource, data[split], f"{where}.{split}")
    if "name" not in data or "train" not in data or "dev" not in data:
        raise RecipeError(f"{where}: a task needs name, train and dev")
    return build(TaskSpec, data, where).check(where)


def looks_like_file(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml")) or "/" in ref


def task_from_spec(spec: TaskSpec) -> GlueTask:
    """The task record of a user task (registered by name for this process)."""
    spec.check()
    names = spec.main_metrics()
    labels = None if spec.regression else tuple(spec.labels)
    text_b = spec.text[1] if len(spec.text) > 1 else None
    task = GlueTask(
        name=spec.name, folder=spec.name, hub_config="", hub_text_a=spec.text[0], hub_text_b=text_b, labels=labels,
        dev_splits=("dev",), hub_dev_splits=("validation",), main_metric=names[0], aux_metrics=names[1:],
        tsv=TsvLayout(header=True, text_a=spec.text[0], text_b=text_b, label=spec.label), display=spec.name,
        spec=json.dumps(asdict(spec), sort_keys=True),
    )
    _USER_TASKS[spec.name] = task
    return task


def user_task(name: str) -> Optional[GlueTask]:
    return _USER_TASKS.get(name)


def spec_of(task: GlueTask) -> TaskSpec:
    data = json.loads(task.spec)
    for split in ("train", "dev"):
        if isinstance(data[split], dict):
            data[split] = SplitSource(**data[split])
    return TaskSpec(**data)


# ---------------------------------------------------------------- reading a split


def _load(source: Union[str, SplitSource], split_name: str):
    """(a ``datasets.Dataset``, how to name its rows in errors, a fingerprint of its content)."""
    import datasets

    datasets.disable_progress_bars()
    if isinstance(source, SplitSource):
        try:
            ds = datasets.load_dataset(source.path, source.config, split=source.split or split_name)
        except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "not available"
            raise DataError(f"hub dataset {source.path}: could not load it ({_first(exc)})") from None
        return ds, f"{source.path} [{source.split or split_name}]", "row {}", f"hub:{ds._fingerprint}"
    path = Path(source)
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .csv, .tsv, .jsonl or .parquet")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror})") from None
    kwargs: dict[str, Any] = {"delimiter": "\t", "quoting": 3} if path.suffix.lower() == ".tsv" else {}
    if kind == "csv":
        kwargs["keep_default_na"] = False  # an empty field is an empty text, not NaN
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True, **kwargs)
    except Exception as exc:  # noqa: BLE001
        if "corresponds to no data" in str(exc):  # a header and no row
            raise DataError(f"{path}: the {split_name} split has no rows") from None
        raise DataError(f"{path}: cannot read it as {path.suffix[1:]} ({_first(exc)})") from None
    row = "line {}" if kind in ("csv", "json") else "row {}"
    first = 2 if kind == "csv" else 1  # CSV's header is line 1
    return ds, str(path), (row, first), "file:" + hashlib.sha256(raw).hexdigest()[:16]


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def read_split(task: GlueTask, split: str):
    """``Examples`` of a user task's split, every row checked (one line naming the file and row otherwise)."""
    from squat_cli.examples import Examples

    spec = spec_of(task)
    ds, where, rowfmt, fingerprint = _load(spec.train if split == "train" else spec.dev, split)
    fmt, first = rowfmt if isinstance(rowfmt, tuple) else (rowfmt, 0)
    columns = list(ds.column_names)
    for col in [*spec.text, spec.label]:
        if col not in columns:
            raise DataError(f"{where}: no column {col!r} (columns: {', '.join(columns) or 'none'})")
    if len(ds) == 0:
        raise DataError(f"{where}: the {split} split has no rows")
    texts = [list(ds[c]) for c in spec.text]
    raw_labels = list(ds[spec.label])
    index = {lab: i for i, lab in enumerate(spec.labels or ())}
    labels: list = []
    for i, value in enumerate(raw_labels):
        at = f"{where}:{i + first}" if fmt.startswith("line") else f"{where}: {fmt.format(i)}"
        for c, col in zip(spec.text, texts):
            t = col[i]
            if not isinstance(t, str):
                raise DataError(f"{at}: {c} is {type(t).__name__} {t!r:.40}, not text")
            if not t.strip():
                raise DataError(f"{at}: {c} is empty")
        if spec.regression:
            try:
                score = float(value) if not isinstance(value, bool) else math.nan
            except (TypeError, ValueError):
                score = math.nan
            if not math.isfinite(score):
                raise DataError(f"{at}: {spec.label} {value!r:.40} is not a number")
            labels.append(score)
        else:
            key = value if isinstance(value, str) else (str(value) if isinstance(value, int) else None)
            if key not in index:
                raise DataError(f"{at}: label {value!r:.40} is not one of {', '.join(spec.labels)}")
            labels.append(index[key])
    return Examples(texts[0], texts[1] if len(texts) > 1 else None, labels, f"{fingerprint}:{split}")
