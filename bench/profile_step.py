"""Which ops take a training step's time: torch.profiler over a few steps of one method.

    python bench/profile_step.py [--method squat] [--steps 2] [--batch 32] [--tokens 128] [--top 25]
                                 [--bf16] [--out bench/PROFILE-<method>.md]

Builds the method as ``bench/step_times.py`` does, with ``bench/step_setup.py`` (packaged MiniLM,
W2A8 for quantized methods), warms up one step, profiles ``--steps`` steps and
prints (and writes) the ops with the most self CPU time, grouped into
matmul / fake-quant / optimizer / other so the share bounded by matmul speed
is visible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_setup import build, fixed_batches  # noqa: E402

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product", "aten::matmul",
               "aten::linear", "mkldnn"),
    "fake-quant": ("LsqFakeQuant", "_SymmetricMaxQuant", "CompiledFxGraph", "aten::round", "aten::clamp", "aten::where",
                   "aten::div"),  # the compiled graphs are the fused LSQ kernels
    "optimizer": ("Optimizer.step", "aten::_foreach", "aten::addcdiv", "aten::lerp", "aten::sqrt", "aten::_fused_adam"),
    "dropout masks": ("aten::random_",),
    "gelu, softmax, layernorm": ("aten::gelu", "aten::_softmax", "aten::native_layer_norm"),
}


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if any(name.startswith(p) or p in name for p in prefixes):
            return group
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="squat")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    precision = "bf16" if args.bf16 else "fp32"
    _, strategy, _ = build(args.method, args.bits, precision)
    data = fixed_batches(args.steps + 1, args.batch, args.tokens)
    strategy.step(data[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in data[1:]:
            strategy.step(b)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    lines = [f"# Profile: {args.method} ({precision}), {args.steps} steps, batch {args.batch} x {args.tokens}", "",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- self CPU time per step: {total / args.steps / 1e6:.3f} s", "",
             "| group | share |", "|---|---|"]
    lines += [f"| {g} | {100 * t / total:.1f}% |" for g, t in sorted(groups.items(), key=lambda kv: -kv[1])]
    lines += ["", "| op | calls/step | self ms/step | share |", "|---|---|---|---|"]
    for e in top:
        lines.append(f"| `{e.key}` | {e.count / args.steps:.0f} | {e.self_cpu_time_total / args.steps / 1e3:.1f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f}% |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
