"""Debug a failure: from a failing check mid-training to a failing unit test, then the fix.

The walk-through of the README's "Debug a failure", end to end, in a work directory:

1. ``my_kernels.py`` (written there: your code) holds ``FusedTanh``, a layer whose custom
   ``autograd.Function`` computes ``scale * tanh(x)`` with a hand-written backward that has a
   planted bug (``1 - t`` where ``1 - t * t`` belongs).
2. Training with ``GradWatch`` catches it: the whole-model check names the layer before it
   (``0.weight``, ``0.bias``: their gradients flow through the bug) and the module-local check
   of the layer (a suspect: it runs custom backward code) names its input gradient
   ``1::input[0]``. The failing check writes capsules next to the logs,
   ``runs/gradwatch/capsules/step-0-1.pt`` for the layer.
3. ``gradwatch repro CAPSULE`` reruns that check offline: the same report, exit status 1.
4. ``gradwatch repro CAPSULE --pytest`` writes a test that loads the capsule into a fresh
   ``FusedTanh`` and reruns the check with its own backward: it fails.
5. Fix the kernel (the example edits ``my_kernels.py``): the same test passes.

Run:
    python examples/debug_a_failure.py --workdir /tmp/debug
    # then, by hand, the same commands:
    gradwatch repro /tmp/debug/runs/gradwatch/capsules/step-0-1.pt
    gradwatch repro /tmp/debug/runs/gradwatch/capsules/step-0-1.pt --pytest > /tmp/debug/test_fused_tanh.py
    PYTHONPATH=/tmp/debug pytest /tmp/debug/test_fused_tanh.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import subprocess
import sys
import tempfile
import warnings
from typing import Any, Sequence

__all__ = ["BUGGY_LINE", "FIXED_LINE", "KERNEL", "main"]

BUGGY_LINE = "grad_x = grad * scale * (1 - t)  # BUG: the derivative of tanh is 1 - t * t"
FIXED_LINE = "grad_x = grad * scale * (1 - t * t)"

#: The user's kernel file (written into the work directory, imported from there).
KERNEL = f'''"""A fused layer with a hand-written backward (the code under test)."""

import torch
from torch import nn


class _ScaledTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        t = torch.tanh(x)
        ctx.save_for_backward(t, scale)
        return scale * t

    @staticmethod
    def backward(ctx, grad):
        t, scale = ctx.saved_tensors
        {BUGGY_LINE}
        grad_scale = (grad * t).sum().reshape(scale.shape)
        return grad_x, grad_scale


class FusedTanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return _ScaledTanh.apply(x, self.scale)
'''


def _pytest(workdir: str, test: str) -> int:
    """Run pytest on ``test`` with the work directory importable; its exit status."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([workdir, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=workdir,
                         env=env, capture_output=True, text=True, timeout=300)
    print(run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-500:])
    return run.returncode


def _train(workdir: str, steps: int) -> Any:
    """Steps 1 and 2: train a small regression through the buggy layer under GradWatch."""
    import torch
    from torch import nn

    import gradwatch

    sys.path.insert(0, workdir)
    try:
        my_kernels = importlib.import_module("my_kernels")
    finally:
        sys.path.remove(workdir)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), my_kernels.FusedTanh(), nn.Linear(16, 1))

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = gradwatch.GradWatch(model, loss_fn, every_n_steps=1, max_overhead=None, seed=0,
                                logdir=os.path.join(workdir, "runs"), on_failure=lambda report: None)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = (torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g))
        opt.zero_grad()
        with watch.step(batch):
            loss_fn(model, batch).backward()
        opt.step()
    watch.close()
    return watch


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the walk-through; returns what each step gave (for the test suite).

    Example:
        >>> main(["--workdir", "/tmp/debug"])  # doctest: +SKIP
    """
    from gradwatch import cli

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None,
                        help="where the kernel, the logs and the test go (default: a new temp dir)")
    parser.add_argument("--steps", type=int, default=2, help="training steps (each one checked)")
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="gradwatch-debug-"))
    os.makedirs(workdir, exist_ok=True)
    kernel = os.path.join(workdir, "my_kernels.py")
    with open(kernel, "w") as f:
        f.write(KERNEL)
    sys.modules.pop("my_kernels", None)  # a fresh import of the file just written

    watch = _train(workdir, args.steps)
    report = watch.last_report
    capsule = report.capsules["1::input[0]"]
    print(f"1. training: {report.summary()}")
    print(f"   the layer's capsule: {capsule}")

    print(f"2. gradwatch repro {capsule}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        repro = cli.main(["repro", capsule])
    print(f"   exit status {repro}")

    test = os.path.join(workdir, "test_fused_tanh.py")
    source = io.StringIO()
    with contextlib.redirect_stdout(source):
        cli.main(["repro", capsule, "--pytest"])
    with open(test, "w") as f:
        f.write(source.getvalue())
    print(f"3. gradwatch repro {capsule} --pytest > {test}; pytest {test}")
    before = _pytest(workdir, test)

    with open(kernel) as f:
        fixed = f.read().replace(BUGGY_LINE, FIXED_LINE)
    with open(kernel, "w") as f:
        f.write(fixed)
    print(f"4. the kernel fixed ({FIXED_LINE!r}); pytest {test}")
    after = _pytest(workdir, test)
    return {"workdir": workdir, "watch": watch, "report": report, "capsule": capsule, "repro": repro, "test": test,
            "pytest_before_fix": before, "pytest_after_fix": after}


if __name__ == "__main__":
    result = main(sys.argv[1:])
    sys.exit(0 if result["repro"] == 1 and result["pytest_before_fix"] != 0 and result["pytest_after_fix"] == 0 else 1)
