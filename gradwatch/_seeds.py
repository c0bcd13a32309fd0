"""Seeds (private): the one derivation of a check's seed from a base seed."""

from __future__ import annotations

import numpy as np

__all__: list[str] = []


def _derive_seed(base: int, n: int) -> int:
    """A seed derived from ``base`` and ``n`` (a step, or a record's position), stable across runs.

    Example:
        >>> _derive_seed(0, 1) == _derive_seed(0, 1) != _derive_seed(0, 2)
        True
    """
    return int(np.random.SeedSequence([base, n]).generate_state(1, np.uint64)[0] >> np.uint64(2))
