"""How large the distillation loss's gradients are against the task loss's: step sizes and weights.

    python bench/kd_grad_scale.py --task mrpc --fp experiments/distillation/runs/mrpc/fp/seed1/model
                                  [--wbits 2] [--batches 8] [--data-dir DIR] [--out FILE.md]

Quantizes the FP model as ``squat quantize --method lsq`` does (W``--wbits``A8, calibrated on the first training
batch), then on each of the next ``--batches`` shuffled training batches takes, from the same weights and dropout
masks, the gradient of (1) the task loss and (2) ``--distill``'s loss (labels 1 + logits 1, T 1, the FP model as
teacher), and prints the norm of the step-size gradient and of the weight gradient of each, and their ratio.

Why it matters: weights are updated by Adam after gradient clipping, which do not see a loss's scale; the step
sizes are updated by plain SGD (lr 0.1 for LSQ, 1.0 for SQuAT), whose step grows with it. A ratio near 2 means
distillation doubles the step sizes' effective learning rate.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import glue_dir, machine_lines  # noqa: E402
from step_setup import glue_batches  # noqa: E402

from squat_cli.glue import get_task  # noqa: E402
from squat_cli.models import load_model  # noqa: E402
from squat_cli.quant.convert import calibrate, quantize_model  # noqa: E402
from squat_cli.quant.qlinear import step_parameters  # noqa: E402
from squat_cli.recipe import QuantConfig  # noqa: E402
from squat_cli.recipe.schema import DistillConfig  # noqa: E402
from squat_cli.train.distill import Distiller  # noqa: E402


def norm(params: list[torch.nn.Parameter]) -> float:
    return float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", required=True)
    ap.add_argument("--fp", required=True, help="the FP model folder (teacher and the student's start)")
    ap.add_argument("--wbits", type=int, default=2)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    task = get_task(args.task)
    data = glue_batches(args.task, args.batches + 1, args.batch_size, 128, str(glue_dir(args.data_dir)), seed=1,
                        two_class=False)
    teacher = load_model(args.fp, task)
    student = copy.deepcopy(teacher)
    quantize_model(student, QuantConfig(method="lsq", wbits=args.wbits, abits=8))
    calibrate(student, data[:1])
    student.train()
    steps = step_parameters(student)
    ids = {id(p) for p in steps}
    weights = [p for p in student.parameters() if p.requires_grad and id(p) not in ids]
    kd = Distiller(teacher, DistillConfig(logits=1.0, labels=1.0, temperature=1.0), task.is_regression)
    rows, ratios = [], {"step": [], "weight": []}
    for i, batch in enumerate(data[1:], 1):
        kd.prepare(batch)
        got = {}
        for name in ("task", "distill"):
            student.zero_grad(set_to_none=True)
            torch.manual_seed(i)  # the same dropout masks for both losses
            out = student(**batch)
            loss = out.loss if name == "task" else kd.loss(out, len(batch["labels"]))[0]
            loss.backward()
            got[name] = (float(loss.detach()), norm(steps), norm(weights))
        (lt, st, wt), (ld, sd, wd) = got["task"], got["distill"]
        ratios["step"].append(sd / st)
        ratios["weight"].append(wd / wt)
        rows.append(f"| {i} | {lt:.3f} | {ld:.3f} | {st:.4f} | {sd:.4f} | {sd / st:.2f} | {wt:.1f} | {wd:.1f} | "
                    f"{wd / wt:.2f} |")
    lines = [f"# Gradient scale of distillation (labels 1 + logits 1, T 1) vs the task loss: {args.task} "
             f"W{args.wbits}A8 LSQ", "", *machine_lines(), f"- FP model: `{args.fp}`", "",
             "| batch | task loss | distill loss | step-size grad (task) | (distill) | ratio | weight grad (task) "
             "| (distill) | ratio |", "|---|---|---|---|---|---|---|---|---|", *rows, "",
             f"Median ratio: step sizes {statistics.median(ratios['step']):.2f}x, weights "
             f"{statistics.median(ratios['weight']):.2f}x.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
