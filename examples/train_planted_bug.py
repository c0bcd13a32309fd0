"""Train a small classifier whose custom autograd.Function hides a backward bug.

The code lives in the package (:mod:`gradwatch.demo`, also run by ``gradwatch demo``),
so it works from an installed gradwatch too; this file runs it from a source checkout.

Run:
    python examples/train_planted_bug.py            # catches the planted bug (runs/planted_bug)
    python examples/train_planted_bug.py --fixed    # the correct backward passes
    gradwatch report runs                           # per-tensor table; exit status 1 on failures
    tensorboard --logdir runs
"""

from __future__ import annotations

import sys

from gradwatch.demo import main

__all__ = ["main"]

if __name__ == "__main__":
    main(sys.argv[1:])
