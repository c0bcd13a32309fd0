"""Lightning adapter: check gradients inside ``Trainer.fit``.

The callback decides *when* to check and *which gradient* to compare, calls
:func:`gradwatch.check` and hands the :class:`~gradwatch.Report` to sinks. It adds
nothing numerical of its own.

One callback serves both namespaces Lightning ships under, ``lightning.pytorch``
(``import lightning as L``) and ``pytorch_lightning``, and imports neither: it is a
``Callback`` of the namespaces already imported when it is created, and of its
Trainer's namespace from ``setup`` on (see :class:`GradWatchCallback`). Strategies,
precision plugins and loggers are recognised by class name, in either namespace.

Example:
    >>> import lightning as L                                  # or: import pytorch_lightning as L
    >>> from gradwatch import GradWatchCallback
    >>> trainer = L.Trainer(callbacks=[GradWatchCallback()])  # doctest: +SKIP
    >>> trainer.fit(model, datamodule)                         # doctest: +SKIP
"""

from __future__ import annotations

import copy
import functools
import importlib
import os
import sys
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from typing_extensions import override

from gradwatch._capsules import _capsule_dir, _capsules_option
from gradwatch._sharded import _LocalGrads, _sharding
from gradwatch._validate import _callable, _non_negative_int, _seed
from gradwatch._watch import _Capture, _LocalRecording, _TensorHooks, _Watch, _Watched
from gradwatch.options import ProbeOptions
from gradwatch.replay import ReplayState, capture
from gradwatch.report import OnFailure, Report, _check_prefix, _check_report, metrics
from gradwatch.sinks import Sink, TensorBoardSink

if TYPE_CHECKING:  # either namespace; nothing is imported at run time
    import pytorch_lightning as pl

__all__ = ["GradWatchCallback", "LightningLoggerSink"]

#: The namespaces Lightning ships under (``lightning.pytorch`` is ``import lightning as L``).
_NAMESPACES = ("lightning.pytorch", "pytorch_lightning")

#: Strategies whose parameters are sharded in a way gradwatch does not check (by class name,
#: so that subclasses and the ``lightning.pytorch`` namespace are recognised too).
#: ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2) in ``configure_model`` is checked.
_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy")
#: What to use instead, said once when the strategy or the model's sharding is not checked.
_INSTEAD = (
    "use ModelParallelStrategy with torch.distributed.fsdp.fully_shard (FSDP2) in configure_model, "
    "or strategy='ddp' (or a single device), for gradient checks"
)


