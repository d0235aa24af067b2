"""Keep freed tensor memory in the process on CPU instead of handing it back to the OS every step.

glibc serves allocations above a threshold (128 KiB to 32 MiB, adaptive) with ``mmap`` and returns
them with ``munmap`` when freed; a training step allocates and frees the same activation and logit
buffers (hundreds of MB) every time, so each step page-faults them in again. Keeping them shortens a
training step markedly (`benchmarks/bench_train.py --malloc glibc keep`; numbers in docs/results.md).
PyTorch's CPU tuning guide suggests jemalloc/tcmalloc for this; `keep_freed_memory` gets most of the
gain from glibc itself (``mallopt``) without an extra library. The CLI calls it; library users may.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2**31 - 1


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (to 2 GiB) and its top pad (1 GiB) for this process;
    True if glibc accepted.

    Memory freed by one step is reused by the next instead of being unmapped and faulted back in.
    A no-op (False) off Linux/glibc. Peak memory is unchanged; the process keeps what it peaked at.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(mallopt(option, _INT_MAX) == 1 for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
    ok = ok and mallopt(_M_TOP_PAD, 2**30) == 1
    logger.debug("glibc mallopt thresholds raised: %s", ok)
    return ok
