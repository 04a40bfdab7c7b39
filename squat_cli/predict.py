"""``squat predict``: run a trained or exported model on new text.

Input: CSV, TSV or JSON Lines (by the file's suffix; ``-`` reads JSON Lines from stdin unless ``input_format``
says otherwise) holding the task's text columns; other columns pass through to the output. Output: JSON Lines,
one object per input row: the row's columns, then ``label`` and ``probabilities`` (classification) or ``score``
(regression). Rows are read, scored and written in chunks (streaming: a large file never sits in memory whole);
within a chunk they are tokenised as the run's dev sets were (its ``max_seq_length``) and batched by length with
its evaluation batch size and precision, so a dev file gives exactly the predictions ``squat evaluate`` scores.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TextIO

import torch

from squat_cli.errors import DataError
from squat_cli.files import atomic_path, check_not_a_file_of, check_output_file

CHUNK = 4096
"""Rows scored together (and batched by length among themselves)."""
INPUT_FORMATS = ("csv", "tsv", "jsonl")


def _rows(stream: TextIO, fmt: str, where: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of every input row."""
    if fmt == "jsonl":
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DataError(f"{where}:{lineno}: not a JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}:{lineno}: not a JSON object")
            yield lineno, row
        return
    reader = csv.DictReader(stream, delimiter="\t" if fmt == "tsv" else ",",
                            quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)
    for row in reader:
        yield reader.line_num, dict(row)


def _format_of(path: str, given: Optional[str]) -> str:
    if given is not None:
        if given not in INPUT_FORMATS:
            raise DataError(f"--input-format: {given!r} is not one of {', '.join(INPUT_FORMATS)}")
        return given
    if path == "-":
        return "jsonl"
    suffix = Path(path).suffix.lower().lstrip(".")
    fmt = {"csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl"}.get(suffix)
    if fmt is None:
        raise DataError(f"{path}: unknown input type {suffix!r}; use .csv, .tsv or .jsonl (or --input-format)")
    return fmt


def predict_rows(scorable, rows: list[tuple[int, dict]], where: str) -> list[dict[str, Any]]:
    """Score one chunk of rows; each output is the row plus the prediction."""
    from squat_cli.batching import eval_loader
    from squat_cli.data import encode
    from squat_cli.dev_scores import to_device
    from squat_cli.examples import Examples

    task = scorable.task
    columns = [task.hub_text_a, *([task.hub_text_b] if task.hub_text_b else [])]
    texts: list[list[str]] = [[] for _ in columns]
    for lineno, row in rows:
        for i, col in enumerate(columns):
            value = row.get(col)
            if col not in row:
                raise DataError(f"{where}:{lineno}: no column {col!r} (the row has: {', '.join(map(str, row)) or 'none'})")
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}:{lineno}: {col} is {'empty' if isinstance(value, str) else repr(value)[:40]}"
                                ", not text")
            texts[i].append(value)
    ex = Examples(texts[0], texts[1] if len(columns) > 1 else None, [0.0 if task.is_regression else 0] * len(rows),
                  "predict")
    enc = encode(ex, scorable.tokenizer, int(scorable.settings["data"]["max_seq_length"]), task.is_regression,
                 use_cache=False)
    loader, order = eval_loader(enc, int(scorable.settings["eval_batch_size"]), scorable.tokenizer.pad_token_id)
    outs = []
    model = scorable.model
    model.eval()
    with torch.no_grad():
        for batch in loader:
            batch = to_device({k: v for k, v in batch.items() if k != "labels"}, torch.device("cpu"))
            with scorable.autocast()():
                outs.append(model(**batch).logits.float())
    logits = torch.empty(len(rows), task.num_labels)
    logits[order] = torch.cat(outs)
    results = []
    for (_, row), z in zip(rows, logits):
        if task.is_regression:
            results.append({**row, "score": float(z[0])})
        else:
            p = torch.softmax(z, -1)
            results.append({**row, "label": task.labels[int(z.argmax())],
                            "probabilities": {lab: round(float(v), 6) for lab, v in zip(task.labels, p)}})
    return results


def predict_file(model_path: Path, input_path: str, output_path: str, input_format: Optional[str] = None,
                 progress: Optional[Callable[[int], None]] = None, stdin: Optional[TextIO] = None,
                 stdout: Optional[TextIO] = None) -> int:
    """Score every row of ``input_path`` (``-``: stdin) into ``output_path`` (``-``: stdout); returns the row
    count. A file output is written atomically (a failed row leaves no partial file)."""
    from squat_cli.evaluation import open_scorable

    fmt = _format_of(input_path, input_format)
    where = "<stdin>" if input_path == "-" else input_path
    if input_path != "-" and not Path(input_path).is_file():
        raise DataError(f"{input_path}: no such file")
    if output_path != "-":
        check_output_file(output_path, "--output")
        if input_path != "-" and Path(output_path).exists() and os.path.samefile(output_path, input_path):
            raise DataError(f"--output {output_path} is the --input file: the predictions would replace the rows; "
                            "choose another file")
    scorable = open_scorable(Path(model_path))
    if output_path != "-":
        check_not_a_file_of(output_path, "--output", scorable.folder)
    if input_path == "-":
        source = stdin if stdin is not None else sys.stdin
    else:
        source = open(input_path, encoding="utf-8-sig", newline="")
    count = 0

    def run(out: TextIO) -> None:
        nonlocal count
        chunk: list[tuple[int, dict]] = []
        try:
            for item in _rows(source, fmt, where):
                chunk.append(item)
                if len(chunk) == CHUNK:
                    count += _write(out, predict_rows(scorable, chunk, where), progress, count)
                    chunk = []
            if chunk:
                count += _write(out, predict_rows(scorable, chunk, where), progress, count)
            if count == 0:
                raise DataError(f"{where}: no rows to score")
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text") from None
        except csv.Error as exc:
            raise DataError(f"{where}: not readable as {fmt} ({exc})") from None

    try:
        if output_path == "-":
            run(stdout or sys.stdout)
        else:
            with atomic_path(output_path) as tmp, open(tmp, "w", encoding="utf-8") as out:
                run(out)
    finally:
        if source is not sys.stdin and source is not stdin and not isinstance(source, io.StringIO):
            source.close()
    return count


def _write(out: TextIO, results: list[dict], progress: Optional[Callable[[int], None]], done: int) -> int:
    for r in results:
        out.write(json.dumps(r, ensure_ascii=False) + "\n")
    out.flush()
    if progress is not None:
        progress(done + len(results))
    return len(results)
