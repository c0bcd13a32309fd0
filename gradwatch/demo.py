"""The planted-bug demo: a small classifier whose custom autograd.Function hides a backward bug.

The model's first layer is a hand-written "fused" linear op, in the style of a CUDA or
Triton kernel wrapper: ``forward`` computes ``x @ W.T + b`` and ``backward`` returns
hand-derived gradients. The planted bug reduces the bias gradient with ``mean`` instead
of ``sum`` over the batch, a bug that still trains, only worse. The GradWatch hook
checks every ``every`` steps and logs to TensorBoard under ``logdir``: relative errors
per tensor, failures, and the kink curves ``gradwatch/kink_fraction`` (probes whose ±h
passes crossed a ReLU kink) and ``gradwatch/kink_margin_min`` (closest approach to one),
with a ``gradwatch/kinks`` text entry naming the ReLU modules near kinks; a dead-ReLU
build-up shows as a rising kink_fraction curve.

It ships with the package, so it runs from an installed gradwatch:

    gradwatch demo                       # catches the planted bug, logs to runs/planted_bug
    gradwatch demo --fixed               # the correct backward passes (runs/planted_bug_fixed)
    gradwatch report runs                # the per-tensor table of both runs
    tensorboard --logdir runs

Example:
    >>> from gradwatch import demo
    >>> watch = demo.run(steps=60, every=20, logdir="runs/planted_bug")  # doctest: +SKIP
    gradwatch: FAIL in 3 of 3 checks - '0.bias'[...
    >>> [t.name for t in watch.last_report.failures]  # doctest: +SKIP
    ['0.bias']
"""

from __future__ import annotations

import argparse
import math
import sys
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch._validate import _argparse_type, _non_negative_int, _positive_int
from gradwatch.hook import GradWatch
from gradwatch.report import Report

__all__ = ["FusedLinear", "FusedLinearLayer", "build_model", "loss_fn", "main", "run", "spirals"]


class FusedLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` with a hand-written backward (planted bug: bias mean vs sum)."""

    @staticmethod
    def forward(ctx, x, weight, bias, planted_bug):
        ctx.save_for_backward(x, weight)
        ctx.planted_bug = planted_bug
        return torch.addmm(bias, x, weight.t())

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight
        grad_w = grad_out.t() @ x
        # the planted bug: a mean where the batch reduction must be a sum
        grad_b = grad_out.mean(0) if ctx.planted_bug else grad_out.sum(0)
        return grad_x, grad_w, grad_b, None


class FusedLinearLayer(nn.Module):
    """An ``nn.Linear`` computed by :class:`FusedLinear`."""

    def __init__(self, n_in: int, n_out: int, planted_bug: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) * math.sqrt(2.0 / n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))
        self.planted_bug = planted_bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FusedLinear.apply(x, self.weight, self.bias, self.planted_bug)


def spirals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved noisy spirals, a classic small 2-D classification set."""
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0.05, 1.0, n)) * 3 * np.pi
    label = rng.integers(0, 2, n)
    sign = np.where(label == 0, 1.0, -1.0)
    xy = np.stack([sign * t * np.cos(t), sign * t * np.sin(t)], 1) / (3 * np.pi)
    xy += rng.normal(scale=0.03, size=xy.shape)
    return torch.tensor(xy, dtype=torch.float32), torch.tensor(label)


def build_model(planted_bug: bool) -> nn.Module:
    """The demo MLP; its first layer ``0`` is a :class:`FusedLinearLayer`."""
    return nn.Sequential(
        FusedLinearLayer(2, 64, planted_bug),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 2),
    )


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of ``model`` on ``batch = (x, y)``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def run(
    *,
    steps: int = 300,
    every: int = 50,
    logdir: str | None = None,
    fixed: bool = False,
    seed: int = 0,
    out: Callable[[str], Any] = print,
) -> GradWatch:
    """Train the demo model with a GradWatch hook and print the verdict and where to look.

    Args:
        steps: Training steps.
        every: Check every ``every`` steps (every tensor, all probes: ``max_overhead=None``).
        logdir: TensorBoard directory; default ``runs/planted_bug`` (``runs/planted_bug_fixed``
            with ``fixed``).
        fixed: Train with the correct backward instead of the planted bug.
        seed: Seed of the data, the model and the probes.
        out: Where the final lines go.

    Returns:
        The (closed) hook: ``watch.reports`` holds ``(step, Report)`` per check.

    Example:
        >>> run(steps=41, every=20, fixed=True, logdir="runs/fixed").last_report.ok  # doctest: +SKIP
        True
    """
    _positive_int("steps", steps)
    _positive_int("every", every)
    _non_negative_int("seed", seed)
    if not isinstance(fixed, bool):
        raise ValueError(f"`fixed` must be a bool, got {fixed!r}")
    if logdir is None:
        logdir = "runs/planted_bug_fixed" if fixed else "runs/planted_bug"
    elif not isinstance(logdir, str) or not logdir:
        raise ValueError(f"`logdir` must be None or a non-empty str, got {logdir!r}")

    torch.manual_seed(seed)
    x, y = spirals(2048, seed)
    model = build_model(planted_bug=not fixed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    failures: list[Report] = []
    # max_overhead=None: a demonstration, so every check probes every tensor; in real
    # training keep the default budget (2% of the training time; every check covers every tensor)
    watch = GradWatch(
        model, loss_fn, every_n_steps=every, max_overhead=None, logdir=logdir,
        on_failure=failures.append, seed=seed,
    )
    gen = torch.Generator().manual_seed(seed)
    with watch:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (128,), generator=gen)
            batch = (x[idx], y[idx])
            optimizer.zero_grad()
            with watch.step(batch):
                loss = loss_fn(model, batch)
                loss.backward()
            optimizer.step()

    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    checks = len(watch.reports)
    if failures:
        first = failures[0].failures[0]
        out(
            f"gradwatch: FAIL in {len(failures)} of {checks} checks - {first.short_message} "
            f"(final loss {loss.item():.3f}, accuracy {accuracy:.1%})"
        )
    else:
        out(f"gradwatch: PASS in all {checks} checks (final loss {loss.item():.3f}, accuracy {accuracy:.1%})")
    out(f"view the logs: tensorboard --logdir {logdir}")
    out(f"per-tensor table: gradwatch report {logdir}")
    return watch


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, shared by ``python -m gradwatch.demo`` and ``gradwatch demo``."""
    parser.add_argument("--steps", type=_argparse_type(partial(_positive_int, "steps"), int), default=300,
                        help="training steps (default 300)")
    parser.add_argument("--every", type=_argparse_type(partial(_positive_int, "every"), int), default=50,
                        help="check every N steps (default 50)")
    parser.add_argument("--logdir", default=None,
                        help="TensorBoard directory (default runs/planted_bug, or runs/planted_bug_fixed with --fixed)")
    parser.add_argument("--fixed", action="store_true", help="train with the correct backward instead of the planted bug")
    parser.add_argument("--seed", type=_argparse_type(partial(_non_negative_int, "seed"), int), default=0,
                        help="seed of the data, the model and the probes (default 0)")


def main(argv: list[str] | None = None) -> GradWatch:
    """Parse ``argv`` (default ``sys.argv[1:]``) and :func:`run` the demo.

    Example:
        >>> main(["--steps", "60", "--every", "20", "--logdir", "runs/demo"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(prog="python -m gradwatch.demo", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return run(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
