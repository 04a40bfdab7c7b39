"""Sharpness of a trained model (paper Appendix C, Algorithm 2), and a Keskar-style variant.

Which tensors are perturbed: the weight matrices of the encoder's linear layers
that the quantizer covers by default (Q, K, V, attention output, FFN in and out
of every layer), as the forward pass uses them. For a quantized run that is the
quantized weight Q(w, s) (step sizes fixed, biases, LayerNorm, embeddings and
classifier untouched); for an FP run the same matrices in full precision. So
FP, LSQ and SQuAT runs are measured over the same set of tensors.

Algorithm 2 (``method="ascent"``), with L the mean loss over a fixed set of
examples (evaluation mode, no dropout: deterministic):

    delta_0 = 0
    delta_{t+1} = delta_t + lr * grad L(W0 + delta_t)
    if ||delta_{t+1}|| > rho: delta_{t+1} = rho * delta_{t+1} / ||delta_{t+1}||
    sharpness = L(W0 + delta_T) - L(W0)

Keskar et al. (``method="keskar"``), as in Mehta et al.'s code: maximise
L(W0 + A y) with L-BFGS-B over the box |y_i| <= rho * (|(A^+ W0)_i| + 1), A a
random n x p matrix with orthonormal columns (so A^+ = A^T), and report
100 * (max L - L(W0)) / (1 + L(W0)). ``rho`` plays the role of Keskar's epsilon.
The search runs in box-normalised coordinates with the objective rescaled by its
initial gradient, so that L-BFGS-B's first step reaches the box edge even near a
minimum, where the raw gradient is tiny.

Near a minimum the raw gradient is tiny, so Algorithm 2's iterates can stop
well inside the ball, and then two radii give the same score. ``step=
"normalized"`` (the default) takes steps of fixed length ``lr * rho`` along the
gradient's direction instead,

    delta_{t+1} = delta_t + lr * rho * g_t / ||g_t||     (then the same projection)

so with ``lr * steps >= 1`` the ascent reaches the edge whatever the gradient's
scale; ``step="raw"`` is Algorithm 2 as printed. Every score stores
``delta_norm`` (||delta_T||) and whether it reached the edge (``reached_edge``:
||delta_T|| >= (1 - 1e-3) rho); the report flags scores that did not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from squat_cli.quant.convert import select_linear
from squat_cli.quant.qlinear import QuantLinear
from squat_cli.recipe import QuantConfig


@dataclass
class SharpnessResult:
    score: float
    loss0: float
    loss_final: float
    delta_norm: float
    trajectory: list[float]


def target_layers(model: nn.Module) -> list[QuantLinear]:
    """The layers whose weights are perturbed; FP ``nn.Linear`` layers are wrapped (identity quantizer)."""
    present = [m for _, m in model.named_modules() if isinstance(m, QuantLinear)]
    if present:
        return present
    default = QuantConfig()
    layers = []
    for name in select_linear(model, default.include, default.exclude):
        lin = model.get_submodule(name)
        q = QuantLinear.from_linear(lin, nn.Identity(), None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        layers.append(q)
    return layers


class _Objective:
    """L(W0 + delta) over fixed batches, and its gradient with respect to delta."""

    def __init__(self, model: nn.Module, batches: list[dict], layers: list[QuantLinear]):
        self.model, self.batches, self.layers = model, batches, layers
        self.n = sum(len(b["labels"]) for b in batches)

    def __call__(self, deltas: list[torch.Tensor], grad: bool) -> tuple[float, Optional[list[torch.Tensor]]]:
        leaves = [d.detach().clone().requires_grad_(grad) for d in deltas]
        for layer, d in zip(self.layers, leaves):
            layer.eps = d
        total = 0.0
        try:
            for b in self.batches:
                with torch.set_grad_enabled(grad):
                    loss = self.model(**b).loss * (len(b["labels"]) / self.n)
                    if grad:
                        loss.backward()
                total += float(loss.detach())
        finally:
            for layer in self.layers:
                layer.eps = None
        return total, ([d.grad.detach().clone() for d in leaves] if grad else None)


def _norm(ts: Iterable[torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in ts))


def _prepare(model: nn.Module, batches: list[dict]) -> tuple[list[QuantLinear], _Objective]:
    """Evaluation mode, parameters frozen (steps included), target layers found or wrapped."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = target_layers(model)
    return layers, _Objective(model, batches, layers)


