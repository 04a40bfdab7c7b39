"""A task's examples as the model sees them: find the data, read a split, take its subset, tokenise.

The one place that sequence is written; training runs, sharpness scores and ``squat evaluate`` all read
their splits through it, so a run's dev set is the same set wherever it is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from squat_cli.data import Encoded, encode, load_split, resolve_data_dir, subset
from squat_cli.errors import DataError, RecipeError
from squat_cli.glue import GlueTask
from squat_cli.tasks import get_task


@dataclass
class TaskData:
    task: GlueTask
    train: Optional[Encoded]
    dev: dict[str, Encoded]


def _getter(data: Any):
    """Read a recipe's ``DataConfig`` and the ``data`` mapping an export's manifest stores alike."""
    if isinstance(data, dict):
        return lambda key, default=None: data.get(key, default)
    return lambda key, default=None: getattr(data, key, default)


def encoded_splits(task: GlueTask, data: Any, tokenizer, splits: dict[str, tuple[Optional[int], Optional[int]]],
                   data_dir: Optional[str] = None) -> dict[str, Encoded]:
    """``splits``: split name -> (subset size or None, subset seed or None: the first N in file order).
    ``data``: the run's data settings; ``data_dir`` overrides where the files are."""
    get = _getter(data)
    max_length = int(get("max_seq_length"))
    check_length(task, tokenizer, max_length)
    source_dir = resolve_data_dir(data_dir or get("data_dir"), get("fallback", "none"), task)
    out = {}
    for split, (n, seed) in splits.items():
        ex = subset(load_split(task, split, source_dir, get("source", "auto")), n, seed)
        if split != "train" and len(ex) < 2 and set(task.metric_names()) & CORRELATIONS:
            raise DataError(f"{task.display} {split}: {len(ex)} example(s); a correlation "
                            f"({', '.join(sorted(set(task.metric_names()) & CORRELATIONS))}) needs at least two "
                            "(raise data.eval_subset)")
        out[split] = encode(ex, tokenizer, max_length, task.is_regression)
    return out


CORRELATIONS = {"pearson", "spearmanr"}


def check_length(task: GlueTask, tokenizer, max_length: int) -> None:
    """``data.max_seq_length`` must hold the special tokens and at least one token of each text."""
    pair = task.tsv.text_b is not None
    need = tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)
    if max_length < need:
        shape = "a sentence pair" if pair else "a sentence"
        raise RecipeError(f"data.max_seq_length: {max_length} cannot hold {shape} ({need - (2 if pair else 1)} "
                          f"special tokens and a token of each text need {need})")


def dev_sets(task: GlueTask, data: Any, tokenizer, data_dir: Optional[str] = None) -> dict[str, Encoded]:
    """Every dev split of the task, cut to the run's ``eval_subset``."""
    n = _getter(data)("eval_subset")
    return encoded_splits(task, data, tokenizer, {s: (n, None) for s in task.dev_splits}, data_dir)


def load_task_data(recipe, tokenizer, need_train: bool = True) -> TaskData:
    """Read, subset and tokenise the task's train and dev splits (errors before any run folder exists)."""
    task = get_task(recipe.data.task)
    d = recipe.data
    splits = {s: (d.eval_subset, None) for s in task.dev_splits}
    if need_train:
        splits["train"] = (d.train_subset, recipe.train.seed)
    enc = encoded_splits(task, d, tokenizer, splits)
    train = enc.pop("train") if need_train else None
    return TaskData(task, train, enc)
