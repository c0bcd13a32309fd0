"""GradWatchTrainerCallback under 2 CPU processes (gloo, through accelerate).

Run by ``tests/test_hf.py::test_two_processes`` with ``torchrun``::

    PYTHONPATH=.:tests python -m torch.distributed.run --nproc_per_node 2 tests/hf_ddp.py OUTDIR

Each rank writes ``OUTDIR/rank<r>.json`` with what it saw: verdicts, failing tensors,
every probe's numbers and the gradwatch log lines it emitted.
"""

from __future__ import annotations

import logging
import pathlib
import sys
import warnings
from typing import Any


def main(out: pathlib.Path) -> None:
    import torch

    from _ranks import error_of, finish, raising
    from gradwatch import GradientCheckError
    from test_hf import gpt2, train, watch

    warnings.simplefilter("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logging.getLogger("gradwatch").addHandler(Lines())

    def summary(callback) -> dict[str, Any]:
        return {
            "verdicts": [r.verdict for _, r in callback.reports],
            "failing": [sorted(t.name for t in r.failures) for _, r in callback.reports],
            "numbers": [[(p.autograd, p.numerical) for p in r.probes] for _, r in callback.reports],
            "reliable": [r.reliable for _, r in callback.reports],
            "seed": callback.seed,
        }

    overrides = dict(gradient_accumulation_steps=2, max_grad_norm=1e-3, ddp_backend="gloo")
    correct = watch(seed=None, on_failure="raise")  # the seed is drawn per process, then rank zero's is used
    trainer = train(gpt2(), correct, out / "correct", **overrides)
    rank = trainer.args.process_index
    result: dict[str, Any] = {"world": trainer.args.world_size, "correct": summary(correct)}
    bug = watch(seed=None, capsules=str(out / "caps"))  # the same directory on both; rank 0 alone writes
    train(gpt2(bug=True), bug, out / "bug", **overrides)
    result["bug"] = summary(bug)
    result["capsules"] = {"written": bug._watch.capsules.written,
                          "tensors": [{n: t.verdict for n, t in r.tensors.items()} for _, r in bug.reports]}
    try:
        train(gpt2(bug=True), watch(on_failure="raise"), out / "raise", steps=1, **overrides)
        result["raise"] = None
    except GradientCheckError as err:
        result["raise"] = type(err).__name__
    # the whole-model check raising on rank 1 alone: rank 0 raises at the check's next collective
    # (the guard's error flag) instead of waiting for rank 1 there
    import gradwatch._watch

    with raising(gradwatch._watch._Watch, "_budgeted", active=rank == 1, message="planted: this process's check raised"):
        result["check_raise"] = error_of(lambda: train(gpt2(), watch(), out / "check_raise", steps=1, **overrides))
    result["lines"] = lines
    finish(out, rank, result)

if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    main(target)
