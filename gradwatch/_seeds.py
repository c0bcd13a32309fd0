"""The one derivation of per-check seeds (private).

A check's probes are drawn from a seed derived from the adapter's base seed and the step
(:class:`gradwatch.GradWatch` and the callbacks), and each module-local check's from the
check's seed and the record's position (``n = 1, 2, ...``): :func:`_derive_seed`, stable
across runs, platforms and processes.

Example:
    >>> _derive_seed(0, 1) == _derive_seed(0, 1) != _derive_seed(0, 2)
    True
    >>> 0 <= _derive_seed(123, 4) < 2**62
    True
"""

from __future__ import annotations

import numpy as np

__all__ = ["_derive_seed"]


def _derive_seed(base: int, n: int) -> int:
    """A seed from ``base`` and ``n`` (a step, or a record's position), stable across runs:
    62 bits of ``numpy.random.SeedSequence([base, n])``."""
    return int(np.random.SeedSequence([base, n]).generate_state(1, np.uint64)[0] >> np.uint64(2))
