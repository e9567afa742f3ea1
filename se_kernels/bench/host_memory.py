"""Host memory for CPU runs: glibc's malloc set to reuse freed memory.

With its defaults glibc serves an allocation above the mmap threshold (128 KiB, raised at
run time to the largest block freed so far, up to 32 MiB) with a fresh mapping, and hands
the top of the heap back to the system once more than twice that threshold lies free
there. A step that allocates a multi-megabyte output on every call then pays, on some
calls, for page faults that zero each page again. Which calls, and which peers, depends on
the order of everything allocated before, so the same layer can time 1.5 ms in one process
and 4.2 ms in the next (EfficientNet-B0 C672 14x14, batch 32, one thread, four peers
interleaved), and a peer's place in the table would be the allocator's doing.

Fixing both thresholds (what MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ do at
start-up, here through mallopt) keeps freed blocks in the process for the next call, the
behaviour PyTorch's CPU tuning guides get by preloading jemalloc or tcmalloc. Every peer
runs under the same setting; the run's notes say which one was in force.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
# mallopt takes an int. Some glibc releases cap the mmap threshold at half a heap (32 MiB)
# and refuse more; their cap still covers all but the biggest activations.
MMAP_THRESHOLDS = (1 << 30, 32 << 20)
TRIM_THRESHOLD = 2**31 - 1


def _glibc():
    """(mallopt, version) of the process's C library when it is glibc, else None."""
    try:
        libc = ctypes.CDLL(None)
        mallopt, version = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, TypeError, AttributeError):  # Windows; macOS, musl (no gnu_ symbol)
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    version.restype = ctypes.c_char_p
    return mallopt, version().decode()


def _size(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


def keep_freed_memory() -> str:
    """Sets glibc's mmap and trim thresholds for the rest of the process; returns the line
    for the run's notes (also when nothing could be set)."""
    found = _glibc()
    if found is None:
        return "host malloc: not glibc, left as it is"
    mallopt, version = found
    # The mmap threshold first: setting either fixes both, and a trim threshold alone would
    # leave every large block to a fresh mapping.
    mmap = next((t for t in MMAP_THRESHOLDS if mallopt(M_MMAP_THRESHOLD, t)), None)
    if mmap is None:
        return f"host malloc: glibc {version} refused a fixed mmap threshold, left as it is"
    trim = _size(TRIM_THRESHOLD + 1) if mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) else "refused"
    return (f"host malloc: glibc {version} with mmap threshold {_size(mmap)}, trim threshold "
            f"{trim} (mallopt): blocks up to the mmap threshold are reused from the heap, not "
            "page-faulted in again on every call; --keep-malloc-defaults leaves glibc as it is")
