"""PyTorch Lightning adapter: check gradients inside ``Trainer.fit``.

The callback decides *when* to check and *which gradient* to compare, calls
:func:`gradwatch.check` and hands the :class:`~gradwatch.Report` to sinks. It adds
nothing numerical of its own.

Example:
    >>> from pytorch_lightning import Trainer
    >>> from gradwatch.lightning import GradWatchCallback
    >>> trainer = Trainer(callbacks=[GradWatchCallback()])  # doctest: +SKIP
    >>> trainer.fit(model, datamodule)                       # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import secrets
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn
from typing_extensions import override

from gradwatch._schedule import _Schedule
from gradwatch._validate import _callable, _non_negative_int, _seed
from gradwatch.engine import check
from gradwatch.hook import _adapter_options, _derive_seed
from gradwatch.replay import ReplayState, capture
from gradwatch.report import (
    OnFailure,
    Report,
    TensorCheck,
    _check_prefix,
    _check_report,
    _handle,
    metrics,
)
from gradwatch.sinks import KinkWarnings, LoggingSink, Sink, TensorBoardSink

__all__ = ["GradWatchCallback", "LightningLoggerSink"]

#: Strategies whose parameters are sharded (by class name, so that subclasses and the
#: ``lightning.pytorch`` namespace are recognised too): not checked yet.
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


class GradWatchCallback(Callback):
    """Checks, every ``every_n_steps`` optimizer steps, the gradient the optimizer uses.

    On a check step the callback captures the RNG states and buffers right before
    ``training_step``, then compares the gradient with float64 central differences of
    the loss on the same batch (:func:`gradwatch.check`). Other steps do nothing: no
    copy, no device synchronisation.

    Which gradient:

    * ``accumulate_grad_batches == 1``: the gradient in ``on_before_optimizer_step``,
      i.e. what the optimizer is about to use: unscaled under ``precision="16-mixed"``,
      before gradient clipping.
    * ``accumulate_grad_batches == N > 1``: the gradient of the window's *first*
      micro-batch, in ``on_after_backward`` right after its backward, when ``.grad``
      holds exactly ``∇(L₀/N)`` (divided by the GradScaler's scale under
      ``16-mixed``). The replayed loss is divided by ``N`` the same way.

    A step whose gradient a GradScaler finds non-finite (so it skips the optimizer
    step) is not checked; its report has verdict ``"skipped"`` and says why. Under
    DDP every rank evaluates the same probes on its local batch and the results are
    averaged across ranks before judging, so all ranks report the same verdicts;
    only rank zero writes to loggers. Sharded strategies (FSDP, DeepSpeed, model
    parallel) are not supported yet: the callback warns once and does not check.

    Args:
        every_n_steps: Check optimizer steps ``0, n, 2n, ...`` (``trainer.global_step``);
            with ``max_overhead``, the smallest gap between two checks.
        max_overhead: Largest fraction of the training time spent checking, such as
            ``0.02`` (the default): checks move further apart and probe fewer
            coordinates and directions per tensor when a check costs more than the
            budget holds; every check starts with a joint probe over every tensor,
            the first one at step 0. Training time is
            the wall time between optimizer steps, read without device
            synchronisation. Under DDP, rank zero's measurements decide for all
            ranks (shared at check steps only). ``None``: every check probes every
            tensor on steps ``0, n, 2n, ...``.
        loss_fn: ``loss_fn(pl_module, batch)`` returning the loss ``training_step``
            returns for that batch (before Lightning's division by
            ``accumulate_grad_batches``). ``None``: re-run
            ``pl_module.training_step(batch, batch_idx)`` with ``self.log`` and
            ``self.log_dict`` disabled, taking the loss from its Tensor or
            ``{"loss": ...}`` return. Required under manual optimization.
        on_failure: ``"warn"``, ``"raise"`` (:class:`~gradwatch.GradientCheckError`
            out of ``Trainer.fit``, on every rank) or a callable receiving the Report.
        seed: Base seed of the probe sampler; each check uses a seed derived from it
            and the step. ``None`` draws one on rank zero.
        prefix: First component of the logged keys.
        coordinates: Random elements probed per tensor (at most, under a budget).
        directions: Random directions probed per tensor (at most, under a budget).
        kinks: Exclude probes that cross a kink of a non-smooth op, and warn (a
            :class:`~gradwatch.KinkWarning`, once per module and op) when probes come
            near one.
        kink_resamples: Replacement coordinates drawn per tensor, at most, for
            coordinate probes that crossed a kink.
        near_kink_margin: Margin below which a kink counts as near.
        precision: Where perturbed losses are evaluated: ``"float64"``, ``"native"``
            or ``"auto"`` (see :func:`gradwatch.check`).

    Attributes:
        reports: ``(global_step, Report)`` for each check, on every rank.
        seed: The base seed in use (rank zero's, broadcast at setup; restored from a
            checkpoint on resume).

    Example:
        >>> trainer = pl.Trainer(callbacks=[GradWatchCallback(every_n_steps=50)])  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 100,
        max_overhead: float | None = 0.02,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        on_failure: OnFailure = "warn",
        seed: int | None = None,
        prefix: str = "gradwatch",
        coordinates: int = 4,
        directions: int = 1,
        kinks: bool = True,
        kink_resamples: int = 4,
        near_kink_margin: float = 10.0,
        precision: str = "auto",
    ) -> None:
        super().__init__()
        self._check_kwargs = _adapter_options(
            every_n_steps=every_n_steps, max_overhead=max_overhead, on_failure=on_failure, seed=seed, prefix=prefix,
            coordinates=coordinates, directions=directions, kinks=kinks, kink_resamples=kink_resamples,
            near_kink_margin=near_kink_margin, precision=precision,
        )
        if loss_fn is not None:
            _callable("loss_fn", loss_fn)
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.loss_fn = loss_fn
        self.on_failure = on_failure
        self.prefix = prefix
        self.seed: int = secrets.randbits(62) if seed is None else seed
        self.reports: list[tuple[int, Report]] = []
        self._schedule = _Schedule(every_n_steps, max_overhead, coordinates, directions)
        self._checks = 0
        self._enabled = True
        self._warned_sharded = False
        self._pending: _Pending | None = None
        self._sinks: list[Sink] | None = None

    @property
    def last_report(self) -> Report | None:
        """The latest report, or ``None`` before the first check."""
        return self.reports[-1][1] if self.reports else None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization and self.loss_fn is None:
            raise ValueError(
                f"{type(pl_module).__name__} uses manual optimization (automatic_optimization=False), so "
                "GradWatchCallback cannot re-run its training_step (it steps the optimizer): pass "
                "`loss_fn=lambda module, batch: <the loss you call manual_backward on>` to GradWatchCallback"
            )
        sharded = [c.__name__ for c in type(trainer.strategy).__mro__ if c.__name__ in _SHARDED]
        self._enabled = not sharded
        if sharded:
            if not self._warned_sharded and trainer.is_global_zero:
                warnings.warn(
                    f"GradWatchCallback does not check gradients under {sharded[0]} yet: its parameters are "
                    "sharded across processes. Training continues unchecked; use strategy='ddp' (or a single "
                    "device) for gradient checks.",
                    UserWarning,
                    stacklevel=2,
                )
            self._warned_sharded = True
            return
        self.seed = int(trainer.strategy.broadcast(self.seed, src=0))
        self._sinks = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._pending = None
        accumulate = trainer.accumulate_grad_batches
        if (
            not self._enabled
            or trainer.sanity_checking
            or batch_idx % accumulate  # not the first micro-batch of a window
            or not self._schedule.begin(trainer.global_step, defer=trainer.world_size == 1)  # reads the clock
        ):
            return
        with trainer.precision_plugin.train_step_context():  # record the autocast state training_step runs in
            replay = capture(pl_module)
        self._pending = _Pending(trainer.global_step, batch, batch_idx, accumulate, replay)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._pending is not None and self._pending.loss is None:
            self._pending.loss = loss.detach()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None and self._pending.accumulate > 1:
            self._check(trainer, pl_module, scaled=True)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._pending is not None:
            self._check(trainer, pl_module, scaled=False)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._pending = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "checks": self._checks}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = _seed("state_dict['seed']", state_dict["seed"])
        self._checks = _non_negative_int("state_dict['checks']", state_dict["checks"])

    # ------------------------------------------------------------------ the check
    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, scaled: bool) -> None:
        """Check the pending step; ``scaled``: ``.grad`` is still multiplied by the GradScaler's scale."""
        pending, self._pending = self._pending, None
        if pending is None or pending.loss is None:  # training_step returned None: nothing was backpropagated
            return
        step = pending.step
        seed = _derive_seed(self.seed, step)
        reduce = partial(trainer.strategy.reduce, reduce_op="mean") if trainer.world_size > 1 else None
        grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        train_loss = pending.loss
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale = scaler.get_scale()  # the scale of this backward; update() runs after the optimizer step
            train_loss = train_loss / scale
            if scaled:
                grads = {n: g / scale for n, g in grads.items()}
            if not _all_finite(grads.values(), reduce):
                reason = (
                    f"GradScaler skips this optimizer step: the gradients scaled by {scale:g} are not finite "
                    "(fp16 overflow); the scale is lowered and no gradient of this step reaches the optimizer"
                )
                self._record(trainer, _skipped_report(pl_module, seed, step, reason))
                return
        loss_fn = self.loss_fn or _training_step_loss(pl_module, pending.batch_idx)
        if pending.accumulate > 1:
            loss_fn = partial(_divided, loss_fn, pending.accumulate)
        names, coordinates, directions = self._schedule.plan(
            [n for n, _ in pl_module.named_parameters() if n in grads]
        )
        richardson = self._schedule.richardson
        if reduce is not None:  # every rank checks the same tensors with the same probes
            names, coordinates, directions, richardson = trainer.strategy.broadcast(
                (names, coordinates, directions, richardson), src=0
            )
            self._schedule.richardson = richardson
        with _metric_states_kept(pl_module):
            report = check(
                pl_module,
                loss_fn,
                pending.batch,
                grads=grads,
                replay=pending.replay,
                train_loss=train_loss,
                seed=seed,
                reduce=reduce,
                coordinates=coordinates,
                directions=directions,
                names=names,
                **{**self._check_kwargs, **self._schedule.check_options()},
            )
        del grads, pending
        self._schedule.done(step, report.seconds, len(report.probes))
        if reduce is not None:
            self._schedule.next_step = int(trainer.strategy.broadcast(self._schedule.next_step, src=0))
        self._record(trainer, dataclasses.replace(report, step=step))
        _handle(self.last_report, self.on_failure)

    def _record(self, trainer: pl.Trainer, report: Report) -> None:
        self.reports.append((report.step, report))
        self._checks += 1
        if not trainer.is_global_zero:
            return
        if self._sinks is None:
            self._sinks = [LoggingSink(), KinkWarnings()] + [_sink_for(logger, self.prefix) for logger in trainer.loggers]
        for sink in self._sinks:
            sink.write(report, report.step)


