"""The watch core (private): the check step every adapter shares.

An adapter (:class:`gradwatch.GradWatch`, :class:`gradwatch.lightning.GradWatchCallback`,
:class:`gradwatch.hf.GradWatchTrainerCallback`, or a fourth one) keeps only its framework's
events: it decides *when* a step is checked (:meth:`_Watch.begin`, a clock read on other
steps) and *which gradient* is compared (it captures the replay state right before the
forward, records the gradient of the checked backward and the loss it was called on), and
hands them to :meth:`_Watch.check_step` as a :class:`_Capture`. The core does the rest,
once for every adapter::

    unscale (GradScaler) -> skip a step whose gradients are not finite -> average across
    processes -> module-local checks -> budgeted whole-model check (a failure of a tensor the
    local checks failed is named without group testing and located there) -> merge -> guard
    (every collective behind an error flag) -> sinks -> on_failure

It owns the options (:class:`~gradwatch.ProbeOptions`), the schedule (overhead budget), the
seeds (one derivation, :func:`gradwatch._seeds._derive_seed`), the reports, the suspect
modules, the turns of registered custom ops, the sinks and ``on_failure``.

Example (a fourth adapter's check step, in a hand-written loop):
    >>> watch = _Watch(options=ProbeOptions(), every_n_steps=100)  # doctest: +SKIP
    >>> if watch.begin(step, defer=True):                           # doctest: +SKIP
    ...     replay = capture(model)
    ...     ...  # the training forward and backward, recording the gradients
    ...     watch.check_step(_Capture(step, model, loss_fn, batch, replay, grads, loss))
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gradwatch._capsules import _CapsuleWriter, _Own, _own_records
from gradwatch._recording import _OpCalls, _Recording
from gradwatch._references import _REFERENCES_BY_OP
from gradwatch._schedule import _Schedule
from gradwatch._sharded import _Guard, _local_device, _share_records, _split, _unsharded
from gradwatch._sharded import _local_reports as _sharded_local_reports
from gradwatch._suspects import _discover, _modules_option, _resolve_modules
from gradwatch._validate import _fraction_or_none, _positive_int, _seed
from gradwatch.engine import _check_with, _LocalFindings, _reduced
from gradwatch.local import _float64_bytes, _local_reports, _merge
from gradwatch._seeds import _derive_seed
from gradwatch.options import ProbeOptions, _options
from gradwatch.replay import _DEVICE_TYPES, ReplayState, _capture_autocast
from gradwatch.report import OnFailure, Report, TensorCheck, _check_on_failure, _check_prefix, _handle, local_name
from gradwatch.sinks import KinkWarnings, LoggingSink, Sink

__all__: list[str] = []


@dataclass
class _Capture:
    """What an adapter hands the core for one check step: which gradient, of which step.

    ``grads`` and ``train_loss`` are as the checked backward made them; with ``scale`` (the
    enabled GradScaler's scale of that backward) the core divides it out of ``train_loss``,
    and out of ``grads`` when ``grads_scaled``. ``distributed``: several processes check this
    step together (every collective behind a :class:`~gradwatch._sharded._Guard`);
    ``average``: ``grads`` are this process's own and are averaged across processes first
    (what data-parallel training hands the optimizer). ``local_grads``: under ``fully_shard``,
    this rank's local gradients, whose mean over ranks ``grads`` is; the parameters are then
    gathered for the check. The core drops ``grads`` and ``replay`` once the whole-model check
    is done. ``loss_factor``: how ``loss_fn`` derives from
    the user's loss, ``("div", n)`` (Lightning's accumulation) or ``("mul", factor)`` (the HF
    Trainer's factor tensor); kept in the whole-model capsule so the user's plain loss replays
    it. None: the user's loss itself. ``own_grads``: when ``distributed`` and ``grads`` already are
    the mean over processes (DDP's ``.grad``), this process's own gradients of the backward, for
    its capsule (recorded only where one would be written; None: not recorded).
    """

    step: int
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    batch: Any
    replay: ReplayState | None
    grads: Mapping[str, Tensor]
    train_loss: Tensor | float | None
    recording: "_LocalRecording | None" = None
    scale: float | None = None
    grads_scaled: bool = True
    distributed: bool = False
    average: bool = False
    local_grads: Mapping[str, Tensor] | None = None
    loss_factor: tuple[str, Any] | None = None
    own_grads: Mapping[str, Tensor] | None = None


class _Watch:
    """The state and the check step of one adapter (see the module docstring).

    Args:
        options: The probe options (``coordinates`` and ``directions`` at most, under a budget).
        every_n_steps: The smallest gap between two checks.
        max_overhead: Largest fraction of the training time spent checking; ``None``: none.
        on_failure: ``"warn"``, ``"raise"`` or a callable receiving the report.
        seed: Base seed of the probe sampler; ``None`` draws one.
        prefix: First component of the logged keys.
        modules: ``"suspects"``, ``None`` or a list of modules (or their names) checked locally.
        sinks: Sinks every report is written to besides the default ones (the ``gradwatch``
            logging line, kink warnings) and the adapter's framework logger.
        capsules: The directory failing checks write their capsules to (:mod:`gradwatch.capsule`), or None.
    """

    def __init__(
        self,
        *,
        options: ProbeOptions | None = None,
        every_n_steps: int = 100,
        max_overhead: float | None = 0.02,
        on_failure: OnFailure = "warn",
        seed: int | None = None,
        prefix: str = "gradwatch",
        modules: Any = "suspects",
        sinks: Sequence[Sink] | None = None,
        capsules: str | None = None,
    ) -> None:
        options = _options("options", options)
        if options.directions < 1:
            raise ValueError(
                "`directions` must be at least 1: a random direction over the whole tensor is what catches "
                f"errors confined to a few elements, got {options.directions!r}"
            )
        _positive_int("every_n_steps", every_n_steps)
        _fraction_or_none("max_overhead", max_overhead)
        _check_on_failure(on_failure)
        _seed("seed", seed)
        _check_prefix(prefix)
        self.options = options
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.on_failure = on_failure
        self.prefix = prefix
        self.modules = _modules_option(modules)
        self.sinks: list[Sink] = [LoggingSink(), KinkWarnings()]
        self.user_sinks = _sinks_option(sinks)
        self.seed: int = secrets.randbits(62) if seed is None else seed
        self.seed_shared = False  # whether every process holds rank zero's base seed
        self.schedule = _Schedule(every_n_steps, max_overhead, options.coordinates, options.directions)
        self.reports: list[tuple[int, Report]] = []
        self.suspects: dict[str, str] = {}
        self.op_turns: dict[str, int] = {}  # which call of each registered custom op the next check records
        self._targets: Any = None  # once resolved on the model: None, "suspects" or qualified name -> module
        self._resolved = False
        self.capsules = _CapsuleWriter(capsules)

    def set_capsule_dir(self, directory: str | None) -> None:
        """Failing checks write their capsules to ``directory`` from now on (``None``: none), with
        the caps of a new run (an adapter that knows its logs only when training starts)."""
        old = self.capsules
        self.capsules = _CapsuleWriter(directory, max_bytes=old.max_bytes, max_count=old.max_count,
                                       max_total_bytes=old.max_total_bytes)

    def reset_sinks(self) -> None:
        """Fresh default sinks (a new run: kink warnings name each tensor once per run)."""
        self.sinks = [LoggingSink(), KinkWarnings()]

    # ------------------------------------------------------------------ when
    def begin(self, step: int, *, defer: bool) -> bool:
        """Start of training step ``step``: whether it is checked (a clock read, nothing else).
        ``defer=False`` under several processes (they decide from the shared plan alone)."""
        return self.schedule.begin(step, defer=defer)

    # ------------------------------------------------------------------ what to record
    def resolve(self, model: nn.Module) -> None:
        """Resolve ``modules`` against ``model`` now (names to submodules; raises for unknown ones)."""
        self._targets, self._resolved = _resolve_modules(model, self.modules), True

    def forget_modules(self) -> None:
        """Resolve ``modules`` again at the next check (a new fit; holds no module meanwhile)."""
        self._targets, self._resolved = None, False

    def targets(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any,
                replay: ReplayState, *, distributed: bool, sharded: bool = False) -> dict[str, nn.Module]:
        """The modules to record at this check step ({} for none). Suspects are found once, by one
        replayed forward (rank zero's under several processes; on gathered parameters under
        ``fully_shard``, unless the whole model's float64 copy is over ``max_shadow_bytes``)."""
        if not self._resolved:
            self.resolve(model)
        if self._targets == "suspects" and sharded and self.too_big(model):
            self._targets = {}  # finding suspects would gather the whole model: name the modules instead
        if self._targets == "suspects":
            guard = _Guard(_local_device(next(model.parameters()))) if distributed else None
            try:  # it runs the loss: a process that raises makes the others raise instead of waiting
                with _unsharded(model) if sharded else nullcontext():
                    found = _discover(model, loss_fn, batch, replay)
                if guard is not None:
                    found = dict(guard.broadcast(found))
            except BaseException:
                if guard is not None:
                    guard.abort()
                raise
            named = dict(model.named_modules())
            self._targets, self.suspects = {n: named[n] for n in found}, dict(found)
        return self._targets or {}

    def recording(self, model: nn.Module, targets: Mapping[str, nn.Module], *, ops: bool) -> "_LocalRecording":
        """The module-local recording of one check step (entered by the adapter around its
        checked forward and backward); ``ops``: also one call of each registered custom op
        (on a single process only)."""
        return _LocalRecording(model, targets, ops=ops and self.modules is not None, turns=self.op_turns)

    def too_big(self, model: nn.Module) -> str | None:
        """Why the whole model gets no float64 check (its copy is over ``max_shadow_bytes``), or None."""
        return _too_big(model, self.options.precision, self.options.max_shadow_bytes)

    # ------------------------------------------------------------------ the check step
    def check_step(self, capture: _Capture, *, sinks: Sequence[Sink] = (), write: bool = True) -> Report:
        """Check a captured step and record its report (``sinks``: the adapter's framework
        sinks; ``write``: whether this process writes to sinks, rank zero's only)."""
        guard = _Guard(_local_device(next(capture.model.parameters()))) if capture.distributed else None
        try:
            report = self._check(capture, guard)
        except BaseException:
            if guard is not None:
                guard.abort()  # the other processes raise at their next collective instead of waiting
            raise
        report = self.capsules.named(report)  # each failing tensor's capsule, for the sinks and on_failure
        self.record(report, sinks=sinks, write=write)
        return report

    def _check(self, capture: _Capture, guard: _Guard | None) -> Report:
        model, step = capture.model, capture.step
        reduce = guard.reduce if guard is not None else None
        if guard is not None and not self.seed_shared:  # rank zero's base seed: every rank draws the same probes
            self.seed, self.seed_shared = int(guard.broadcast(self.seed)), True
        seed = _derive_seed(self.seed, step)
        grads, train_loss = capture.grads, capture.train_loss
        if capture.scale is not None:
            scale = capture.scale
            if capture.grads_scaled:
                grads = {n: g / scale for n, g in grads.items()}
            train_loss = None if train_loss is None else train_loss / scale
            if not _all_finite(grads.values(), reduce):
                reason = (
                    f"GradScaler skips this optimizer step: the gradients scaled by {scale:g} are not finite "
                    "(fp16 overflow); the scale is lowered and no gradient of this step reaches the optimizer"
                )
                return _skipped_report(model, seed, step, reason)
        own = _own_grads(capture) if capture.distributed and self.capsules.wants() else None  # for its capsule
        if capture.average and reduce is not None and grads:
            grads = _reduced(grads, reduce)  # this process's own gradient: the mean, as DDP averages
        records = capture.recording.records() if capture.recording is not None else {}
        own_records = (_own_records(records, capture.local_grads)  # before the checks average them
                       if capture.distributed and records and self.capsules.wants(records) else None)
        sharded = capture.local_grads is not None
        skip = self._whole_skipped(model, records, sharded=sharded)
        with ExitStack() as gathered:
            references: Mapping[str, tuple] = {}
            if sharded:  # the whole model, or the checked modules only when it does not fit
                for module in [r.module for r in records.values()] if skip else [model]:
                    gathered.enter_context(_unsharded(module))
                if records:  # the records agreed across ranks, their gradients averaged
                    references = _share_records(records, capture.local_grads, capture.grads, guard)
            plan = self._plan(model, grads, guard, skip)  # closes the timing of the training step
            # the module-local checks first (their modules alone; the smallest when the plan is): a whole-model
            # failure of a tensor they failed is named and located there, without group testing or
            # bisecting the whole model
            local, used, seconds = (self._local_checks(capture, records, seed, guard, references) if records
                                    else ([], [], 0.0))
            report = self._budgeted(capture, grads, train_loss, seed, guard, skip, plan, own,
                                    _findings(records, local))
            del grads, own
            capture.grads, capture.replay = {}, None
            if records:
                report = self._merge_local(report, step, local, used, seconds, whole=skip is None, guard=guard,
                                           records=records, own=own_records)
        return report

    def _whole_skipped(self, model: nn.Module, records: Mapping[str, Any], *, sharded: bool) -> str | None:
        """Why the whole model is not checked at this step, or None: with ``precision="auto"`` a
        model whose float64 copy is over ``max_shadow_bytes`` gets module-local float64 checks
        instead of a native one; under ``fully_shard`` it is never gathered."""
        too_big = self.too_big(model) if records or sharded else None
        if too_big is None or records:
            return too_big
        if not sharded:
            return None  # no module to check locally: the whole model, natively
        return too_big.split(":")[0] + (
            ": under fully_shard the whole model is not gathered for a check (nor searched for suspects); pass "
            "`modules=[...]` to check modules locally (only their parameters are gathered)"
        )

    def _plan(self, model: nn.Module, grads: Mapping[str, Tensor], guard: _Guard | None,
              skip: str | None) -> tuple[list[str], int, int]:
        """The tensors, coordinates and directions of this step's check within the schedule's
        budget (also :attr:`_Schedule.richardson`); under several processes rank zero's plan.
        ``skip``: why the whole model is not checked (no tensor planned). Closes the timing of
        the training step: what runs from here on is checking."""
        schedule = self.schedule
        if skip is not None:
            schedule.plan([])
            return [], 0, 0
        names, coordinates, directions = schedule.plan(
            [n for n, p in model.named_parameters() if n in grads and p.numel()]  # empty tensors: skipped
        )
        if guard is not None:
            names, coordinates, directions, schedule.richardson = guard.broadcast(
                (names, coordinates, directions, schedule.richardson))
        return names, coordinates, directions

    def _planned_options(self, plan: tuple[list[str], int, int]) -> ProbeOptions:
        """The probe options of this step's checks: the plan's coordinates and directions per
        tensor (the schedule sized them within the overhead budget), and the smallest check's
        ``±h`` passes when not even the joint probe fits in full."""
        _, coordinates, directions = plan
        return dataclasses.replace(self.options, coordinates=coordinates, directions=directions, per_tensor="all",
                                   **self.schedule.check_options())

    def _budgeted(self, capture: _Capture, grads: Mapping[str, Tensor], train_loss: Tensor | float | None,
                  seed: int, guard: _Guard | None, skip: str | None, plan: tuple[list[str], int, int],
                  own: _Own | None = None, found: _LocalFindings | None = None) -> Report:
        """The whole-model check of ``plan`` (:meth:`_plan`); under several processes every one
        checks rank zero's plan (the same tensors with the same probes). ``skip``: why the whole
        model is not checked (every tensor ``skipped``); ``own``: this process's own gradients,
        for its capsule under several processes; ``found``: what the module-local checks of this
        step found (:func:`_findings`)."""
        schedule, model, step = self.schedule, capture.model, capture.step
        if skip is not None:
            return _skipped_report(model, seed, step, skip)
        names = plan[0]
        options = self._planned_options(plan)
        report = _check_with(model, capture.loss_fn, capture.batch, options, grads=dict(grads), replay=capture.replay,
                             train_loss=train_loss, seed=seed, reduce=guard.reduce if guard is not None else None,
                             names=names, local=found)
        schedule.done(step, report.seconds, len(report.probes))
        if guard is not None:
            schedule.next_step = int(guard.broadcast(schedule.next_step))
        report = dataclasses.replace(report, step=step)
        self.capsules.whole(report, model, capture.batch, grads, capture.replay, train_loss, seed, options, names,
                            loss_factor=capture.loss_factor, own=own)
        return report

    def _local_checks(self, capture: _Capture, records: Mapping[str, Any], seed: int, guard: _Guard | None,
                      references: Mapping[str, tuple]) -> tuple[list[Report], list[ProbeOptions], float]:
        """The module-local checks of the recorded step (agreed across processes when there are
        several), the options each ran with (:meth:`_local_options`), and the seconds they took."""
        started = time.perf_counter()
        if capture.local_grads is not None:
            local = _sharded_local_reports(records, seed, self.options, references, guard, reduce=guard.reduce)
            used = [self.options] * len(local)
        elif guard is not None:
            local = _agreed_local_reports(capture.model, records, seed, self.options, guard)
            used = [self.options] * len(local)
        else:
            smallest = self._local_options()
            local, used = _local_reports(capture.recording.recordings(), seed, smallest,
                                         full=self.options if smallest is not self.options else None)
        return local, used, time.perf_counter() - started

    def _local_options(self) -> ProbeOptions:
        """The options of this step's module-local checks in one process: the configured ones; at
        the smallest check (not even the whole model's joint probe fits in full in the budget), the
        joint probe alone at ``±h``, as the whole model's (a failure is measured again with ``±2h``
        passes, and located, before it stands), and the configured ones again for a module that
        did not evaluate in float64 (:func:`gradwatch.local._local_reports`)."""
        if self.schedule.richardson or not self.options.joint:
            return self.options
        return dataclasses.replace(self.options, coordinates=0, directions=0, **self.schedule.check_options())

    def _merge_local(self, report: Report, step: int, local: list[Report], used: list[ProbeOptions],
                     seconds: float, *,
                     whole: bool, guard: _Guard | None, records: Mapping[str, Any] | None = None,
                     own: Mapping[str, tuple] | None = None) -> Report:
        """``report`` with the module-local reports added; their ``seconds`` count against the
        budget (``whole``: the whole model was checked too, else the local checks are the check).
        ``records``: a failing one gets a capsule (each local report carries the seed its check
        used; ``own``: under several processes, each record's own gradients)."""
        report = _merge(report, local)
        if records is not None:
            self.capsules.local(step, records, local, used, own=own)
        if whole:
            self.schedule.add(step, seconds)
        else:
            self.schedule.done(step, seconds, len(report.probes))
        if guard is not None:
            self.schedule.next_step = int(guard.broadcast(self.schedule.next_step))  # rank zero's clock decides
        return report

    # ------------------------------------------------------------------ reports
    def record(self, report: Report, *, sinks: Sequence[Sink] = (), write: bool = True) -> None:
        """Keep ``report``, write it to the sinks (when ``write``) and apply ``on_failure``."""
        self.reports.append((report.step, report))
        if write:
            for sink in [*self.sinks, *sinks, *self.user_sinks]:
                sink.write(report, report.step)
        _handle(report, self.on_failure)


class _Watched:
    """What every adapter exposes of its core (``self._watch``): the options and the reports."""

    _watch: _Watch

    @property
    def options(self) -> ProbeOptions:
        """The probe options (:class:`~gradwatch.ProbeOptions`)."""
        return self._watch.options

    @property
    def every_n_steps(self) -> int:
        """The smallest gap between two checks."""
        return self._watch.every_n_steps

    @property
    def max_overhead(self) -> float | None:
        """Largest fraction of the training time spent checking (``None``: no budget)."""
        return self._watch.max_overhead

    @property
    def on_failure(self) -> OnFailure:
        """What a failing check does: ``"warn"``, ``"raise"`` or a callable."""
        return self._watch.on_failure

    @property
    def prefix(self) -> str:
        """First component of the logged keys."""
        return self._watch.prefix

    @property
    def modules(self) -> Any:
        """The ``modules`` option, as given."""
        return self._watch.modules

    @property
    def seed(self) -> int:
        """The base seed in use (rank zero's under several processes)."""
        return self._watch.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._watch.seed = value

    @property
    def reports(self) -> list[tuple[int, Report]]:
        """``(step, Report)`` for each check."""
        return self._watch.reports

    @property
    def last_report(self) -> Report | None:
        """The latest report, or ``None`` before the first check."""
        return self._watch.reports[-1][1] if self._watch.reports else None

    @property
    def suspects(self) -> dict[str, str]:
        """With ``modules="suspects"``, after the first check: qualified module name -> why it is one."""
        return self._watch.suspects


class _LocalRecording:
    """The module-local recordings of one check step: ``targets`` (qualified name -> module) and,
    with ``ops``, one call of each custom op with a registered reference (``turns``: the
    core's :class:`_OpCalls` turns, which call). Entered at the start of the checked forward;
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


class _BackwardRoots(TorchFunctionMode):
    """Records the tensors ``backward()`` is called on (the training loss), and the
    autocast state of the forward when autocast is entered inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.roots: list[Tensor] = []
        self.autocast: dict[str, tuple[bool, torch.dtype]] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.autocast is None and any(torch.is_autocast_enabled(d) for d in _DEVICE_TYPES):
            self.autocast = _capture_autocast()
        if func is Tensor.backward:
            self.roots.append(args[0].detach())
        elif func is torch.autograd.backward:
            tensors = args[0] if args else kwargs.get("tensors")
            self.roots.extend(t.detach() for t in ([tensors] if isinstance(tensors, Tensor) else tensors))
        return func(*args, **kwargs)

    def loss(self) -> Tensor | None:
        """The sum of the scalar roots, or None when a root was not a scalar."""
        if not self.roots or any(r.numel() != 1 for r in self.roots):
            return None
        total = self.roots[0].reshape(())
        for r in self.roots[1:]:
            total = total + r.reshape(()).to(total.device)
        return total


def _findings(records: Mapping[str, Any], local: Sequence[Report]) -> _LocalFindings:
    """What the module-local checks of a step found: the parameters they failed (qualified name
    -> the local check's verdict, named ``'blocks.1.attn::weight'``, :func:`gradwatch.report.local_name`)
    and the kernels they measured computing in float64."""
    failed = {t.name: t for r in local for t in r.failures}
    return _LocalFindings(
        failed={(f"{m}.{p}" if m else p): failed[local_name(m, p)] for m, r in records.items() for p in r.param_grads
                if local_name(m, p) in failed},
        float64_kernels=frozenset(k for r in local if r.measured_precision == "float64" for k in r.kernels),
    )


def _own_grads(capture: _Capture) -> _Own:
    """This process's own gradients of a distributed step (for its capsule), with the scale they carry."""
    if capture.local_grads is not None:  # fully_shard: recorded in the backward
        return _Own(capture.local_grads, capture.scale)
    if capture.average:  # grads are this process's, averaged by the core
        return _Own(capture.grads, capture.scale if capture.grads_scaled else None)
    return _Own(capture.own_grads, capture.scale)  # recorded in the backward by the adapter, or None


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


def _too_big(model: nn.Module, precision: str, max_shadow_bytes: int) -> str | None:
    """Why ``precision="auto"`` makes no float64 copy of the whole model (too large), else None."""
    if precision != "auto" or _float64_bytes(model) <= max_shadow_bytes:
        return None
    return (f"the whole model's float64 copy would take {_float64_bytes(model) / 2**20:.0f} MiB > "
            f"max_shadow_bytes {max_shadow_bytes / 2**20:.0f} MiB: module-local float64 checks "
            "instead of a whole-model check in the native precision")


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


def _sinks_option(sinks: Any) -> list[Sink]:
    """Validate an adapter's ``sinks``: ``None`` or a sequence of objects with ``write(report, step)``."""
    if sinks is None:
        return []
    if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Sequence) or not all(
            callable(getattr(s, "write", None)) for s in sinks):
        raise TypeError(f"`sinks` must be None or a list of sinks (objects with .write(report, step)), "
                        f"got {sinks!r}"[:300])
    return list(sinks)


class _TensorHooks:
    """Records the gradient each backward of the step sends to each parameter (after the
    parameter's own tensor hooks, so a hook that rescales a gradient is checked too), summed
    over the backwards. ``copy``: keep copies (DDP may write the mean over ranks into the very
    tensor a hook sees: a rank's own gradients for its capsule)."""

    def __init__(self, model: nn.Module, *, copy: bool = False) -> None:
        self.grads: dict[str, Tensor] = {}
        self._copy = copy
        self._handles = [p.register_hook(partial(self._keep, name)) for name, p in model.named_parameters()
                         if p.requires_grad]

    def _keep(self, name: str, grad: Tensor) -> None:
        previous = self.grads.get(name)
        if previous is not None:
            self.grads[name] = previous + grad.detach()
        else:
            self.grads[name] = grad.detach().clone() if self._copy else grad.detach()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
