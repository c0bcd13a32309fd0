"""Train a small classifier whose custom autograd.Function hides a backward bug.

The model's first layer is a hand-written "fused" linear op, in the style of a CUDA or
Triton kernel wrapper: ``forward`` computes ``x @ W.T + b`` and ``backward`` returns
hand-derived gradients. The planted bug reduces the bias gradient with ``mean`` instead
of ``sum`` over the batch, a bug that still trains, only worse. The GradWatch hook
checks every ``--every`` steps and logs to TensorBoard under ``--logdir``: relative
errors per tensor, failures, and the kink curves ``gradwatch/kink_fraction`` (probes
whose ±h passes crossed a ReLU kink) and ``gradwatch/kink_margin_min`` (closest
approach to one), with a ``gradwatch/kinks`` text entry naming the ReLU modules near
kinks; a dead-ReLU build-up shows as a rising kink_fraction curve.

Run:
    python examples/train_planted_bug.py            # catches the planted bug
    python examples/train_planted_bug.py --fixed    # the correct backward passes
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch


class FusedLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` with a hand-written backward."""

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
    return nn.Sequential(
        FusedLinearLayer(2, 64, planted_bug),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 2),
    )


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def main(argv: list[str] | None = None) -> gradwatch.GradWatch:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--every", type=int, default=50, help="check every N steps (default 50)")
    parser.add_argument("--logdir", default="runs/planted_bug", help="TensorBoard directory (default runs/planted_bug)")
    parser.add_argument("--fixed", action="store_true", help="use the correct backward")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x, y = spirals(2048, args.seed)
    model = build_model(planted_bug=not args.fixed)
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
        print(
            f"gradwatch: FAIL in {len(failures)} of {checks} checks - {first.message.split(' (tolerance')[0]} "
            f"(final loss {loss.item():.3f}, accuracy {accuracy:.1%})"
        )
    else:
        print(f"gradwatch: PASS in all {checks} checks (final loss {loss.item():.3f}, accuracy {accuracy:.1%})")
    print(f"view the logs: tensorboard --logdir {args.logdir.split('/')[0] or args.logdir}")
    return watch


if __name__ == "__main__":
    main(sys.argv[1:])
