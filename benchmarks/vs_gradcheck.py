"""(c) gradwatch against torch.autograd.gradcheck (fast and slow mode) on planted bugs.

Each row is one planted-bug model of the test zoo (``tests/zoo.py``) and one correct
model. gradcheck gets the same module's parameters as its float64 inputs
(``functional_call`` on a float64 copy, so gradcheck sees the module's own backward); it
needs the whole model in float64 and checks the derivative of the function it is given.
gradwatch checks the float32 gradient of the training step itself (tensor hooks
included) with its defaults (4 coordinates + 1 direction per tensor). Time to verdict
is the wall time of one call; "caught" says whether each flagged the model (for the
correct model, a flag is a false alarm).

The second table times ``gradwatch.assert_gradients`` at its defaults (joint probes
first) against ``torch.autograd.gradcheck(fast_mode=True)`` on the same tiny op, at
several sizes up to 1k elements: a hand-written ``autograd.Function`` ``tanh(x @ w)``
(inputs ``x``, ``w``) and ``F.linear(x, w, b)``. gradcheck gets the op's float64 inputs;
assert_gradients gets a module holding them as float32 parameters and the loss
``(op(...) * r).sum()`` with a fixed random ``r``. Times are CPU seconds
(``time.process_time``, one thread), the 20th percentile of ``--repeats`` interleaved
calls: steadier than wall time on a shared machine. "thorough" is ``thorough=True``
(every tensor also probed with 16 coordinates and 4 directions: the defaults before
joint probes came first). "evals" counts ``loss_fn`` calls of one assert_gradients.

Run:  python benchmarks/vs_gradcheck.py             (both tables)
      python benchmarks/vs_gradcheck.py --table tiny
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
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


class _TanhMatmul(torch.autograd.Function):
    """``tanh(x @ w)`` with a hand-written backward; ``bug`` flips the sign of ``dw``."""

    @staticmethod
    def forward(ctx, x, w, bug=False):
        y = torch.tanh(x @ w)
        ctx.save_for_backward(x, w, y)
        ctx.bug = bug
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, y = ctx.saved_tensors
        d = grad * (1 - y * y)
        dw = x.t() @ d
        return d @ w.t(), -dw if ctx.bug else dw, None


class _OpInputs(nn.Module):
    """The op's inputs as float32 parameters, and the op applied to them."""

    def __init__(self, op: Callable, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inputs = nn.ParameterList(nn.Parameter(torch.randn(s, generator=g) / s[0] ** 0.5) for s in shapes)
        self.op = op

    def forward(self):
        return self.op(*self.inputs)


def _tiny_ops():
    """(label, op, input shapes) of the tiny-op table: <= 1k elements each."""
    rows = [(f"Function tanh(x@w) {n}x{n}", _TanhMatmul.apply, [(n, n), (n, n)]) for n in (4, 8, 16, 22)]
    rows += [(f"F.linear x 8x{n}, w {n}x{n}, b", F.linear, [(8, n), (n, n), (n,)]) for n in (4, 16, 27)]
    rows += [("buggy Function 16x16 (sign dw)", lambda x, w: _TanhMatmul.apply(x, w, True), [(16, 16), (16, 16)])]
    return rows


def _cpu_seconds(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """CPU seconds of each of ``fns``, called in turn ``repeats`` times (interleaved, so
    that a busy spell of the machine weighs on all alike): the 20th percentile of each."""
    for fn in fns:
        fn()  # first calls pay one-off costs
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.process_time()
            fn()
            out.append(time.process_time() - start)
    return [sorted(t)[len(t) // 5] for t in times]


def tiny_table(repeats: int) -> None:
    print(f"{'op (assert_gradients vs gradcheck fast mode)':42} {'elems':>5} {'gradcheck fast':>14} "
          f"{'assert_grad':>11} {'ratio':>6} {'thorough':>9} {'ratio':>6} {'evals':>9}  verdicts")
    for label, op, shapes in _tiny_ops():
        module = _OpInputs(op, shapes)
        weights = torch.randn(module().shape, generator=torch.Generator().manual_seed(1))
        inputs = tuple(p.detach().double().clone().requires_grad_(True) for p in module.inputs)

        def loss_fn(m, r, calls=[]):  # noqa: B006 (counts the loss evaluations of one call)
            calls.append(1)
            return (m() * r).sum()

        def ours(**kw) -> str:
            try:
                gradwatch.assert_gradients(module, loss_fn, weights, **kw)
                return "pass"
            except gradwatch.GradientCheckError as err:
                return "FAIL " + str(err).splitlines()[1].split(":")[0]

        def theirs() -> str:
            return "pass" if torch.autograd.gradcheck(op, inputs, fast_mode=True, raise_exception=False) else "FAIL"

        verdicts = (theirs(), ours(), ours(thorough=True))
        calls = loss_fn.__defaults__[0]
        counts = []
        for kw in ({}, {"thorough": True}):
            calls.clear()
            ours(**kw)
            counts.append(len(calls))
        fast, joint = _cpu_seconds([theirs, ours], repeats)
        thorough = _cpu_seconds([lambda: ours(thorough=True)], max(repeats // 10, 3))[0]
        n = sum(p.numel() for p in module.inputs)
        print(f"{label:42} {n:5d} {fast * 1e3:11.2f} ms {joint * 1e3:8.2f} ms {joint / fast:5.1f}x "
              f"{thorough * 1e3:6.1f} ms {thorough / fast:5.1f}x {counts[0]:3d} / {counts[1]:3d}  "
              f"gradcheck {verdicts[0]}; ours {verdicts[1]}; thorough {verdicts[2]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--table", choices=("all", "zoo", "tiny"), default="all",
                        help="zoo: planted-bug models; tiny: assert_gradients on tiny ops (default all)")
    parser.add_argument("--repeats", type=int, default=60, help="timed calls per cell of the tiny table")
    args = parser.parse_args(argv)
    header(args)
    if args.table in ("all", "tiny"):
        tiny_table(args.repeats)
    if args.table == "tiny":
        return
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
