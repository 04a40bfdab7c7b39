"""The LSQ quantizer (Esser et al. 2020): learned step size, STE rounding, scaled step gradient.

    Q(x) = round(clip(x / s, Qn, Qp)) * s        signed n-bit: Qn = -2^(n-1), Qp = 2^(n-1) - 1

Gradients (one fused autograd function, value and both gradients in one pass):

    dQ/dx = 1            if Qn < x/s < Qp, else 0          (straight-through inside the range)
    dQ/ds = round(x/s) - x/s   if Qn < x/s < Qp
          = Qn               if x/s <= Qn
          = Qp               if x/s >= Qp

and the step gradient is multiplied by ``g = 1 / sqrt(N * Qp)``, N the number of
elements sharing one step. ``torch.round`` rounds halves to even.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

MIN_STEP = 1e-8


def signed_range(bits: int) -> tuple[int, int]:
    """(Qn, Qp) of a signed ``bits``-bit integer grid; 2 bits -> (-2, 1)."""
    if not 2 <= bits <= 32:
        raise ValueError(f"bits must be in 2..32, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dimensions that were broadcast from ``shape``."""
    if t.shape == shape:
        return t
    if len(shape) == 1 and shape[0] == 1:
        return t.sum().reshape(shape)
    return t.sum_to_size(shape)


def _sum_product(a: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``(a * b)`` summed down to ``shape``; a single dot product (no temporary) for a per-tensor step."""
    if shape.numel() == 1 and a.dtype in (torch.float32, torch.float64) and a.dtype == b.dtype:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    if shape.numel() == 1:
        return (a * b).sum(dtype=torch.float32).to(a.dtype).reshape(shape)
    return _reduce_to(a * b, shape)


class LsqFakeQuant(torch.autograd.Function):
    """Fake-quantize ``x`` with step ``s``; backward gives LSQ's gradients (step grad scaled by ``g``).

    The forward pass keeps only what the backward needs: the in-range mask, and
    ``dQ/ds`` when the step is trained. With the step frozen (SQuAT's weight
    passes) that is one boolean per element.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
        xs = x / s
        q = xs.clamp(qn, qp).round_()
        out = q * s
        ctx.meta = (qn, qp, g, s.shape)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return out
        inside = torch.gt(xs, qn).logical_and_(torch.lt(xs, qp))
        if ctx.needs_input_grad[1]:
            # inside: round(x/s) - x/s; clipped: q already equals Qn or Qp, and q - x/s is replaced by q.
            ds = torch.where(inside, q - xs, q)
            ctx.save_for_backward(inside, ds)
        else:
            ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qn, qp, g, s_shape = ctx.meta
        inside = ctx.saved_tensors[0]
        grad_x = torch.where(inside, grad, 0.0) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            grad_s = _sum_product(grad, ctx.saved_tensors[1], s_shape) * g
        return grad_x, grad_s, None, None, None


def lsq_quantize(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float = 1.0) -> torch.Tensor:
    return LsqFakeQuant.apply(x, s, qn, qp, g)


class LsqQuantizer(nn.Module):
    """One learned step size per tensor (shape ``(1,)``) or per output channel (``(C, 1)``).

    ``initialized`` is False until the step is set from data (weights: at conversion;
    activations: by calibration). An uninitialised activation quantizer passes input through.
    """

    def __init__(self, bits: int, channels: Optional[int] = None, learnable: bool = True):
        super().__init__()
        self.bits = bits
        self.qn, self.qp = signed_range(bits)
        shape = (channels, 1) if channels else (1,)
        self.step = nn.Parameter(torch.ones(shape), requires_grad=learnable)
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def per_channel(self) -> bool:
        return self.step.dim() == 2

    def grad_scale(self, x: torch.Tensor) -> float:
        n = x.numel() // self.step.numel()
        return 1.0 / math.sqrt(n * self.qp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            return x
        s = self.step if self.step.dtype == x.dtype else self.step.to(x.dtype)
        return lsq_quantize(x, s, self.qn, self.qp, self.grad_scale(x))

    @torch.no_grad()
    def init_lsq(self, x: torch.Tensor) -> None:
        """LSQ's initialisation ``2 * mean|x| / sqrt(Qp)`` (per row when per-channel)."""
        if self.per_channel:
            mean = x.abs().reshape(x.shape[0], -1).mean(dim=1, keepdim=True)
        else:
            mean = x.abs().mean().reshape(1)
        self.set_step(2 * mean / math.sqrt(self.qp))

    @torch.no_grad()
    def init_max(self, x: torch.Tensor) -> None:
        """Min-max initialisation ``max|x| / Qp`` (the whole range representable)."""
        if self.per_channel:
            mx = x.abs().reshape(x.shape[0], -1).amax(dim=1, keepdim=True)
        else:
            mx = x.abs().max().reshape(1)
        self.set_step(mx / self.qp)

    @torch.no_grad()
    def init_mse(self, x: torch.Tensor, grid: int = 100) -> None:
        """The step among ``alpha * max|x| / Qp`` (alpha in (0, 1]) with the least squared error."""
        rows = x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)
        mx = rows.abs().amax(dim=1, keepdim=True).clamp_min(MIN_STEP)
        best_err = torch.full_like(mx, float("inf"))
        best = mx / self.qp
        for a in torch.linspace(1.0 / grid, 1.0, grid):
            s = a * mx / self.qp
            err = ((rows / s).clamp(self.qn, self.qp).round() * s - rows).pow(2).sum(dim=1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, s, best)
        self.set_step(best if self.per_channel else best.reshape(1))

    @torch.no_grad()
    def set_step(self, value: torch.Tensor) -> None:
        self.step.copy_(value.reshape(self.step.shape).clamp_min(MIN_STEP))
        self.initialized.fill_(True)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the step positive after an optimizer update."""
        self.step.clamp_(min=MIN_STEP)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"


class _SymmetricMaxQuant(torch.autograd.Function):
    """Q8BERT-style symmetric quantization with a given scale; straight-through inside the range."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, qp: int) -> torch.Tensor:
        xs = x / scale
        ctx.save_for_backward((xs.abs() <= qp))
        return xs.clamp(-qp, qp).round_() * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


class MaxQuantizer(nn.Module):
    """Q8BERT's quantizer: symmetric ``[-Qp, Qp]`` grid, scale ``max|x| / Qp``.

    Weights (``ema=None``) use the current max; activations keep an exponential
    moving average of max|x| during training and use it in evaluation.
    """

    def __init__(self, bits: int, ema: Optional[float] = None):
        super().__init__()
        self.bits = bits
        self.qp = 2 ** (bits - 1) - 1
        self.ema = ema
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(ema is None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ema is None:
            mx = x.detach().abs().max()
        else:
            if not bool(self.initialized):
                return x
            if self.training:
                with torch.no_grad():
                    self.running_max.mul_(self.ema).add_((1 - self.ema) * x.detach().abs().max().float())
            mx = self.running_max.to(x.dtype)
        scale = (mx / self.qp).clamp_min(MIN_STEP)
        return _SymmetricMaxQuant.apply(x, scale, self.qp)

    @torch.no_grad()
    def init_max(self, x: torch.Tensor) -> None:
        self.running_max.fill_(float(x.abs().max()))
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ema={self.ema}"
