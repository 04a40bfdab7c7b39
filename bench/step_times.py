"""Median training-step time of every method on all-MiniLM-L6-v2, ratios, MFU, bf16 vs fp32.

    python bench/step_times.py [--steps 5] [--warmup 2] [--batch 32] [--tokens 128]
                               [--methods fp,lsq,joint,squat,squat-reuse,fp-sam,q8bert] [--bf16]

Prints a table and writes bench/RESULTS.md (machine, versions, command).
Each method trains a fresh copy of the packaged MiniLM (2-class head) on fixed
random-token batches of exactly ``--tokens`` tokens (``--glue-dir`` uses real
dynamically padded SST-2/RTE batches instead). Before timing, the script checks
that each method's first-pass loss equals the plain FP/quantized forward on the
same batch (a faster path must not change the loss).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from squat_cli.glue import get_task  # noqa: E402
from squat_cli.models import load_model  # noqa: E402
from squat_cli.quant.convert import calibrate, quantize_model  # noqa: E402
from squat_cli.recipe import QuantConfig, TrainConfig  # noqa: E402
from squat_cli.train.loop import build_optimizers  # noqa: E402
from squat_cli.train.strategies import StepContext, make_strategy  # noqa: E402

METHODS = {  # name -> (strategy method, quantized?, step_size_grad)
    "fp": ("fp", False, "fresh"),
    "lsq": ("lsq", True, "fresh"),
    "joint": ("joint", True, "fresh"),
    "squat": ("squat", True, "fresh"),
    "squat-reuse": ("squat", True, "reuse"),
    "fp-sam": ("fp-sam", False, "fresh"),
    "q8bert": ("q8bert", True, "fresh"),
}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Measured FLOP/s of a square matmul on this machine (the MFU denominator)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def model_flops_per_step(model: torch.nn.Module, batch: int, seq: int) -> float:
    """6 * params(non-embedding) * tokens + attention (fwd+bwd), the usual training estimate."""
    cfg = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq  # per token, fwd+bwd, QK^T and AV
    return (6 * params + attn) * batch * seq


def batches(n: int, batch: int, tokens: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1000, 29000, (batch, tokens), generator=g),
             "attention_mask": torch.ones(batch, tokens, dtype=torch.int64),
             "token_type_ids": torch.zeros(batch, tokens, dtype=torch.int64),
             "labels": torch.randint(0, 2, (batch,), generator=g)} for _ in range(n)]


def build(method: str, bits: int, precision: str):
    strat, quantized, ssg = METHODS[method]
    torch.manual_seed(0)
    model = load_model("packaged-minilm", get_task("sst2"))
    qcfg = None
    if quantized:
        qcfg = QuantConfig(method=strat, wbits=8 if strat == "q8bert" else bits, abits=8)
        quantize_model(model, qcfg)
        calibrate(model, batches(1, 8, 32, seed=99))
    model.train()
    train = TrainConfig(optimizer="adam", lr=1e-5, weight_decay=0.0, scheduler="constant", warmup_ratio=0.0)
    w_opt, _, s_opt, _ = build_optimizers(model, train, qcfg, 100)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    ctx = StepContext(model=model, core=model, w_opt=w_opt, s_opt=s_opt, backward=lambda loss: loss.backward(),
                      autocast=autocast, no_sync=contextlib.nullcontext, max_grad_norm=1.0, rho=0.1)
    from squat_cli.train.strategies import default_clip

    ctx.clip = default_clip
    return model, make_strategy(strat, ctx, ssg), autocast


def time_method(method: str, data: list[dict], warmup: int, bits: int, precision: str) -> tuple[float, float]:
    model, strategy, autocast = build(method, bits, precision)
    torch.manual_seed(1)  # same dropout masks for both; a copy, so EMA buffers (q8bert) are not advanced twice
    with torch.no_grad(), autocast():
        plain = float(copy.deepcopy(model)(**data[0]).loss)
    torch.manual_seed(1)
    first = strategy.step(data[0])  # loss of the first pass on the same batch, same weights
    if abs(first - plain) > 1e-4 * max(1.0, abs(plain)):
        raise SystemExit(f"{method}: first-pass loss {first} != plain forward {plain}")
    times = []
    for i, b in enumerate(data[1:]):
        t = time.perf_counter()
        strategy.step(b)
        if i >= warmup - 1:
            times.append(time.perf_counter() - t)
    return statistics.median(times), first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--bf16", action="store_true", help="also time fp and squat under bf16 autocast")
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS.md")))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    data = batches(args.steps + args.warmup + 1, args.batch, args.tokens)
    rows = {}
    for m in args.methods.split(","):
        rows[m], _ = time_method(m, data, args.warmup, args.bits, "fp32")
        print(f"{m:12s} {rows[m]:.3f} s/step", flush=True)
    bf = {}
    if args.bf16:
        for m in ("fp", "lsq", "squat"):
            bf[m], _ = time_method(m, data, args.warmup, args.bits, "bf16")
            print(f"{m:12s} bf16 {bf[m]:.3f} s/step", flush=True)
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16)
    model, _, _ = build("fp", args.bits, "fp32")
    flops = model_flops_per_step(model, args.batch, args.tokens)
    lines = [
        "# Step-time benchmark", "",
        f"- machine: {platform.machine()}, {torch.get_num_threads()} threads, {platform.platform()}",
        f"- torch {torch.__version__}, python {platform.python_version()}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- batch {args.batch} x {args.tokens} tokens, all-MiniLM-L6-v2, W{args.bits}A8 for quantized methods",
        f"- measured matmul peak: fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s",
        "", "| method | s/step (median) | vs fp | vs lsq |", "|---|---|---|---|",
    ]
    for m, t in rows.items():
        vs_fp = f"{t / rows['fp']:.2f}x" if "fp" in rows else "-"
        vs_lsq = f"{t / rows['lsq']:.2f}x" if "lsq" in rows else "-"
        lines.append(f"| {m} | {t:.3f} | {vs_fp} | {vs_lsq} |")
    if "fp" in rows:
        mfu = flops / rows["fp"] / peak32
        lines += ["", f"FP step model FLOPs {flops / 1e9:.1f} GFLOP; MFU vs measured fp32 peak: {100 * mfu:.0f}%"]
    if bf:
        lines += ["", "| method | fp32 s/step | bf16 s/step | speed-up |", "|---|---|---|---|"]
        for m, t in bf.items():
            lines.append(f"| {m} | {rows.get(m, float('nan')):.3f} | {t:.3f} | {rows.get(m, float('nan')) / t:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
