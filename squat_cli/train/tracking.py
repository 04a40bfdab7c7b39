"""Experiment tracking through accelerate's trackers (``train.report_to: tensorboard``).

What is logged, by global step: ``train/loss`` (mean over the last
``train.log_every`` steps), ``train/lr`` (the weight optimizer's learning rate),
``train/sam_grad_norm`` (SAM-type methods: ||grad|| of the ascent that set eps),
``quant/mean_wstep`` and ``quant/mean_astep`` (mean weight and activation step
sizes), and every evaluation as ``eval/<metric>``. The run's recipe goes in as
hyperparameters. Event files live in ``<run>/tensorboard/``. Only the main
process logs.
"""

from __future__ import annotations

from typing import Any, Optional

TRACKERS = ("none", "tensorboard")
PROJECT = "squat"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested recipe dict -> ``section.key`` scalars (lists and None as text), as trackers take them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


class Tracking:
    """A thin layer over ``accelerator.log``; does nothing when the accelerator has no tracker."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.enabled = bool(getattr(accelerator, "log_with", None))

    def start(self, config: dict) -> None:
        if self.enabled:
            self.acc.init_trackers(PROJECT, config=flatten(config))

    def log(self, values: dict[str, Optional[float]], step: int) -> None:
        if self.enabled:
            clean = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if clean:
                self.acc.log(clean, step=step)

    def end(self) -> None:
        if self.enabled:
            self.acc.end_training()
