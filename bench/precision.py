"""bf16 autocast against fp32: training time and the dev metric after the same short run.

    python bench/precision.py [--task sst2] [--train-subset 4000] [--epochs 1] [--seeds 42,43]
                              [--data-dir DIR] [--out bench/RESULTS-precision.md]

Runs ``squat finetune`` (packaged all-MiniLM-L6-v2, dynamic padding) once per
precision and seed on the same training subset, then evaluates on the full dev
set. Reports the time of the training steps (from ``metrics.json``), the
speed-up and the dev metric for each, so a speed-up that costs accuracy shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import glue_dir, machine_lines, squat_finetune

from squat_cli.tasks import get_task


def run(task: str, precision: str, seed: int, subset: int, epochs: float, data_dir: Path, work: Path) -> dict:
    return squat_finetune(task, data_dir, work / f"{precision}-{seed}", f"train.precision={precision}",
                          f"data.train_subset={subset}", epochs=str(epochs), seed=str(seed))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--train-subset", type=int, default=4000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seeds", default="42,43")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-precision.md")))
    ap.add_argument("--json", default=None, help="also write the times and metrics as JSON here")
    args = ap.parse_args()
    data_dir = glue_dir(args.data_dir)
    task = get_task(args.task)
    seeds = [int(s) for s in args.seeds.split(",")]
    res: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for precision in res:  # alternate, so a slow spell of the machine hits both
                m = run(args.task, precision, seed, args.train_subset, args.epochs, data_dir, Path(tmp))
                res[precision].append(m)
                print(f"{precision} seed {seed}: {m['train_time_s']:.1f} s, {task.main_metric} "
                      f"{100 * m[task.main_metric]:.2f}", flush=True)
    t32 = statistics.mean(m["train_time_s"] for m in res["fp32"])
    lines = ["# bf16 autocast vs fp32: time and accuracy of a short run", "",
             *machine_lines(),
             f"- `squat finetune`, all-MiniLM-L6-v2, {task.display}: {args.train_subset} training examples, "
             f"{args.epochs:g} epoch(s), batch 32, dynamic padding; full dev set; seeds {args.seeds}", "",
             f"| precision | train s (mean) | speed-up | dev {task.main_metric} per seed | mean | eval loss (mean) |",
             "|---|---|---|---|---|---|"]
    for precision, ms in res.items():
        t = statistics.mean(m["train_time_s"] for m in ms)
        per = ", ".join(f"{100 * m[task.main_metric]:.2f}" for m in ms)
        mean = statistics.mean(100 * m[task.main_metric] for m in ms)
        loss = statistics.mean(m["eval_loss"] for m in ms)
        lines.append(f"| {precision} | {t:.1f} | {t32 / t:.2f}x | {per} | {mean:.2f} | {loss:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"metric": task.main_metric, "runs": res}, indent=1))


if __name__ == "__main__":
    main()
