"""Test-session setup: one torch thread (on the 2-core CI machine the suite runs several
times faster than with the default thread count), also in the subprocesses tests start."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads when it starts its pool)

torch.set_num_threads(1)
