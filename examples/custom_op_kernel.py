"""Unit-test and train a ``torch.library`` custom op whose hand-written backward has a planted bug.

``fused_bias_gelu(x, bias)`` = GELU (tanh approximation) of ``x + bias`` is registered
the way CUDA/Triton kernel wrappers are: ``torch.library.custom_op`` around a forward
"kernel", ``register_fake`` for shape propagation (meta tensors, ``torch.compile``), and
``register_autograd`` with ``setup_context`` and a backward that calls a second custom
op, the backward "kernel", which returns the input and bias gradients in one pass. Both
kernels are written out as explicit CPU tensor math, standing in for compiled kernels.

The planted bug is in the backward kernel: it differentiates the inner polynomial
``√(2/π)·(z + 0.044715·z³)`` as if it were linear, dropping ``3·0.044715·z²``. The
gradient is off by a few percent where ``|z|`` is around 1-2; training still runs and
the loss still falls.

It shows both ways to use gradwatch on such an op:

1. **Unit test** of the op: ``gradwatch.assert_gradients`` on a tiny module whose
   parameters are the op's inputs (what you would put in ``tests/``); it raises a
   ``GradientCheckError`` (an ``AssertionError``) naming the input and element.
2. **Training**: ``gradwatch.GradWatch`` checks a small regression MLP built from the op
   every ``--every`` steps and logs to TensorBoard under ``--logdir``; the wrong
   gradient shows in the biases of the fused layers and the weights before them.

Run:
    python examples/custom_op_kernel.py            # the planted bug: both uses catch it
    python examples/custom_op_kernel.py --fixed    # the correct backward passes both
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradwatch

_K = math.sqrt(2.0 / math.pi)
_C = 0.044715


# ----------------------------------------------------------------------- the "kernels"
@torch.library.custom_op("gradwatch_examples::fused_bias_gelu", mutates_args=())
def fused_bias_gelu(x: Tensor, bias: Tensor, planted_bug: bool) -> Tensor:
    """Forward kernel: ``gelu_tanh(x + bias)``, bias broadcast over the last dimension."""
    z = x + bias
    return 0.5 * z * (1.0 + torch.tanh(_K * (z + _C * z * z * z)))


@fused_bias_gelu.register_fake
def _(x: Tensor, bias: Tensor, planted_bug: bool) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("gradwatch_examples::fused_bias_gelu_backward", mutates_args=())
def fused_bias_gelu_backward(grad_out: Tensor, x: Tensor, bias: Tensor, planted_bug: bool) -> tuple[Tensor, Tensor]:
    """Backward kernel: ``(grad_x, grad_bias)`` in one pass, recomputing ``z`` (no saved activations)."""
    z = x + bias
    t = torch.tanh(_K * (z + _C * z * z * z))
    if planted_bug:
        d_inner = _K * torch.ones_like(z)  # the planted bug: d/dz of z + 0.044715·z³ taken as 1
    else:
        d_inner = _K * (1.0 + 3.0 * _C * z * z)
    grad_x = grad_out * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * d_inner)
    return grad_x, grad_x.reshape(-1, grad_x.shape[-1]).sum(0)


@fused_bias_gelu_backward.register_fake
def _(grad_out: Tensor, x: Tensor, bias: Tensor, planted_bug: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(bias)


def _setup_context(ctx, inputs, output) -> None:
    x, bias, planted_bug = inputs
    ctx.save_for_backward(x, bias)
    ctx.planted_bug = planted_bug


def _backward(ctx, grad_out: Tensor):
    x, bias = ctx.saved_tensors
    grad_x, grad_bias = fused_bias_gelu_backward(grad_out, x, bias, ctx.planted_bug)
    return grad_x, grad_bias, None


fused_bias_gelu.register_autograd(_backward, setup_context=_setup_context)


class FusedBiasGELU(nn.Module):
    """``gelu_tanh(x + bias)`` through the custom op (a bias-free Linear goes before it)."""

    def __init__(self, dim: int, planted_bug: bool) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        self.planted_bug = planted_bug

    def forward(self, x: Tensor) -> Tensor:
        return fused_bias_gelu(x, self.bias, self.planted_bug)


# ------------------------------------------------------------------- 1. the unit test
class OpInputs(nn.Module):
    """The op's inputs as parameters, so that every input's gradient is checked."""

    def __init__(self, planted_bug: bool, *, rows: int = 8, dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = nn.Parameter(2.0 * torch.randn(rows, dim, generator=g))  # spans GELU's curved region
        self.bias = nn.Parameter(0.5 * torch.randn(dim, generator=g))
        self.planted_bug = planted_bug

    def forward(self) -> Tensor:
        return fused_bias_gelu(self.x, self.bias, self.planted_bug)


def unit_test(planted_bug: bool, seed: int = 0) -> gradwatch.Report:
    """What a test in ``tests/`` does: the loss is a fixed random projection of the output."""
    module = OpInputs(planted_bug, seed=seed)
    projection = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed + 1))
    return gradwatch.assert_gradients(module, lambda m, w: (m() * w).sum(), projection)


# --------------------------------------------------------------------- 2. in training
def build_model(planted_bug: bool) -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, 64, bias=False), FusedBiasGELU(64, planted_bug),
        nn.Linear(64, 64, bias=False), FusedBiasGELU(64, planted_bug),
        nn.Linear(64, 1),
    )


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def target(x: Tensor) -> Tensor:
    """The regression target: a smooth 2-D surface."""
    return (torch.sin(3 * x[:, 0]) * torch.cos(2 * x[:, 1])).unsqueeze(1)


class Outcome(NamedTuple):
    """What :func:`main` ran: the unit test's report or error, and the training hook."""

    unit_test: gradwatch.Report | gradwatch.GradientCheckError
    watch: gradwatch.GradWatch


