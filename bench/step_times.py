"""Training-step time of every method on all-MiniLM-L6-v2: ratios, MFU, bf16 vs fp32, pass-time floors.

    python bench/step_times.py [--rounds 6] [--batch 32] [--tokens 128] [--glue rte,sst2]
                               [--data-dir DIR] [--methods fp,lsq,joint,squat,squat-reuse,fp-sam,q8bert]
                               [--bf16] [--out bench/RESULTS-steps.md]

Every method trains its own copy of the packaged MiniLM (2-class head, W2A8 for
the quantized methods, built as ``squat quantize`` builds it: fast CPU dropout,
fused Adam). The methods take turns, one step each per round, so a slow
moment of a shared machine hits all of them alike; each reported time is a
median over rounds and each ratio the median of per-round ratios (same batch).
The fp32 (and bf16) matmul peak is measured between rounds, for MFU.

Batches: ``fixed`` is random tokens, exactly ``--tokens`` long; ``--glue TASK``
adds real batches of that task's training set (``--data-dir`` or
``$SQUAT_DATA_DIR``), shuffled and dynamically padded as ``squat`` trains.

Before timing, each method's first-pass loss is checked against a plain forward
of the same model on the same batch with the same dropout seed (a faster path
must not change the loss). Pass times (one forward+backward, one optimizer
step) give the floor each method's pass count implies.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_lines  # noqa: E402
from step_setup import (  # noqa: E402
    DEFAULT_METHODS,
    METHODS,
    SCHEDULES,
    base,
    build,
    device,
    fixed_batches,
    fused_kernels,
    glue_batches,
    set_device,
    step,
    sync,
    to_device,
)


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 6) -> float:
    """Measured FLOP/s of a square matmul on this machine (the MFU denominator)."""
    if device().type == "cuda":
        n, reps = 8192, 20
    a, b = torch.randn(n, n, dtype=dtype, device=device()), torch.randn(n, n, dtype=dtype, device=device())
    for _ in range(2):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def model_flops(model: torch.nn.Module, batch: dict) -> float:
    """6 * params(non-embedding) * tokens + attention (fwd+bwd), the usual training estimate, for one batch."""
    cfg = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n and "step" not in n)
    bsz, seq = batch["input_ids"].shape
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq  # per token, fwd+bwd, QK^T and AV
    return (6 * params + attn) * bsz * seq


def check_first_pass(method: str, model, strategy, autocast, batch: dict) -> str:
    """The method's first-pass loss equals a plain forward: same weights and dropout seed, unfused ops."""
    sam = METHODS[base(method)][3] > 1
    ascent = sam and strategy.ctx.schedule.mode(strategy.step_count, False) == "ascent"
    first_autocast = strategy.ctx.aux_autocast if strategy.ctx.aux_autocast and ascent else autocast
    first_batch = strategy.ctx.schedule.ascent_batch(batch) if ascent else batch  # ascent_fraction: a part
    torch.manual_seed(1)  # a copy, so EMA buffers (q8bert) are not advanced twice
    with torch.no_grad(), first_autocast(), fused_kernels(False):
        plain = float(copy.deepcopy(model)(**first_batch).loss)
    torch.manual_seed(1)
    first = step(method, strategy, batch)
    tol = 1e-5 if device().type == "cpu" else 1e-3  # GPU kernels may reorder sums between the two paths
    if abs(first - plain) > tol * max(1.0, abs(plain)):
        raise SystemExit(f"{method}: first-pass loss {first} != plain forward {plain}")
    return f"{method}: first-pass loss {first:.6f}, plain unfused forward {plain:.6f}"


def fwd_bwd_time(model, strategy, autocast, batch: dict) -> float:
    """One forward+backward of the whole model (gradients discarded, no update)."""
    sync()
    t = time.perf_counter()
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    sync()
    elapsed = time.perf_counter() - t
    strategy.zero_all()
    return elapsed