class GradWatchCallback(_Watched):
    """Checks, every ``every_n_steps`` optimizer steps, the gradient the optimizer uses.

    A callback for ``lightning.pytorch.Trainer`` and for ``pytorch_lightning.Trainer``.
    Lightning's two namespaces have distinct ``Callback`` classes, and importing one
    does not import the other; so an instance's class is built on first use from
    ``GradWatchCallback`` and the ``Callback`` of each namespace already imported when
    it is created (``isinstance(callback, L.Callback)`` holds), and from ``setup`` on
    also of its Trainer's namespace. Nothing here imports a namespace.

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
    averaged across ranks before judging, so all ranks report the same verdicts (with
    accumulation, the first micro-batch's gradients, which Lightning computes without
    DDP's all-reduce, are averaged across ranks first, as DDP does at the window's
    end); only rank zero writes to loggers.

    Under ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2) in ``configure_model``,
    the gradient compared is the mean over ranks of each rank's local (unsharded)
    gradient of the checked backward, recorded before FSDP's reduce-scatter; the
    parameters are gathered for the check (a full copy of the model) and the check runs
    like under DDP. A rank whose check raises makes the others raise too (no hang).
    ``FSDPStrategy`` (FSDP1 flat parameters), DeepSpeed, XLA FSDP and tensor-parallel
    parameters are not checked: the callback warns once, says what to use instead, and
    training continues unchecked.

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
        options: The probe options (:class:`~gradwatch.ProbeOptions`; ``None``: the
            defaults), as :class:`gradwatch.GradWatch` takes them: ``coordinates`` and
            ``directions`` are the most a check probes per tensor under a budget;
            ``max_shadow_bytes`` the largest float64 copy of the model (or of a module)
            ``precision="auto"`` makes.
        modules: Modules checked in isolation after the whole-model check, as
            :class:`gradwatch.GradWatch` does (``<module>::<tensor>`` in the report, such
            as ``attn::input[0]``): ``"suspects"`` (default), the modules whose forward
            runs custom backward code, found by one replayed forward at the first check
            (rank zero's under DDP); a list of submodules of the LightningModule (or
            their names); ``None``: none. They are recorded during the checked backward
            only (the window's first micro-batch under accumulation); under DDP and
            ``fully_shard`` their gradients are averaged over ranks, so every rank reports
            the same verdicts. With ``precision="auto"``, when the whole model's float64
            copy is over ``options.max_shadow_bytes`` (2 GiB), only these modules are
            checked (in float64), the whole-model tensors reported ``skipped``; under
            ``fully_shard`` only their parameters are then gathered, and suspects are not
            searched (name them).
        sinks: More sinks each report is written to on rank zero (objects with
            ``write(report, step)``), besides the ``gradwatch`` logging line, the kink
            warnings and the Trainer's loggers.
        capsules: Where a failing check writes its capsules (everything needed to rerun it
            offline: :mod:`gradwatch.capsule`, ``gradwatch repro``), on rank zero only, as
            :class:`gradwatch.GradWatch` does: ``None`` or ``True`` (default):
            ``<log_dir>/gradwatch/capsules`` under the first logger's directory (its
            ``log_dir``, the ``trainer.log_dir`` of a TensorBoard or CSV logger, else its
            ``save_dir``), resolved in ``setup`` of each fit; none with ``logger=False``; a
            directory; ``False``: none. Under DDP or ``fully_shard`` rank zero's capsules hold its
            own batch (or module inputs) and its own gradients, before they are averaged over
            ranks, so that one process replays like with like (``Capsule.processes`` says so);
            under DDP that takes a copy of rank zero's gradients on check steps while a capsule
            may still be written.

    Attributes:
        reports: ``(global_step, Report)`` for each check, on every rank.
        seed: The base seed in use (rank zero's, broadcast at setup; restored from a
            checkpoint on resume).
        suspects: With ``modules="suspects"``, after the first check: qualified module
            name -> why it is a suspect.

    Example:
        >>> trainer = L.Trainer(callbacks=[GradWatchCallback(every_n_steps=50)])  # doctest: +SKIP
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "GradWatchCallback":
        return super().__new__(_with_callbacks(_plain(cls), _loaded_namespaces()))

    def __reduce__(self) -> tuple:  # pickle/deepcopy: the built class is rebuilt where it is loaded
        return _rebuild, (_plain(type(self)), _namespaces_of(type(self))), self.__dict__

    def __init__(
        self,
        *,
        every_n_steps: int = 100,
        max_overhead: float | None = 0.02,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        on_failure: OnFailure = "warn",
        seed: int | None = None,
        prefix: str = "gradwatch",
        options: ProbeOptions | None = None,
        modules: Any = "suspects",
        sinks: Sequence[Sink] | None = None,
        capsules: str | bool | None = None,
    ) -> None:
        super().__init__()
        self._capsules = _capsules_option("capsules", capsules)  # the directory is known in setup
        self._watch = _Watch(options=options, every_n_steps=every_n_steps, max_overhead=max_overhead,
                             on_failure=on_failure, seed=seed, prefix=prefix, modules=modules, sinks=sinks)
        if loss_fn is not None:
            _callable("loss_fn", loss_fn)
        self.loss_fn = loss_fn
        self._checks_before = 0  # checks of the run this one resumes (from a checkpoint)
        self._enabled = True
        self._warned_sharded = False
        self._sharded: str | None = None  # "fsdp2" once a check step found fully_shard units
        self._pending: _Pending | None = None
        self._logger_sinks: list[Sink] | None = None

    @property
    def state_key(self) -> str:
        """Key of the callback's state in checkpoints: the same in both namespaces."""
        return f"{_plain(type(self)).__qualname__}{repr({'prefix': self.prefix})}"  # as Callback._generate_state_key

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        namespace = _namespace(trainer)
        if namespace is not None and namespace not in _namespaces_of(type(self)):  # a Callback of its Trainer's
            self.__class__ = _with_callbacks(_plain(type(self)), _namespaces_of(type(self)) + (namespace,))
        if stage != "fit":
            return
        if not pl_module.automatic_optimization and self.loss_fn is None:
            raise ValueError(
                f"{type(pl_module).__name__} uses manual optimization (automatic_optimization=False), so "
                "GradWatchCallback cannot re-run its training_step (it steps the optimizer): pass "
                "`loss_fn=lambda module, batch: <the loss you call manual_backward on>` to GradWatchCallback"
            )
        sharded = _is_a(trainer.strategy, *_SHARDED)
        self._enabled = not sharded
        if sharded:
            if not self._warned_sharded and trainer.is_global_zero:
                warnings.warn(
                    f"GradWatchCallback does not check gradients under {sharded}: its parameters are "
                    f"sharded across processes in a way gradwatch cannot gather. Training continues unchecked; "
                    f"{_INSTEAD}.",
                    UserWarning,
                    stacklevel=2,
                )
            self._warned_sharded = True
            return
        capsules = None  # rank zero writes them (the core's writer checks the rank too)
        if trainer.is_global_zero:
            capsules = _capsule_dir(self._capsules, _log_dir(trainer) if self._capsules in (None, True) else None)
        self._watch.set_capsule_dir(capsules)
        self.seed = int(trainer.strategy.broadcast(self.seed, src=0))
        self._watch.seed_shared = True
        self._watch.reset_sinks()
        self._logger_sinks = None
        self._watch.forget_modules()  # resolved at the first check: configure_model may still create the modules

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._drop_pending()
        accumulate = trainer.accumulate_grad_batches
        if (
            not self._enabled
            or trainer.sanity_checking
            or batch_idx % accumulate  # not the first micro-batch of a window
            or not self._watch.begin(trainer.global_step, defer=trainer.world_size == 1)  # reads the clock
        ):
            return
        try:
            self._sharded = _sharding(pl_module)  # configure_model has run: fully_shard units are in place
        except ValueError as err:  # sharded in a way that cannot be checked (same on every rank)
            self._enabled = False
            if trainer.is_global_zero:
                warnings.warn(f"GradWatchCallback does not check gradients: {err}. Training continues unchecked; "
                              f"{_INSTEAD}.", UserWarning, stacklevel=2)
            return
        with trainer.precision_plugin.train_step_context():  # record the autocast state training_step runs in
            replay = capture(pl_module)
        distributed = bool(self._sharded) or trainer.world_size > 1
        with _metric_states_kept(pl_module):  # suspects are found by re-running training_step
            targets = self._watch.targets(pl_module, self._loss_fn(trainer, pl_module, batch_idx, 1), batch, replay,
                                          distributed=distributed, sharded=bool(self._sharded))
        recorder = None
        if self._sharded:  # too large a model to gather: the checked modules' gradients only
            recorder = _LocalGrads(pl_module, names=[
                f"{m}.{p}" if m else p for m, module in targets.items() for p, _ in module.named_parameters()
            ] if self._watch.too_big(pl_module) else None)
        own = None  # DDP's .grad will be the mean over ranks: this rank's own gradients, for its capsule
        if distributed and not self._sharded and accumulate == 1 and self._watch.capsules.wants():
            own = _TensorHooks(pl_module, copy=True)
        pending = self._pending = _Pending(trainer.global_step, batch, batch_idx, accumulate, replay,
                                           recorder=recorder, own=own)
        # custom ops with a reference are recorded on one process only (as the hook does without FSDP)
        pending.recording = self._watch.recording(pl_module, targets, ops=trainer.world_size == 1)
        pending.recording.__enter__()  # exited when the checked backward is done or the step dropped

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
        self._drop_pending()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._drop_pending()
        self._watch.forget_modules()  # hold no module after fit (suspects stay readable)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._drop_pending()

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending.release()
        self._pending = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "checks": self._checks_before + len(self.reports)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = _seed("state_dict['seed']", state_dict["seed"])
        self._checks_before = _non_negative_int("state_dict['checks']", state_dict["checks"]) - len(self.reports)

    # ------------------------------------------------------------------ the check
    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, scaled: bool) -> None:
        """Check the pending step; ``scaled``: ``.grad`` is still multiplied by the GradScaler's scale
        (accumulation: checked in ``on_after_backward``, before the optimizer step unscales it)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.release()
        if pending is None or pending.loss is None:  # training_step returned None: nothing was backpropagated
            return
        fsdp = pending.recorder is not None
        if fsdp:  # fully_shard: this backward's local gradients, averaged over ranks
            grads = pending.recorder.mean(pl_module)
        else:
            grads = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None  # of this backward
        checked = _Capture(
            pending.step, pl_module, self._loss_fn(trainer, pl_module, pending.batch_idx, pending.accumulate),
            pending.batch, pending.replay, grads, pending.loss, recording=pending.recording, scale=scale,
            grads_scaled=scaled or fsdp,  # recorded in the backward: scaled, whatever unscale_ did to .grad
            distributed=fsdp or trainer.world_size > 1,
            # accumulation: Lightning runs this backward without DDP's all-reduce, so .grad is this rank's;
            # the optimizer gets the mean over ranks (the window's last backward syncs)
            average=scaled and not fsdp,
            local_grads=pending.recorder.grads if fsdp else None,
            loss_factor=("div", pending.accumulate) if pending.accumulate > 1 else None,
            own_grads=pending.own.grads if pending.own is not None else None,
        )
        del pending, grads
        with _metric_states_kept(pl_module):  # a re-run training_step may update torchmetrics states
            self._watch.check_step(checked, sinks=self._sinks(trainer), write=trainer.is_global_zero)

    def _loss_fn(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int,
                 accumulate: int) -> Callable[[nn.Module, Any], Tensor]:
        """The loss as Lightning backpropagated it (divided under accumulation)."""
        loss_fn = self.loss_fn or _training_step_loss(pl_module, batch_idx, _namespace(trainer))
        return partial(_divided, loss_fn, accumulate) if accumulate > 1 else loss_fn

    def _sinks(self, trainer: pl.Trainer) -> list[Sink]:
        """A sink for each of the Trainer's loggers (made at the first check of a fit)."""
        if self._logger_sinks is None:
            self._logger_sinks = [_sink_for(logger, self.prefix) for logger in trainer.loggers]
        return self._logger_sinks


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
    recorder: _LocalGrads | None = None  # fully_shard: records the local gradients of the backward
    recording: _LocalRecording | None = None  # the module-local recordings of the checked backward
    own: "_TensorHooks | None" = None  # DDP: this rank's own gradients of the backward (for its capsule)

    def release(self) -> None:
        """Remove every hook this step registered (idempotent)."""
        if self.recorder is not None:
            self.recorder.remove()
        if self.own is not None:
            self.own.remove()
        if self.recording is not None:
            self.recording.close()



