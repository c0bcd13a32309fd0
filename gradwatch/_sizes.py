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

__all__ = ["CHUNK", "spans"]

#: Elements a tensor above this size is taken in at once: directions drawn, points moved,
#: sums and non-finite checks made a chunk at a time (bounds their temporaries).
CHUNK = 1 << 18


def spans(n: int) -> list[tuple[int, int]]:
    """The chunks ``[lo, hi)`` of :data:`CHUNK` elements a tensor of ``n`` elements is taken
    in (a tail under 16 elements joins the last chunk: drawn in chunks of a multiple of 16,
    at least 16 each, CPU normal draws equal those of one call)."""
    out, lo = [], 0
    while lo < n:
        hi = min(n, lo + CHUNK)
        if n - hi < 16:
            hi = n
        out.append((lo, hi))
        lo = hi
    return out
