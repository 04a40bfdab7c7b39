"""Elementwise kernels fused by ``torch.compile``, with the eager code as the fallback.

A chain of elementwise ops (divide, clamp, round, compare, select, multiply)
costs one pass over memory per op in eager PyTorch; compiled, it is one loop.
``fused(fn)`` returns a callable that runs ``torch.compile(fn)`` (dynamic
shapes, so dynamically padded batches do not recompile) and falls back to
calling ``fn`` itself, for good, the first time compilation fails (no C++
compiler, an unsupported platform). The compiled and eager results are equal
on the same inputs; tests check that.

Each kernel keeps one graph per kind of input it meets (dtype, rank, a bound of 0 or 1, per-row or not:
dynamic shapes cover the sizes), which in a sweep of many methods and widths in one process passes
dynamo's default limit of 8 graphs per function; the kernels run with a limit of ``RECOMPILE_LIMIT``.

``SQUAT_FUSED=0`` turns the compiled path off. Compiled kernels are cached on
disk by PyTorch, so the one-off compile (seconds) happens once per machine.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Callable

import torch
from torch._dynamo import config as dynamo_config
from torch.fx.experimental import _config as fx_config

FUSED_ENV = "SQUAT_FUSED"
RECOMPILE_LIMIT = 64
log = logging.getLogger(__name__)
# the settings every call runs under, built once: a config patch costs ~10 us to build, and the kernels run
# hundreds of times a step. No "duck" sizing: equal sizes (a square weight) must not specialise the graph.
_COMPILE_SETTINGS = (fx_config.patch(use_duck_shape=False), dynamo_config.patch(recompile_limit=RECOMPILE_LIMIT))


def fused_enabled() -> bool:
    return os.environ.get(FUSED_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class Fused:
    """``fn``, compiled on first use; ``fn`` itself when compiling is off or fails."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled: Callable | None = None
        self.failed = False
        self.reason = ""  # why compiling failed, when it did (the warning's text)

    def __call__(self, *args):
        if self.failed or not fused_enabled() or torch.compiler.is_compiling():
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
        try:
            shapes, limit = _COMPILE_SETTINGS
            with shapes, limit:
                return self._compiled(*args)
        except Exception as err:  # no compiler / unsupported backend: keep going, unfused
            self.failed = True
            self.reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning("fused kernel %s unavailable (%s); using the unfused ops", self.fn.__name__, self.reason)
            return self.fn(*args)


_KERNELS: "weakref.WeakSet[Fused]" = weakref.WeakSet()


def fused(fn: Callable) -> Fused:
    kernel = Fused(fn)
    _KERNELS.add(kernel)
    return kernel


def kernel_state() -> str:
    """What a run's steps ran, for its metrics: "off" (``SQUAT_FUSED=0``), "on" (compiled, or not yet used), or
    which kernels fell back to the eager ops and why (slower steps: a cost figure should know)."""
    if not fused_enabled():
        return "off"
    failed = sorted(f"{k.fn.__name__} ({k.reason})" for k in _KERNELS if k.failed)
    return "fell back: " + "; ".join(failed) if failed else "on"
