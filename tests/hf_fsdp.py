"""accelerate's FSDP2 (``fully_shard``) on 2 CPU processes (gloo): a hand-written ``Accelerator``
loop watched by :class:`gradwatch.GradWatch`, and the Hugging Face ``Trainer`` with
:class:`gradwatch.hf.GradWatchTrainerCallback`, on the model of ``examples/hf_trainer.py`` (its
hand-written GELU kernel with the planted backward bug, and the fixed one).

Run by ``tests/test_hf.py::test_fsdp2_two_processes`` with ``torchrun``::

    PYTHONPATH=.:tests python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_fsdp.py OUTDIR

Each rank writes ``OUTDIR/rank<r>.json`` with what it saw.

**What stops FSDP on CPU, and the one line changed here.** accelerate 1.16.0 turns an FSDP plugin
into ``DistributedType.FSDP`` only for accelerator back ends: in ``AcceleratorState.__init__``
(``accelerate/state.py``, line 947) the branch ``elif self.distributed_type in [DistributedType.MULTI_GPU,
DistributedType.MULTI_MLU, ..., DistributedType.MULTI_NEURON]:`` is the only place that runs
``self.distributed_type = DistributedType.FSDP`` (line 974) and ``self.fsdp_plugin = fsdp_plugin``. On CPU
the type is ``MULTI_CPU``, not in that list, so the plugin is dropped without an error or a
warning: ``Trainer.is_fsdp_enabled`` (``getattr(self.accelerator.state, "fsdp_plugin", None) is
not None``, transformers 5.25 ``trainer.py`` line 875) is False and the Trainer trains with DDP
(``DistributedDataParallel``, plain ``Parameter``s). :func:`fsdp_on_cpu` makes that one decision
as on a GPU (``distributed_type = FSDP``, the plugin kept); everything else is accelerate's and the
Trainer's own FSDP2 code: ``fsdp2_prepare_model`` (``fully_shard`` of each ``GPT2Block`` and the
root, on gloo), the Trainer's FSDP branches, accelerate's ``backward``, clipping and optimizer.
(FSDP1 does not run on CPU past that either: accelerate's ``FullyShardedDataParallelPlugin``
raises "FSDP parameter initialization with `sync_module_states=True` is not supported on cpu.",
and with ``sync_module_states=False`` torch's ``FullyShardedDataParallel`` raises
"Inconsistent compute device and `device_id` on rank 0: cpu vs cpu:0".)
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import pathlib
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: The transformer blocks accelerate's auto-wrap policy shards as FSDP units (the root is one too).
WRAP = ["GPT2Block"]


@contextmanager
def fsdp_on_cpu() -> Iterator[None]:
    """accelerate keeps an FSDP plugin on CPU (``MULTI_CPU``) as it does on GPUs (see the module docstring)."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    real = state.AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        real(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.device.type == "cpu" and getattr(self, "fsdp_plugin", None) is None:
            self.distributed_type = DistributedType.FSDP  # what the branch quoted above does on a GPU
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    state.AcceleratorState.__init__ = init
    try:
        yield
    finally:
        state.AcceleratorState.__init__ = real
        if state.PartialState._shared_state.get("distributed_type") == DistributedType.FSDP:
            state.PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU


def example() -> Any:
    """``examples/hf_trainer.py`` as a module."""
    spec = importlib.util.spec_from_file_location("hf_trainer_example", ROOT / "examples" / "hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(watch: Any) -> dict[str, Any]:
    return {
        "verdicts": [r.verdict for _, r in watch.reports],
        "reliable": [r.reliable for _, r in watch.reports],
        "failing": [sorted(t.name for t in r.failures) for _, r in watch.reports],
        "numbers": [[(p.autograd, p.numerical) for p in r.probes] for _, r in watch.reports],
        "steps": [s for s, _ in watch.reports],
        "seed": watch.seed,
    }


def _fresh_state() -> None:
    """A new ``Accelerator`` (a Trainer's included) takes its own plugin; the process group stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def accelerate_loop(ex: Any, *, planted_bug: bool, steps: int = 2, **watch: Any) -> Any:
    """The example's model under an ``Accelerator`` with an FSDP2 plugin, a hand-written loop
    (``accelerator.backward``, clipping, SGD) watched by ``GradWatch`` on the prepared model."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    import gradwatch

    _fresh_state()
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=WRAP)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60))])
    assert accelerator.is_fsdp2, accelerator.state.distributed_type
    model = ex.build_model(planted_bug=planted_bug)
    optimizer = torch.optim.SGD(model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)

    def loss_fn(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        logits = module(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, ex.VOCAB), ids[:, 1:].reshape(-1))

    options = dict(every_n_steps=1, max_overhead=None, seed=0, on_failure=lambda report: None,
                   options=gradwatch.ProbeOptions(coordinates=1, directions=1, kinks=False))
    gw = gradwatch.GradWatch(model, loss_fn, **{**options, **watch})
    data = ex.Progressions(64, 0).ids
    rank, world = accelerator.process_index, accelerator.num_processes
    for step in range(steps):
        batch = data[(step * world + rank) * 4:(step * world + rank + 1) * 4]  # this rank's own 4 sequences
        with gw.step(batch):
            accelerator.backward(loss_fn(model, batch))
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return gw, model


