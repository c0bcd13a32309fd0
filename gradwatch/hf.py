"""Hugging Face ``transformers.Trainer`` adapter: check gradients inside ``Trainer.train``.

Like the Lightning callback, the Trainer callback decides *when* to check and *which
gradient* to compare, calls :func:`gradwatch.check` and hands the
:class:`~gradwatch.Report` to sinks. This module imports ``transformers`` only when a
callback is created (``pip install "gradwatch[transformers]"``).

Example:
    >>> from transformers import Trainer
    >>> from gradwatch.hf import GradWatchTrainerCallback
    >>> trainer = Trainer(model, args, train_dataset=data,
    ...                   callbacks=[GradWatchTrainerCallback()])  # doctest: +SKIP
    >>> trainer.train()                                           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor, nn

from gradwatch._capsules import _capsule_dir, _capsules_option
from gradwatch._sharded import _LocalGrads
from gradwatch._sharded import _sharding as _model_sharding
from gradwatch._validate import _callable
from gradwatch._watch import _BackwardRoots, _Capture, _LocalRecording, _Watch, _Watched
from gradwatch.options import ProbeOptions
from gradwatch.replay import ReplayState, capture
from gradwatch.report import OnFailure
from gradwatch.sinks import Sink, TensorBoardSink

__all__ = ["GradWatchTrainerCallback"]

#: How far up the stack ``on_train_begin`` looks for the Trainer that calls it.
_TRAINER_FRAMES = 8


class GradWatchTrainerCallback(_Watched):
    """Checks, every ``every_n_steps`` optimizer steps, the gradient ``transformers.Trainer`` uses.

    A ``transformers.TrainerCallback`` (the class is built on first use, so that importing
    :mod:`gradwatch.hf` does not import ``transformers``). On a check step it wraps the
    Trainer's ``compute_loss`` for one call: right before it, the RNG states and buffers
    are captured (dropout masks replay), and a forward hook keeps the inputs the Trainer
    feeds to the model and the model's ``outputs.loss``. Tensor hooks then record the
    gradient this micro-batch's backward sends to each parameter, and a hook on
    ``outputs.loss`` records the factor the Trainer applied to it before backward (the
    division by ``gradient_accumulation_steps`` unless the loss is already normalised
    over the accumulated tokens, the product by the process count when tokens are
    averaged across processes, and a GradScaler's scale, which is divided out). At the next callback event (``on_substep_end`` inside an accumulation
    window, ``on_pre_optimizer_step`` otherwise) the hooks are removed and the gradient
    is compared with float64 central differences (:func:`gradwatch.check`). Other steps
    only read the clock.

    Which gradient, with the Lightning callback's rules:

    * the gradient of the check micro-batch's own backward, *before* ``max_grad_norm``
      clipping (the Trainer clips before ``on_pre_optimizer_step``, so no callback event
      sees unclipped gradients: the tensor hooks do);
    * with ``gradient_accumulation_steps`` = N > 1, the window's first micro-batch: the
      replayed loss carries the same factor as the backpropagated one;
    * under bf16/fp16 autocast (``bf16=True``) the precision tolerances of the autocast
      dtype apply; a step whose fp16 gradients a GradScaler finds non-finite is reported
      ``skipped``;
    * with several processes (DDP through accelerate), the local gradients are averaged
      across processes (what DDP hands the optimizer), every process runs the same
      probes on its local batch and the results are averaged before judging, so all
      processes report the same verdicts; only the main process logs;
    * under FSDP2 (``TrainingArguments(fsdp=True, fsdp_config={"fsdp_version": 2})``: accelerate
      applies ``fully_shard``), as :class:`gradwatch.GradWatch` does under ``fully_shard``: the
      gradient compared is the mean over processes of each one's local gradient of the check
      micro-batch, recorded on the unsharded parameters inside each FSDP unit's forward (before
      the reduce-scatter and clipping); for the check the parameters are gathered (a full copy of
      the model) with FSDP's hooks suspended, and every process runs the same probes on its own
      micro-batch, averaged before judging. When the check raises on one process the others raise
      too instead of waiting. When the whole model's float64 copy is over ``max_shadow_bytes`` only
      the ``modules`` named are gathered and checked. FSDP1 (``fsdp_version=1``), DeepSpeed, XLA
      FSDP, Megatron-LM and tensor parallelism are not checked: the callback warns once, naming what
      it found, why, and what to use instead.

    Reports go to the ``gradwatch`` logger (one line per check), to
    :class:`~gradwatch.KinkWarning`\\ s, and to the Trainer's TensorBoard
    (``report_to="tensorboard"``) through :class:`~gradwatch.TensorBoardSink` with the
    keys of :func:`gradwatch.metrics`, at ``state.global_step``.

    The Trainer is found on the stack in ``on_train_begin`` (callbacks are not handed
    it), so the callback expects ``Trainer.train`` to call it, with the Trainer's own
    ``training_step`` calling ``compute_loss`` once per micro-batch.

    Args:
        every_n_steps: Check optimizer steps ``0, n, 2n, ...`` (``state.global_step``);
            with ``max_overhead``, the smallest gap between two checks.
        max_overhead: Largest fraction of the training time spent checking (default 2%);
            ``None``: every check probes every tensor on steps ``0, n, 2n, ...``. Under
            several processes, the main process's measurements decide for all.
        loss_fn: ``loss_fn(model, inputs)`` returning the model's ``outputs.loss`` for
            ``inputs``, the keyword arguments the Trainer called the model with
            (``num_items_in_batch``, the label count of the accumulation window, among
            them when the model takes it). ``None``: the model's own ``outputs.loss``.
            When the model returns no loss (a ``compute_loss_func`` or label smoothing
            computes it), ``inputs`` are those the Trainer passed to ``compute_loss``
            (with ``num_items_in_batch`` added) and the loss is what ``compute_loss``
            returns; ``None`` then replays the Trainer's ``compute_loss``.
        on_failure: ``"warn"``, ``"raise"`` (:class:`~gradwatch.GradientCheckError` out
            of ``Trainer.train``, on every process) or a callable receiving the Report.
        seed: Base seed of the probe sampler; each check uses a seed derived from it and
            the step. ``None`` draws one on the main process.
        prefix: First component of the logged keys.
        options: The probe options (:class:`~gradwatch.ProbeOptions`; ``None``: the
            defaults), as :class:`gradwatch.GradWatch` takes them: ``coordinates`` and
            ``directions`` are the most a check probes per tensor under a budget;
            ``max_shadow_bytes`` the largest float64 copy of the model (or of a module)
            ``precision="auto"`` makes.
        modules: Modules checked in isolation after the whole-model check, as
            :class:`gradwatch.GradWatch` does (``<module>::<tensor>`` in the report, such as
            ``transformer.h.0.attn::input[0]``): ``"suspects"`` (default), the modules whose
            forward runs custom backward code, found by one replay of ``compute_loss`` at the
            first check (the main process's under several processes); a list of submodules of
            the model (or their names); ``None``: none. They are recorded during the checked
            micro-batch's forward and backward only; with several processes their gradients
            are averaged, so every process reports the same verdicts. With
            ``precision="auto"``, when the whole model's float64 copy is over
            ``options.max_shadow_bytes`` (2 GiB), only these modules are checked (in float64),
            the whole-model tensors reported ``skipped``.
        sinks: More sinks each report is written to on the main process (objects with
            ``write(report, step)``), besides the ``gradwatch`` logging line, the kink
            warnings and the Trainer's TensorBoard.
        capsules: Where a failing check writes its capsules (everything needed to rerun it
            offline: :mod:`gradwatch.capsule`, ``gradwatch repro``), on the main process only,
            as :class:`gradwatch.GradWatch` does: ``None`` or ``True`` (default):
            ``<logging_dir>/gradwatch/capsules``, resolved in ``on_train_begin``:
            ``args.logging_dir`` (transformers 4), else the directory of the Trainer's
            TensorBoard callback (transformers 5: ``report_to="tensorboard"``,
            ``TENSORBOARD_LOGGING_DIR``); none without one. A directory; ``False``: none.
            With several processes the main process's capsules hold its own micro-batch (or
            module inputs) and its own gradients, before they are averaged. A whole-model
            capsule is replayed with the loss the check used (``loss_fn``, or the model's own
            ``outputs.loss``): ``capsule.check(model, loss_fn)``.

    Attributes:
        reports: ``(global_step, Report)`` for each check, on every process.
        seed: The base seed in use (the main process's, broadcast at the start of training).
        suspects: With ``modules="suspects"``, after the first check: qualified module name ->
            why it is a suspect.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=data,
        ...                   callbacks=[GradWatchTrainerCallback(every_n_steps=50)])  # doctest: +SKIP
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "GradWatchTrainerCallback":
        return super().__new__(_with_trainer_callback(cls))

    def __reduce__(self) -> tuple:  # pickle/deepcopy: rebuilt on the TrainerCallback class where loaded
        return _rebuild, (vars(type(self)).get("_gradwatch_plain", type(self)),), self.__dict__

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
        self._capsules = _capsules_option("capsules", capsules)  # the directory is known in on_train_begin
        self._watch = _Watch(options=options, every_n_steps=every_n_steps, max_overhead=max_overhead,
                             on_failure=on_failure, seed=seed, prefix=prefix, modules=modules, sinks=sinks)
        if loss_fn is not None:
            _callable("loss_fn", loss_fn)
        self.loss_fn = loss_fn
        self._trainer: Any = None
        self._enabled = True
        self._warned_sharded = False
        self._fsdp = False  # whether the Trainer's model is sharded with fully_shard (FSDP2)
        self._pending: _Pending | None = None
        self._tensorboard: TensorBoardSink | None = None


    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Find the Trainer, refuse sharding it cannot check, and share the main process's seed."""
        trainer = _calling_trainer()
        self._disarm()  # a capture left armed by an interrupted train()
        self._trainer = trainer
        self._watch.reset_sinks()
        self._watch.forget_modules()
        capsules = None  # the main process writes them (the core's writer checks the rank too)
        if state.is_world_process_zero:
            capsules = _capsule_dir(self._capsules, _logging_dir(args, trainer) if self._capsules in (None, True)
                                    else None)
        self._watch.set_capsule_dir(capsules)
        refused = _refused(trainer)  # the model is prepared (sharded) before on_train_begin
        self._enabled = refused is None
        if refused is not None:
            if not self._warned_sharded and state.is_world_process_zero:
                warnings.warn(f"GradWatchTrainerCallback does not check gradients under {refused}. Training "
                              "continues unchecked.", UserWarning, stacklevel=2)
            self._warned_sharded = True
            return
        self._fsdp = _model_sharding(trainer.model) == "fsdp2"
        if trainer.accelerator.num_processes > 1:
            self._watch.seed = int(self._broadcast(self.seed))
        self._watch.seed_shared = True

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start of an optimizer step (its first micro-batch): arm the capture on a check step."""
        self._disarm()
        trainer = self._trainer
        if (
            not self._enabled
            or trainer is None
            or not self._watch.begin(state.global_step, defer=trainer.accelerator.num_processes == 1)
        ):
            return
        pending = self._pending = _Pending(state.global_step)
        original = trainer.compute_loss  # the bound method, or an instance attribute someone set

        def compute_loss(model: nn.Module, inputs: Any, *a: Any, **kw: Any) -> Any:
            self._restore_compute_loss(pending)
            module = trainer.model
            pending.replay = capture(module)  # right before the forward: its dropout masks replay
            inputs_copy = dict(inputs)  # compute_loss may pop the labels from its dict
            num_items = kw.get("num_items_in_batch", a[1] if len(a) > 1 else None)
            if num_items is not None:  # the Trainer's token count over the window (and processes)
                inputs_copy[_NUM_ITEMS] = num_items
            multi = trainer.accelerator.num_processes > 1 or self._fsdp
            targets = self._watch.targets(module, _trainer_loss(trainer), inputs_copy, pending.replay,
                                          distributed=multi, sharded=self._fsdp)
            pending.recording = self._watch.recording(module, targets, ops=not multi)
            if self._fsdp:  # this rank's local gradients, recorded on the gathered parameters before reduce-scatter
                pending.recorder = _LocalGrads(module, names=[  # the checked modules' only when the model is too big
                    f"{m}.{p}" if m else p for m, sub in targets.items() for p, _ in sub.named_parameters()
                ] if self._watch.too_big(module) else None)
            fed: dict[str, Any] = {}
            hook = module.register_forward_hook(partial(_keep_forward, fed, pending), with_kwargs=True)
            roots = _BackwardRoots()  # records the autocast state the forward runs under
            try:
                pending.recording.__enter__()  # exited at the check: records this micro-batch only
                with roots:
                    out = original(model, inputs, *a, **kw)
            except BaseException:
                self._disarm()
                raise
            finally:
                hook.remove()
            if roots.autocast is not None:
                pending.replay = dataclasses.replace(pending.replay, autocast=roots.autocast)
            if "loss" in fed and fed["inputs"] is not None:  # the model's own outputs.loss, hooked in the forward
                pending.loss, pending.inputs, pending.default = fed["loss"], fed["inputs"], _model_loss
            else:  # the model returns none (compute_loss_func, label smoothing): compute_loss's loss
                if "factor" in fed:
                    fed["factor"].remove()
                loss, pending.inputs, pending.default = (out[0] if isinstance(out, tuple) else out), inputs_copy, None
                if _scalar_with_grad(loss):
                    pending.loss = loss.detach()
                    pending.handles.append(loss.register_hook(partial(_keep_factor, pending)))
            if pending.loss is not None:
                pending.handles += [
                    p.register_hook(partial(_keep_grad, pending.grads, name))
                    for name, p in module.named_parameters()
                    if p.requires_grad and pending.recorder is None  # FSDP2: shards; the recorder has the gradients
                ]
            return out

        pending.restore = trainer.__dict__.get("compute_loss", _MISSING)
        trainer.compute_loss = compute_loss

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """End of a micro-batch inside an accumulation window: check the captured one."""
        self._check_captured()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Before the optimizer step (after clipping): check the captured micro-batch."""
        self._check_captured()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._disarm()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._disarm()
        self._trainer = None

    # ------------------------------------------------------------------ the check
    def _check_captured(self) -> None:
        if self._pending is None or self._pending.factor is None:  # not armed, or no backward through compute_loss yet
            return
        pending = self._disarm()
        trainer = self._trainer
        factor = pending.factor  # of the backpropagated loss: a GradScaler's scale included
        scaler = getattr(trainer.accelerator, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None  # of this backward
        loss_fn = self.loss_fn or pending.default or _trainer_loss(trainer)
        multi = trainer.accelerator.num_processes > 1
        applied = factor if scale is None else factor / scale
        fsdp = pending.recorder is not None
        # FSDP2: the local gradients' mean over ranks (collectives, the same on every rank), what the
        # reduce-scatter hands the optimizer; otherwise this process's own gradients, averaged in the check
        grads = pending.recorder.mean(trainer.model) if fsdp else dict(pending.grads)
        checked = _Capture(
            pending.step, trainer.model, partial(_scaled, loss_fn, applied),
            pending.inputs, pending.replay, grads, pending.loss * factor,  # before clipping
            recording=pending.recording, scale=scale, distributed=multi or fsdp,
            average=multi and not fsdp,  # what DDP hands the optimizer: the mean over processes
            local_grads=pending.recorder.grads if fsdp else None,
            loss_factor=("mul", applied),
        )
        del pending
        self._watch.check_step(checked, sinks=self._sinks(trainer), write=trainer.is_world_process_zero())

    def _sinks(self, trainer: Any) -> list[Sink]:
        """The Trainer's TensorBoard (``report_to="tensorboard"``), whose writer is made in
        ``on_train_begin`` and closed at the end of training."""
        writer = _tensorboard_writer(trainer)
        if writer is None:
            return []
        if self._tensorboard is None or self._tensorboard.writer is not writer:
            self._tensorboard = TensorBoardSink(writer, prefix=self.prefix)
        return [self._tensorboard]

    def _broadcast(self, obj: Any) -> Any:
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def _disarm(self) -> _Pending | None:
        """Take the pending capture, if any: put ``compute_loss`` back and remove the hooks."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._restore_compute_loss(pending)
            for handle in pending.handles:
                handle.remove()
            pending.handles.clear()
            if pending.recorder is not None:
                pending.recorder.remove()  # its hooks only: the gradients it recorded stay
            if pending.recording is not None:
                pending.recording.close()
        return pending

    def _restore_compute_loss(self, pending: _Pending) -> None:
        trainer = self._trainer
        if pending.restore is None or trainer is None:
            return
        if pending.restore is _MISSING:
            trainer.__dict__.pop("compute_loss", None)
        else:
            trainer.compute_loss = pending.restore
        pending.restore = None


_MISSING = object()
#: Key of the Trainer's ``num_items_in_batch`` in the inputs handed to ``loss_fn``.
_NUM_ITEMS = "num_items_in_batch"


@dataclass(eq=False)
class _Pending:
    """What a check step captured before its gradient is checked."""

    step: int
    restore: Any = None  # the Trainer's compute_loss binding to put back (_MISSING: none of its own)
    replay: ReplayState | None = None
    inputs: Any = None  # what loss_fn gets: the kwargs the model was called with (or compute_loss's inputs)
    default: Callable[[nn.Module, Any], Tensor] | None = None  # the default loss_fn, when not compute_loss
    loss: Tensor | None = None
    factor: Tensor | None = None  # d(backpropagated loss)/d(the model's or compute_loss's loss)
    grads: dict[str, Tensor] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)
    recording: _LocalRecording | None = None  # the module-local recordings of this micro-batch
    recorder: _LocalGrads | None = None  # FSDP2: this rank's local gradients of the micro-batch's backward


def _keep_factor(pending: _Pending, grad: Tensor) -> None:
    """Hook on compute_loss's loss: the gradient reaching it is the factor applied before backward."""
    pending.factor = grad.detach().reshape(())


def _keep_forward(fed: dict[str, Any], pending: _Pending, module: nn.Module, args: tuple, kwargs: dict,
                  output: Any) -> None:
    """Forward hook on the model: the inputs the Trainer fed it (keywords only) and its ``outputs.loss``,
    whose value is copied and whose factor hook is registered right here: ``compute_loss`` may scale
    that very tensor in place afterwards (``loss *= num_processes`` when tokens are averaged across
    processes; under FSDP2 no wrapper copies the output first), and a hook registered before an
    in-place change receives the gradient of the value before it."""
    if "inputs" in fed:
        return
    fed["inputs"] = None if args else dict(kwargs)
    loss = _output_loss(output)
    if _scalar_with_grad(loss):
        fed["loss"] = loss.detach().clone()
        fed["factor"] = loss.register_hook(partial(_keep_factor, pending))
        pending.handles.append(fed["factor"])


def _output_loss(output: Any) -> Any:
    """``outputs.loss`` of a model output (a ``ModelOutput`` or a dict), or None."""
    if isinstance(output, Mapping):
        return output.get("loss")
    return getattr(output, "loss", None)


def _scalar_with_grad(loss: Any) -> bool:
    return isinstance(loss, Tensor) and loss.requires_grad and loss.numel() == 1


def _model_loss(model: nn.Module, inputs: Any) -> Tensor:
    """The default ``loss_fn``: the model's own ``outputs.loss`` on the inputs the Trainer fed it."""
    loss = _output_loss(model(**inputs))
    if not isinstance(loss, Tensor):
        raise TypeError(f"the model returned no `loss` when gradwatch re-ran it on the Trainer's inputs "
                        f"({sorted(inputs)}): pass `loss_fn` to GradWatchTrainerCallback")
    return loss


def _keep_grad(captured: dict[str, Tensor], name: str, grad: Tensor) -> None:
    """Tensor hook: a copy of the gradient this backward sends to the parameter (``.grad`` may
    become this very tensor, which clipping then scales in place)."""
    previous = captured.get(name)
    captured[name] = grad.detach().clone() if previous is None else previous + grad.detach()


def _scaled(loss_fn: Callable[[nn.Module, Any], Tensor], factor: Tensor, model: nn.Module, inputs: Any) -> Tensor:
    """The loss as the Trainer backpropagated it: ``loss_fn``'s times the Trainer's factor."""
    loss = loss_fn(model, inputs)
    return loss * factor.to(device=loss.device, dtype=loss.dtype)


def _trainer_loss(trainer: Any) -> Callable[[nn.Module, Any], Tensor]:
    """The default ``loss_fn`` when the model returns no loss: the Trainer's own ``compute_loss``
    (its ``compute_loss_func`` or label smoothing)."""

    def loss_fn(model: nn.Module, inputs: Any) -> Tensor:
        inputs = dict(inputs)
        return trainer.compute_loss(model, inputs, num_items_in_batch=inputs.pop(_NUM_ITEMS, None))

    return loss_fn


def _calling_trainer() -> Any:
    """The ``transformers.Trainer`` whose method is up the stack (callbacks are not handed it)."""
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(_TRAINER_FRAMES):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    raise RuntimeError(
        "GradWatchTrainerCallback found no transformers.Trainer calling on_train_begin: pass it in "
        "`Trainer(..., callbacks=[GradWatchTrainerCallback()])` and train with `trainer.train()`"
    )


#: What to use instead of a sharding the callback does not check.
_INSTEAD = ("to check gradients, shard with FSDP2 (`TrainingArguments(fsdp=True, fsdp_config={'fsdp_version': 2})`, "
            "torch.distributed.fsdp.fully_shard) or train with DDP")


def _refused(trainer: Any) -> str | None:
    """What shards this Trainer's parameters in a way the callback does not check, why, and what to
    use instead; None for a single process, DDP and FSDP2 (``fully_shard``)."""
    kind = str(getattr(trainer.accelerator, "distributed_type", ""))
    if getattr(trainer, "is_deepspeed_enabled", False) or "DEEPSPEED" in kind:
        return ("DeepSpeed: ZeRO partitions the parameters and keeps, accumulates and clips the gradients in its "
                f"own buffers, which gradwatch cannot read before they are reduced; {_INSTEAD}")
    if getattr(trainer, "is_fsdp_xla_enabled", False) or "XLA" in kind:
        return f"FSDP/XLA (torch_xla): gradwatch cannot gather XLA-sharded parameters; {_INSTEAD}"
    if "MEGATRON_LM" in kind:
        return f"Megatron-LM: its tensor-parallel layers split parameters that gradwatch cannot gather; {_INSTEAD}"
    if getattr(trainer, "is_fsdp_enabled", False) or "FSDP" in kind:
        plugin = getattr(getattr(trainer.accelerator, "state", None), "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", 1)
        if version != 2:
            return (f"FSDP1 (fsdp_version={version}, FullyShardedDataParallel): each unit's parameters are "
                    f"flattened into one sharded FlatParameter that gradwatch cannot map back to the model's "
                    f"tensors; {_INSTEAD}")
    tp_size = getattr(trainer, "get_tp_size", lambda: 1)()
    if tp_size > 1:
        return f"tensor parallelism (tp_size={tp_size}): its DTensor parameters are split across processes; {_INSTEAD}"
    try:  # the model itself: FSDP1 flat parameters or tensor-parallel DTensors, however they came about
        _model_sharding(trainer.model)
    except ValueError as err:
        return f"this sharding: {err}"
    return None


def _logging_dir(args: Any, trainer: Any) -> str | None:
    """The Trainer's logging directory: ``args.logging_dir`` (transformers 4), else its TensorBoard
    callback's (transformers 5, set in that callback's ``on_train_begin``, which runs before ours), or None."""
    path = getattr(args, "logging_dir", None)
    if path is None:
        path = next((getattr(c, "logging_dir", None) for c in trainer.callback_handler.callbacks
                     if type(c).__name__ == "TensorBoardCallback"), None)
    return None if path is None else os.fspath(path)


def _tensorboard_writer(trainer: Any) -> Any:
    """The ``SummaryWriter`` of the Trainer's TensorBoard callback (``report_to="tensorboard"``), or None."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback":
            return getattr(callback, "tb_writer", None)
    return None


_BUILT: dict[type, type] = {}


def _with_trainer_callback(cls: type) -> type:
    """``cls`` mixed with ``transformers.TrainerCallback`` (built once per class)."""
    plain = vars(cls).get("_gradwatch_plain", cls)
    if plain not in _BUILT:
        from transformers import TrainerCallback

        _BUILT[plain] = type(plain.__name__, (plain, TrainerCallback), {
            "__module__": plain.__module__, "__qualname__": plain.__qualname__, "__doc__": plain.__doc__,
            "_gradwatch_plain": plain,
        })
    return _BUILT[plain]


def _rebuild(cls: type) -> GradWatchTrainerCallback:
    return object.__new__(_with_trainer_callback(cls))