def _loaded_namespaces() -> tuple[str, ...]:
    """The Lightning namespaces imported so far."""
    return tuple(ns for ns in _NAMESPACES if ns in sys.modules)


def _namespace_of_module(module: str) -> str | None:
    return next((ns for ns in _NAMESPACES if module == ns or module.startswith(ns + ".")), None)


def _namespace(obj: Any) -> str | None:
    """The Lightning namespace ``obj``'s class (or a base of it) comes from, or None."""
    return next((ns for c in type(obj).__mro__ if (ns := _namespace_of_module(c.__module__))), None)


def _is_a(obj: Any, *names: str) -> str | None:
    """The first of ``names`` that is the name of a Lightning class ``obj`` is an instance of (either namespace)."""
    return next((c.__name__ for c in type(obj).__mro__ if c.__name__ in names and _namespace_of_module(c.__module__)),
                None)


def _plain(cls: type) -> type:
    """The class a built callback class was built from (``cls`` itself otherwise)."""
    return vars(cls).get("_gradwatch_plain", cls)


def _namespaces_of(cls: type) -> tuple[str, ...]:
    return vars(cls).get("_gradwatch_namespaces", ())


@functools.cache
def _with_callbacks(cls: type, namespaces: tuple[str, ...]) -> type:
    """``cls`` mixed with the ``Callback`` class of each namespace (which must be imported already)."""
    namespaces = tuple(ns for ns in _NAMESPACES if ns in namespaces)  # one order: one class per set
    if not namespaces:
        return cls
    bases = tuple(sys.modules[ns].Callback for ns in namespaces)
    return type(cls.__name__, (cls, *bases), {
        "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
        "_gradwatch_plain": cls, "_gradwatch_namespaces": namespaces,
    })