class LightningLoggerSink:
    """Writes a report's scalars through a Lightning logger's ``log_metrics``.

    For loggers other than ``TensorBoardLogger`` (whose ``SummaryWriter`` the callback
    writes to directly with :class:`~gradwatch.TensorBoardSink`): CSVLogger, MLflow,
    Weights & Biases, ... The keys are those of :func:`gradwatch.metrics`.

    Args:
        logger: A ``pytorch_lightning.loggers.Logger`` (anything with ``log_metrics``).
        prefix: First component of every key.

    Example:
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> LightningLoggerSink(CSVLogger("logs")).write(report, step=10)  # doctest: +SKIP
    """

    def __init__(self, logger: Any, *, prefix: str = "gradwatch") -> None:
        if not callable(getattr(logger, "log_metrics", None)):
            raise TypeError(f"`logger` must be a Lightning logger (needs .log_metrics), got {type(logger).__name__}")
        _check_prefix(prefix)
        self.logger = logger
        self.prefix = prefix

    def write(self, report: Report, step: int) -> None:
        """Log the scalars of the key scheme at ``step``."""
        _check_report(report)
        _non_negative_int("step", step)
        self.logger.log_metrics(metrics(report, prefix=self.prefix), step=step)


@dataclass
class _Pending:
    """What a check step recorded before its gradient is ready."""

    step: int
    batch: Any
    batch_idx: int
    accumulate: int
    replay: ReplayState
    loss: Tensor | None = None


