"""The Hugging Face ``Trainer`` under FSDP2 (accelerate's ``fully_shard``), watched by
``GradWatchTrainerCallback``: the model of ``examples/hf_trainer.py`` with its planted GELU
backward bug, and with the fixed kernel. Part 7 of ``benchmarks/gpu_check.sh``.

One process per device, under ``torchrun``. On a machine with one GPU this is an FSDP2 world of
size 1 over NCCL: accelerate shards nothing across ranks then, but the whole FSDP2 path runs
(``fully_shard`` units, DTensor parameters, unsharded parameters inside the forward, the
reduce-scatter into sharded ``.grad``, and the callback's gathering, suspended hooks, collectives
and guard, over NCCL on CUDA tensors); with several GPUs the parameters are sharded for real.
On CPU (``--device cpu``) accelerate drops the FSDP plugin (``tests/hf_fsdp.py`` says where), so
the script keeps it as a GPU run does, with gloo.

Printed by rank zero, per run (bug, fixed): each check's step, verdict, number of failing tensors,
whether the expected tensors failed (``transformer.h.1.mlp.c_fc.weight`` and the kernels'
``transformer.h.{0,1}.mlp.act::input[0]``, none downstream of the last kernel), reliability,
check seconds; and the median training step without and with the callback on steps it does not
check. Exit status 1 when the bug is not caught on every rank with the same numbers, or the
fixed kernel is not quiet.

Run:
    torchrun --standalone --nproc_per_node 1 benchmarks/hf_fsdp.py                  # cuda
    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/hf_fsdp.py --device cpu
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import pathlib
import statistics
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPECTED = "transformer.h.1.mlp.c_fc.weight"
KERNELS = {f"transformer.h.{i}.mlp.act::input[0]" for i in (0, 1)}
DOWNSTREAM = {"transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight",
              "transformer.ln_f.bias"}


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("hf_trainer_example", ROOT / "examples" / "hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fresh_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


class _StepClock:
    """A ``TrainerCallback``-like timer of the optimizer steps (``on_step_begin`` to ``on_step_end``)."""

    def __init__(self, device: str) -> None:
        self.device, self.seconds, self._start = device, [], 0.0

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)


def _run(ex: Any, out: pathlib.Path, *, device: str, planted_bug: bool, steps: int, every: int,
         watched: bool) -> tuple[Any, list[float]]:
    """One Trainer run under FSDP2; the callback (or None) and the step times."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    import gradwatch
    from gradwatch.hf import GradWatchTrainerCallback

    _fresh_state()
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=3e-3, max_grad_norm=1.0, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=device == "cpu", disable_tqdm=True, seed=0, data_seed=0, ddp_timeout=120,
        fsdp=True, fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"]},
    )
    callback = GradWatchTrainerCallback(every_n_steps=every, max_overhead=None, seed=0, loss_fn=ex.causal_lm_loss,
                                        on_failure=lambda report: None,
                                        options=gradwatch.ProbeOptions(kinks=False)) if watched else None
    clock = type("StepClock", (_StepClock, TrainerCallback), {})(device)
    trainer = Trainer(model=ex.build_model(planted_bug=planted_bug), args=args, train_dataset=ex.Progressions(512, 0),
                      callbacks=[c for c in (callback, clock) if c is not None])
    if not (trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2):
        raise RuntimeError(f"accelerate did not enable FSDP2: {trainer.accelerator.state.distributed_type}")
    trainer.train()
    return callback, clock.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    parser.add_argument("--every", type=int, default=3, help="check every N steps (default 3)")
    args = parser.parse_args(argv)
    try:
        import accelerate  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as err:
        print(f"hf_fsdp needs transformers and accelerate: {err}")
        return 1
    warnings.simplefilter("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.device == "cpu":
        torch.set_num_threads(1)
        sys.path.insert(0, str(ROOT / "tests"))
        from hf_fsdp import fsdp_on_cpu  # the one decision accelerate makes differently on CPU
        keep = fsdp_on_cpu()
    else:
        keep = nullcontext()
    ex = _example()
    ok = True
    with keep, tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, bug in (("bug", True), ("fixed", False)):
            callback, seconds = _run(ex, pathlib.Path(tmp) / name, device=args.device, planted_bug=bug,
                                     steps=args.steps, every=args.every, watched=True)
            results[name] = (callback, seconds)
        _, plain = _run(ex, pathlib.Path(tmp) / "plain", device=args.device, planted_bug=False, steps=args.steps,
                        every=args.every, watched=False)
        dist = torch.distributed
        rank, world = dist.get_rank(), dist.get_world_size()
        numbers = {name: [[(p.autograd, p.numerical) for p in r.probes] for _, r in cb.reports]
                   for name, (cb, _) in results.items()}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, numbers)
        same = all(g == gathered[0] for g in gathered)
        if rank == 0:
            print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
                  f"world {world}, backend {dist.get_backend()}, torch {torch.__version__}, "
                  f"transformers {transformers.__version__}, accelerate {accelerate.__version__}")
        for name, (callback, seconds) in results.items():
            for step, report in callback.reports:
                failing = {t.name for t in report.failures}
                expected = EXPECTED in failing and KERNELS <= failing and not failing & DOWNSTREAM
                good = report.reliable and (expected if name == "bug" else report.verdict == "pass")
                ok &= good
                if rank == 0:
                    print(f"{name:5s} step {step}: {report.verdict:10s} failing {len(failing):2d} "
                          f"expected-failing {expected!s:5s} reliable {report.reliable!s:5s} "
                          f"check {report.seconds:.2f} s  {'ok' if good else 'WRONG'}")
            ok &= len(callback.reports) == len(range(0, args.steps, args.every))
            if rank == 0:  # steps not checked: the callback's cost off its check steps
                unchecked = [s for i, s in enumerate(seconds) if i % args.every]
                print(f"{name:5s} median unchecked step {1e3 * statistics.median(unchecked):.1f} ms "
                      f"(without the callback {1e3 * statistics.median(plain[1:]):.1f} ms)")
        ok &= same
        if rank == 0:
            print(f"the same probe numbers on all {world} ranks: {same}")
            print("hf_fsdp:", "ok" if ok else "FAILED")
        dist.barrier()
        dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
