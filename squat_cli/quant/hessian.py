"""Q-BERT's Hessian sensitivity: the top eigenvalue of the loss Hessian restricted to one layer's weights.

For a block of parameters theta (one encoder layer's linear weights), power
iteration with Hessian-vector products (double backward, as PyHessian does):

    v <- random unit vector;  repeat: Hv = d/dtheta (g . v),  lambda = v . Hv,  v = Hv / ||Hv||

until lambda changes by less than ``tol`` (relative) or ``iters`` steps. The
loss is the mean over a set of batches, in evaluation mode (no dropout), so the
Hessian is that of a fixed function. Q-BERT repeats this on several random
subsets of the training data and ranks layers by
``Omega_i = |mean(lambda_i)| + std(lambda_i)``; mixed precision gives the higher
bit width to the most sensitive layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def _loss(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    n = sum(len(b["labels"]) for b in batches)
    return sum(model(**b).loss * (len(b["labels"]) / n) for b in batches)


def top_eigenvalue(model: nn.Module, params: list[torch.Tensor], batches: list[dict], iters: int = 20,
                   tol: float = 1e-4, seed: int = 0) -> float:
    """Largest-magnitude eigenvalue of d^2 L / d params^2 by power iteration (``model`` in eval mode)."""
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
    norm = math.sqrt(sum(float((x * x).sum()) for x in v))
    v = [x / norm for x in v]
    eig = None
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(_loss(model, batches), params, create_graph=True)
        hv = torch.autograd.grad(sum((g * x).sum() for g, x in zip(grads, v)), params)
        new = sum(float((h * x).sum()) for h, x in zip(hv, v))
        norm = math.sqrt(sum(float((h * h).sum()) for h in hv))
        if norm == 0.0:
            return 0.0
        v = [h.detach() / norm for h in hv]
        if eig is not None and abs(new - eig) <= tol * (abs(eig) + 1e-12):
            return new
        eig = new
    return float(eig)


@dataclass
class Sensitivity:
    layer: str
    eigenvalues: list[float]

    @property
    def omega(self) -> float:
        """|mean| + std (population std) of the eigenvalues over the data subsets."""
        t = torch.tensor(self.eigenvalues, dtype=torch.float64)
        return float(t.mean().abs() + (t.std(unbiased=False) if len(t) > 1 else 0.0))


def layer_sensitivity(model: nn.Module, layers: dict[str, list[nn.Parameter]], subsets: list[list[dict]],
                      iters: int = 20, seed: int = 0) -> list[Sensitivity]:
    """Top Hessian eigenvalue of every layer's block on every data subset. Other parameters are frozen meanwhile."""
    was_training = model.training
    model.eval()
    flags = {id(p): p.requires_grad for p in model.parameters()}
    # Hessian-vector products need a double backward, which fused attention kernels do not provide
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    if attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        out = []
        for name, params in layers.items():
            for p in params:
                p.requires_grad_(True)
            eigs = [top_eigenvalue(model, params, subset, iters, seed=seed + k) for k, subset in enumerate(subsets)]
            for p in params:
                p.requires_grad_(False)
            out.append(Sensitivity(name, eigs))
        return out
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(was_training)
        if attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn)


def mixed_bits(sens: list[Sensitivity], low: int, high: int, share: float = 0.5) -> dict[str, int]:
    """``high`` bits for the ``round(share * n)`` layers of largest Omega (ties: the earlier layer), else ``low``."""
    order = sorted(range(len(sens)), key=lambda i: (-sens[i].omega, i))
    top = set(order[: int(round(share * len(sens)))])
    return {s.layer: (high if i in top else low) for i, s in enumerate(sens)}