def _sink_for(logger: Any, prefix: str) -> Sink:
    if isinstance(logger, TensorBoardLogger):
        return TensorBoardSink(logger.experiment, prefix=prefix)
    return LightningLoggerSink(logger, prefix=prefix)


def _training_step_loss(pl_module: pl.LightningModule, batch_idx: int) -> Callable[[nn.Module, Any], Tensor]:
    """``loss_fn`` that re-runs ``training_step`` with logging disabled."""
    with_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)

    def loss_fn(module: nn.Module, batch: Any) -> Tensor:
        with _logging_disabled(module):
            out = module.training_step(batch, batch_idx) if with_idx else module.training_step(batch)
        if isinstance(out, Mapping):
            if "loss" not in out:
                raise ValueError(f"training_step returned a dict without a 'loss' key ({sorted(out)}): pass `loss_fn`")
            out = out["loss"]
        if not isinstance(out, Tensor):
            raise TypeError(
                f"training_step returned {type(out).__name__} when gradwatch re-ran it; it must return the loss "
                "Tensor or {'loss': Tensor}: pass `loss_fn` to GradWatchCallback"
            )
        return out

    return loss_fn


def _divided(loss_fn: Callable[[nn.Module, Any], Tensor], n: int, module: nn.Module, batch: Any) -> Tensor:
    """The loss as Lightning backpropagates it under ``accumulate_grad_batches=n``."""
    return loss_fn(module, batch) / n