def trainer_run(ex: Any, out: pathlib.Path, *, planted_bug: bool, callback: Any = None, steps: int = 2) -> Any:
    """The example's Trainer (accumulation 2, clipping) under FSDP2 through ``TrainingArguments``."""
    from transformers import Trainer, TrainingArguments

    _fresh_state()
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=3e-3, max_grad_norm=1.0, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, ddp_backend="gloo", ddp_timeout=60,
        fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": WRAP},
    )
    trainer = Trainer(model=ex.build_model(planted_bug=planted_bug), args=args, train_dataset=ex.Progressions(64, 0),
                      callbacks=[callback] if callback is not None else None)
    assert trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2
    trainer.train()
    return trainer


def callback(ex: Any, **kwargs: Any) -> Any:
    import gradwatch
    from gradwatch.hf import GradWatchTrainerCallback

    options = dict(every_n_steps=1, max_overhead=None, seed=0, loss_fn=ex.causal_lm_loss,
                   on_failure=lambda report: None,
                   options=gradwatch.ProbeOptions(coordinates=1, directions=1, kinks=False))
    return GradWatchTrainerCallback(**{**options, **kwargs})


def local_params(model: Any) -> dict[str, list]:
    """This rank's shards of every parameter."""
    return {n: p.detach().to_local().reshape(-1).tolist() for n, p in model.named_parameters()}


def main(out: pathlib.Path) -> None:
    import torch

    import gradwatch
    import gradwatch._watch
    from _ranks import error_of, finish, raising
    from gradwatch import GradientCheckError

    warnings.simplefilter("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    ex = example()
    result: dict[str, Any] = {}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ["RANK"])
    with fsdp_on_cpu():
        # first, the check raising on rank 1 alone: rank 0 raises at the check's next collective instead
        # of waiting (the group's timeout is 60 s, the test's 300 s); everything below then still runs
        planted = dict(active=rank == 1, message="planted: this process's check raised")
        with raising(gradwatch._watch._Watch, "_budgeted", **planted):
            result["loop_check_raise"] = error_of(lambda: accelerate_loop(ex, planted_bug=False, steps=1))
        with raising(gradwatch._watch._Watch, "_budgeted", **planted):
            result["trainer_check_raise"] = error_of(
                lambda: trainer_run(ex, out / "check_raise", planted_bug=False, callback=callback(ex), steps=1))
        # (a) the hand-written Accelerator loop, GradWatch on the prepared (fully_shard) model
        gw, model = accelerate_loop(ex, planted_bug=True, steps=1)
        result["world"] = torch.distributed.get_world_size()
        result["loop_sharded"] = sorted({type(p).__name__ for p in model.parameters()})
        result["loop_bug"] = summary(gw)
        result["loop_fixed"] = summary(accelerate_loop(ex, planted_bug=False, steps=1)[0])
        # (b) the Trainer under FSDP2 (accumulation 2, clipping), the callback watching it
        bug = callback(ex)
        trainer = trainer_run(ex, out / "bug", planted_bug=True, callback=bug)
        result["trainer_sharded"] = sorted({type(p).__name__ for p in trainer.model.parameters()})
        result["trainer_bug"] = summary(bug)
        fixed = callback(ex)
        watched = trainer_run(ex, out / "fixed", planted_bug=False, callback=fixed, steps=1)
        result["trainer_fixed"] = summary(fixed)
        plain = trainer_run(ex, out / "plain", planted_bug=False, steps=1)  # no callback: the same shards
        result["identical"] = local_params(watched.model) == local_params(plain.model)
        # the whole model's float64 copy over max_shadow_bytes: never gathered; the named module alone is
        small = callback(ex, modules=["transformer.h.1.mlp.act"], options=gradwatch.ProbeOptions(
            coordinates=1, directions=1, kinks=False, max_shadow_bytes=1))
        trainer_run(ex, out / "too_big", planted_bug=True, callback=small, steps=1)
        result["too_big"] = {**summary(small), "whole": sorted({t.verdict for n, t in small.last_report.tensors.items()
                                                                if "::" not in n}),
                             "reason": small.last_report.reason}
        try:
            trainer_run(ex, out / "raise", planted_bug=True, callback=callback(ex, on_failure="raise"), steps=1)
            result["trainer_raise"] = None
        except GradientCheckError as err:
            result["trainer_raise"] = type(err).__name__
    finish(out, rank, result)


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    main(target)
