"""Keep freed memory inside the process during CPU training (glibc's malloc settings).

torch's CPU tensors come from the C library's ``malloc``. glibc hands the top
of its heap back to the operating system whenever more than a small threshold
(128 KiB, raised only as large blocks come and go) lies free there, and serves
the largest blocks with fresh ``mmap`` calls; the next training step then
faults the same pages in again, one 4 KiB page at a time. Measured on the
2-core machine (`bench/NOTES.md`): 50,000-106,000 minor page faults per step
of all-MiniLM-L6-v2 at 32 x 128 tokens in bf16, and LSQ / SQuAT steps 15% / 9%
faster once they are gone, with the same numbers (memory reuse changes no
arithmetic).

``tune_allocator`` sets two ``mallopt`` parameters once per process: keep up
to 1 GiB of free heap (``M_TRIM_THRESHOLD``) and serve blocks under 32 MiB
from the heap (``M_MMAP_THRESHOLD``, glibc's largest). The price is a resident
size that stays at the run's peak, which a training process reaches anyway.
It is what jemalloc or tcmalloc (which PyTorch's CPU performance guides
suggest preloading) do by default, without a second library to install.

``SQUAT_CPU_ALLOCATOR=system`` leaves glibc's defaults (e.g. to time runs as
before); elsewhere than glibc Linux nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

from squat_cli.errors import SquatError

ENV = "SQUAT_CPU_ALLOCATOR"
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_FREE = 1 << 30
HEAP_BELOW = 32 << 20

_state: Optional[str] = None


def requested() -> str:
    """The allocator asked for by ``$SQUAT_CPU_ALLOCATOR``: ``tuned`` (the default) or ``system``."""
    value = os.environ.get(ENV, "tuned").strip().lower() or "tuned"
    if value not in ("tuned", "system"):
        raise SquatError(f"{ENV}={os.environ[ENV]!r}: expected 'tuned' or 'system'")
    return value


def tune_allocator() -> str:
    """Apply the request once per process; returns what holds: ``tuned``, ``system`` or ``system (why)``."""
    global _state
    want = requested()
    if _state is not None:
        return _state
    if want == "system":
        _state = "system"
    elif not sys.platform.startswith("linux"):
        _state = "system (not Linux)"
    else:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE) == 1 and libc.mallopt(M_MMAP_THRESHOLD, HEAP_BELOW) == 1
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            ok = False
        _state = "tuned" if ok else "system (no glibc mallopt)"
    return _state
