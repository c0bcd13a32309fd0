"""Chunk sizes: how large tensors are taken a chunk at a time (private).

One home for :data:`CHUNK`, read at use time (``_sizes.CHUNK``) by every room of the
engine that takes a large tensor in pieces (:mod:`gradwatch._judging`,
:mod:`gradwatch._probing`, :mod:`gradwatch._joint`), so a test that makes chunks small
patches it once.

Example:
    >>> spans(10)
    [(0, 10)]
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Callable, Iterator

__all__ = ["CHUNK", "TRIM_BYTES", "release", "released", "spans"]

#: Elements a tensor above this size is taken in at once: directions drawn, points moved,
#: sums and non-finite checks made a chunk at a time (bounds their temporaries).
CHUNK = 1 << 18
#: Bytes of float64 temporaries a loop over tensors or chunks frees between two
#: :func:`release` calls (:func:`released`).
TRIM_BYTES = 4 << 20
_freed = [0]


class _Spans(list):
    """The chunks of :func:`spans`; iterating them counts each chunk after the first as the
    float64 temporaries of the previous one freed (:func:`released`), so a loop over the
    chunks of a large tensor gives memory back to the system every few MiB."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i, (lo, hi) in enumerate(list.__iter__(self)):
            if i:
                released(8 * (hi - lo))
            yield lo, hi


def spans(n: int) -> list[tuple[int, int]]:
    """The chunks ``[lo, hi)`` of :data:`CHUNK` elements a tensor of ``n`` elements is taken
    in (a tail under 16 elements joins the last chunk: drawn in chunks of a multiple of 16,
    at least 16 each, CPU normal draws equal those of one call). Iterating them gives memory
    back to the system every :data:`TRIM_BYTES` of chunks (:class:`_Spans`)."""
    out, lo = _Spans(), 0
    while lo < n:
        hi = min(n, lo + CHUNK)
        if n - hi < 16:
            hi = n
        out.append((lo, hi))
        lo = hi
    return out


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None elsewhere (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release() -> None:
    """Give the memory the check freed back to the system (glibc's ``malloc_trim(0)``; nothing
    elsewhere). glibc keeps freed heap memory for later allocations, and after a large
    tensor is freed it serves tensors up to that size from the heap instead of fresh
    mappings (its dynamic mmap threshold): freed float64 temporaries of one stage of a check
    then stay resident under the next. Measured on 6 x Linear(1536, 1536) (float64 copy
    108 MiB): a check added 385 MiB of peak RSS and left 298 MiB resident without it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def released(nbytes: int) -> None:
    """Count ``nbytes`` of temporaries a loop just freed (or is about to free); every
    :data:`TRIM_BYTES` of them, :func:`release`. Small temporaries freed between small
    results that live on (the per-tensor scalars of a check) leave holes in glibc's heap
    that it does not give back: on 606 tensors of 32 KiB the float64 reference pass left
    52 MiB resident that no tensor held, and the precision test's distance of one
    32768 x 256 embedding, taken a chunk at a time, grew the heap by up to 79 MiB."""
    _freed[0] += nbytes
    if _freed[0] >= TRIM_BYTES:
        _freed[0] = 0
        release()
