"""Elementwise kernels fused by ``torch.compile``, with the eager code as the fallback.

A chain of elementwise ops (divide, clamp, round, compare, select, multiply)
costs one pass over memory per op in eager PyTorch; compiled, it is one loop.
``fused(fn)`` returns a callable that runs ``torch.compile(fn)`` (dynamic
shapes, so dynamically padded batches do not recompile) and falls back to
calling ``fn`` itself, for good, the first time compilation fails (no C++
compiler, an unsupported platform). The compiled and eager results are equal
on the same inputs; tests check that.

``SQUAT_FUSED=0`` turns the compiled path off. Compiled kernels are cached on
disk by PyTorch, so the one-off compile (seconds) happens once per machine.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from torch.fx.experimental import _config as fx_config

FUSED_ENV = "SQUAT_FUSED"
log = logging.getLogger(__name__)


def fused_enabled() -> bool:
    return os.environ.get(FUSED_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class Fused:
    """``fn``, compiled on first use; ``fn`` itself when compiling is off or fails."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled: Callable | None = None
        self.failed = False

    def __call__(self, *args):
        if self.failed or not fused_enabled() or torch.compiler.is_compiling():
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            # no "duck" sizing: equal sizes (a square weight) must not specialise the graph
            with fx_config.patch(use_duck_shape=False):
                return self._compiled(*args)
        except Exception as err:  # no compiler / unsupported backend: keep going, unfused
            self.failed = True
            log.warning("fused kernel %s unavailable (%s); using the unfused ops", self.fn.__name__,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
            return self.fn(*args)


def fused(fn: Callable) -> Fused:
    return Fused(fn)
