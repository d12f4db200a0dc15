"""Keep freed frame memory in a process that decodes, instead of handing it back to the kernel after every clip.

glibc gives a freed heap top back to the kernel once it exceeds the trim threshold, which adapts to at most 64 MiB.
The RGB frames of one full-resolution 1080p clip (16 × 6 MB) exceed that, so they are given back after each clip and
faulted in again for the next: 20-25 thousand page faults a clip, a quarter of its CPU time, for every decoder in the
process alike (BENCHMARKS.md, "Decoder"). Fixing the mmap threshold at its largest value and raising the trim
threshold keeps that memory for the next clip. The setting is process-wide and is made once, by the first decode;
without glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
HEAP_CHUNKS_UP_TO = 32 * 2**20  # glibc's largest mmap threshold: smaller blocks come from the heap and are reused
KEEP_FREED_UP_TO = 2**30  # freed heap memory a decoding process keeps at most


@functools.cache
def keep_freed_memory() -> bool:
    """Tell this process's glibc malloc to reuse freed blocks up to 32 MiB and keep up to 1 GiB freed; whether it
    took the setting (False where the C library has no mallopt, e.g. macOS, or refuses it)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_CHUNKS_UP_TO)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_UP_TO))
