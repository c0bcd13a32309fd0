"""(c) gradwatch against torch.autograd.gradcheck (fast and slow mode) on planted bugs.

Each row is one planted-bug model of the test zoo (``tests/zoo.py``) and one correct
model. gradcheck gets the same module's parameters as its float64 inputs
(``functional_call`` on a float64 copy, so gradcheck sees the module's own backward); it
needs the whole model in float64 and checks the derivative of the function it is given.
gradwatch checks the float32 gradient of the training step itself (tensor hooks
included) with its defaults (4 coordinates + 1 direction per tensor). Time to verdict
is the wall time of one call; "caught" says whether each flagged the model (for the
correct model, a flag is a false alarm).

Run:  python benchmarks/vs_gradcheck.py
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import time

import torch
from torch.func import functional_call

import gradwatch
from _common import add_common_args, header

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from zoo import BUGS, CORRECT, SPARSE_BUGS, Case, CustomLinear, Mlp, classification_loss  # noqa: E402


def _wide(bug: str, wrong: str):
    """The zoo's custom-linear bug in a wider layer: 64 -> 128 -> 3, 8.7k parameters."""

    def build(seed: int) -> Case:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(10_000 + seed)
        batch = (torch.randn(64, 64, generator=g), torch.randint(0, 3, (64,), generator=g))
        return Case(bug, Mlp(CustomLinear(64, 128, bug=bug), torch.tanh, 128), classification_loss, batch, {wrong})

    return build


CASES = {**{k: BUGS[k] for k in ("wrong_sign", "bias_mean", "ignores_grad_output", "hook_rescale")},
         "wrong_row": SPARSE_BUGS["wrong_row"], "correct: custom_function": CORRECT["custom_function"],
         "wide bias_mean": _wide("bias_mean", "fc1.bias"), "wide wrong_row": _wide("wrong_row", "fc1.weight")}


def run_gradcheck(case, fast: bool) -> tuple[bool, float]:
    model64 = copy.deepcopy(case.model).double()
    names = [n for n, p in model64.named_parameters() if p.requires_grad]
    inputs = tuple(p.detach().clone().requires_grad_(True) for n, p in model64.named_parameters() if p.requires_grad)
    x, y = case.batch
    batch64 = (x.double() if x.is_floating_point() else x, y)

    def f(*params):
        return case.loss_fn(lambda inp: functional_call(model64, dict(zip(names, params)), (inp,)), batch64)

    start = time.perf_counter()
    ok = torch.autograd.gradcheck(f, inputs, fast_mode=fast, raise_exception=False)
    return (not ok), time.perf_counter() - start


def run_gradwatch(case) -> tuple[bool, float, str]:
    start = time.perf_counter()
    report = gradwatch.check(case.model, case.loss_fn, case.batch, seed=0)
    failed = sorted(t.name for t in report.failures)
    return (not report.ok), time.perf_counter() - start, ",".join(failed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    header(args)
    warm = CORRECT["custom_function"](0)  # first calls pay one-off costs
    run_gradcheck(warm, True), run_gradwatch(warm)
    print(f"{'case':26} {'params':>6} {'gradcheck fast':>16} {'gradcheck slow':>16} {'gradwatch':>16}  "
          "gradwatch names / truly wrong")
    for label, build in CASES.items():
        case = build(0)
        n = sum(p.numel() for p in case.model.parameters())
        cells = []
        for fast in (True, False):
            caught, seconds = run_gradcheck(build(0), fast)
            cells.append(f"{'caught' if caught else 'missed'} {seconds:7.3f}s")
        caught, seconds, names = run_gradwatch(build(0))
        cells.append(f"{'caught' if caught else 'missed'} {seconds:7.3f}s")
        print(f"{label:26} {n:6d} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}  "
              f"{names or '-'} / {','.join(sorted(case.wrong)) or '-'}")
    print("# 'caught' on the correct model would be a false alarm; gradcheck sees no tensor hooks on parameters "
          "(hook_rescale) because it differentiates the function it is given, not the training step")


if __name__ == "__main__":
    main()
