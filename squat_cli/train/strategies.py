"""One small class per training method; each turns a batch into parameter updates.

Notation as in the paper: ``w`` are the weights (every trainable parameter
that is not a step size), ``s`` the LSQ step sizes, ``Q(w, s)`` the quantized
weights and ``eps`` SAM's perturbation (see ``sam.py``).

=========  ==================================================================
method     one step on batch B
=========  ==================================================================
fp         w <- opt_w(grad_w L(w))                          (plain fine-tuning)
lsq        one pass; w <- opt_w, s <- opt_s from the same gradients
q8bert     like lsq; Q8BERT's quantizers have no learned steps
qbert      like lsq; Q-BERT's group-wise ranges are not learned
joint      pass 1 at Q(w,s): eps; pass 2 at Q(w,s)+eps: w <- opt_w, s <- opt_s
fp-sam     joint on an unquantized model (plain SAM)
squat      Algorithm 1. pass 1 at Q(w_t,s_t): eps (s frozen);
           pass 2 at Q(w_t,s_t)+eps: w_{t+1} <- opt_w (s frozen);
           pass 3 at Q(w_{t+1},s_t): s_{t+1} <- opt_s (w frozen)   [fresh]
           reuse: no pass 3; the s step uses pass 1 of the *next* step,
           which is evaluated at Q(w_{t+1}, s_t) on the next batch (a next
           step without an ascent, under sam.every/probability: its weight
           pass, at Q(w_{t+1}, s_t) + the reused eps or unperturbed)
=========  ==================================================================

``opt_w`` is the recipe's optimizer (Adam/AdamW with a schedule), ``opt_s`` the
step-size optimizer (SGD by default). Gradient clipping applies to w only.

Two conventions of the SAM-type steps are options (``sam.*``): the weight step's
gradient through the quantizer (``weight_ste``: LSQ's clipping mask, or dQ/dw = 1
as Eq. 7 writes it) and whether the passes of one step share their dropout masks
(``dropout_replay``, see ``RngReplay``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from squat_cli.errors import DivergenceError
from squat_cli.quant.lsq import LsqQuantizer
from squat_cli.quant.methods import get_method
from squat_cli.quant.qlinear import clamp_steps, quant_layers, step_parameters, weight_parameters
from squat_cli.train.distill import Distiller, term_values
from squat_cli.train.rng_replay import RngReplay
from squat_cli.train.sam import Perturbation
from squat_cli.train.sam_schedule import ASCENT, PLAIN, REUSE, SamSchedule


@dataclass
class StepContext:
    """What a strategy needs from the loop, with no knowledge of files or devices."""

    model: nn.Module
    """The model to call (possibly wrapped for data parallelism)."""
    core: nn.Module
    """The unwrapped model (to find quantizers and parameters)."""
    w_opt: torch.optim.Optimizer
    s_opt: Optional[torch.optim.Optimizer]
    backward: Callable[[torch.Tensor], None]
    autocast: Callable[[], contextlib.AbstractContextManager]
    no_sync: Callable[[], contextlib.AbstractContextManager]
    max_grad_norm: Optional[float] = None
    clip: Optional[Callable[[list[torch.Tensor], float], None]] = None
    rho: float = 0.0
    grad_mean: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    """Mean over processes (None in a single process)."""
    sync_perturbation: bool = False
    """Average SAM's ascent gradient over processes (default: each process its own eps)."""
    aux_autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None
    """Autocast of the passes that make no weight update (SAM's ascent, SQuAT's step-size pass);
    None: ``autocast``."""
    weight_ste: str = "masked"
    """SAM's weight step through the weight quantizers: ``masked`` (LSQ's STE) or ``identity`` (dQ/dw = 1)."""
    dropout_replay: bool = False
    """Every pass of a step draws the dropout masks of its first pass."""
    schedule: SamSchedule = SamSchedule()
    """When SAM-type steps take their ascent, and on what part of the batch (``sam.every`` etc.)."""
    distiller: Optional[Distiller] = None
    """Distillation from the FP teacher: every pass's loss is the distillation loss (None: the task loss)."""


