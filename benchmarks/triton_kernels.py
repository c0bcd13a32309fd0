"""False alarms, caught bugs and resolving power of gradwatch on our own Triton kernels.

Run:  python benchmarks/triton_kernels.py --seeds 20          (CPU: Triton's interpreter)
      python benchmarks/triton_kernels.py --device cuda       (compiled kernels on a GPU)

For each kernel of ``tests/_triton_kernels.py`` (a small model with the kernel between torch
layers), each version (correct, planted bug) and each way of checking, over ``--seeds`` seeds:

- ``check``:  ``gradwatch.check(model, loss_fn, batch, seed=s)`` at defaults (whole model);
- ``watch``:  ``gradwatch.GradWatch(model, loss_fn, seed=s)`` at defaults over ``--steps``
  Adam steps (its checks, module-local checks of suspects included);
- ``module``: ``gradwatch.check_module(kernel, inputs, seed=s)`` (the kernel alone).

Prints false alarms / checks on the correct version (a run whose report failed), caught /
planted on the buggy one, the median over every judged tensor of
``TensorCheck.resolving_power`` (the smallest relative gradient error that check would have
failed; NaN before gradwatch reports it), the median ``error_ratio``, and how often each
tensor verdict was seen (pass/fail/skipped/inconclusive/...; frozen tensors left out).
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
import os
import pathlib
import statistics
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))


def _median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def _to(value, device):
    import torch

    if isinstance(value, torch.Tensor):
        moved = value.detach().to(device)
        return moved.requires_grad_() if value.requires_grad else moved
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


def _run(case, bug: bool, mode: str, seed: int, steps: int, device: str):
    """One check of ``case``; returns the reports it produced and the names of frozen tensors."""
    import torch

    import gradwatch

    if mode == "module":
        module, inputs = case.module(bug=bug, seed=seed)
        return [gradwatch.check_module(module.to(device), _to(inputs, device), seed=seed)], set()
    model = case.model(bug=bug, seed=seed).to(device)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if mode == "check":
        return [gradwatch.check(model, case.loss_fn, _to(case.batch(seed), device), seed=seed)], frozen
    watch = gradwatch.GradWatch(model, case.loss_fn, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = _to(case.batch(1000 * seed + step), device)
        opt.zero_grad()
        with watch.step(batch):
            case.loss_fn(model, batch).backward()
        opt.step()
    return [report for _, report in watch.reports], frozen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeds per kernel, version and mode (default 20)")
    parser.add_argument("--steps", type=int, default=3, help="training steps of the `watch` mode (default 3)")
    parser.add_argument("--kernels", nargs="*", default=None, help="kernel names (default: all)")
    parser.add_argument("--modes", nargs="*", default=["check", "watch", "module"],
                        choices=["check", "watch", "module"])
    parser.add_argument("--device", default="cpu", help="cpu (Triton's interpreter) or cuda")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    torch.set_num_threads(1)
    from _triton_kernels import KERNELS

    logging.getLogger("gradwatch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    names = args.kernels or list(KERNELS)
    print(f"# python benchmarks/triton_kernels.py --seeds {args.seeds} --steps {args.steps} --device {args.device}"
          f"  (torch {torch.__version__})")
    print(f"{'kernel':19} {'version':7} {'mode':6} {'result':>16} {'resolving':>9} {'err/tol':>8} "
          f"{'s/run':>6}  verdicts seen (tensor checks)")
    started = time.perf_counter()
    for name in names:
        case = KERNELS[name]
        for bug in (False, True):
            for mode in args.modes:
                flagged, powers, ratios, verdicts, seconds, errors = [], [], [], collections.Counter(), 0.0, []
                for seed in range(args.seeds):
                    t0 = time.perf_counter()
                    try:
                        reports, frozen = _run(case, bug, mode, seed, args.steps, args.device)
                    except Exception as exc:  # a crash is a result too
                        errors.append(f"seed {seed}: {type(exc).__name__}: {exc}"[:160])
                        flagged.append(False)
                        continue
                    finally:
                        seconds += time.perf_counter() - t0
                    flagged.append(any(not r.ok for r in reports))
                    for report in reports:
                        for tc in (t for n, t in report.tensors.items() if n not in frozen):
                            verdicts[tc.verdict] += 1
                            powers.append(getattr(tc, "resolving_power", math.nan))
                            ratios.append(tc.error_ratio)
                runs = len(flagged)
                label = "caught" if bug else "alarms"
                result = f"{label} {sum(flagged):>2}/{runs}" + ("*" if not bug and any(flagged) else " ")
                seen = " ".join(f"{v}:{n}" for v, n in sorted(verdicts.items()))
                print(f"{name:19} {'bug' if bug else 'correct':7} {mode:6} {result:>16} {_median(powers):>9.3g} "
                      f"{_median(ratios):>8.3g} {seconds / max(runs, 1):>6.2f}  {seen}", flush=True)
                if not bug and any(flagged):
                    print(f"{'':35} false alarms at seeds {[s for s, f in enumerate(flagged) if f]}")
                if bug and not all(flagged):
                    print(f"{'':35} missed at seeds {[s for s, f in enumerate(flagged) if not f]}")
                for line in errors[:3]:
                    print(f"{'':35} CRASH {line}")
    print(f"# total {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