def run_rounds(names: list[str], data: list[dict], warmup: int, bits: int, precision: str) -> dict:
    built = {m: build(base(m), bits, "bf16" if m.endswith("@bf16") else precision) for m in names}
    data = [to_device(b) for b in data]
    checks = [check_first_pass(m, model, strategy, autocast, data[0]) for m, (model, strategy, autocast) in built.items()]
    times: dict[str, list[float]] = {m: [] for m in names}
    ascents: dict[str, list[bool]] = {m: [] for m in names}  # whether each timed step made an ascent
    passes: dict[str, list[float]] = {m: [] for m in ("fp", "lsq") if m in names}
    flops, peaks = [], {torch.float32: [], torch.bfloat16: []}
    for r, batch in enumerate(data[1:]):
        for m, (_, strategy, _) in built.items():  # noqa: B007
            ascent = strategy.ctx.schedule.mode(strategy.step_count, True) == "ascent"
            sync()
            t = time.perf_counter()
            step(m, strategy, batch)
            sync()
            if r >= warmup:
                times[m].append(time.perf_counter() - t)
                ascents[m].append(ascent)
        if r < warmup:
            continue
        for m in passes:
            passes[m].append(fwd_bwd_time(*built[m], batch))
        flops.append(model_flops(built[names[0]][0], batch))
        for dt in peaks:
            peaks[dt].append(matmul_peak(dt))
        print(f"  round {r + 1 - warmup}/{len(data) - 1 - warmup}: "
              + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in names), flush=True)
    return {"times": times, "ascents": ascents, "flops": flops, "peak32": statistics.median(peaks[torch.float32]),
            "peak16": statistics.median(peaks[torch.bfloat16]), "passes": passes, "precision": precision,
            "checks": checks}


def amortised(m: str) -> bool:
    return METHODS[base(m)][4] in SCHEDULES


WARNED: set[str] = set()


def ascent_share(m: str) -> float:
    """The share of steps that make an ascent, by the schedule's definition: probability / every."""
    sched = SCHEDULES[METHODS[base(m)][4]]
    return sched.probability / sched.every


def step_cost(res: dict, m: str) -> float:
    """Seconds per step: the median; for a schedule variant the expected cost per step, share x mean ascent step +
    (1 - share) x mean other step, so a handful of rounds that happens to hold more or fewer ascents than the
    schedule's share does not bias it."""
    t = res["times"][m]
    if not amortised(m):
        return statistics.median(t)
    share = ascent_share(m)
    up = [x for x, a in zip(t, res["ascents"][m]) if a]
    other = [x for x, a in zip(t, res["ascents"][m]) if not a]
    if share >= 1.0 or not other:
        return statistics.mean(up or t)
    if not up:  # too few rounds to hold an ascent (a --quick smoke run): the plain mean, said aloud once
        if m not in WARNED:
            WARNED.add(m)
            print(f"warning: {m}: no ascent step among the timed rounds; its cost leaves the ascent out (--rounds)",
                  file=sys.stderr)
        return statistics.mean(other)
    return share * statistics.mean(up) + (1 - share) * statistics.mean(other)


def ratio(res: dict, a: str, b: str) -> float:
    """Median of per-round ratios; for a schedule variant, its expected cost per step over the other's."""
    if amortised(a) or amortised(b):
        return step_cost(res, a) / step_cost(res, b)
    return statistics.median(x / y for x, y in zip(res["times"][a], res["times"][b]))


def floor_ratio(res: dict, m: str) -> str:
    """Per round: (passes - 1) extra forward+backward passes on top of an LSQ step, over that LSQ step."""
    if "@" in m:
        return "-"
    ref = "lsq" if METHODS[m][1] else "fp"
    if METHODS[m][4] or ref not in res["passes"] or "lsq" not in res["times"]:
        return "-"
    n = METHODS[m][3]
    vals = [((n - 1) * fb + step) / lsq for fb, step, lsq in
            zip(res["passes"][ref], res["times"][ref], res["times"]["lsq"])]
    return f"{statistics.median(vals):.2f}x"