def main(argv: list[str] | None = None) -> Outcome:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--every", type=int, default=50, help="check every N steps (default 50)")
    parser.add_argument("--logdir", default="runs/custom_op", help="TensorBoard directory (default runs/custom_op)")
    parser.add_argument("--fixed", action="store_true", help="use the correct backward kernel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    planted_bug = not args.fixed

    # 1. the unit test of the op
    try:
        unit: gradwatch.Report | gradwatch.GradientCheckError = unit_test(planted_bug, args.seed)
        print(f"unit test (gradwatch.assert_gradients): PASS - {unit.summary()}")
    except gradwatch.GradientCheckError as err:
        unit = err
        print(f"unit test (gradwatch.assert_gradients): FAIL - {_largest_error([err.report])[1]}")

    # 2. the op in a training loop
    torch.manual_seed(args.seed)
    model = build_model(planted_bug)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    failures: list[gradwatch.Report] = []
    # max_overhead=None: a demonstration, so every check probes every tensor; in real
    # training keep the default budget (2% of the training time, spent in turn over the tensors)
    watch = gradwatch.GradWatch(
        model, loss_fn, every_n_steps=args.every, max_overhead=None, logdir=args.logdir,
        on_failure=failures.append, seed=args.seed,
    )
    gen = torch.Generator().manual_seed(args.seed)
    with watch:
        for _ in range(args.steps):
            x = 2 * torch.rand(128, 2, generator=gen) - 1
            batch = (x, target(x))
            optimizer.zero_grad()
            with watch.step(batch):
                loss = loss_fn(model, batch)
                loss.backward()
            optimizer.step()
    checks = len(watch.reports)
    if failures:
        step, where = _largest_error(failures)
        print(
            f"training (gradwatch.GradWatch): FAIL in {len(failures)} of {checks} checks; largest error at step "
            f"{step}: {where} (final loss {loss.item():.4f})"
        )
    else:
        print(f"training (gradwatch.GradWatch): PASS in all {checks} checks (final loss {loss.item():.4f})")
    print(f"view the logs: tensorboard --logdir {args.logdir.split('/')[0] or args.logdir}")
    return Outcome(unit, watch)


def _largest_error(reports: list[gradwatch.Report]) -> tuple[int | None, str]:
    """The step and the located part of the failure message whose probe has the largest rel_err."""
    report, tensor = max(
        ((r, t) for r in reports for t in r.failures if t.worst is not None), key=lambda rt: rt[1].worst.rel_error
    )
    return report.step, tensor.short_message


if __name__ == "__main__":
    main(sys.argv[1:])