class Strategy:
    """Base: a single forward/backward, then both optimizers."""

    name = "fp"

    def __init__(self, ctx: StepContext):
        self.ctx = ctx
        self.w_params = [p for _, p in weight_parameters(ctx.core)]
        self.s_params = step_parameters(ctx.core)
        ids = {id(p) for p in self.s_params}
        self.s_named = [(n, p) for n, p in ctx.core.named_parameters() if id(p) in ids]
        self.step_count = 0
        device = next(ctx.core.parameters()).device
        self.rng = RngReplay(ctx.dropout_replay, device)
        self.wquantizers = [m.wq for _, m in quant_layers(ctx.core) if isinstance(m.wq, LsqQuantizer)]
        self.last_terms: dict[str, float] = {}
        """With distillation: each loss term of the last weight-update pass (for the run's history)."""

    # helpers -------------------------------------------------------------
    def loss(self, batch: dict, aux: bool = False) -> torch.Tensor:
        """The model's loss on ``batch``; ``aux``: a pass that makes no weight update (its own precision)."""
        autocast = self.ctx.aux_autocast if aux and self.ctx.aux_autocast is not None else self.ctx.autocast
        kd = self.ctx.distiller
        with autocast():
            out = self.ctx.model(**batch) if kd is None else self.ctx.model(**batch, **kd.student_kwargs())
        if kd is None:
            loss = out.loss
        else:
            loss, terms = kd.loss(out, len(batch["labels"]))
            if not aux:  # the passes that only steer an update are not recorded: no host read for them
                self.last_terms = term_values(terms)
        if not torch.isfinite(loss.detach()):
            raise DivergenceError(f"non-finite loss ({float(loss.detach())}) at step {self.step_count + 1}")
        return loss

    def prepare(self, batch: dict) -> None:
        """Before a step's passes: the teacher's outputs for ``batch`` (once per batch)."""
        if self.ctx.distiller is not None:
            self.ctx.distiller.prepare(batch)

    def _backward(self, loss: torch.Tensor) -> None:
        self.ctx.backward(loss)

    def _set_grad(self, params: list[nn.Parameter], on: bool) -> None:
        for p in params:
            p.requires_grad_(on)

    @contextlib.contextmanager
    def weight_step(self):
        """Around SAM's weight-update pass: the weight quantizers' STE as ``ctx.weight_ste`` says."""
        identity = self.ctx.weight_ste == "identity"
        for q in self.wquantizers:
            q.identity_ste = identity
        try:
            yield
        finally:
            for q in self.wquantizers:
                q.identity_ste = False

    def _clip_w(self) -> None:
        if self.ctx.max_grad_norm is not None and self.ctx.clip is not None:
            self.ctx.clip(self.w_params, self.ctx.max_grad_norm)

    def _step_w(self) -> None:
        self._clip_w()
        self.ctx.w_opt.step()
        self.ctx.w_opt.zero_grad(set_to_none=True)

    def _step_s(self) -> None:
        if self.ctx.s_opt is not None and self.s_params:
            self.ctx.s_opt.step()
            self.ctx.s_opt.zero_grad(set_to_none=True)
            clamp_steps(self.ctx.core)
            self._check_steps()

    def _check_steps(self) -> None:
        for name, p in self.s_named:
            if not torch.isfinite(p).all():
                raise DivergenceError(f"non-finite step size {name} at step {self.step_count + 1}")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What the strategy carries from step to step beyond parameters and optimizers (for checkpoints)."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def zero_all(self) -> None:
        self.ctx.w_opt.zero_grad(set_to_none=True)
        if self.ctx.s_opt is not None:
            self.ctx.s_opt.zero_grad(set_to_none=True)

    # the step ------------------------------------------------------------
    def step(self, batch: dict) -> float:
        """One optimizer step on ``batch``; returns the loss of its first pass."""
        self.prepare(batch)
        loss = self.loss(batch)
        self._backward(loss)
        self._step_w()
        self._step_s()
        self.step_count += 1
        return float(loss.detach())


class Plain(Strategy):
    """fp, lsq, q8bert and qbert: one pass, w and s updated together."""


