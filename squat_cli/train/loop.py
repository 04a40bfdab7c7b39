"""The shared training loop: devices and precision (accelerate), optimizers, schedules, evaluation.

Every method runs through ``fit``; what differs between methods is the
strategy object (``strategies.py``) that turns a batch into updates.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from squat_cli.batching import train_loader
from squat_cli.data import Encoded
from squat_cli.dev_scores import evaluate, to_device
from squat_cli.errors import SquatError
from squat_cli.glue import GlueTask
from squat_cli.progress import Reporter
from squat_cli.quant.convert import step_summary
from squat_cli.quant.qlinear import step_parameters, weight_parameters
from squat_cli.recipe import QuantConfig, Recipe, TrainConfig
from squat_cli.train.checkpoint import load_checkpoint, save_checkpoint
from squat_cli.train.distill import Distiller
from squat_cli.train.fast_dropout import use_fast_dropout
from squat_cli.train.sam_schedule import SamSchedule
from squat_cli.train.strategies import StepContext, default_clip, make_strategy
from squat_cli.train.tracking import Tracking


def make_accelerator(precision: str = "fp32", cpu: bool = False, report_to: str = "none",
                     log_dir: Optional[Path] = None):
    """An ``accelerate.Accelerator``: CUDA when present, bf16 autocast when asked, a tracker writing into
    ``log_dir`` when ``report_to`` names one."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, PartialState

    if not PartialState._shared_state or PartialState().num_processes == 1:
        # one process: allow a fresh precision setting per run (tests run many in one process)
        AcceleratorState._reset_state(reset_partial_state=False)
    # strategies freeze w or s for some passes: DDP must accept parameters without gradients
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    # without CUDA, say cpu=True: that is what makes accelerate use gloo under torchrun / accelerate launch
    cpu = cpu or not torch.cuda.is_available()
    tracking = {}
    if report_to != "none":
        import importlib.util

        if importlib.util.find_spec(report_to) is None:
            raise SquatError(f"train.report_to: {report_to} needs the {report_to} package "
                             f"(pip install {report_to}, or the squat[track] extra)")
        tracking = {"log_with": report_to, "project_dir": str(log_dir) if log_dir else None}
    return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=cpu, kwargs_handlers=[ddp],
                       **tracking)


def seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed

    set_seed(seed)


def _distiller(recipe: Recipe, teacher: Optional[nn.Module], task: GlueTask, acc) -> Optional[Distiller]:
    if recipe.distill is None:
        return None
    if teacher is None:
        raise SquatError("distill: this run distils, but no teacher model was given")
    return Distiller(teacher, recipe.distill, task.is_regression, acc.autocast)


def build_optimizers(
    core: nn.Module, train: TrainConfig, quant: Optional[QuantConfig], total_steps: int
) -> tuple[torch.optim.Optimizer, Any, Optional[torch.optim.Optimizer], Any]:
    """The weight optimizer (no decay on 1-D tensors), the step-size optimizer and their schedules."""
    from transformers import get_scheduler

    decay, no_decay = [], []
    for _, p in weight_parameters(core):
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernels do the whole update in one pass over each tensor (on CPU ~5x faster than foreach)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    if train.optimizer == "adamw":
        w_opt = torch.optim.AdamW(groups, lr=train.lr, fused=fused or None)
    elif train.optimizer == "adam":
        w_opt = torch.optim.Adam(groups, lr=train.lr, fused=fused or None)
    else:
        w_opt = torch.optim.SGD(groups, lr=train.lr, momentum=0.9)
    warmup = int(round(train.warmup_ratio * total_steps))
    w_sched = get_scheduler(train.scheduler, w_opt, num_warmup_steps=warmup, num_training_steps=total_steps)
    s_opt = s_sched = None
    steps = step_parameters(core)
    if steps and quant is not None:
        if quant.step_optimizer == "sgd":
            s_opt = torch.optim.SGD(steps, lr=quant.step_lr, momentum=quant.step_momentum)
        else:
            s_opt = torch.optim.Adam(steps, lr=quant.step_lr)
        s_sched = get_scheduler(train.scheduler, s_opt, num_warmup_steps=warmup, num_training_steps=total_steps)
    return w_opt, w_sched, s_opt, s_sched


def aux_autocast(train: TrainConfig, acc) -> Optional[Callable]:
    """Autocast for the passes that make no weight update (``train.aux_precision``); None: as the run."""
    if train.aux_precision == "same" or train.precision == train.aux_precision:
        return None
    device_type = acc.device.type
    return lambda: torch.autocast(device_type, dtype=torch.bfloat16)


