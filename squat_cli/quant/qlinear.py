"""Quantized drop-in layers: ``QuantLinear`` and ``QuantEmbedding``.

They subclass the layers they replace, so ``weight`` and ``bias`` keep their
names and shapes (state dicts stay compatible with the FP model); the
quantizers add ``wq.step`` (and ``aq.step``) entries.

Each layer also carries what SAM needs on the *quantized* weights: an
additive perturbation ``eps`` applied after quantization, and, when
``capture_grad`` is on, the gradient of the loss with respect to the
quantized (and perturbed) weight, ``qgrad``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from squat_cli.quant.lsq import LsqQuantizer


class _QuantWeightMixin:
    wq: nn.Module
    eps: Optional[torch.Tensor]
    qgrad: Optional[torch.Tensor]
    capture_grad: bool

    def _init_sam_state(self) -> None:
        self.eps = None
        self.qgrad = None
        self.capture_grad = False

    def _store_grad(self, grad: torch.Tensor) -> None:
        self.qgrad = grad if self.qgrad is None else self.qgrad + grad

    def quantized_weight(self) -> torch.Tensor:
        """Q(w, s) (+ eps while SAM's perturbation is applied)."""
        w = self.wq(self.weight)
        if self.capture_grad and not w.requires_grad:
            # SAM's ascent pass with w and s frozen needs d L / d Q(w) only: make Q(w) the leaf
            w = w.detach().requires_grad_()
        if self.eps is not None:
            w = w + self.eps.to(w.dtype)
        if self.capture_grad and w.requires_grad:
            w.register_hook(self._store_grad)
        return w


class QuantLinear(nn.Linear, _QuantWeightMixin):
    """``nn.Linear`` with a weight quantizer and an optional input-activation quantizer."""

    def __init__(self, in_features: int, out_features: int, bias: bool, wq: nn.Module, aq: Optional[nn.Module]):
        super().__init__(in_features, out_features, bias=bias)
        self.wq = wq
        self.aq = aq
        self._init_sam_state()

    @classmethod
    def from_linear(cls, lin: nn.Linear, wq: nn.Module, aq: Optional[nn.Module]) -> "QuantLinear":
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, wq, aq)
        q.to(device=lin.weight.device, dtype=lin.weight.dtype)
        q.weight = lin.weight
        q.bias = lin.bias
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is not None:
            x = self.aq(x)
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantEmbedding(nn.Embedding, _QuantWeightMixin):
    """``nn.Embedding`` whose table is fake-quantized (weights only; lookups need no activation quantizer)."""

    def __init__(self, num: int, dim: int, padding_idx: Optional[int], wq: nn.Module):
        super().__init__(num, dim, padding_idx=padding_idx)
        self.wq = wq
        self.aq = None
        self._init_sam_state()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, wq: nn.Module) -> "QuantEmbedding":
        q = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, wq)
        q.to(device=emb.weight.device, dtype=emb.weight.dtype)
        q.weight = emb.weight
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.quantized_weight(), self.padding_idx)


QUANT_LAYERS = (QuantLinear, QuantEmbedding)


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]


def learned_quantizers(model: nn.Module) -> list[tuple[str, LsqQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LsqQuantizer)]


def step_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every learned step size (the ``s`` of the paper)."""
    return [m.step for _, m in learned_quantizers(model) if m.step.requires_grad]


def weight_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every trainable parameter that is not a step size (the ``w`` of the paper)."""
    steps = {id(p) for p in step_parameters(model)}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in steps]


def clamp_steps(model: nn.Module) -> None:
    for _, q in learned_quantizers(model):
        q.clamp_()


def is_quantizer_key(key: str) -> bool:
    """State-dict keys that belong to quantizers (``...wq.step``, ``...aq.running_max``)."""
    return ".wq." in key or ".aq." in key
