"""Plain-PyTorch adapter: check gradients every N steps of a hand-written loop.

Example:
    >>> watch = GradWatch(model, loss_fn, every_n_steps=100, logdir="runs")  # doctest: +SKIP
    >>> for batch in loader:                                                  # doctest: +SKIP
    ...     optimizer.zero_grad()
    ...     with watch.step(batch):
    ...         loss = loss_fn(model, batch)
    ...         loss.backward()
    ...     optimizer.step()

With a ``torch.amp.GradScaler`` pass it as ``scaler=`` and keep ``loss_fn`` unscaled:

    >>> watch = GradWatch(model, loss_fn, scaler=scaler)                  # doctest: +SKIP
    >>> with watch.step(batch):                                            # doctest: +SKIP
    ...     with torch.autocast("cuda", dtype=torch.float16):
    ...         loss = loss_fn(model, batch)
    ...     scaler.scale(loss).backward()
    >>> scaler.step(optimizer); scaler.update()                            # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import secrets
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gradwatch._callbacks import (
    _all_finite,
    _budgeted_check,
    _LocalRecording,
    _merge_local,
    _skipped_report,
    _suspect_modules,
    _too_big,
)
from gradwatch._recording import _Recording
from gradwatch._schedule import _Schedule
from gradwatch._seeds import _derive_seed
from gradwatch._sharded import _Guard, _local_device, _LocalGrads, _share_records, _sharding, _unsharded
from gradwatch._sharded import _local_reports as _sharded_local_reports
from gradwatch._suspects import _resolve_modules
from gradwatch._validate import (
    _callable,
    _fraction_or_none,
    _kink_options,
    _module,
    _one_of,
    _positive_int,
    _probe_options,
    _seed,
)
from gradwatch.engine import DEFAULT_SHADOW_BYTES, PRECISIONS
from gradwatch.local import _float64_bytes, _local_reports
from gradwatch.options import ProbeOptions
from gradwatch.replay import _DEVICE_TYPES, _capture_autocast, capture
from gradwatch.report import OnFailure, Report, _check_on_failure, _check_prefix, _handle
from gradwatch.sinks import KinkWarnings, LoggingSink, Sink, TensorBoardSink

__all__ = ["GradWatch"]


class GradWatch:
    """Checks, every ``every_n_steps`` steps, the gradient a training step produced.

    On a check step, :meth:`step` captures the RNG states and buffers before your
    forward, records the gradient that your ``backward()`` inside the block sends to
    each parameter (after your tensor hooks), and the loss you backpropagated. On
    leaving the block it replays ``loss_fn(model, batch)`` in float64 with ±h
    perturbations and compares. Other steps only read the clock: no copy, no hook,
    no tensor operation, no device synchronisation.

    With ``max_overhead`` (default 2%), the time spent checking stays within that
    fraction of the training time: checks are at least ``every_n_steps`` apart, and
    further apart, or with fewer probes per tensor, when a check costs more than the
    budget holds. Every check starts with a joint probe over every tensor (see
    ``gradwatch.check(joint=...)``), the first one at step 0 included.

    With ``scaler`` (the AMP recipe ``scaler.scale(loss).backward()`` inside the
    block), the recorded gradients and backpropagated loss are divided by
    ``scaler.get_scale()``, read when the block ends (the scale of that backward:
    call ``scaler.update()`` after the block, as the recipe does), so unscaled
    gradients are compared with the unscaled ``loss_fn``. When the scaled gradients
    are not finite the scaler skips that optimizer step: the report's verdict is then
    ``"skipped"`` with the reason, and nothing is probed. Without ``scaler`` a
    scaled backward makes the check unreliable (the replayed loss differs from the
    backpropagated one).

    A model sharded with ``torch.distributed.fsdp.fully_shard`` (FSDP2) is checked on every
    rank, like data-parallel training: the gradient compared is the mean over ranks of each
    rank's local (unsharded) gradient of the block's backward, recorded before FSDP's
    reduce-scatter; for the check the parameters are gathered (a full copy of the model;
    module-local checks of ``modules`` need the same) and FSDP's hooks are suspended, every
    rank evaluates the same probes on its local batch, and the values are averaged across
    ranks before judging, so all ranks report the same verdicts. Module-local checks average
    the input gradients over ranks too (so each module's inputs must have the same shape on
    every rank, else it is skipped saying so). When the whole model's float64 copy is over
    ``max_shadow_bytes`` it is never gathered: only ``modules`` are (suspects are not
    searched, since that takes a forward of the whole model). When the check raises on one rank, the
    others raise at their next collective instead of waiting. FSDP1 flat parameters and
    tensor-parallel ``DTensor`` parameters are refused when the hook is created.

    Args:
        model: The module being trained.
        loss_fn: ``loss_fn(model, batch)`` returning the scalar loss you
            backpropagate inside the block (the same value, scaling included; with
            ``scaler``, the loss before ``scaler.scale``).
        every_n_steps: Check on steps ``0, n, 2n, ...`` (counted in :meth:`step`
            calls); with ``max_overhead``, the smallest gap between two checks.
        max_overhead: Largest fraction of the training time spent checking, such as
            ``0.02``. ``None``: no budget; every check probes every tensor with
            ``coordinates`` and ``directions`` on steps ``0, n, 2n, ...``.
        writer: A ``SummaryWriter`` to log to, or ``None``.
        logdir: Directory for a ``SummaryWriter`` the hook creates and owns.
        on_failure: ``"warn"`` (``warnings.warn``), ``"raise"``
            (:class:`~gradwatch.GradientCheckError`, after everything is restored), or a
            callable receiving the :class:`~gradwatch.Report`.
        seed: Base seed of the probe sampler; each check uses a seed derived from it
            and the step. ``None`` draws one (see :attr:`seed`).
        prefix: First component of the logged keys.
        coordinates: Random elements probed per tensor (at most, under a budget).
        directions: Random directions probed per tensor (at most, under a budget).
        kinks: Exclude probes that cross a kink of a non-smooth op; proximity is
            logged at INFO (once per module and op), and a
            :class:`~gradwatch.KinkWarning` says when kinks keep a tensor from being
            verified (:class:`~gradwatch.KinkWarnings`).
        kink_resamples: Replacement coordinates drawn per tensor, at most, for
            coordinate probes that crossed a kink.
        near_kink_margin: Margin below which a kink counts as near.
        precision: Where perturbed losses are evaluated: ``"float64"``, ``"native"``
            or ``"auto"`` (see :func:`gradwatch.check`).
        scaler: The ``torch.amp.GradScaler`` whose ``scale(loss)`` you backpropagate
            inside the block, or ``None``. A disabled scaler counts as ``None``.
        modules: Modules checked in isolation after the whole-model check
            (:mod:`gradwatch.local`): their parameter *and input* gradients against
            ``<grad_out, module(x)>``, in float64 where the module supports it, else in its
            own precision (float32 for float16/bfloat16). ``"suspects"`` (default): the
            modules whose forward runs custom backward code (custom ``autograd.Function``,
            ``torch.library`` custom ops, tensor hooks), found by one replayed forward at
            the first check. A list of submodules (or their names) checks those; ``None``
            none. Their tensors join the report as ``<module>::<tensor>``
            (``attn::input[0]``, ``attn::weight``), with comparisons to references from
            :func:`gradwatch.register_reference` in ``Report.references``. A module called
            more than once in a step, or sharing parameters with modules outside it, is
            skipped with the reason.
        max_shadow_bytes: Largest float64 copy of the whole model ``precision="auto"``
            makes. When the whole model does not fit and ``modules`` names modules (or
            suspects were found), the module-local float64 checks are run instead of a
            whole-model check in the native precision, whose central differences would
            miss small errors (the whole-model tensors are then ``skipped``, saying so).

    Attributes:
        reports: ``(step, Report)`` for each check.
        seed: The base seed in use.
        suspects: With ``modules="suspects"``, after the first check: qualified module
            name -> why it is a suspect (``{}`` before, or when none was found).

    Example:
        >>> watch = GradWatch(model, loss_fn, every_n_steps=50, logdir="runs")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        *,
        every_n_steps: int = 100,
        max_overhead: float | None = 0.02,
        writer: Any = None,
        logdir: str | None = None,
        on_failure: OnFailure = "warn",
        seed: int | None = None,
        prefix: str = "gradwatch",
        coordinates: int = 4,
        directions: int = 1,
        kinks: bool = True,
        kink_resamples: int = 4,
        near_kink_margin: float = 10.0,
        precision: str = "auto",
        scaler: Any = None,
        modules: Any = "suspects",
        max_shadow_bytes: int = DEFAULT_SHADOW_BYTES,
    ) -> None:
        _module("model", model)
        _callable("loss_fn", loss_fn)
        _scaler("scaler", scaler)
        self._modules = _resolve_modules(model, modules)
        _positive_int("max_shadow_bytes", max_shadow_bytes)
        self._check_kwargs = _adapter_options(
            every_n_steps=every_n_steps, max_overhead=max_overhead, on_failure=on_failure, seed=seed, prefix=prefix,
            coordinates=coordinates, directions=directions, kinks=kinks, kink_resamples=kink_resamples,
            near_kink_margin=near_kink_margin, precision=precision,
        )
        if writer is not None and logdir is not None:
            raise ValueError(f"pass `writer` or `logdir`, not both; got writer={writer!r}, logdir={logdir!r}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"`model` has no parameter with requires_grad=True to check ({type(model).__name__})")
        self._owned_writer = None
        if logdir is not None:
            if not isinstance(logdir, str) or not logdir:
                raise ValueError(f"`logdir` must be a non-empty str, got {logdir!r}")
            from torch.utils.tensorboard import SummaryWriter

            writer = self._owned_writer = SummaryWriter(log_dir=logdir)
        self.model = model
        self.loss_fn = loss_fn
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.on_failure = on_failure
        self.seed = secrets.randbits(62) if seed is None else seed
        self.writer = writer
        self.scaler = scaler
        self.sinks: list[Sink] = [LoggingSink(), KinkWarnings()]
        if writer is not None:
            self.sinks.append(TensorBoardSink(writer, prefix=prefix))
        self._schedule = _Schedule(every_n_steps, max_overhead, coordinates, directions)
        self.reports: list[tuple[int, Report]] = []
        self._step = 0
        self._sharded = _sharding(model)  # raises for sharding that cannot be checked
        self._seed_shared = False
        self._max_shadow_bytes = max_shadow_bytes
        self.suspects: dict[str, str] = {}
        self._op_turns: dict[str, int] = {}  # which call of each registered custom op the next check records
        self._local_options = ProbeOptions(kinks=kinks, kink_resamples=kink_resamples,
                                           near_kink_margin=near_kink_margin, coordinates=coordinates,
                                           directions=directions, precision=precision,
                                           max_shadow_bytes=max_shadow_bytes)

    @property
    def global_step(self) -> int:
        """Number of :meth:`step` blocks entered so far."""
        return self._step

    @property
    def last_report(self) -> Report | None:
        """The latest report, or ``None`` before the first check."""
        return self.reports[-1][1] if self.reports else None

    def is_check_step(self, step: int | None = None) -> bool:
        """Whether ``step`` (default: the next one) is a check step as planned now.

        Without ``max_overhead`` the plan is fixed (``0, n, 2n, ...``). With it, only
        the next planned check step answers True, and the budget can still defer it.
        """
        return self._schedule.is_planned(self._step if step is None else step)

    @contextmanager
    def step(self, batch: Any) -> Iterator[None]:
        """Wrap one training step's forward and backward.

        Args:
            batch: The batch this step trains on, as ``loss_fn`` takes it.

        Raises:
            ValueError: On a check step where no parameter received a gradient.
            GradientCheckError: With ``on_failure="raise"`` when a tensor fails.

        Example:
            >>> with watch.step(batch):  # doctest: +SKIP
            ...     loss_fn(model, batch).backward()
        """
        step = self._step
        self._step += 1
        if not self._schedule.begin(step, defer=self._sharded is None):  # the hot path: a clock read, nothing else
            yield
            return
        if self._sharded is not None:
            yield from self._sharded_step(batch, step)
            return
        state = capture(self.model)
        targets = self._targets(batch, state)
        recording = _LocalRecording(self.model, targets, ops=self._modules is not None, turns=self._op_turns)
        captured: dict[str, Tensor] = {}
        handles = [
            p.register_hook(partial(_capture_grad, captured, name))
            for name, p in self.model.named_parameters()
            if p.requires_grad
        ]
        roots = _BackwardRoots()
        try:
            with roots, recording:
                yield
        finally:
            for handle in handles:
                handle.remove()
        if not captured:
            raise ValueError(
                f"no parameter of `model` received a gradient inside `watch.step(batch)` at step {step}: "
                "call loss.backward() inside the with-block"
            )
        if roots.autocast is not None:  # autocast entered inside the block: replay the forward under it
            state = dataclasses.replace(state, autocast=roots.autocast)
        seed = _derive_seed(self.seed, step)
        train_loss = roots.loss()
        if self.scaler is not None and self.scaler.is_enabled():
            scale = self.scaler.get_scale()  # the scale of this backward; update() runs after the block
            captured = {n: g / scale for n, g in captured.items()}
            train_loss = None if train_loss is None else train_loss / scale
            if not _all_finite(captured.values(), None):
                reason = (
                    f"GradScaler skips this optimizer step: the gradients scaled by {scale:g} are not finite "
                    "(fp16 overflow); the scale is lowered and no gradient of this step reaches the optimizer"
                )
                self._record(_skipped_report(self.model, seed, step, reason), step)
                return
        recordings = recording.recordings()
        too_big = _too_big(self.model, self._check_kwargs["precision"], self._max_shadow_bytes) if recordings else None
        report = _budgeted_check(self._schedule, self.model, self.loss_fn, batch, step=step, seed=seed,
                                 grads=captured, replay=state, train_loss=train_loss, reduce=None,
                                 broadcast=None, options=self._check_kwargs, skip=too_big)
        del captured, state
        if recordings:  # local checks count against the budget
            report = _merge_local(self._schedule, report, step,
                                  partial(_local_reports, recordings, seed, self._local_options), whole=too_big is None)
        del recording, recordings
        self._record(report, step)

    def _sharded_step(self, batch: Any, step: int) -> Iterator[None]:
        """A check step of a ``fully_shard`` (FSDP2) model: every rank checks the same probes
        on its local batch with the parameters gathered, judging the mean over ranks against
        the mean of the local gradients (what the sharded ``.grad`` holds), as under DDP; the
        module-local checks likewise (:func:`gradwatch._sharded._share_records`)."""
        state = capture(self.model)
        if (self._modules == "suspects" and self._check_kwargs["precision"] == "auto"
                and _float64_bytes(self.model) > self._max_shadow_bytes):
            self._modules = {}  # finding suspects would gather the whole model: name the modules instead
        if self._modules == "suspects":  # found once, on a plain forward: gathered parameters, FSDP hooks suspended
            guard = _Guard(_local_device(next(self.model.parameters())))
            try:
                with _unsharded(self.model):
                    self._targets(batch, state)
                found = guard.broadcast(self.suspects)  # after every rank's forward: rank zero's suspects
            except BaseException:
                guard.abort()  # it runs loss_fn: the other ranks raise instead of waiting
                raise
            named = dict(self.model.named_modules())
            self.suspects, self._modules = dict(found), {n: named[n] for n in found}
        targets = self._targets(batch, state)
        whole_too_big = (self._check_kwargs["precision"] == "auto"
                         and _float64_bytes(self.model) > self._max_shadow_bytes)
        recorder = _LocalGrads(self.model, names=[  # the checked modules' parameters only when not whole
            f"{m}.{p}" if m else p for m, module in targets.items() for p, _ in module.named_parameters()
        ] if whole_too_big else None)
        recording = _Recording(targets, model=self.model) if targets else nullcontext()
        roots = _BackwardRoots()
        try:
            with roots, recording:
                yield
        finally:
            recorder.remove()
        captured = recorder.mean(self.model)  # collectives: every rank, same order
        if not captured and not whole_too_big:
            raise ValueError(
                f"no parameter of `model` received a gradient inside `watch.step(batch)` at step {step}: "
                "call loss.backward() inside the with-block"
            )
        if roots.autocast is not None:
            state = dataclasses.replace(state, autocast=roots.autocast)
        guard = _Guard(_local_device(next(self.model.parameters())))
        train_loss = roots.loss()
        try:
            if not self._seed_shared:  # rank zero's base seed: every rank draws the same probes
                self.seed, self._seed_shared = int(guard.broadcast(self.seed)), True
            seed = _derive_seed(self.seed, step)
            backward_mean = captured  # as the backward made them: scaled like the records' output gradients
            if self.scaler is not None and self.scaler.is_enabled():  # as in step(), agreed across ranks
                scale = self.scaler.get_scale()
                captured = {n: g / scale for n, g in captured.items()}
                train_loss = None if train_loss is None else train_loss / scale
                if not _all_finite(captured.values(), guard.reduce):
                    reason = (
                        f"GradScaler skips this optimizer step: the gradients scaled by {scale:g} are not finite "
                        "(fp16 overflow); the scale is lowered and no gradient of this step reaches the optimizer"
                    )
                    self._record(_skipped_report(self.model, seed, step, reason), step)
                    return
            with ExitStack() as gathered:  # the whole model, or the checked modules only when it does not fit
                for module in list(targets.values()) if whole_too_big else [self.model]:
                    gathered.enter_context(_unsharded(module))
                if targets:  # the records agreed across ranks, their gradients averaged
                    references = _share_records(recording.records, recorder.grads, backward_mean, guard)
                reason = None
                if whole_too_big:
                    reason = _too_big(self.model, "auto", self._max_shadow_bytes)
                    if not targets:
                        reason = reason.split(":")[0] + (
                            ": under fully_shard the whole model is not gathered for a check (nor searched for "
                            "suspects); pass `modules=[...]` to check modules locally (only their parameters are "
                            "gathered)")
                report = _budgeted_check(  # skipped when too big: the next check as begin() set it
                    self._schedule, self.model, self.loss_fn, batch, step=step, seed=seed, grads=captured,
                    replay=state, train_loss=train_loss, reduce=guard.reduce, broadcast=guard.broadcast,
                    options=self._check_kwargs, skip=reason,
                )
                del captured, state
                if targets:
                    local = partial(_sharded_local_reports, recording.records, seed,
                                    self._local_options, references, guard, reduce=guard.reduce)
                    report = _merge_local(self._schedule, report, step, local, whole=not whole_too_big,
                                          broadcast=guard.broadcast)
        except BaseException:
            guard.abort()  # the other ranks raise at their next collective instead of waiting
            raise
        self._record(report, step)

    def _targets(self, batch: Any, state: Any) -> dict[str, nn.Module]:
        """The modules to record at this check step ({} for none); suspects are found once."""
        if self._modules == "suspects":
            self._modules, self.suspects = _suspect_modules(self.model, self.loss_fn, batch, state)
        return self._modules or {}

    def _record(self, report: Report, step: int) -> None:
        self.reports.append((step, report))
        for sink in self.sinks:
            sink.write(report, step)
        _handle(report, self.on_failure)

    def close(self) -> None:
        """Close the writer the hook created from ``logdir`` (not one you passed)."""
        if self._owned_writer is not None:
            self._owned_writer.close()
            self._owned_writer = None

    def __enter__(self) -> "GradWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _capture_grad(captured: dict[str, Tensor], name: str, grad: Tensor) -> None:
    """Tensor hook: keep the gradient this backward sends to the parameter."""
    previous = captured.get(name)
    captured[name] = grad.detach() if previous is None else previous + grad.detach()


def _adapter_options(
    *, every_n_steps: Any, max_overhead: Any, on_failure: Any, seed: Any, prefix: Any, coordinates: Any,
    directions: Any, kinks: Any, kink_resamples: Any, near_kink_margin: Any, precision: Any,
) -> dict[str, Any]:
    """Validate the options :class:`GradWatch` and the Lightning callback share; returns the
    per-check engine options (coordinates and directions are the schedule's)."""
    _positive_int("every_n_steps", every_n_steps)
    _fraction_or_none("max_overhead", max_overhead)
    _check_on_failure(on_failure)
    _seed("seed", seed)
    _check_prefix(prefix)
    _probe_options(coordinates, directions, kinks)
    _kink_options(kink_resamples, near_kink_margin)
    _one_of("precision", precision, PRECISIONS)
    return {"kinks": kinks, "kink_resamples": kink_resamples, "near_kink_margin": near_kink_margin,
            "precision": precision}


def _scaler(name: str, value: Any) -> Any:
    """``None`` or a GradScaler-like object (``scale``, ``get_scale``, ``is_enabled``)."""
    if value is not None and not all(callable(getattr(value, m, None)) for m in ("scale", "get_scale", "is_enabled")):
        raise TypeError(f"`{name}` must be None or a torch.amp.GradScaler, got {type(value).__name__}")
    return value


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
