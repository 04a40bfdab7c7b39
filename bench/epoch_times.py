"""Epoch time of ``squat finetune`` against a plain ``transformers`` Trainer, same model, data and batch size.

    python bench/epoch_times.py [--tasks cola,rte] [--batch 32] [--max-length 128]
                                [--trainer-max-steps N] [--data-dir DIR] [--out bench/RESULTS-epochs.md]

For each task, one epoch of full-precision fine-tuning of the packaged
all-MiniLM-L6-v2 (AdamW, lr 2e-5, linear schedule, no evaluation, nothing
saved), three ways:

- ``squat finetune`` as a user runs it (the CLI, in a subprocess), dynamic
  padding; its ``metrics.json`` gives the time of the training steps alone;
- ``Trainer`` with ``run_glue``'s default: every example padded to
  ``--max-length`` tokens;
- ``Trainer`` with dynamic padding (``DataCollatorWithPadding``);
- ``squat finetune`` again with ``train.group_by_length=true`` (batches of
  similar lengths: less padding, other batch composition).

Both read the same GLUE TSV files (``--data-dir`` or ``$SQUAT_DATA_DIR``) and
tokenize with the same tokenizer and truncation. Trainer's time is its own
``train_runtime``. ``--trainer-max-steps`` times only the first N steps of the
max-length run and scales them to an epoch (its steps all cost the same:
every batch has the same shape); the table says when it did.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from common import glue_dir, machine_lines, squat_finetune

from squat_cli.data import load_split
from squat_cli.models import resolve_model_path
from squat_cli.tasks import get_task


def squat_epoch(task: str, batch: int, max_length: int, data_dir: Path, workdir: Path, *sets: str) -> dict:
    metrics = squat_finetune(task, data_dir, workdir / f"squat-{task}-{len(sets)}", f"train.batch_size={batch}",
                             f"data.max_seq_length={max_length}", *sets, epochs="1")
    return {"time": metrics["train_time_s"], "steps": metrics["steps"], "scaled_from": None,
            "metric": metrics[get_task(task).main_metric]}


def trainer_epoch(task_name: str, batch: int, max_length: int, data_dir: Path, workdir: Path, dynamic: bool,
                  max_steps: int | None) -> dict:
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    task = get_task(task_name)
    path = resolve_model_path("packaged-minilm")
    tok = AutoTokenizer.from_pretrained(path)
    ex = load_split(task, "train", data_dir, "local")
    cols = {"text_a": ex.text_a, "label": ex.label}
    if ex.text_b is not None:
        cols["text_b"] = ex.text_b
    ds = Dataset.from_dict(cols)
    padding = "longest" if dynamic else "max_length"

    def tokenize(b):
        args = (b["text_a"],) if "text_b" not in b else (b["text_a"], b["text_b"])
        return tok(*args, padding=False if dynamic else padding, max_length=max_length, truncation=True)

    ds = ds.map(tokenize, batched=True, remove_columns=[c for c in cols if c != "label"])
    torch.manual_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels)
    steps_per_epoch = math.ceil(len(ds) / batch)
    args = TrainingArguments(
        output_dir=str(workdir / f"trainer-{task_name}-{padding}"), per_device_train_batch_size=batch,
        num_train_epochs=1, max_steps=max_steps if max_steps else -1, learning_rate=2e-5, weight_decay=0.01,
        warmup_steps=0.1, lr_scheduler_type="linear", eval_strategy="no", save_strategy="no", report_to=[],
        logging_strategy="no", seed=42, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
    )
    collator = DataCollatorWithPadding(tok) if dynamic else None
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    runtime = trainer.train().metrics["train_runtime"]
    steps = max_steps or steps_per_epoch
    return {"time": runtime * steps_per_epoch / steps, "steps": steps_per_epoch,
            "scaled_from": steps if steps < steps_per_epoch else None, "metric": None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="cola,rte")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--trainer-max-steps", type=int, default=None,
                    help="time only this many steps of the max-length Trainer run and scale to an epoch")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-epochs.md")))
    ap.add_argument("--json", default=None, help="also write the epoch times as JSON here")
    args = ap.parse_args()
    data_dir = glue_dir(args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for task in args.tasks.split(","):
            res = {
                "squat finetune (dynamic padding)": squat_epoch(task, args.batch, args.max_length, data_dir, work),
                "Trainer, padding to max length": trainer_epoch(task, args.batch, args.max_length, data_dir, work,
                                                                dynamic=False, max_steps=args.trainer_max_steps),
                "Trainer, dynamic padding": trainer_epoch(task, args.batch, args.max_length, data_dir, work,
                                                          dynamic=True, max_steps=None),
                "squat finetune, train.group_by_length=true": squat_epoch(
                    task, args.batch, args.max_length, data_dir, work, "train.group_by_length=true"),
            }
            for name, r in res.items():
                print(f"{task}: {name}: {r['time']:.1f} s/epoch", flush=True)
            rows.append((task, res))
    lines = ["# Epoch time: squat finetune vs transformers Trainer", "",
             *machine_lines(),
             f"- all-MiniLM-L6-v2, FP32, batch {args.batch}, max length {args.max_length}, one epoch, "
             "AdamW lr 2e-5, linear schedule, no evaluation or saving", "",
             "| task | run | steps | s/epoch | vs Trainer max-length | vs Trainer dynamic |", "|---|---|---|---|---|---|"]
    for task, res in rows:
        ref_max = res["Trainer, padding to max length"]["time"]
        ref_dyn = res["Trainer, dynamic padding"]["time"]
        for name, r in res.items():
            note = f" (scaled from {r['scaled_from']} steps)" if r["scaled_from"] else ""
            lines.append(f"| {task} | {name} | {r['steps']} | {r['time']:.1f}{note} | {r['time'] / ref_max:.2f}x | "
                         f"{r['time'] / ref_dyn:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({task: res for task, res in rows}, indent=1))


if __name__ == "__main__":
    main()