def ascent_sharpness(
    model: nn.Module, batches: list[dict], rho: float, steps: int, lr: float,
    on_step: Optional[Callable[[int, float], None]] = None, step: str = "raw",
) -> SharpnessResult:
    """Algorithm 2: projected gradient ascent in the L2 ball of radius ``rho`` around the weights.

    ``step="raw"``: ``delta += lr * g`` as printed; ``"normalized"``: ``delta += lr * rho * g / ||g||``.
    """
    if step not in ("raw", "normalized"):
        raise ValueError(f"step must be 'raw' or 'normalized', got {step!r}")
    layers, objective = _prepare(model, batches)
    deltas = [torch.zeros_like(layer.weight) for layer in layers]
    trajectory = []
    for t in range(steps):
        loss_t, grads = objective(deltas, grad=True)  # L(W_t) and its gradient in one pass
        trajectory.append(loss_t)
        if on_step and t:
            on_step(t, loss_t)
        scale = lr
        if step == "normalized":
            scale = lr * rho / max(_norm(grads), 1e-30)
        deltas = [d + scale * g for d, g in zip(deltas, grads)]
        norm = _norm(deltas)
        if norm > rho:
            deltas = [d * (rho / norm) for d in deltas]
    final, _ = objective(deltas, grad=False)
    trajectory.append(final)
    if on_step:
        on_step(steps, final)
    return SharpnessResult(final - trajectory[0], trajectory[0], final, _norm(deltas), trajectory)


def keskar_sharpness(
    model: nn.Module, batches: list[dict], rho: float, subspace: int, maxiter: int, seed: int,
) -> SharpnessResult:
    """Keskar et al.'s sharpness in a random ``subspace``-dimensional subspace (L-BFGS-B in a box)."""
    from scipy.optimize import minimize

    layers, objective = _prepare(model, batches)
    with torch.no_grad():
        w0 = torch.cat([layer.quantized_weight().detach().flatten() for layer in layers])
    shapes = [layer.weight.shape for layer in layers]
    sizes = [s.numel() for s in shapes]
    gen = torch.Generator().manual_seed(seed)
    a, _ = torch.linalg.qr(torch.randn(w0.numel(), subspace, generator=gen))  # orthonormal columns
    bound = rho * ((a.T @ w0).abs() + 1.0)

    def split(flat: torch.Tensor) -> list[torch.Tensor]:
        return [c.reshape(s) for c, s in zip(torch.split(flat, sizes), shapes)]

    loss0, grads0 = objective(split(torch.zeros_like(w0)), grad=True)
    g0 = (a.T @ torch.cat([x.flatten() for x in grads0])) * bound
    # Optimise over z = y / bound in [-1, 1]^p, the objective scaled so that the first L-BFGS-B step
    # (along the gradient, unit Hessian) spans the box even where the gradient is tiny (near a minimum).
    scale = 1.0 / max(float(g0.abs().max()), 1e-12)
    trajectory = [loss0]

    def neg(z: np.ndarray) -> tuple[float, np.ndarray]:
        y = torch.from_numpy(z).to(w0.dtype) * bound
        loss, grads = objective(split(a @ y), grad=True)
        trajectory.append(loss)
        g = (a.T @ torch.cat([x.flatten() for x in grads])) * bound
        return -loss * scale, -(g * scale).double().numpy()

    res = minimize(neg, np.zeros(subspace), jac=True, method="L-BFGS-B", bounds=[(-1.0, 1.0)] * subspace,
                   options={"maxiter": maxiter, "gtol": 0.0, "ftol": 0.0})
    delta = a @ (torch.from_numpy(res.x).to(w0.dtype) * bound)
    best = max(trajectory)
    score = 100.0 * (best - loss0) / (1.0 + loss0)
    return SharpnessResult(score, loss0, best, float(delta.norm()), trajectory)
