"""Q8BERT's quantizer (Zafrir et al. 2019): symmetric max-scaled grid, EMA of activation maxima."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from squat_cli.quant.lsq import MIN_STEP


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