_MISSING = object()
#: Non-state attributes of a torchmetrics Metric that ``update``/``forward`` change.
_METRIC_FLAGS = ("_update_count", "_computed", "_forward_cache")


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _logging_disabled(module: nn.Module) -> Iterator[None]:
    """Make ``module.log`` and ``module.log_dict`` no-ops for the duration (instance attributes)."""
    saved = {name: module.__dict__.get(name, _MISSING) for name in ("log", "log_dict")}
    try:
        for name in saved:
            module.__dict__[name] = _noop
        yield
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


@contextmanager
def _metric_states_kept(pl_module: nn.Module) -> Iterator[None]:
    """Put back the states of torchmetrics ``Metric`` modules that a re-run ``training_step`` updated.

    Metrics update their state tensors in place, which the replay's attribute
    restore cannot undo; their states are copied here and written back in place.
    """
    saved = []
    for m in pl_module.modules():
        defaults = getattr(m, "_defaults", None)
        if isinstance(defaults, dict) and callable(getattr(m, "update", None)) and callable(getattr(m, "reset", None)):
            saved.append((m, {k: copy.deepcopy(v) for k, v in vars(m).items() if k in defaults or k in _METRIC_FLAGS}))
    try:
        yield
    finally:
        for m, state in saved:
            for key, value in state.items():
                current = vars(m).get(key)
                if isinstance(current, Tensor) and isinstance(value, Tensor) and current.shape == value.shape:
                    with torch.no_grad():
                        current.copy_(value)
                else:
                    setattr(m, key, value)


def _all_finite(grads: Any, reduce: Callable[[Tensor], Tensor] | None) -> bool:
    """Whether every gradient is finite (one host sync; across ranks when ``reduce`` is given)."""
    grads = list(grads)
    if not grads:
        return True
    device = grads[0].device
    bad = torch.stack([(~torch.isfinite(g)).any().to(device) for g in grads]).any().to(torch.float64).reshape(1)
    if reduce is not None:
        bad = reduce(bad)
    return not bool(bad.item() > 0)


def _skipped_report(pl_module: nn.Module, seed: int, step: int, reason: str) -> Report:
    """A report for a step that is not checked: every tensor ``skipped`` with ``reason``."""
    tensors = {
        n: TensorCheck(n, tuple(p.shape), "skipped", reason=reason)
        for n, p in pl_module.named_parameters()
    }
    return Report(tensors=tensors, seed=seed, reason=reason, step=step)
