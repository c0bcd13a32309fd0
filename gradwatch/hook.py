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
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from torch import Tensor, nn

from gradwatch._capsules import _capsule_dir, _capsules_option
from gradwatch._sharded import _LocalGrads, _sharding
from gradwatch._validate import _callable, _module
from gradwatch._watch import _BackwardRoots, _Capture, _TensorHooks, _Watch, _Watched
from gradwatch.options import ProbeOptions
from gradwatch.replay import capture
from gradwatch.report import OnFailure
from gradwatch.sinks import Sink, TensorBoardSink

__all__ = ["GradWatch"]


class GradWatch(_Watched):
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
        options: The probe options (:class:`~gradwatch.ProbeOptions`; ``None``: the
            defaults). ``coordinates`` and ``directions`` are the most a check probes per
            tensor under a budget (``directions`` at least 1). With ``kinks`` (default),
            probes that cross a kink of a non-smooth op are excluded, proximity is logged at
            INFO (once per module and op), and a :class:`~gradwatch.KinkWarning` says when
            kinks keep a tensor from being verified (:class:`~gradwatch.KinkWarnings`).
            ``precision`` is where perturbed losses are evaluated (see
            :func:`gradwatch.check`); ``max_shadow_bytes`` the largest float64 copy of the
            whole model (or of a module) ``precision="auto"`` makes: when the whole model does
            not fit and ``modules`` names modules (or suspects were found), the module-local
            float64 checks are run instead of a whole-model check in the native precision,
            whose central differences would miss small errors (the whole-model tensors are
            then ``skipped``, saying so).
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
        sinks: More sinks each report is written to (objects with ``write(report, step)``:
            wandb, MLflow, ...), besides the ``gradwatch`` logging line, the kink warnings
            and the TensorBoard writer.
        capsules: Where a failing check writes its capsules (everything needed to rerun it
            offline: :mod:`gradwatch.capsule`, ``gradwatch repro``): ``None`` or ``True``
            (default): ``<logdir>/gradwatch/capsules`` (the writer's ``log_dir``), none without
            one; a directory; ``False``: none. The first failure of each module (and of the
            whole model) is kept, at most 8 capsules and 256 MiB per run, 32 MiB each (a
            larger one leaves tensors out and says so); a write that fails warns once and
            training goes on.

    Attributes:
        reports: ``(step, Report)`` for each check.
        seed: The base seed in use.
        suspects: With ``modules="suspects"``, after the first check: qualified module
            name -> why it is a suspect (``{}`` before, or when none was found).

    Example:
        >>> watch = GradWatch(model, loss_fn, every_n_steps=50, logdir="runs")  # doctest: +SKIP
        >>> watch = GradWatch(model, loss_fn, options=ProbeOptions(coordinates=8))  # doctest: +SKIP
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
        options: ProbeOptions | None = None,
        scaler: Any = None,
        modules: Any = "suspects",
        sinks: Sequence[Sink] | None = None,
        capsules: str | bool | None = None,
    ) -> None:
        _module("model", model)
        _callable("loss_fn", loss_fn)
        _scaler("scaler", scaler)
        capsules = _capsules_option("capsules", capsules)
        self._watch = _Watch(options=options, every_n_steps=every_n_steps, max_overhead=max_overhead,
                             on_failure=on_failure, seed=seed, prefix=prefix, modules=modules, sinks=sinks,
                             capsules=_capsule_dir(capsules, logdir or getattr(writer, "log_dir", None)))
        self._watch.resolve(model)
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
        self.writer = writer
        self.scaler = scaler
        self._tensorboard = [TensorBoardSink(writer, prefix=prefix)] if writer is not None else []
        self._step = 0
        self._sharded = _sharding(model)  # raises for sharding that cannot be checked

    @property
    def global_step(self) -> int:
        """Number of :meth:`step` blocks entered so far."""
        return self._step

    def is_check_step(self, step: int | None = None) -> bool:
        """Whether ``step`` (default: the next one) is a check step as planned now.

        Without ``max_overhead`` the plan is fixed (``0, n, 2n, ...``). With it, only
        the next planned check step answers True, and the budget can still defer it.
        """
        return self._watch.schedule.is_planned(self._step if step is None else step)

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
        if not self._watch.begin(step, defer=self._sharded is None):  # the hot path: a clock read, nothing else
            yield
            return
        sharded = self._sharded is not None
        state = capture(self.model)
        targets = self._watch.targets(self.model, self.loss_fn, batch, state, distributed=sharded, sharded=sharded)
        recording = self._watch.recording(self.model, targets, ops=not sharded)
        if sharded:  # this rank's local gradients, before FSDP's reduce-scatter
            too_big = self._watch.too_big(self.model)
            recorder = _LocalGrads(self.model, names=[  # the checked modules' parameters only when not whole
                f"{m}.{p}" if m else p for m, module in targets.items() for p, _ in module.named_parameters()
            ] if too_big else None)
        else:
            recorder = _TensorHooks(self.model)
        roots = _BackwardRoots()
        try:
            with roots, recording:
                yield
        finally:
            recorder.remove()
        grads = recorder.mean(self.model) if sharded else recorder.grads  # collectives: every rank, same order
        if not grads and not (sharded and too_big):
            raise ValueError(
                f"no parameter of `model` received a gradient inside `watch.step(batch)` at step {step}: "
                "call loss.backward() inside the with-block"
            )
        if roots.autocast is not None:  # autocast entered inside the block: replay the forward under it
            state = dataclasses.replace(state, autocast=roots.autocast)
        scale = self.scaler.get_scale() if self.scaler is not None and self.scaler.is_enabled() else None
        checked = _Capture(step, self.model, self.loss_fn, batch, state, grads, roots.loss(), recording=recording,
                           scale=scale, distributed=sharded, local_grads=recorder.grads if sharded else None)
        del state, grads, recorder, recording
        self._watch.check_step(checked, sinks=self._tensorboard)

    def close(self) -> None:
        """Close the writer the hook created from ``logdir`` (not one you passed)."""
        if self._owned_writer is not None:
            self._owned_writer.close()
            self._owned_writer = None

    def __enter__(self) -> "GradWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _scaler(name: str, value: Any) -> Any:
    """``None`` or a GradScaler-like object (``scale``, ``get_scale``, ``is_enabled``)."""
    if value is not None and not all(callable(getattr(value, m, None)) for m in ("scale", "get_scale", "is_enabled")):
        raise TypeError(f"`{name}` must be None or a torch.amp.GradScaler, got {type(value).__name__}")
    return value
