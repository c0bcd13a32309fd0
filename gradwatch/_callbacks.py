"""What the training-framework callbacks share (private): one budgeted check, and the
report of a step that a GradScaler skips.

:class:`gradwatch.lightning.GradWatchCallback` and :class:`gradwatch.hf.GradWatchTrainerCallback`
decide when to check and which gradient to compare; both then call :func:`_budgeted_check`,
which plans the probes with the shared :class:`~gradwatch._schedule._Schedule`, makes every
process take rank zero's plan, runs :func:`gradwatch.check` and books its cost.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from gradwatch._schedule import _Schedule
from gradwatch.engine import check
from gradwatch.replay import ReplayState
from gradwatch.report import Report, TensorCheck

__all__: list[str] = []


def _budgeted_check(
    schedule: _Schedule,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    *,
    step: int,
    seed: int,
    grads: Mapping[str, Tensor],
    replay: ReplayState,
    train_loss: Tensor | float | None,
    reduce: Callable[[Tensor], Tensor] | None,
    broadcast: Callable[[Any], Any] | None,
    options: Mapping[str, Any],
) -> Report:
    """Check ``step`` within the schedule's budget; ``broadcast(obj)`` returns rank zero's ``obj``
    (data-parallel training: every process checks the same tensors with the same probes)."""
    names, coordinates, directions = schedule.plan(
        [n for n, p in model.named_parameters() if n in grads and p.numel()]  # empty tensors: skipped
    )
    richardson = schedule.richardson
    if broadcast is not None:
        names, coordinates, directions, richardson = broadcast((names, coordinates, directions, richardson))
        schedule.richardson = richardson
    report = check(
        model,
        loss_fn,
        batch,
        grads=dict(grads),
        replay=replay,
        train_loss=train_loss,
        seed=seed,
        reduce=reduce,
        coordinates=coordinates,
        directions=directions,
        names=names,
        **{**options, **schedule.check_options()},
    )
    schedule.done(step, report.seconds, len(report.probes))
    if broadcast is not None:
        schedule.next_step = int(broadcast(schedule.next_step))
    return dataclasses.replace(report, step=step)


def _all_finite(grads: Iterable[Tensor], reduce: Callable[[Tensor], Tensor] | None) -> bool:
    """Whether every gradient is finite (one host sync; across ranks when ``reduce`` is given)."""
    grads = list(grads)
    if not grads:
        return True
    device = grads[0].device
    bad = torch.stack([(~torch.isfinite(g)).any().to(device) for g in grads]).any().to(torch.float64).reshape(1)
    if reduce is not None:
        bad = reduce(bad)
    return not bool(bad.item() > 0)


def _skipped_report(model: nn.Module, seed: int, step: int, reason: str) -> Report:
    """A report for a step that is not checked: every tensor ``skipped`` with ``reason``."""
    tensors = {
        n: TensorCheck(n, tuple(p.shape), "skipped", reason=reason)
        for n, p in model.named_parameters()
    }
    return Report(tensors=tensors, seed=seed, reason=reason, step=step)
