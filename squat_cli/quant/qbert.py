"""Q-BERT's quantizers (Shen et al., AAAI 2020): group-wise asymmetric weights, EMA-ranged activations.

Weights: the rows (output neurons) of a matrix are split into ``groups``
contiguous groups of equal size; each group has its own range [min, max] of
its current values and step ``(max - min) / (2^k - 1)``:

    Q(w) = round((w - min) / step) * step + min

with the straight-through estimator (every weight lies inside its group's
range, so dQ/dw = 1). One group per attention head is 12 groups for
BERT-base; the paper's finest setting is 128 groups per matrix.

Activations: asymmetric k-bit with a range tracked as an exponential moving
average of each batch's min and max during training (momentum 0.99, as in the
authors' code), used as is in evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from squat_cli.quant.lsq import MIN_STEP


def group_ranges(w: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of ``w``'s rows split into ``groups`` equal parts; each of shape ``(groups, 1)``."""
    rows = w.shape[0]
    if groups < 1 or rows % groups:
        raise ValueError(f"{rows} rows cannot be split into {groups} equal groups")
    g = w.detach().reshape(groups, -1)
    return g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)


def asymmetric_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """round((x - lo) / step) * step + lo, step = (hi - lo) / (2^bits - 1), values clipped to [lo, hi]."""
    levels = 2**bits - 1
    step = ((hi - lo) / levels).clamp_min(MIN_STEP)
    q = ((x - lo) / step).round().clamp(0, levels)
    return q * step + lo


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class GroupQuantizer(nn.Module):
    """Q-BERT's weight quantizer: ``groups`` row groups, each with its own min-max range; STE backward."""

    def __init__(self, bits: int, groups: int = 128):
        super().__init__()
        self.groups = groups
        # a buffer, so that a mixed-precision model's per-layer bits travel with its quantizer state
        self.register_buffer("nbits", torch.tensor(bits))
        self.register_buffer("initialized", torch.tensor(True))

    @property
    def bits(self) -> int:
        return int(self.nbits)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        lo, hi = group_ranges(w, self.groups)
        g = w.detach().float().reshape(self.groups, -1)
        q = asymmetric_quantize(g, lo.float(), hi.float(), self.bits).reshape(w.shape).to(w.dtype)
        return _STE.apply(w, q)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={self.groups}"


class EmaRangeQuantizer(nn.Module):
    """Asymmetric activation quantizer with an EMA of the batch min and max (training) as its range."""

    def __init__(self, bits: int, momentum: float = 0.99):
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            return x
        if self.training:
            with torch.no_grad():
                m = self.momentum
                self.running_min.mul_(m).add_((1 - m) * x.detach().amin().float())
                self.running_max.mul_(m).add_((1 - m) * x.detach().amax().float())
        q = asymmetric_quantize(x.detach().float(), self.running_min, self.running_max, self.bits).to(x.dtype)
        # straight-through inside the range, zero outside (clipped)
        inside = (x >= self.running_min.to(x.dtype)) & (x <= self.running_max.to(x.dtype))
        return x * inside + (q - x * inside).detach()

    @torch.no_grad()
    def init_range(self, xs: list[torch.Tensor]) -> None:
        self.running_min.fill_(min(float(x.amin()) for x in xs))
        self.running_max.fill_(max(float(x.amax()) for x in xs))
        self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, momentum={self.momentum}"
