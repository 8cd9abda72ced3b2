"""Give the memory that freed tensors leave in the C heap back to the operating system.

Moment propagation (``passes.propagate``) runs the whole graph on the calibration sample and frees
each value after its last use. On Linux with glibc, tensors of up to 32 MiB come from the C heap
(glibc raises its mmap threshold to the largest block freed, up to 32 MiB), and the heap keeps the
pages of freed blocks that sit between live ones: over the ~1,600 nodes of timm's
maxvit_tiny_tf_512 the conversion's resident memory grew from 1.0 to 4.6 GiB while the live
values stayed under 2 GiB (the same run with ``MALLOC_MMAP_THRESHOLD_=1048576`` stays at 2.0 GiB).
:func:`release_freed_heap` calls glibc's ``malloc_trim(0)``, which returns every whole free page
of the heap (it changes no allocator setting); elsewhere (macOS, musl) it does nothing.

Each trim has a price: the pages it returns are faulted in and zeroed again by the next
allocations. Trimming after every node cost resnet50's conversion (44 calibration samples at
224 px) 4.0 s of system time in 10.2 s; :class:`FreedBytes` trims only once the values freed
since the last trim add up to a threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_heap() -> None:
    """Return the C heap's free pages to the operating system (glibc), or do nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class FreedBytes:
    """Counts the bytes of the values freed since the heap was last given back, and gives it back
    (:func:`release_freed_heap`) once they reach ``threshold``."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.pending = 0

    def add(self, freed: int) -> None:
        self.pending += freed
        if self.pending >= self.threshold:
            release_freed_heap()
            self.pending = 0