def table(res: dict, title: str) -> list[str]:
    t = res["times"]
    med = {m: step_cost(res, m) for m in t}
    lines = [f"### {title}", "",
             "| method | passes | s/step (median) | vs fp | vs lsq | floor vs lsq |", "|---|---|---|---|---|---|"]
    for m in t:
        vs_fp = f"{ratio(res, m, 'fp'):.2f}x" if "fp" in t else "-"
        vs_lsq = f"{ratio(res, m, 'lsq'):.2f}x" if "lsq" in t else "-"
        lines.append(f"| {m} | {METHODS[base(m)][3]:g} | {med[m]:.3f} | {vs_fp} | {vs_lsq} | {floor_ratio(res, m)} |")
    lines += ["", "floor: the method's forward+backward passes at the measured cost of one LSQ (fp-sam: FP) pass, "
                  "plus one optimizer update, relative to the LSQ step of the same round. Variants `+every4`, "
                  "`+rst0.5`, `+frac0.25` (sam.every=4, sam.probability=0.5, sam.ascent_fraction=0.25; with `squat-reuse`, "
                  "steps without an ascent take the step-size gradient from their weight pass): expected cost "
                  "per step (share of ascent steps by the schedule x their mean time + the rest x theirs), "
                  "passes = expected passes per step.",
              "Same-loss checks (first pass vs a plain forward with the unfused ops, same batch and dropout seed): "
              + "; ".join(res["checks"]) + "."]
    if res["passes"]:
        lines.append("One forward+backward (median): " + ", ".join(
            f"{m} {statistics.median(v):.3f} s" for m, v in res["passes"].items()))
    if "fp" in t:
        bf16 = res["precision"] == "bf16"
        peak = res["peak16"] if bf16 else res["peak32"]
        mfu = sum(res["flops"]) / sum(t["fp"]) / peak
        lines += ["", f"FP step: {statistics.mean(res['flops']) / 1e9:.1f} GFLOP/step (model FLOPs); measured matmul "
                      f"peak fp32 {res['peak32'] / 1e9:.1f} GFLOP/s, bf16 {res['peak16'] / 1e9:.1f} GFLOP/s; "
                      f"**FP step MFU {100 * mfu:.0f}% of the measured {'bf16' if bf16 else 'fp32'} peak**"]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds (one step of each method per round)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--glue", default=None, help="also time real dynamically padded batches of these tasks (e.g. rte,sst2)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--bf16", action="store_true", help="also time fp, lsq and squat under bf16 autocast")
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-steps.md")))
    ap.add_argument("--json", default=None, help="also write the medians and ratios as JSON here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (models, batches and the matmul peak there)")
    args = ap.parse_args()
    set_device(args.device)
    names = args.methods.split(",")
    n = args.rounds + args.warmup + 1
    sections = [("fixed", f"batch {args.batch} x {args.tokens} tokens (fixed length), fp32",
                 fixed_batches(n, args.batch, args.tokens), names, "fp32")]
    for task in (args.glue or "").split(","):
        if task:
            sections.append((task, f"batch {args.batch}, real {task.upper()} batches, dynamic padding "
                                   f"(max {args.tokens}), fp32",
                             glue_batches(task, n, args.batch, args.tokens, args.data_dir), names, "fp32"))
    if args.bf16:  # fp32 and bf16 of each method, interleaved
        bf = [v for m in ("fp", "lsq", "squat") if m in names for v in (m, f"{m}@bf16")]
        sections.append(("bf16", f"batch {args.batch} x {args.tokens} tokens, fp32 and bf16 autocast (`@bf16`)",
                         fixed_batches(n, args.batch, args.tokens), bf, "fp32"))
    results = {}
    for key, title, data, ms, precision in sections:
        print(f"== {title}", flush=True)
        results[key] = run_rounds(ms, data, args.warmup, args.bits, precision)
    lines = [
        "# Step-time benchmark", "",
        *machine_lines(),
        f"- all-MiniLM-L6-v2, W{args.bits}A8 for quantized methods (q8bert: W8A8); {args.rounds} timed rounds "
        f"after {args.warmup} warm-up; device {device()}"
        + (f" ({torch.cuda.get_device_name()})" if device().type == "cuda" else ""), "",
    ]
    for key, title, *_ in sections:
        lines += table(results[key], title)
    summary: dict = {"sections": {}}
    for key, res in results.items():
        t = res["times"]
        sec = {"median_s": {m: step_cost(res, m) for m in t}, "ratios": {}}
        for a, b in (("lsq", "fp"), ("squat", "lsq"), ("squat-reuse", "lsq"), ("joint", "lsq"), ("fp-sam", "fp"),
                     ("squat+aux-bf16", "lsq"), ("squat-reuse+aux-bf16", "lsq"), ("fp+nn-dropout", "fp"),
                     ("lsq+unfused", "lsq"), ("squat+every4", "lsq"), ("squat+rst0.5", "lsq"),
                     ("squat+frac0.25", "lsq"), ("squat-reuse+every4", "lsq"), ("squat-reuse+rst0.5", "lsq")):
            if a in t and b in t:
                sec["ratios"][f"{a}/{b}"] = ratio(res, a, b)
        if "fp" in t and res["precision"] == "fp32":
            sec["mfu_fp32"] = sum(res["flops"]) / sum(t["fp"]) / res["peak32"]
        sec["peak_fp32"], sec["peak_bf16"] = res["peak32"], res["peak16"]
        summary["sections"][key] = sec
    if "bf16" in results:
        b = results["bf16"]
        lines += ["### bf16 autocast vs fp32 (same rounds, fixed-length batches)", "",
                  "| method | fp32 s/step | bf16 s/step | speed-up (median of rounds) |", "|---|---|---|---|"]
        summary["bf16_speedup"] = {}
        for m in ("fp", "lsq", "squat"):
            if m in b["times"]:
                up = ratio(b, m, f"{m}@bf16")
                summary["bf16_speedup"][m] = up
                lines.append(f"| {m} | {statistics.median(b['times'][m]):.3f} | "
                             f"{statistics.median(b['times'][m + '@bf16']):.3f} | {up:.2f}x |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
