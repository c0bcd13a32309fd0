"""Test-session setup: one torch thread (on the 2-core CI machine the suite runs several
times faster than with the default thread count), also in the subprocesses tests start."""

import importlib.util
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads when it starts its pool)

torch.set_num_threads(1)

# Triton's CPU interpreter for tests/test_triton.py. It must be set before anything imports
# triton (importing Lightning does): `triton.jit` reads it when a function is decorated,
# triton.language's own functions included. Only where no GPU could run a compiled Triton
# kernel anyway, so that no other test changes; with a GPU, run
# `TRITON_INTERPRET=1 pytest tests/test_triton.py`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/_triton_kernels.py (collected for its doctests) needs triton, and on CPU its interpreter
collect_ignore = []
if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore.append("_triton_kernels.py")


import pytest  # noqa: E402


@pytest.fixture
def bug():
    """Plant a bug in the backward of the attention op of ``tests/_attn_op.py`` (``bug("dk")``);
    always reset afterwards."""
    from tests._attn_op import BUG

    yield lambda mode: BUG.update(mode=mode)
    BUG["mode"] = None
