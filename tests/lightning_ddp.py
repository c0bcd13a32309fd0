"""GradWatchCallback under ``strategy="ddp"`` with 2 CPU processes (gloo).

Run by ``tests/test_lightning.py::test_ddp_two_cpu_processes`` as a script, because
Lightning's DDP launcher starts rank 1 by re-running this script, in one Lightning
namespace (``pytorch_lightning``, the default, or ``lightning.pytorch``)::

    PYTHONPATH=.:tests python tests/lightning_ddp.py OUTDIR [NAMESPACE]

Each rank writes ``OUTDIR/rank<r>.json`` with what it saw: verdicts, failing tensors,
every probe's numbers, its local training losses, and what reached its logger.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any


def main(out: pathlib.Path, namespace: str) -> None:
    import logging
    import warnings

    import torch

    from gradwatch import GradientCheckError
    from _ranks import error_of, finish, raising
    from gradwatch.lightning import GradWatchCallback
    from lightning_zoo import api, attention_case, loader
    from tests._attn_op import BUG as ATTN_BUG
    from zoo import BUGS, CORRECT

    lit = api(namespace)
    pl, ZooModule, Logger = lit.pl, lit.ZooModule, lit.loggers.Logger
    warnings.simplefilter("ignore")
    logging.getLogger(namespace.split(".")[0]).setLevel(logging.ERROR)
    torch.set_num_threads(1)

    class RecordingLogger(Logger):
        """Records, on whichever rank it is called, the steps of gradwatch metrics."""

        def __init__(self) -> None:
            super().__init__()
            self.steps: list[int] = []

        @property
        def name(self) -> str:
            return "recording"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if any(k.startswith("gradwatch/") for k in metrics):
                self.steps.append(step)

    class LocalLosses(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(float(outputs["loss"]))

    def fit(build, on_failure, logger=None, extra=(), max_overhead=None, every_n_steps=1, max_steps=2, accumulate=1,
            capsules=None):
        module = ZooModule(build(0))
        callback = GradWatchCallback(every_n_steps=every_n_steps, max_overhead=max_overhead,
                                     on_failure=on_failure, capsules=capsules)  # seed drawn per rank, broadcast
        trainer = pl.Trainer(
            strategy="ddp", accelerator="cpu", devices=2, max_steps=max_steps, logger=logger or False,
            callbacks=[callback, *extra], enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, accumulate_grad_batches=accumulate,
        )
        trainer.fit(module, loader(module.case, batches=8))
        return trainer, callback

    def summary(callback) -> dict[str, Any]:
        return {
            "verdicts": [r.verdict for _, r in callback.reports],
            "failing": [sorted(t.name for t in r.failures if "::" not in t.name) for _, r in callback.reports],
            "local_failing": [sorted(t.name for t in r.failures if "::" in t.name) for _, r in callback.reports],
            "numbers": [[(p.autograd, p.numerical, p.kink) for p in r.probes] for _, r in callback.reports],
            "seeds": [r.seed for _, r in callback.reports],
        }

    logger, losses = RecordingLogger(), LocalLosses()
    trainer, correct = fit(CORRECT["mlp_relu_dropout"], "raise", logger=logger, extra=[losses])
    rank = trainer.global_rank
    result: dict[str, Any] = {"correct": summary(correct), "logged_steps": logger.steps, "local_losses": losses.losses,
                              "is_callback": isinstance(correct, pl.Callback)}
    # capsules: both ranks name the same directory, rank 0 alone writes (its own batch and gradients)
    _, bug = fit(BUGS["wrong_sign"], lambda report: None, capsules=str(out / "caps"))
    result["bug"] = {**summary(bug), "written": bug._watch.capsules.written,
                     "tensors": [{n: t.verdict for n, t in r.tensors.items()} for _, r in bug.reports]}
    # accumulation: the first micro-batch's backward runs without DDP's all-reduce (local .grad)
    _, accumulated = fit(CORRECT["mlp_relu_dropout"], lambda report: None, accumulate=2)
    result["accumulated"] = summary(accumulated)
    # a budget: rank zero's plan (tensors, probes, the smallest check's options, the
    # next check step) is broadcast, so both ranks check the same steps with the same probes
    _, budgeted = fit(BUGS["wrong_sign"], lambda report: None, max_overhead=0.3, every_n_steps=1, max_steps=12)
    result["budgeted"] = {
        **summary(budgeted),
        "steps": [step for step, _ in budgeted.reports],
        # the whole model's (the module-local checks of the suspect net.fc1 follow, on the same plan)
        "checked": [[n for n, t in r.tensors.items() if t.verdict != "skipped" and "::" not in n]
                    for _, r in budgeted.reports],
        "kinds": [[p.kind for n, t in r.tensors.items() if "::" not in n for p in t.probes]
                  for _, r in budgeted.reports],
        "joint": [[p.kind for p in r.joint] for _, r in budgeted.reports],
        "reference": [r.reference for _, r in budgeted.reports],
    }
    # module-local checks at the defaults (suspects: rank zero's): a planted bug in the attention op's dk
    ATTN_BUG["mode"] = "dk"
    try:
        _, attn = fit(attention_case, lambda report: None, max_steps=1)
    finally:
        ATTN_BUG["mode"] = None
    result["attn"] = {**summary(attn), "suspects": attn.suspects,
                      "local": [{n: t.verdict for n, t in r.tensors.items() if "::" in n} for _, r in attn.reports]}
    # a module-local check that raises on rank 1 alone: that module is skipped on both ranks, nothing hangs
    import gradwatch._sharded

    with raising(gradwatch._sharded, "_check_record", active=rank == 1,
                 message="planted: this rank's module-local check raised"):
        _, attn_raise = fit(attention_case, lambda report: None, max_steps=1)
    result["attn_raise"] = {"verdicts": [r.verdict for _, r in attn_raise.reports],
                            "local": [{n: t.verdict for n, t in r.tensors.items() if "::" in n}
                                      for _, r in attn_raise.reports]}
    try:
        fit(BUGS["wrong_sign"], "raise")
        result["raise"] = None
    except GradientCheckError as err:
        result["raise"] = type(err).__name__
    # the whole-model check raising on rank 1 alone: rank 0 raises at its next collective of
    # the check (the guard's error flag) instead of waiting for rank 1 there
    import gradwatch._watch

    with raising(gradwatch._watch._Watch, "_budgeted", active=rank == 1, message="planted: this rank's check raised"):
        result["check_raise"] = error_of(lambda: fit(CORRECT["mlp_relu_dropout"], lambda report: None, max_steps=1))
    result["namespaces"] = [ns for ns in ("pytorch_lightning", "lightning.pytorch") if ns in sys.modules]
    finish(out, rank, result)

if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    main(target, sys.argv[2] if len(sys.argv) > 2 else "pytorch_lightning")
