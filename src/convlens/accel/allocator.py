"""Keep glibc from unmapping large freed blocks, which makes CPU inference faster.

A forward pass of a convolutional network allocates activation tensors of tens of MB and frees
them again. glibc serves blocks above ``M_MMAP_THRESHOLD`` (at most 32 MB when it adapts the
threshold itself) with a fresh ``mmap`` and returns them with ``munmap``, so every forward pass
page-faults its activations in again (measurements: ``benchmarks/RESULTS_ANALYZE.md``).
Raising the mmap and trim thresholds keeps freed blocks in the heap for reuse. The price is
that up to ``nbytes`` of freed memory is kept by the process instead of being returned to the
system.

This changes the whole process's allocator, so the library never calls it on its own: the
``convlens`` command line does (every command owns its process), and Python users may call it
once.
"""

from __future__ import annotations

import ctypes
import logging
import platform

__all__ = ["keep_freed_memory"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(nbytes: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds to ``nbytes`` for this process.

    Args:
        nbytes: blocks up to this size come from the heap and freed memory up to this size is
            kept for reuse (default 1 GiB; at most ``2**31 - 1``).

    Returns:
        True when the thresholds were set; False where the C library is not glibc (macOS,
        Windows, musl), in which case nothing changes.

    Raises:
        ValueError: ``nbytes`` is not between 1 and ``2**31 - 1``.
    """
    if not 1 <= nbytes < 2**31:
        raise ValueError(f"nbytes must be between 1 and 2**31 - 1, got {nbytes}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, nbytes)) and bool(mallopt(_M_TRIM_THRESHOLD, nbytes))
    log.debug("glibc mmap/trim thresholds set to %d bytes: %s", nbytes, ok)
    return ok
