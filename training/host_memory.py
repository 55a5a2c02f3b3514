"""Hand the C heap's free pages back to the operating system between the phases of a CPU step.

PyTorch's CPU tensors come from glibc's ``malloc``. Once a large tensor has been freed, glibc
raises its threshold for serving requests with their own ``mmap`` (up to 32 MiB), so the many
medium tensors of a step (activations, chunk logits, gradients) then come from the heap, and
pages freed in its middle stay resident until something trims them. Resident memory then holds
the forward's freed tensors while the backward allocates its own, and the backward's while the
optimizer creates its state. ``malloc_trim(0)`` before each backward and before the optimizer
step gives those pages back: on the real SmolLM2 pair (full-parameter student, seq 128) peak
resident memory fell from 1.76 to 1.65 GiB at no measurable step time (``benchmarks/README.md``,
"Host memory"); a fixed low ``mmap`` threshold saved as much but cost 50% of the step time in
page faults.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None on another C library or system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the heap's free pages to the operating system (glibc's ``malloc_trim(0)``).

    Returns:
        True when memory was released; False when there was none to release or the C library
        has no ``malloc_trim`` (then nothing is done).
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
