"""What the training-framework callbacks share (private): one budgeted check, the
report of a step that a GradScaler skips, and the module-local checks of a check step.

:class:`gradwatch.lightning.GradWatchCallback` and :class:`gradwatch.hf.GradWatchTrainerCallback`
decide when to check and which gradient to compare; both then call :func:`_budgeted_check`,
which plans the probes with the shared :class:`~gradwatch._schedule._Schedule`, makes every
process take rank zero's plan, runs :func:`gradwatch.check` and books its cost. The module-local checks
(:mod:`gradwatch.local`) of :class:`gradwatch.GradWatch` and both callbacks go through the same
helpers: :func:`_suspect_modules` finds the modules to watch, :class:`_LocalRecording` records
them during the checked backward, :func:`_too_big` says when ``precision="auto"`` checks them
instead of the whole model, :func:`_agreed_local_reports` makes their verdicts agree across
data-parallel processes, and :func:`_merge_local` adds them to the report and books their time.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from gradwatch._recording import _OpCalls, _Recording
from gradwatch._references import _REFERENCES_BY_OP
from gradwatch._schedule import _Schedule
from gradwatch._sharded import _Guard, _share_records, _split
from gradwatch._sharded import _local_reports as _sharded_local_reports
from gradwatch._suspects import _discover, _modules_option  # noqa: F401  (_modules_option: for the callbacks)
from gradwatch.engine import check
from gradwatch.local import _float64_bytes, _local_reports, _merge
from gradwatch.options import ProbeOptions
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
    skip: str | None = None,
) -> Report:
    """Check ``step`` within the schedule's budget; ``broadcast(obj)`` returns rank zero's ``obj``
    (data-parallel training: every process checks the same tensors with the same probes).
    ``skip``: why the whole model is not checked at this step (every tensor ``skipped``)."""
    if skip is not None:
        schedule.plan([])  # closes the timing of the training step
        return _skipped_report(model, seed, step, skip)
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


def _suspect_modules(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any,
                     replay: ReplayState, broadcast: Callable[[Any], Any] | None = None,
                     ) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The modules with custom backward code (one replayed forward), and why each is one;
    ``broadcast``: rank zero's are taken (every process then records the same modules)."""
    found = _discover(model, loss_fn, batch, replay)
    if broadcast is not None:
        found = dict(broadcast(found))
    named = dict(model.named_modules())
    return {n: named[n] for n in found}, dict(found)


def _too_big(model: nn.Module, precision: str, max_shadow_bytes: int) -> str | None:
    """Why ``precision="auto"`` makes no float64 copy of the whole model (too large), else None."""
    if precision != "auto" or _float64_bytes(model) <= max_shadow_bytes:
        return None
    return (f"the whole model's float64 copy would take {_float64_bytes(model) / 2**20:.0f} MiB > "
            f"max_shadow_bytes {max_shadow_bytes / 2**20:.0f} MiB: module-local float64 checks "
            "instead of a whole-model check in the native precision")


class _LocalRecording:
    """The module-local recordings of one check step: ``targets`` (qualified name -> module) and,
    with ``ops``, one call of each custom op with a registered reference (``turns``: the
    adapter's :class:`_OpCalls` turns, which call). Entered at the start of the checked forward;
    :meth:`close` (idempotent, also on errors) removes every hook."""

    def __init__(self, model: nn.Module, targets: Mapping[str, nn.Module], *, ops: bool,
                 turns: dict[str, int] | None = None) -> None:
        self.parts: list[Any] = [_Recording(targets, model=model)] if targets else []
        if ops and _REFERENCES_BY_OP:
            self.parts.append(_OpCalls(_REFERENCES_BY_OP, turns))
        self._entered: list[Any] = []

    def __enter__(self) -> "_LocalRecording":
        try:
            for part in self.parts:
                part.__enter__()
                self._entered.append(part)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        while self._entered:
            self._entered.pop().__exit__(None, None, None)

    def recordings(self) -> list[Any]:
        """The parts that recorded something."""
        return [p for p in self.parts if p.records]

    def records(self) -> dict[str, Any]:
        return {name: r for p in self.parts for name, r in p.records.items()}


def _merge_local(schedule: _Schedule, report: Report, step: int, local_reports: Callable[[], list[Report]], *,
                 whole: bool, broadcast: Callable[[Any], Any] | None = None) -> Report:
    """``report`` with the module-local reports added; their time counts against the budget
    (``whole``: the whole model was checked too, else the local checks are the check)."""
    started = time.perf_counter()
    report = _merge(report, local_reports())
    seconds = time.perf_counter() - started
    if whole:
        schedule.add(step, seconds)
    else:
        schedule.done(step, seconds, len(report.probes))
    if broadcast is not None:
        schedule.next_step = int(broadcast(schedule.next_step))  # rank zero's clock decides
    return report


def _local_checks(model: nn.Module, recording: Any, seed: int, options: ProbeOptions,
                  guard: _Guard | None) -> Callable[[], list[Report]]:
    """The module-local checks of a recorded step (a :class:`_LocalRecording`), for
    :func:`_merge_local`: agreed across processes through ``guard`` when there are several."""
    if guard is not None:
        return partial(_agreed_local_reports, model, recording.records(), seed, options, guard)
    return partial(_local_reports, recording.recordings(), seed, options)


def _agreed_local_reports(model: nn.Module, records: Mapping[str, Any], seed: int, options: ProbeOptions,
                          guard: _Guard) -> list[Report]:
    """The module-local checks of a data-parallel (DDP) step, with the same verdicts on every
    process: each record's parameter gradients (its own, this process's) averaged over processes
    and shared as under ``fully_shard`` (:func:`gradwatch._sharded._share_records`)."""
    local = {(f"{n}.{p}" if n else p): g for n, r in records.items() for p, g in r.param_grads.items()}
    params = dict(model.named_parameters())
    names = list(params)
    present = guard.reduce(torch.tensor([float(n in local) for n in names], dtype=torch.float64,
                                        device=guard.device))
    kept = [n for n, flag in zip(names, present.tolist()) if flag > 0]
    tensors = [local[n] if n in local else torch.zeros_like(params[n]) for n in kept]
    mean = dict(zip(kept, _split(guard.reduce, tensors))) if kept else {}
    references = _share_records(records, local, mean, guard)
    return _sharded_local_reports(records, seed, options, references, guard, reduce=guard.reduce)
