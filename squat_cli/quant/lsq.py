"""The LSQ quantizer (Esser et al. 2020): learned step size, STE rounding, scaled step gradient.

    Q(x) = round(clip(x / s, Qn, Qp)) * s        signed n-bit: Qn = -2^(n-1), Qp = 2^(n-1) - 1

Gradients (one fused autograd function, value and both gradients in one pass):

    dQ/dx = 1            if Qn < x/s < Qp, else 0          (straight-through inside the range)
    dQ/ds = round(x/s) - x/s   if Qn < x/s < Qp
          = Qn               if x/s <= Qn
          = Qp               if x/s >= Qp

and the step gradient is multiplied by ``g = 1 / sqrt(N * Qp)``, N the number of
elements sharing one step (``grad_scale="tensor"``), or, for activations with
``grad_scale="token"``, the features of one token (the last dimension), so that
the scale does not change with batch size and padded length.
``torch.round`` rounds halves to even.

``identity_ste`` (SAM's weight step written as in the paper's Eq. 7 and
Algorithm 1, ``w <- w - lr * grad_Q L``): dQ/dx = 1 for every element, clipped
ones included; the step gradient is unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from squat_cli.compiled import fused

MIN_STEP = 1e-8


def signed_range(bits: int) -> tuple[int, int]:
    """(Qn, Qp) of a signed ``bits``-bit integer grid; 2 bits -> (-2, 1)."""
    if not 2 <= bits <= 32:
        raise ValueError(f"bits must be in 2..32, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _sum_rows(t: torch.Tensor, per_row: bool) -> torch.Tensor:
    """Sum to one value (per-tensor step) or one per row (per-channel step, shape ``(C, 1)``)."""
    return t.sum(dim=1, keepdim=True) if per_row else t.sum().reshape(1)


# The kernels: ``x`` is 1-D (per-tensor step) or 2-D ``(C, K)`` with a ``(C, 1)`` step.
# They compute in fp32 (fp64 for fp64 inputs) and return the input's dtype.


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _fake_quant(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    q = (_wide(x) / _wide(s)).clamp(qn, qp).round()
    return (q * _wide(s)).to(x.dtype)


def _grad_x(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    xs = _wide(x) / _wide(s)
    return torch.where((xs > qn) & (xs < qp), grad, 0.0)


def _inside_and_ds(xs: torch.Tensor, qn: int, qp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The in-range mask and dQ/ds: inside, round(x/s) - x/s; clipped, q (already Qn or Qp)."""
    q = xs.clamp(qn, qp).round()
    inside = (xs > qn) & (xs < qp)
    return inside, torch.where(inside, q - xs, q)


def _grad_s(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, per_row: bool) -> torch.Tensor:
    _, ds = _inside_and_ds(_wide(x) / _wide(s), qn, qp)
    return _sum_rows(_wide(grad) * ds, per_row)


def _grad_x_s(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, per_row: bool):
    inside, ds = _inside_and_ds(_wide(x) / _wide(s), qn, qp)
    return torch.where(inside, grad, 0.0), _sum_rows(_wide(grad) * ds, per_row)


fake_quant_kernel = fused(_fake_quant)
grad_x_kernel = fused(_grad_x)
grad_s_kernel = fused(_grad_s)
grad_x_s_kernel = fused(_grad_x_s)


def _as_kernel_shape(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """1-D for a per-tensor step; ``(C, K)`` for a per-row step (the weight matrix)."""
    return t.reshape(-1) if s.numel() == 1 else t.reshape(s.shape[0], -1)


class LsqFakeQuant(torch.autograd.Function):
    """Fake-quantize ``x`` with step ``s``; backward gives LSQ's gradients (step grad scaled by ``g``).

    Value and gradients are each one fused elementwise kernel (``squat_cli.compiled``).
    The forward pass keeps only ``x`` and ``s`` (references, no copies); the
    backward recomputes ``x / s``, which costs less than storing masks and
    ``dQ/ds`` and reading them back. Arithmetic is in fp32 for any input dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float,
                identity_ste: bool = False) -> torch.Tensor:
        if s.numel() != 1 and (x.dim() != 2 or s.shape != (x.shape[0], 1)):
            raise ValueError(f"a step of shape {tuple(s.shape)} needs a (C, K) input, got {tuple(x.shape)}")
        # detached: the kernels see plain tensors (one compiled graph whatever needs gradients)
        out = fake_quant_kernel(_as_kernel_shape(x.detach(), s), s.detach(), qn, qp).view(x.shape)
        ctx.meta = (qn, qp, g, identity_ste)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(x, s)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qn, qp, g, identity_ste = ctx.meta
        x, s = (t.detach() for t in ctx.saved_tensors)
        gk, xk = _as_kernel_shape(grad.detach(), s), _as_kernel_shape(x, s)
        per_row = s.numel() != 1
        grad_x = grad_s = None
        if identity_ste:  # dQ/dx = 1 everywhere
            if ctx.needs_input_grad[0]:
                grad_x = grad
            if ctx.needs_input_grad[1]:
                grad_s = grad_s_kernel(gk, xk, s, qn, qp, per_row)
        elif ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
            grad_x, grad_s = grad_x_s_kernel(gk, xk, s, qn, qp, per_row)
        elif ctx.needs_input_grad[0]:
            grad_x = grad_x_kernel(gk, xk, s, qn, qp)
        elif ctx.needs_input_grad[1]:
            grad_s = grad_s_kernel(gk, xk, s, qn, qp, per_row)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        if grad_s is not None:
            grad_s = (grad_s * g).reshape(s.shape).to(s.dtype)
        return grad_x, grad_s, None, None, None, None


def lsq_quantize(x: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float = 1.0,
                 identity_ste: bool = False) -> torch.Tensor:
    return LsqFakeQuant.apply(x, s, qn, qp, g, identity_ste)


class LsqQuantizer(nn.Module):
    """One learned step size per tensor (shape ``(1,)``) or per output channel (``(C, 1)``).

    ``initialized`` is False until the step is set from data (weights: at conversion;
    activations: by calibration). An uninitialised activation quantizer passes input through.
    """

    def __init__(self, bits: int, channels: Optional[int] = None, learnable: bool = True,
                 grad_scale: str = "tensor"):
        super().__init__()
        if grad_scale not in ("tensor", "token"):
            raise ValueError(f"grad_scale must be 'tensor' or 'token', got {grad_scale!r}")
        self.bits = bits
        self.grad_scale_mode = grad_scale
        self.identity_ste = False
        """While True, the backward passes the gradient to every element (no clipping mask)."""
        self.qn, self.qp = signed_range(bits)
        shape = (channels, 1) if channels else (1,)
        self.step = nn.Parameter(torch.ones(shape), requires_grad=learnable)
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def per_channel(self) -> bool:
        return self.step.dim() == 2

    def grad_scale(self, x: torch.Tensor) -> float:
        """``1 / sqrt(N * Qp)``: N the elements per step (``tensor``) or one token's features (``token``)."""
        n = x.shape[-1] if self.grad_scale_mode == "token" else x.numel() // self.step.numel()
        return 1.0 / math.sqrt(n * self.qp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            return x
        s = self.step if self.step.dtype == x.dtype else self.step.to(x.dtype)
        return lsq_quantize(x, s, self.qn, self.qp, self.grad_scale(x), self.identity_ste)

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
        scale = ", grad_scale=token" if self.grad_scale_mode == "token" else ""
        return f"bits={self.bits}, per_channel={self.per_channel}{scale}"
