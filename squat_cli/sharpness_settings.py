"""What a sharpness score is measured with, and whether an ascent reached the ball's edge.

Torch-free: the grid, the sweep and the report read and check these settings
without loading a model; the measurement itself is ``sharpness.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

from squat_cli.errors import RecipeError

CHOICES = {"method": ("ascent", "keskar"), "step": ("normalized", "raw"), "split": ("train", "dev")}


@dataclass
class SharpnessSettings:
    rho: float
    method: str = "ascent"
    steps: int = 10
    lr: float = 0.5
    """normalized steps: step length as a fraction of rho; raw steps: the gradient's multiplier."""
    step: str = "normalized"
    """ascent only: ``normalized`` (fixed-length steps along the gradient) or ``raw`` (Algorithm 2)."""
    examples: int = 256
    split: str = "train"
    seed: int = 0
    batch_size: int = 64
    subspace: int = 10
    """keskar only: dimension p of the random subspace."""
    maxiter: int = 10
    """keskar only: L-BFGS-B iterations."""

    def key(self) -> str:
        return f"{self.method}/rho={self.rho:g}"

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, name: Callable[[str], str] = lambda key: f"sharpness.{key}") -> "SharpnessSettings":
        """Every value checked, one line naming the key as ``name(key)`` says (``sharpness.steps``, ``--steps``)."""
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise RecipeError(f"{name(key)}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("rho", "lr", "steps", "examples", "batch_size", "subspace", "maxiter"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RecipeError(f"{name(key)}: {value} is not a finite number")
            if value <= 0:
                raise RecipeError(f"{name(key)}: {value} must be > 0")
        return self


EDGE_TOLERANCE = 1e-3


def reached_edge(delta_norm: float, rho: float) -> bool:
    """Whether an ascent ended on the ball's edge (to a relative 1e-3)."""
    return delta_norm >= (1.0 - EDGE_TOLERANCE) * rho