class JointSam(Strategy):
    """SAM on the quantized weights; w and s both updated from the perturbed gradient (paper Eq. 5-7).

    On a model without quantizers this is plain SAM (``fp-sam``).
    """

    name = "joint"

    def __init__(self, ctx: StepContext):
        super().__init__(ctx)
        self.perturb = Perturbation(ctx.core, ctx.grad_mean if ctx.sync_perturbation else None)
        self.perturb.keep = ctx.schedule.keeps_eps
        self.last_grad_norm: Optional[float] = None
        """||grad|| of the last ascent (eps = rho * grad / ||grad||), for logging."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.perturb.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.perturb.load_state_tensors(tensors)

    def begin_step(self, batch: dict, ascent: Callable[[dict], torch.Tensor]) -> tuple[str, Optional[torch.Tensor]]:
        """Start a step as the schedule says: ascent (eps from this batch, or its first part), reuse of the
        stored eps, or no perturbation. Returns the mode and the ascent's loss (None without an ascent)."""
        mode = self.ctx.schedule.mode(self.step_count, self.perturb.stored is not None)
        self.rng.begin()
        if mode == ASCENT:
            loss = ascent(self.ctx.schedule.ascent_batch(batch))
            self.rng.replay()
            return mode, loss
        if mode == REUSE:
            self.perturb.apply_stored()
        return mode, None

    def ascent(self, batch: dict) -> torch.Tensor:
        """Pass 1 (no gradient sync): capture d L / d Q(w) and apply eps. Step sizes get no gradient."""
        self._set_grad(self.s_params, False)
        self.perturb.capture(True)
        try:
            with self.ctx.no_sync():
                loss = self.loss(batch, aux=True)
                self._backward(loss)
            self.last_grad_norm = self.perturb.apply(self.ctx.rho)
        finally:
            self.perturb.capture(False)
            self._set_grad(self.s_params, True)
        self.zero_all()
        return loss

    def step(self, batch: dict) -> float:
        self.prepare(batch)
        mode, loss = self.begin_step(batch, self.ascent)
        try:
            with self.weight_step() if mode != PLAIN else contextlib.nullcontext():
                descent = self.loss(batch)
                self._backward(descent)
        finally:
            self.perturb.restore()
        self.rng.end()
        self._step_w()
        self._step_s()
        self.step_count += 1
        return float((loss if loss is not None else descent).detach())


class SQuAT(JointSam):
    """Algorithm 1: a SAM step of w with s fixed, then an SGD step of s with w fixed."""

    name = "squat"

    def __init__(self, ctx: StepContext, step_size_grad: str = "fresh"):
        super().__init__(ctx)
        self.fresh = step_size_grad == "fresh"

    def step(self, batch: dict) -> float:
        self.prepare(batch)
        mode, loss = self.begin_step(batch, self.ascent if self.fresh else self._ascent_with_step_grad)
        # reuse on a step without an ascent (sam.every / probability): the weight pass carries the pending
        # step-size gradient, grad_s L at Q(w_t, s_t) (+ the reused eps), in place of the ascent pass
        s_in_weight_pass = not self.fresh and mode != ASCENT
        # pass 2: weight step at Q(w_t, s_t) + eps, s fixed
        if not s_in_weight_pass:
            self._set_grad(self.s_params, False)
        try:
            with self.weight_step() if mode != PLAIN else contextlib.nullcontext():
                descent = self.loss(batch)
                self._backward(descent)
        finally:
            self.perturb.restore()
            self._set_grad(self.s_params, True)
        if loss is None:
            loss = descent
        self._step_w()
        if s_in_weight_pass:
            if self.step_count > 0:
                self._step_s()
            elif self.ctx.s_opt is not None:
                self.ctx.s_opt.zero_grad(set_to_none=True)  # no step-size update is pending at step 0
        if self.fresh:
            # pass 3: step-size step at Q(w_{t+1}, s_t), w fixed
            self.rng.replay()
            self._set_grad(self.w_params, False)
            try:
                self._backward(self.loss(batch, aux=True))
            finally:
                self._set_grad(self.w_params, True)
            self._step_s()
        self.rng.end()
        self.step_count += 1
        return float(loss.detach())

    def _ascent_with_step_grad(self, batch: dict) -> torch.Tensor:
        """Pass 1 of ``reuse``: one backward gives eps and grad_s L(Q(w_t, s_{t-1})), the previous step's s update."""
        self.perturb.capture(True)
        try:
            with self.ctx.no_sync():
                loss = self.loss(batch, aux=True)
                self._backward(loss)
            if self.step_count > 0:
                if self.ctx.grad_mean is not None:  # pass 1 ran without sync; the s step is synced
                    for p in self.s_params:
                        if p.grad is not None:
                            p.grad.copy_(self.ctx.grad_mean(p.grad))
                self._step_s()
            elif self.ctx.s_opt is not None:
                self.ctx.s_opt.zero_grad(set_to_none=True)
            self.last_grad_norm = self.perturb.apply(self.ctx.rho)
        finally:
            self.perturb.capture(False)
        self.zero_all()
        return loss


STRATEGIES = {"plain": Plain, "joint": JointSam, "squat": SQuAT}
"""The classes behind the method table's ``strategy`` names (``quant/methods.py``)."""


def make_strategy(method: str, ctx: StepContext, step_size_grad: str = "fresh") -> Strategy:
    kind = get_method(method).strategy
    if kind not in STRATEGIES:
        raise ValueError(f"no training strategy for method {method!r} (it makes no training step)")
    if kind == "squat":
        return SQuAT(ctx, step_size_grad)
    return STRATEGIES[kind](ctx)


def default_clip(params: list[torch.Tensor], max_norm: float) -> None:
    grads = [p for p in params if p.grad is not None]
    if grads:
        torch.nn.utils.clip_grad_norm_(grads, max_norm)