@dataclass
class FitResult:
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    epochs: float = 0.0
    train_examples: int = 0
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    """Wall time of the training steps alone (without evaluation and checkpoints)."""
    train_cpu_s: float = 0.0
    """This process's CPU time (all its threads) over the same steps."""
    threads: int = 1
    train_loss: float = float("nan")


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(n_examples / batch_size))


def total_steps(train: TrainConfig, n_examples: int) -> int:
    if train.max_steps is not None:
        return train.max_steps
    return max(1, math.ceil(train.epochs * steps_per_epoch(n_examples, train.batch_size)))


def fit(
    model: nn.Module,
    task: GlueTask,
    train_enc: Encoded,
    dev: dict[str, Encoded],
    recipe: Recipe,
    method: str,
    pad_id: int,
    reporter: Optional[Reporter] = None,
    on_eval: Optional[Callable[[dict[str, Any]], None]] = None,
    accelerator=None,
    checkpoint_dir: Optional[Path] = None,
    resume: bool = False,
    on_resume: Optional[Callable[[list[dict[str, Any]]], None]] = None,
    teacher: Optional[nn.Module] = None,
) -> FitResult:
    """Train ``model`` with ``method`` and evaluate on ``dev``; returns the final metrics and history.

    With ``checkpoint_dir``, a resumable checkpoint is written every ``train.save_every`` steps and
    at each epoch end; ``resume`` continues from it (``on_resume`` gets the restored history). ``teacher``:
    the FP model a distilled run (``recipe.distill``) learns from; every evaluation then records the mean of
    each loss term over the steps since the last one (``train_kd_<term>``).
    """
    reporter = reporter or Reporter()
    t = recipe.train
    acc = accelerator or make_accelerator(t.precision)
    seed_everything(t.seed)
    loader = train_loader(train_enc, t.batch_size, t.seed, pad_id, t.group_by_length,
                          rank=acc.process_index, world=acc.num_processes)
    spe = steps_per_epoch(len(train_enc), t.batch_size)
    total = total_steps(t, len(train_enc))
    w_opt, w_sched, s_opt, s_sched = build_optimizers(model, t, recipe.quant, total)
    distributed = acc.num_processes > 1
    if t.fast_dropout and acc.device.type == "cpu":
        use_fast_dropout(model)
    model = acc.prepare(model)
    core = acc.unwrap_model(model)
    ctx = StepContext(
        model=model, core=core, w_opt=w_opt, s_opt=s_opt, backward=acc.backward, autocast=acc.autocast,
        no_sync=lambda: acc.no_sync(model), max_grad_norm=t.max_grad_norm, clip=default_clip,
        rho=recipe.sam.rho, grad_mean=(lambda g: acc.reduce(g, "mean")) if distributed else None,
        sync_perturbation=recipe.sam.sync_perturbation, aux_autocast=aux_autocast(t, acc),
        weight_ste=recipe.sam.weight_ste, dropout_replay=recipe.sam.dropout_replay,
        schedule=SamSchedule(recipe.sam.every, recipe.sam.probability, recipe.sam.ascent_fraction, t.seed),
        distiller=_distiller(recipe, teacher, task, acc),
    )
    qcfg = recipe.quant
    strategy = make_strategy(method, ctx, qcfg.step_size_grad if qcfg else "fresh")
    device = acc.device
    optimizers = {"w": w_opt, "s": s_opt}
    schedulers = {"w": w_sched, "s": s_sched}
    st: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "seen": 0, "recent": [], "history": [],
                          "elapsed": 0.0, "strategy_steps": 0, "kd_terms": {}}
    if resume and checkpoint_dir is not None and (checkpoint_dir / "manifest.json").is_file():
        st, strategy_state = load_checkpoint(checkpoint_dir, core, optimizers, schedulers)
        strategy.step_count = st["strategy_steps"]
        strategy.load_state_tensors(strategy_state)
        if on_resume and acc.is_main_process:
            on_resume(st["history"])
        reporter.message(f"resumed from step {st['step']} (epoch {st['epoch']}, batch {st['batch']})")
    last_metrics: dict[str, float] = st["history"][-1] if st["history"] else {}
    start = time.perf_counter() - st["elapsed"]
    cpu_start = time.process_time() - st.get("cpu_elapsed", 0.0)
    n_epochs = math.ceil(total / spe)
    model.train()
    tracking = Tracking(acc)
    tracking.start(recipe.to_dict())
    reporter.start(total, f"{task.display} {method}")
    reporter.update(st["step"], loss=float("nan"), ex_s=0.0)

    def run_eval(at_epoch: float) -> None:
        nonlocal last_metrics
        t0, c0 = time.perf_counter(), time.process_time()
        m = evaluate(core, task, dev, t.eval_batch_size, pad_id, device, acc.autocast)
        recent = st["recent"]
        rec = {"step": st["step"], "epoch": round(at_epoch, 4), **m,
               "train_loss": float(np.mean(recent)) if recent else None}
        rec.update(step_summary(core))
        for term, values in st.get("kd_terms", {}).items():  # distillation: each term's mean since the last one
            rec[f"train_kd_{term}"] = float(np.mean(values)) if values else None
        st["kd_terms"] = {}
        tracking.log({f"eval/{k}": v for k, v in m.items()}, st["step"])
        st["history"].append(rec)
        last_metrics = m
        if on_eval and acc.is_main_process:
            on_eval(rec)
        shown = ", ".join(f"{k} {m[k]:.4f}" for k in task.metric_names())
        reporter.message(f"step {st['step']} epoch {at_epoch:.2f}: {shown}, eval_loss {m['eval_loss']:.4f}")
        st["overhead"] = st.get("overhead", 0.0) + time.perf_counter() - t0
        st["cpu_overhead"] = st.get("cpu_overhead", 0.0) + time.process_time() - c0

    def save() -> None:
        if checkpoint_dir is None or not acc.is_main_process:
            return
        t0, c0 = time.perf_counter(), time.process_time()
        st["elapsed"], st["cpu_elapsed"] = t0 - start, c0 - cpu_start
        st["strategy_steps"] = strategy.step_count
        save_checkpoint(checkpoint_dir, core, optimizers, schedulers, st, strategy.state_tensors())
        st["overhead"] = st.get("overhead", 0.0) + time.perf_counter() - t0
        st["cpu_overhead"] = st.get("cpu_overhead", 0.0) + time.process_time() - c0

    try:
        if t.eval_at_start and st["step"] == 0 and not st["history"]:
            run_eval(0.0)
        for epoch in range(st["epoch"], n_epochs):
            loader.sampler.set_epoch(epoch, st["batch"] if epoch == st["epoch"] else 0)
            st["epoch"] = epoch
            for batch in loader:
                if st["step"] >= total:
                    break
                batch = to_device(batch, device)
                loss = strategy.step(batch)
                w_sched.step()
                if s_sched is not None:
                    with warnings.catch_warnings():  # squat/reuse makes no s step on its first step
                        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                        s_sched.step()
                st["step"] += 1
                st["batch"] += 1
                st["seen"] += len(batch["labels"]) * acc.num_processes
                st["recent"].append(loss)
                for term, value in strategy.last_terms.items():
                    st["kd_terms"].setdefault(term, []).append(value)
                step = st["step"]
                if step % t.log_every == 0 or step == total:
                    elapsed = time.perf_counter() - start
                    mean_loss = float(np.mean(st["recent"][-t.log_every:]))
                    reporter.update(step, loss=mean_loss, ex_s=st["seen"] / max(elapsed, 1e-9))
                    if tracking.enabled:
                        summary = step_summary(core)
                        tracking.log({"train/loss": mean_loss, "train/lr": w_sched.get_last_lr()[0],
                                      "train/sam_grad_norm": getattr(strategy, "last_grad_norm", None),
                                      "quant/mean_wstep": summary.get("mean_wstep"),
                                      "quant/mean_astep": summary.get("mean_astep")}, step)
                if t.eval_strategy == "steps" and step % t.eval_steps == 0 and step < total:
                    run_eval(step / spe)
                if t.save_every and step % t.save_every == 0 and step < total and st["batch"] < spe:
                    save()
            if st["step"] >= total:
                break
            st["epoch"], st["batch"] = epoch + 1, 0
            if t.eval_strategy == "epoch":
                run_eval(epoch + 1)
            st["recent"] = []
            save()
        run_eval(st["step"] / spe)
    finally:
        reporter.stop()
        tracking.end()
    recent = st["recent"]
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return FitResult(
        metrics=last_metrics, history=st["history"], steps=st["step"], epochs=st["step"] / spe,
        train_examples=len(train_enc), wall_time_s=wall, train_time_s=wall - st.get("overhead", 0.0),
        train_cpu_s=cpu - st.get("cpu_overhead", 0.0), threads=torch.get_num_threads(),
        train_loss=float(np.mean(recent)) if recent else float("nan"),
    )


__all__ = ["fit", "make_accelerator", "build_optimizers", "FitResult", "total_steps"]
