"""When a SAM-type step takes its ascent, and on what: cheaper sharpness-aware steps.

Three options (recipe ``sam.*``), each reducing the passes SAM spends, each
exactly today's step at its default:

- ``every: k`` -- the ascent (the pass that sets eps) runs on steps 0, k, 2k,
  ...; the steps between reuse the last eps as it is (the plain reuse of eps,
  not LookSAM's reuse of the gradient's SAM component): their weight pass is at
  Q(w_t, s) + eps_{last}, one pass instead of two.
- ``probability: p`` -- randomized switching (RST, Zhao et al. 2022): each step
  is a SAM step with probability p, else a plain step (no perturbation: the
  method's weight pass at Q(w_t, s)). The draw is a function of the run's seed
  and the step number alone, so it needs no state and resumes exactly.
- ``ascent_fraction: f`` -- the ascent runs on the first ceil(f * B) examples
  of the batch (ESAM-style data selection, Du et al. 2022), the descent on all
  of it.

A plain step decides first (with probability 1 - p); otherwise ``every``
decides between ascent and reuse (a reuse with no stored eps yet is an ascent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ASCENT, REUSE, PLAIN = "ascent", "reuse", "plain"


@dataclass(frozen=True)
class SamSchedule:
    every: int = 1
    probability: float = 1.0
    fraction: float = 1.0
    seed: int = 0

    @property
    def default(self) -> bool:
        return self.every == 1 and self.probability == 1.0 and self.fraction == 1.0

    @property
    def keeps_eps(self) -> bool:
        """Whether steps reuse a stored perturbation (so it must be kept, and checkpointed)."""
        return self.every > 1

    def mode(self, step: int, has_eps: bool) -> str:
        """``ascent``, ``reuse`` or ``plain`` for the 0-based optimizer ``step``."""
        if self.probability < 1.0:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            if float(torch.rand((), generator=gen)) >= self.probability:
                return PLAIN
        if self.every > 1 and step % self.every != 0 and has_eps:
            return REUSE
        return ASCENT

    def ascent_batch(self, batch: dict) -> dict:
        """The part of ``batch`` the ascent runs on (all of it at fraction 1)."""
        if self.fraction >= 1.0:
            return batch
        n = len(batch["labels"])
        keep = max(1, math.ceil(self.fraction * n))
        return {k: v[:keep] for k, v in batch.items()}
