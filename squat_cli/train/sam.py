"""SAM's perturbation (Foret et al. 2020): compute, apply, restore.

    eps = rho * g / ||g||_2

``g`` is the gradient with respect to what the forward pass uses: for a
quantized layer, the quantized weight Q(w, s) (the perturbation is added
after quantization, as in SQuAT); for every other trainable weight (biases,
LayerNorm, classifier, unquantized embeddings) the parameter itself. Step
sizes are never perturbed. One global L2 norm covers all of them, computed
in fp32.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from squat_cli.quant.qlinear import quant_layers, weight_parameters


class Perturbation:
    def __init__(self, model: nn.Module, all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        """``all_reduce`` (mean over processes) makes eps the same on every process; None keeps it local."""
        self.qlayers = [m for _, m in quant_layers(model)]
        qweights = {id(m.weight) for m in self.qlayers}
        self.plain = [p for _, p in weight_parameters(model) if id(p) not in qweights]
        self.all_reduce = all_reduce
        self._saved: list[torch.Tensor] = []
        self._frozen: list[torch.Tensor] = []
        self.active = False
        self.keep = False
        """Keep a copy of the last eps (``apply_stored`` reuses it)."""
        self.stored: Optional[list[torch.Tensor]] = None

    def capture(self, on: bool) -> None:
        """Record d loss / d Q(w) in the next backward pass (``on``), or stop recording.

        While recording, the quantized layers' weights are frozen: the ascent needs
        the gradient with respect to Q(w), not w, so the quantizer's backward and the
        weight-gradient accumulation are skipped.
        """
        if on:
            self._frozen = [m.weight for m in self.qlayers if m.weight.requires_grad]
        for m in self.qlayers:
            m.capture_grad = on
            m.qgrad = None
        for w in self._frozen:
            w.requires_grad_(not on)
        if not on:
            self._frozen = []

    def gradients(self) -> list[torch.Tensor]:
        grads = [m.qgrad if m.qgrad is not None else torch.zeros_like(m.weight) for m in self.qlayers]
        grads += [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.plain]
        if self.all_reduce is not None:
            grads = [self.all_reduce(g) for g in grads]
        return grads

    @torch.no_grad()
    def apply(self, rho: float) -> float:
        """Perturb by ``rho * g / ||g||`` from the last captured backward; return ||g||."""
        grads = self.gradients()
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        scale = rho / (norm + 1e-12)
        for m in self.qlayers:
            m.qgrad = None
            m.capture_grad = False
        eps = [(g.float() * scale).to(t.dtype) for g, t in zip(grads, self._targets())]
        if self.keep:
            self.stored = [e.clone() for e in eps]
        self._perturb(eps)
        return float(norm)

    def _targets(self) -> list[torch.Tensor]:
        return [m.weight for m in self.qlayers] + list(self.plain)

    @torch.no_grad()
    def _perturb(self, eps: list[torch.Tensor]) -> None:
        for m, e in zip(self.qlayers, eps[: len(self.qlayers)]):
            m.eps = e
        self._saved = []
        for p, e in zip(self.plain, eps[len(self.qlayers):]):
            self._saved.append(p.detach().clone())
            p.add_(e)
        self.active = True

    @torch.no_grad()
    def apply_stored(self) -> None:
        """Perturb by the eps kept from the last ``apply`` (``keep`` on)."""
        if self.stored is None:
            raise RuntimeError("no stored perturbation to reuse")
        self._perturb(self.stored)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The kept eps, for a checkpoint (empty when none is kept)."""
        return {f"eps.{i}": e for i, e in enumerate(self.stored or [])}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            targets = self._targets()
            self.stored = [tensors[f"eps.{i}"].to(t.device, t.dtype) for i, t in enumerate(targets)]

    @torch.no_grad()
    def restore(self) -> None:
        """Remove the perturbation: exact, the original values are copied back."""
        for m in self.qlayers:
            m.eps = None
        for p, old in zip(self.plain, self._saved):
            p.copy_(old)
        self._saved = []
        self.active = False
