"""What the step benchmarks time: each method's table entry, its model and training step, and the batches.

Shared by ``bench/step_times.py`` (timing and tables) and ``bench/profile_step.py`` (which ops take the time).
Every method trains its own copy of the packaged MiniLM (2-class head, W2A8 for the quantized methods, built as
``squat quantize`` builds it: fast CPU dropout, fused Adam).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from squat_cli.compiled import FUSED_ENV  # noqa: E402
from squat_cli.glue import get_task  # noqa: E402
from squat_cli.models import load_model  # noqa: E402
from squat_cli.quant.convert import calibrate, quantize_model  # noqa: E402
from squat_cli.recipe import QuantConfig, TrainConfig  # noqa: E402
from squat_cli.train.fast_dropout import use_fast_dropout  # noqa: E402
from squat_cli.train.loop import build_optimizers  # noqa: E402
from squat_cli.train.sam_schedule import SamSchedule  # noqa: E402
from squat_cli.train.strategies import StepContext, default_clip, make_strategy  # noqa: E402

METHODS = {  # name -> (strategy method, quantized?, step_size_grad, forward/backward passes per step, variant)
    "fp": ("fp", False, "fresh", 1, ""),
    "lsq": ("lsq", True, "fresh", 1, ""),
    "joint": ("joint", True, "fresh", 2, ""),
    "squat": ("squat", True, "fresh", 3, ""),
    "squat-reuse": ("squat", True, "reuse", 2, ""),
    "fp-sam": ("fp-sam", False, "fresh", 2, ""),
    "q8bert": ("q8bert", True, "fresh", 1, ""),
    # the same methods with one speed option changed, to show what each option buys
    "squat+aux-bf16": ("squat", True, "fresh", 3, "aux-bf16"),  # train.aux_precision=bf16
    "squat-reuse+aux-bf16": ("squat", True, "reuse", 2, "aux-bf16"),
    "fp+nn-dropout": ("fp", False, "fresh", 1, "nn-dropout"),  # train.fast_dropout=false
    "lsq+unfused": ("lsq", True, "fresh", 1, "unfused"),  # SQUAT_FUSED=0
    # cheaper SAM steps (sam.every / sam.probability / sam.ascent_fraction): amortised over rounds
    "squat+every4": ("squat", True, "fresh", 2.25, "every4"),
    "squat+rst0.5": ("squat", True, "fresh", 2.5, "rst0.5"),
    "squat+frac0.25": ("squat", True, "fresh", 2.25, "frac0.25"),
    "squat-reuse+every4": ("squat", True, "reuse", 1.25, "every4"),  # ascent 1 in 4, no step-size pass
    "squat-reuse+rst0.5": ("squat", True, "reuse", 1.5, "rst0.5"),
}
SCHEDULES = {"every4": SamSchedule(every=4), "rst0.5": SamSchedule(probability=0.5),
             "frac0.25": SamSchedule(fraction=0.25)}
"""Variants whose cost changes from step to step: their time is the mean over rounds (amortised)."""
DEFAULT_METHODS = ("fp,lsq,joint,squat,squat-reuse,fp-sam,q8bert,squat+aux-bf16,squat-reuse+aux-bf16,fp+nn-dropout,"
                   "lsq+unfused,squat+every4,squat+rst0.5,squat+frac0.25,squat-reuse+every4,squat-reuse+rst0.5")


@contextlib.contextmanager
def fused_kernels(on: bool):
    """SQUAT_FUSED for the duration (the unfused variant times the plain eager ops)."""
    old = os.environ.get(FUSED_ENV)
    os.environ[FUSED_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[FUSED_ENV]
        else:
            os.environ[FUSED_ENV] = old


DEVICE = torch.device("cpu")
"""Where models and batches live (``--device``, set by :func:`set_device`); CPU by default."""


def device() -> torch.device:
    return DEVICE


def set_device(name: str) -> None:
    global DEVICE
    DEVICE = torch.device(name)


def sync() -> None:
    """Wait for queued device work (CUDA is asynchronous), so wall-clock timings are right."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def to_device(batch: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in batch.items()}


def fixed_batches(n: int, batch: int, tokens: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1000, 29000, (batch, tokens), generator=g),
             "attention_mask": torch.ones(batch, tokens, dtype=torch.int64),
             "token_type_ids": torch.zeros(batch, tokens, dtype=torch.int64),
             "labels": torch.randint(0, 2, (batch,), generator=g)} for _ in range(n)]


def glue_batches(task_name: str, n: int, batch: int, max_len: int, data_dir: str | None, seed: int = 0,
                 two_class: bool = True) -> list[dict]:
    """``n`` shuffled, dynamically padded training batches of a GLUE task, as ``squat`` builds them; ``two_class``:
    labels folded to 0/1 for the step benchmarks' 2-class head (False: the task's own labels)."""
    from squat_cli.batching import train_loader
    from squat_cli.data import encode, load_split, resolve_data_dir
    from squat_cli.models import load_tokenizer

    task = get_task(task_name)
    tok = load_tokenizer("packaged-minilm")
    enc = encode(load_split(task, "train", resolve_data_dir(data_dir), "local"), tok, max_len, task.is_regression)
    out = []
    for b in train_loader(enc, batch, seed=seed, pad_id=tok.pad_token_id):
        if two_class:
            b["labels"] = b["labels"] % 2
        out.append(b)
        if len(out) == n:
            break
    return out


def build(method: str, bits: int, precision: str):
    strat, quantized, ssg, _, variant = METHODS[method]
    torch.manual_seed(0)
    model = load_model("packaged-minilm", get_task("sst2"))
    qcfg = None
    if quantized:
        qcfg = QuantConfig(method=strat, wbits=8 if strat == "q8bert" else bits, abits=8)
        quantize_model(model, qcfg)
        model.to(DEVICE)
        calibrate(model, [to_device(b) for b in fixed_batches(1, 8, 32, seed=99)])
    model.to(DEVICE)
    train = TrainConfig(optimizer="adam", lr=1e-5, weight_decay=0.0, scheduler="constant", warmup_ratio=0.0)
    if train.fast_dropout and variant != "nn-dropout":
        use_fast_dropout(model)  # what `squat` training does on CPU
    model.train()
    w_opt, _, s_opt, _ = build_optimizers(model, train, qcfg, 100)
    autocast = (lambda: torch.autocast(DEVICE.type, dtype=torch.bfloat16)) if precision == "bf16" else \
        contextlib.nullcontext
    ctx = StepContext(model=model, core=model, w_opt=w_opt, s_opt=s_opt, backward=lambda loss: loss.backward(),
                      autocast=autocast, no_sync=contextlib.nullcontext, max_grad_norm=1.0, clip=default_clip,
                      rho=0.1)
    if variant == "aux-bf16":
        ctx.aux_autocast = lambda: torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    if variant in SCHEDULES:
        ctx.schedule = SCHEDULES[variant]
    return model, make_strategy(strat, ctx, ssg), autocast


def base(method: str) -> str:
    """``lsq@bf16`` -> ``lsq``: a method name with its precision suffix removed."""
    return method.split("@")[0]


def step(method: str, strategy, batch: dict) -> float:
    with fused_kernels(METHODS[base(method)][4] != "unfused"):
        return strategy.step(batch)
