"""GradWatchCallback under ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2), 2 CPU processes (gloo).

Run by ``tests/test_lightning.py::test_model_parallel_fsdp2_two_cpu_processes`` as a script,
because Lightning's launcher starts rank 1 by re-running this script, in one Lightning
namespace (``pytorch_lightning``, the default, or ``lightning.pytorch``)::

    PYTHONPATH=.:tests python tests/lightning_fsdp.py OUTDIR [NAMESPACE]

Each rank writes ``OUTDIR/rank<r>.json`` with what it saw.
"""

from __future__ import annotations

import datetime
import pathlib
import sys
from typing import Any


def main(out: pathlib.Path, namespace: str) -> None:
    import logging
    import warnings

    import torch
    from torch.distributed.fsdp import fully_shard

    from gradwatch import GradientCheckError
    from _ranks import finish
    from gradwatch.lightning import GradWatchCallback
    from lightning_zoo import api, loader
    from zoo import BUGS, CORRECT, assert_same_state, training_state

    lit = api(namespace)
    pl = lit.pl
    warnings.simplefilter("ignore")
    logging.getLogger(namespace.split(".")[0]).setLevel(logging.ERROR)
    torch.set_num_threads(1)

    class ShardedZooModule(lit.ZooModule):
        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for child in self.net.children():
                if any(True for _ in child.parameters()):
                    fully_shard(child, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def fit(build, callback, accumulate=1, max_steps=2):
        pl.seed_everything(0, verbose=False)
        module = ShardedZooModule(build(0))
        trainer = pl.Trainer(
            strategy=lit.strategies.ModelParallelStrategy(timeout=datetime.timedelta(seconds=60)),
            accelerator="cpu", devices=2, max_steps=max_steps, logger=False,
            callbacks=[callback] if callback is not None else [], enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False, accumulate_grad_batches=accumulate,
        )
        trainer.fit(module, loader(module.case, batches=8))
        return trainer, module

    def summary(callback) -> dict[str, Any]:
        return {
            "verdicts": [r.verdict for _, r in callback.reports],
            "reliable": [r.reliable for _, r in callback.reports],
            "failing": [sorted(t.name for t in r.failures if "::" not in t.name) for _, r in callback.reports],
            "local_failing": [sorted(t.name for t in r.failures if "::" in t.name) for _, r in callback.reports],
            "numbers": [[(p.autograd, p.numerical) for p in r.probes] for _, r in callback.reports],
            "reports": [str(r) for _, r in callback.reports],
        }

    def watch(**kwargs):
        return GradWatchCallback(**{"every_n_steps": 1, "max_overhead": None, "on_failure": lambda r: None, **kwargs})

    result: dict[str, Any] = {}
    trainer, _ = fit(CORRECT["mlp_relu_dropout"], correct := watch(on_failure="raise"))
    rank = trainer.global_rank
    result["correct"] = summary(correct)
    fit(BUGS["wrong_sign"], bug := watch(capsules=str(out / "caps")))  # rank 0 alone writes, with its own gradients
    result["bug"] = {**summary(bug), "written": bug._watch.capsules.written,
                     "tensors": [{n: t.verdict for n, t in r.tensors.items()} for _, r in bug.reports]}
    fit(CORRECT["layernorm_gelu"], accumulated := watch(), accumulate=2, max_steps=2)
    result["accumulated"] = summary(accumulated)
    try:
        fit(BUGS["wrong_sign"], watch(on_failure="raise"))
        result["raise"] = None
    except GradientCheckError as err:
        result["raise"] = type(err).__name__
    # a model whose float64 copy is over the limit (patched down to 1 byte) is not gathered: skipped, saying so
    from gradwatch import ProbeOptions

    small = ProbeOptions(max_shadow_bytes=1)
    fit(CORRECT["layernorm_gelu"], too_big := watch(options=small), max_steps=1)
    # ... unless modules are named: only they are gathered and checked locally
    fit(BUGS["wrong_sign"], named := watch(modules=["net.fc1"], options=small), max_steps=1)
    result["too_big"] = summary(too_big)
    result["too_big_named"] = summary(named)
    # training is bit-identical with and without the callback (local shards, Adam state, RNG)
    states = []
    for callback in (None, watch(every_n_steps=2, on_failure="raise")):
        trainer, module = fit(CORRECT["mlp_relu_dropout"], callback, max_steps=4)
        state = training_state(module, trainer.optimizers[0])
        states.append({k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in state.items()})
    assert_same_state(states[0], states[1])
    result["identical"] = True
    finish(out, rank, result)


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    main(target, sys.argv[2] if len(sys.argv) > 2 else "pytorch_lightning")