def _rebuild(cls: type, namespaces: tuple[str, ...]) -> GradWatchCallback:
    for ns in namespaces:
        importlib.import_module(ns)
    return object.__new__(_with_callbacks(cls, namespaces))


def _log_dir(trainer: pl.Trainer) -> str | None:
    """The first logger's directory, as ``trainer.log_dir`` names it (without its broadcast:
    read on rank zero only), or None without a logger."""
    if not trainer.loggers:
        return None
    logger = trainer.loggers[0]
    path = logger.log_dir if _is_a(logger, "TensorBoardLogger", "CSVLogger") else getattr(logger, "save_dir", None)
    return None if path is None else os.fspath(path)


def _sink_for(logger: Any, prefix: str) -> Sink:
    if _is_a(logger, "TensorBoardLogger"):
        return TensorBoardSink(logger.experiment, prefix=prefix)
    return LightningLoggerSink(logger, prefix=prefix)


def _training_step_loss(
    pl_module: pl.LightningModule, batch_idx: int, namespace: str | None
) -> Callable[[nn.Module, Any], Tensor]:
    """``loss_fn`` that re-runs ``training_step`` with logging disabled."""
    signature_utils = importlib.import_module(f"{namespace or 'pytorch_lightning'}.utilities.signature_utils")
    with_idx = signature_utils.is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)

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
