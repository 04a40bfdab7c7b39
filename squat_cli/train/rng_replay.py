"""The same random draws (dropout masks) in every pass of one SAM-type step (``sam.dropout_replay``)."""

from __future__ import annotations

import torch


class RngReplay:
    """The same random draws (dropout masks) in every pass of one step.

    ``begin`` records the generator state before the first pass, ``replay`` restores it
    before a later pass, ``end`` moves the stream to where the first pass left it, so
    the run's random stream advances as if each step were one pass. Covers the CPU
    generator and, on CUDA, the current device's. Disabled, every call does nothing.
    """

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self._start = self._after = None

    def _state(self):
        return torch.get_rng_state(), (torch.cuda.get_rng_state() if self.cuda else None)

    def _set(self, state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1])

    def begin(self) -> None:
        if self.enabled:
            self._start, self._after = self._state(), None

    def replay(self) -> None:
        if self.enabled:
            if self._after is None:  # the first pass just ended
                self._after = self._state()
            self._set(self._start)

    def end(self) -> None:
        if self.enabled and self._after is not None:
            self._set(self._after)
