"""GLUE examples from a local folder or the hub, tokenised once and cached, batched with dynamic padding.

Both sources give the same ``Examples``: ``text_a``, ``text_b`` (or None) and
``label`` (class id in the hub's order, or STS-B's float score).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import numpy as np
import torch
from safetensors.torch import load_file

from squat_cli.errors import DataError, RunError
from squat_cli.examples import Examples
from squat_cli.files import atomic_path, save_tensors, user_path
from squat_cli.glue import GlueTask

DATA_DIR_ENV = "SQUAT_DATA_DIR"
CACHE_DIR_ENV = "SQUAT_CACHE_DIR"
HUB_DATASET = "nyu-mll/glue"

csv.field_size_limit(sys.maxsize)


# ---------------------------------------------------------------- sources


EMBEDDED_TASKS = ("stsb",)
"""Tasks whose train and dev splits ship inside the package (``squat_cli/demo_data``)."""
_told: set[str] = set()


CHARS_PER_TOKEN = 16
"""Before tokenising, each text is cut to ``16 * max_seq_length`` characters: a wordpiece token spans at least one
character, so every text still holds at least ``max_seq_length`` tokens unless it is mostly whitespace, and one
absurd line (a 2 MB field) cannot take gigabytes to tokenise. GLUE's longest field (RTE, 1,392 characters) is
under the cut at the default length."""


def embedded_data_dir() -> Path:
    """The GLUE-layout folder packaged with squat (STS-B only)."""
    return Path(__file__).resolve().parent / "demo_data"


def resolve_data_dir(data_dir: str | None, fallback: str = "none", task: Optional[GlueTask] = None) -> Optional[Path]:
    """The local GLUE folder: the option, else ``$SQUAT_DATA_DIR``, else None (use the hub).

    ``fallback="embedded"``: with neither given and the hub unreachable, the data packaged with
    squat (``EMBEDDED_TASKS``), announced in one line on stderr.
    """
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if chosen is None:
        if fallback == "embedded" and task is not None and task.name in EMBEDDED_TASKS and not hub_reachable():
            if task.name not in _told:
                _told.add(task.name)
                print(f"squat: no --data-dir or {DATA_DIR_ENV} and no hub: using the {task.display} data packaged "
                      "with squat (squat_cli/demo_data, CC BY-SA 4.0 scores)", file=sys.stderr, flush=True)
            return embedded_data_dir()
        return None
    path = user_path(chosen, "--data-dir")
    if path.exists() and not path.is_dir():
        raise DataError(f"data folder {path} is a file, not a folder; pass GLUE's folder")
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist; pass --data-dir or set {DATA_DIR_ENV} to GLUE's folder")
    return path


def read_tsv(task: GlueTask, path: Path) -> Examples:
    """One split of a task in GLUE's original TSV format (quoting off, BOM tolerated)."""
    if not path.is_file():
        raise DataError(f"{path} not found: the {task.display} folder needs {path.name} (GLUE's original layout)")
    raw = path.read_bytes()
    lay = task.tsv
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); GLUE's files are UTF-8") from None
    # rows end at "\n" only (GLUE's files): U+2028, NEL or a form feed inside a sentence is text, not a row break
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    rows = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    if lay.header:
        try:
            names = next(rows)
        except StopIteration:
            raise DataError(f"{path}: empty file") from None
        width = len(names)
        cols = {}
        for role, col in (("text_a", lay.text_a), ("text_b", lay.text_b), ("label", lay.label)):
            if col is None:
                continue
            if col not in names:
                raise DataError(f"{path}: header has no column {col!r} (found: {', '.join(names)})")
            cols[role] = names.index(col)
        start = 2
    else:
        width = lay.n_columns
        cols = {"text_a": lay.text_a, "label": lay.label}
        if lay.text_b is not None:
            cols["text_b"] = lay.text_b
        start = 1
    text_a: list[str] = []
    text_b: list[str] = []
    labels: list = []
    index = {lab: i for i, lab in enumerate(task.labels or ())}
    for lineno, row in enumerate(rows, start=start):
        if not row:
            continue
        if len(row) != width:
            raise DataError(f"{path}:{lineno}: expected {width} tab-separated fields, found {len(row)}")
        value = row[cols["label"]].strip()
        if task.is_regression:
            try:
                score = float(value)
            except ValueError:
                raise DataError(f"{path}:{lineno}: label {value[:40]!r} is not a number") from None
            lo, hi = task.score_range or (-math.inf, math.inf)
            if not (math.isfinite(score) and lo <= score <= hi):
                raise DataError(f"{path}:{lineno}: label {value[:40]!r} is outside {task.display}'s range {lo:g} to {hi:g}")
            labels.append(score)
        else:
            if value not in index:
                raise DataError(f"{path}:{lineno}: label {value[:40]!r} is not one of {', '.join(task.labels)}")
            labels.append(index[value])
        text_a.append(row[cols["text_a"]])
        if "text_b" in cols:
            text_b.append(row[cols["text_b"]])
    if not labels:
        raise DataError(f"{path}: no examples")
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return Examples(text_a, text_b if "text_b" in cols else None, labels, f"tsv:{digest}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (fast check, no retries)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def examples_from_hub_dataset(task: GlueTask, ds) -> Examples:
    """Map a ``nyu-mll/glue`` split (a ``datasets.Dataset``) to our columns."""
    text_b = list(ds[task.hub_text_b]) if task.hub_text_b else None
    labels = [float(x) for x in ds["label"]] if task.is_regression else [int(x) for x in ds["label"]]
    if not task.is_regression and any(x < 0 for x in labels):
        raise DataError(f"{task.display}: hub split has no labels (test split?)")
    fp = getattr(ds, "_fingerprint", None) or hashlib.sha256(
        json.dumps([ds[task.hub_text_a][:50], labels[:50], len(labels)]).encode()
    ).hexdigest()[:16]
    return Examples(list(ds[task.hub_text_a]), text_b, labels, f"hub:{fp}")


def load_hub_split(task: GlueTask, hub_split: str) -> Examples:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise DataError(
            f"cannot reach the Hugging Face hub for {HUB_DATASET}; pass --data-dir or set "
            f"{DATA_DIR_ENV} to a folder in GLUE's original layout"
        )
    try:
        import datasets

        ds = datasets.load_dataset(HUB_DATASET, task.hub_config, split=hub_split)
    except Exception as exc:  # datasets raises many types; all mean "not available"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not load {HUB_DATASET}/{task.hub_config} [{hub_split}]: {first}") from None
    return examples_from_hub_dataset(task, ds)


def load_split(task: GlueTask, split: str, data_dir: Optional[Path], source: str = "auto") -> Examples:
    """``split`` is ``train`` or one of ``task.dev_splits``; a user task reads its own files (``task_file``)."""
    if task.spec is not None:
        from squat_cli.task_file import read_split

        return read_split(task, split)
    if source == "local" and data_dir is None:
        raise DataError(f"data.source is local but no data folder is given; pass --data-dir or set {DATA_DIR_ENV}")
    if data_dir is not None and source != "hub":
        return read_tsv(task, data_dir / task.folder / f"{split}.tsv")
    hub_split = "train" if split == "train" else task.hub_dev_splits[task.dev_splits.index(split)]
    return load_hub_split(task, hub_split)


def subset(ex: Examples, n: Optional[int], seed: Optional[int]) -> Examples:
    """The first ``n`` examples, after a seeded shuffle when ``seed`` is given."""
    if n is None or n >= len(ex):
        return ex
    order = np.random.RandomState(seed).permutation(len(ex))[:n] if seed is not None else np.arange(n)
    pick = lambda xs: [xs[i] for i in order]  # noqa: E731
    return Examples(
        pick(ex.text_a), pick(ex.text_b) if ex.text_b is not None else None, pick(ex.label),
        f"{ex.fingerprint}:sub{n}:{seed}",
    )


# ---------------------------------------------------------------- tokenisation


@dataclass
class Encoded:
    """Ragged token ids stored flat: example i is ``ids[offsets[i]:offsets[i+1]]``."""

    ids: torch.Tensor
    type_ids: Optional[torch.Tensor]
    offsets: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def select(self, idx: np.ndarray) -> "Encoded":
        idx = np.asarray(idx)
        lengths = self.lengths[idx]
        offsets = torch.zeros(len(idx) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        pieces = [torch.arange(self.offsets[i], self.offsets[i + 1]) for i in idx]
        flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
        return Encoded(
            self.ids[flat], self.type_ids[flat] if self.type_ids is not None else None, offsets, self.labels[idx]
        )


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # call-time settings, changed by every tokenizer call
        spec.pop("padding", None)
        content = json.dumps(spec, sort_keys=True)
    else:
        content = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.model_input_names, tokenizer.padding_side])
    return hashlib.sha256((content + extra).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return user_path(env, "SQUAT_CACHE_DIR")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "squat" / "tokenized"


def encode(ex: Examples, tokenizer, max_length: int, regression: bool, use_cache: bool = True) -> Encoded:
    """Tokenise (truncating to ``max_length``), cached on disk by data, tokenizer and length."""
    key = hashlib.sha256(
        f"{ex.fingerprint}|{tokenizer_fingerprint(tokenizer)}|{max_length}|{len(ex)}".encode()
    ).hexdigest()[:24]
    path = cache_dir() / f"{key}.safetensors"
    if use_cache and path.is_file():
        try:
            t = load_file(str(path))
            return Encoded(t["ids"], t.get("type_ids"), t["offsets"], t["labels"])
        except Exception:
            pass  # a broken cache entry is rebuilt below
    cut = CHARS_PER_TOKEN * max_length  # bounds time and memory on absurdly long texts; keeps >= max_length tokens
    text_a = [t[:cut] for t in ex.text_a]
    text_b = [t[:cut] for t in ex.text_b] if ex.text_b is not None else None
    enc = tokenizer(text_a, text_b, truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
    offsets = torch.zeros(len(ids) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    flat = torch.tensor([t for x in ids for t in x], dtype=torch.int64)
    type_ids = None
    if "token_type_ids" in enc:
        type_ids = torch.tensor([t for x in enc["token_type_ids"] for t in x], dtype=torch.int64)
    labels = torch.tensor(ex.label, dtype=torch.float32 if regression else torch.int64)
    out = Encoded(flat, type_ids, offsets, labels)
    if use_cache:
        tensors = {"ids": flat, "offsets": offsets, "labels": labels}
        if type_ids is not None:
            tensors["type_ids"] = type_ids
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_tensors(tensors, tmp)
        except (OSError, RunError):
            pass  # caching is an optimisation; a read-only cache folder is not an error
    return out
