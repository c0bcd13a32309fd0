"""Test-session setup: one torch thread (on the 2-core CI machine the suite runs several
times faster than with the default thread count), also in the subprocesses tests start."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads when it starts its pool)

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture
def bug():
    """Plant a bug in the backward of the attention op of ``tests/_attn_op.py`` (``bug("dk")``);
    always reset afterwards."""
    from tests._attn_op import BUG

    yield lambda mode: BUG.update(mode=mode)
    BUG["mode"] = None
