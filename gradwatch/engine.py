"""The check engine: central differences in float64 against autograd's gradient.

:func:`check` knows nothing about training loops, Lightning or TensorBoard. Adapters
decide when to call it and which gradient to compare; it returns a frozen
:class:`~gradwatch.report.Report`.

Numerics (see ``shared/design.md`` §3 and the README):

* Every perturbed loss is evaluated on a float64 copy of the parameters, buffers and
  floating inputs (``torch.func.functional_call``), from the RNG state and buffers
  the training forward started from, so dropout masks and batch statistics match.
* Each probe takes four evaluations, ``θ ± h·v`` and ``θ ± 2h·v``; the value is the
  central difference at ``h`` and its error bar is ``|D(h) - D(2h)| / 3`` (the
  Richardson truncation estimate) plus the rounding of the loss evaluations.
* A probe passes when ``|numerical - autograd| <= rtol·S + atol·‖v‖ + 3·error_bar``
  where ``S = Σ|g_i·v_i|`` (so directions whose terms cancel are not over-judged),
  ``rtol`` depends on the precision the gradient was computed in (:data:`RTOL`:
  2.4e-4 for float32, looser under TF32 and bf16/fp16 autocast), and
  ``atol = rtol·G/2`` with ``G`` the root-mean-square of the whole model's gradient:
  float32 rounding noise in a tensor whose true gradient is 0 (a conv bias before
  BatchNorm) stays below it.
* Probes whose perturbed passes took another branch of a non-smooth op than the
  unperturbed pass are marked as kinks and never count towards a failure. Crossed
  coordinates are replaced by fresh ones (``kink_resamples`` per tensor), and every
  non-smooth op a probe moved is reported with its module and margin
  (:mod:`gradwatch.kinks`).

All probe arithmetic stays on the model's device; results reach the host in one
transfer per check.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from contextlib import nullcontext
from typing import Any, Callable, Collection, Mapping, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from gradwatch._validate import _callable, _kink_options, _module, _one_of, _positive_float, _probe_options, _seed
from gradwatch.kinks import _BranchRecorder, _ProbeKinks, _Reference
from gradwatch.replay import (
    ReplayState,
    _autocast,
    _cast_floats,
    _default_dtype,
    _isolated,
    _LossModule,
    _restore_attrs,
    _restore_rng,
    capture,
)
from gradwatch.report import KinkEvent, Probe, Report, TensorCheck

__all__ = ["check", "DEFAULT_STEP", "RTOL"]

#: Base step for float64 central differences, ``≈ eps64^(1/3)``; scaled by ``max(1, |θ|)``.
DEFAULT_STEP = 6e-6
#: Relative tolerance by the precision the gradient was computed in. Float32 is 2000
#: machine epsilons; TF32 and autocast follow their ~10-bit and 8-bit mantissas.
RTOL = {
    "float64": 2000 * torch.finfo(torch.float64).eps,
    "float32": 2000 * torch.finfo(torch.float32).eps,
    "tf32": 1e-2,
    "float16": 2e-2,
    "bfloat16": 1e-1,
}
#: Absolute tolerance as a fraction of ``rtol`` times the model's gradient RMS.
_ATOL_RATIO = 0.5
#: Multiple of the numerical error bar added to the tolerance.
_ERROR_BAR_MULT = 3.0
#: Multiple of ``|<g - g_ref, v>|`` (autocast gradient minus the same code's gradient
#: without autocast) added to a probe's tolerance; 1 would suffice by the triangle
#: inequality, 2 keeps ``error / tolerance`` of a probe whose error is that gap at 0.5.
_GAP_MULT = 2.0
#: A tensor fails when its relative autocast gap (see :func:`_judge_gap`) exceeds this.
#: Correct zoo models reach 0.08 (bf16) and 0.05 (fp16); a backward that ignores the
#: GradScaler's scaling reaches 1.
_GAP_LIMIT = {"float16": 0.25, "bfloat16": 0.5}
#: Relative rounding of a float64 loss evaluation assumed in the error bar.
_LOSS_ROUNDING = 64 * torch.finfo(torch.float64).eps
#: Native replay vs training loss: relative and absolute slack (nondeterministic kernels).
_REPLAY_RTOL = 1e-5
#: Float64 replay vs native loss, relative slack per training precision.
_SHADOW_RTOL = {"float64": 1e-9, "float32": 1e-3, "tf32": 1e-2, "float16": 5e-2, "bfloat16": 5e-2}

_GRADS = ("autograd", "existing")
_NOT_SELECTED = "not selected for this check (checked in turn within the overhead budget)"
#: Mixed into the seed of the replacement-coordinate generator (independent of the plan's).
_RESAMPLE_SALT = 0x5DEECE66D


def check(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    *,
    seed: int | None = None,
    grads: str | Mapping[str, Tensor] = "autograd",
    coordinates: int = 4,
    directions: int = 1,
    step: float = DEFAULT_STEP,
    kinks: bool = True,
    kink_resamples: int = 4,
    near_kink_margin: float = 10.0,
    replay: ReplayState | None = None,
    train_loss: Tensor | float | None = None,
    names: Collection[str] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Report:
    """Compare the gradient of ``loss_fn(model, batch)`` with central differences.

    Args:
        model: The module whose parameters are checked. Its train/eval modes are used
            as they are.
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss tensor.
        batch: Anything ``loss_fn`` accepts; floating tensors inside tuples, lists,
            dicts and namedtuples are cast to float64 for the perturbed passes.
        seed: Seed of the probe sampler (coordinates and directions). ``None`` draws
            one at random; the report records it, so passing it again reproduces the
            check.
        grads: ``"autograd"``: compute the gradient here, leaving every ``.grad``
            untouched. ``"existing"``: compare with the current ``.grad``. A mapping
            from parameter name to tensor: compare with those tensors.
        coordinates: Random elements probed per tensor, drawn without replacement.
        directions: Random Gaussian directions over the whole tensor probed per
            tensor; they catch errors confined to a few elements.
        step: Base step ``h`` of the float64 central differences.
        kinks: Record branches of non-smooth ops and exclude probes that cross one;
            the report lists every op a probe moved as a
            :class:`~gradwatch.report.KinkEvent` with its module and margin.
        kink_resamples: Replacement coordinates drawn per tensor, at most, for
            coordinate probes that crossed a kink (one host transfer per round of
            replacements). 0 disables resampling.
        near_kink_margin: A kink event with a margin below this is "near" (the
            margin is the distance to the kink in units of the ``±2h`` move).
        replay: State captured with :func:`gradwatch.capture` right before the
            training forward. With ``grads="autograd"`` it must be ``None``; otherwise
            ``None`` means "replay from the current state".
        train_loss: Loss of the training forward, compared with the replayed loss
            before the check is trusted. Only with ``grads`` other than "autograd";
            without it the replay cannot be verified against the training step (the
            float64 copy is still compared with the model in its own precision).
        names: ``named_parameters()`` names of the tensors to check; the others are
            reported ``skipped``. ``None`` checks every tensor with a gradient. The
            adapters use it to spread checks over steps within an overhead budget.
        reduce: For data-parallel training: averages a 1-D float64 device tensor
            across processes (every process must call ``check`` with the same
            ``seed`` and probe options, on its local batch). It is applied once per
            host transfer to every value the check collects (losses, directional
            derivatives, kink flags and margins), so each process judges the mean loss
            against the mean gradient, which is what data-parallel ``.grad`` holds, and
            all processes take the same kink resampling decisions and return the same
            verdicts.

    Returns:
        A :class:`~gradwatch.report.Report`. ``report.ok`` is False when a tensor
        failed; a replay that does not reproduce ``train_loss`` gives an unreliable
        report with no verdicts rather than a failure.

    Raises:
        TypeError: ``model`` is no module, ``loss_fn`` is not callable or returns no
            tensor, or a ``grads`` mapping holds something else than tensors.
        ValueError: Bad argument values, a non-scalar or non-finite loss, or no
            parameter with a gradient to check.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> check(model, loss_fn, batch, seed=0).ok
        True
    """
    started = time.perf_counter()
    _module("model", model)
    _callable("loss_fn", loss_fn)
    seed = _seed("seed", seed)
    _probe_options(coordinates, directions, kinks)
    _kink_options(kink_resamples, near_kink_margin)
    _positive_float("step", step)
    if reduce is not None:
        _callable("reduce", reduce)
    if isinstance(grads, str):
        _one_of("grads", grads, _GRADS)
    elif not isinstance(grads, Mapping):
        raise ValueError(f"`grads` must be 'autograd', 'existing' or a mapping name -> Tensor, got {grads!r}")
    if replay is not None and not isinstance(replay, ReplayState):
        raise TypeError(f"`replay` must be a gradwatch.ReplayState from gradwatch.capture(), got {type(replay).__name__}")
    if grads == "autograd" and (replay is not None or train_loss is not None):
        raise ValueError(
            "`replay` and `train_loss` describe a training step that already happened; they only apply "
            f"with grads='existing' or a mapping, got grads='autograd' with replay={type(replay).__name__}, "
            f"train_loss={train_loss!r}"
        )
    if seed is None:
        seed = secrets.randbits(62)

    params = dict(model.named_parameters())
    if names is not None:
        names = _names(names, params)
    host = _HostValues(reduce)
    with _isolated(model):
        if grads == "autograd":
            replay = capture(model)
            train_loss, grad_map = _autograd_gradients(model, loss_fn, batch, replay, params)
        else:
            grad_map = _given_gradients(grads, params)
            if replay is None:
                replay = capture(model)
            if train_loss is not None:
                train_loss = _loss_value("train_loss", train_loss)
        skipped = _skip_reasons(params, grad_map)
        grad_map = {n: g for n, g in grad_map.items() if n not in skipped}
        if names is not None and grad_map:  # the same probes and tolerances as a check of every tensor
            scale = _gradient_rms(grad_map, host)
            plan = _plan(grad_map, seed, coordinates, directions)
            skipped.update({n: _NOT_SELECTED for n in params if n not in names and n not in skipped})
            grad_map = {n: g for n, g in grad_map.items() if n in names}
        if not grad_map:
            raise ValueError(
                "`model` has no parameter with a gradient to check: "
                + "; ".join(f"{n}: {r}" for n, r in skipped.items())
                if skipped
                else "`model` has no parameters"
            )
        if names is None:
            scale = _gradient_rms(grad_map, host)
            plan = _plan(grad_map, seed, coordinates, directions)
        first_grad = next(iter(grad_map.values()))
        precision = _grad_precision(first_grad, replay, model)
        reference = _grad_precision(first_grad, replay, model, autocast=False)
        # under autocast, measure the gap to the same code's gradient without autocast (see _autocast_gaps)
        gaps = _autocast_gaps(model, loss_fn, batch, replay, grad_map, reduce) if precision != reference else {}
        gap_norms = {name: _gap_norms(grad_map[name], gap, host) for name, gap in gaps.items()}
        evaluation = _Evaluation(model, loss_fn, batch, replay, kinks)
        native_loss = train_loss if grads == "autograd" else evaluation.native()
        loss0, signature = evaluation.float64(evaluation.shadow)
        probe = evaluation.loss_dtype == torch.float64  # else unreliable: no point in probing
        kink_log: dict[str, list] = {name: [] for name in grad_map}
        rows = {name: _probe_tensor(evaluation, name, grad_map[name], plan[name], step, signature, host, kink_log[name],
                                    gap=gaps.get(name))
                for name in grad_map if probe}
        if probe and signature is not None and kink_resamples:
            _resample(evaluation, grad_map, rows, kink_log, seed, kink_resamples, step, signature, host, gaps)
        gstats = {name: _grad_stats(g, host) for name, g in grad_map.items()}
        i_loss0 = host.add(loss0)
        i_native = host.add(native_loss) if isinstance(native_loss, Tensor) else None
        i_train = host.add(train_loss) if isinstance(train_loss, Tensor) else None
        values = host.fetch()

    train = values[i_train] if i_train is not None else train_loss
    native = values[i_native] if i_native is not None else None
    replayed = values[i_loss0]
    for label, value in (("train_loss", train), ("loss_fn", replayed)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"`{label}` must be finite, got {value!r}: fix the NaN/Inf in the loss before checking gradients")
    reason = _replay_problem(train, native, replayed, _SHADOW_RTOL[precision], grads == "autograd")
    if reason is None and evaluation.loss_dtype != torch.float64:
        reason = (
            f"`loss_fn` returned a {str(evaluation.loss_dtype).replace('torch.', '')} loss on the float64 copy of the model: "
            "something casts to a lower precision (such as .float()), so central differences would measure "
            "rounding noise; keep the loss in the dtype of its inputs"
        )
    tensors: dict[str, TensorCheck] = {}
    for name, p in params.items():
        shape = tuple(p.shape)
        if name in skipped:
            tensors[name] = TensorCheck(name, shape, "skipped", reason=skipped[name])
        elif reason is not None:
            tensors[name] = TensorCheck(name, shape, "skipped", reason="check unreliable: " + reason)
        else:
            tensors[name] = _judge(name, shape, rows[name], gstats[name], values, scale, RTOL[reference])
            if name in gap_norms:
                gap, ref_norm = (values[i] for i in gap_norms[name])
                floor = values[scale] * math.sqrt(p.numel())
                tensors[name] = _judge_gap(tensors[name], gap, ref_norm + floor, precision)
            tensors[name] = _attach_kinks(tensors[name], kink_log[name], signature, values, near_kink_margin)
    return Report(
        tensors=tensors,
        seed=seed,
        precision="float64",
        grad_dtype=str(first_grad.dtype).replace("torch.", ""),
        grad_precision=precision,
        train_loss=train,
        replay_loss=replayed,
        reliable=reason is None,
        reason=reason,
        seconds=time.perf_counter() - started,
    )


class _HostValues:
    """Collects device scalars and brings them to the host in one transfer per device.

    With ``reduce`` (a cross-process mean of a 1-D float64 tensor), all values are
    stacked on one device, reduced in one call, then transferred once.
    """

    def __init__(self, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self._values: list[Tensor] = []
        self._starts: list[int] = []
        self._size = 0
        self.reduce = reduce

    def add(self, value: Tensor | float | bool) -> int:
        if not isinstance(value, Tensor):
            value = torch.tensor(float(value), dtype=torch.float64)
        return self.extend(value.detach().reshape(1))[0]

    def extend(self, values: Tensor) -> range:
        """Add every element of ``values``; returns their indices."""
        values = values.detach().reshape(-1).to(torch.float64)
        self._values.append(values)
        self._starts.append(self._size)
        self._size += values.numel()
        return range(self._size - values.numel(), self._size)

    def fetch(self) -> list[float]:
        out: list[float] = [0.0] * self._size
        if self.reduce is not None:
            device = next((v.device for v in self._values if v.device.type != "cpu"), torch.device("cpu"))
            stacked = torch.cat([v.to(device) for v in self._values])
            reduced = self.reduce(stacked)
            if not isinstance(reduced, Tensor) or reduced.shape != stacked.shape:
                raise TypeError(
                    f"`reduce` must return a tensor of shape {tuple(stacked.shape)}, got {type(reduced).__name__} "
                    f"{tuple(getattr(reduced, 'shape', ()))}"
                )
            return reduced.to(torch.float64).cpu().tolist()
        by_device: dict[torch.device, list[int]] = {}
        for i, v in enumerate(self._values):
            by_device.setdefault(v.device, []).append(i)
        for idx in by_device.values():
            host = torch.cat([self._values[i] for i in idx]).cpu().tolist()
            pos = 0
            for i in idx:
                n = self._values[i].numel()
                out[self._starts[i] : self._starts[i] + n] = host[pos : pos + n]
                pos += n
        return out


class _Evaluation:
    """Runs ``loss_fn`` on replayed state, natively or on the float64 shadow."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batch: Any, replay: ReplayState, kinks: bool) -> None:
        self.wrapper = _LossModule(model, loss_fn)
        self.batch = batch
        self.replay = replay
        names = {id(m): n for n, m in model.named_modules()}
        self.recorder = _BranchRecorder(names) if kinks else None
        self.loss_dtype = torch.float64
        with torch.no_grad():
            self.shadow = {
                f"model.{n}": p.detach().to(torch.float64).contiguous() if p.is_floating_point() else p.detach()
                for n, p in model.named_parameters()
            }
            self.buffers64 = {
                f"model.{n}": b.to(torch.float64) if b.is_floating_point() else b
                for n, b in replay.buffers.items()
            }
        self.batch64 = _cast_floats(batch, torch.float64)

    def _reset(self) -> None:
        _restore_attrs(self.replay.attrs)
        _restore_rng(self.replay.rng)

    def native(self) -> Tensor:
        """The unperturbed loss in the model's own dtype, replayed (no graph)."""
        return _native_loss(self.wrapper, self.batch, self.replay, grad=False).detach()

    def float64(
        self, params: Mapping[str, Tensor], kinks: _ProbeKinks | None = None
    ) -> tuple[Tensor, _Reference | None]:
        """The loss at ``params`` (float64). Without ``kinks`` it also records the
        reference branches (or None when kinks are off); with ``kinks`` the branches
        are compared with its reference and folded into it."""
        self._reset()
        state = dict(params)
        state.update({k: v.clone() for k, v in self.buffers64.items()})
        recorder = nullcontext() if self.recorder is None else self.recorder.compare_into(kinks)
        try:
            with torch.no_grad(), _default_dtype(torch.float64), _autocast(None), recorder:
                out = functional_call(self.wrapper, state, (self.batch64,), strict=False)
        except Exception as err:
            err.add_note(
                "gradwatch: raised while evaluating `loss_fn` on the float64 copy of the model; "
                "the model, its buffers, .grad and the RNG stream were restored."
            )
            raise
        signature = self.recorder.take_reference() if self.recorder is not None and kinks is None else None
        loss = _loss_tensor(out)
        self.loss_dtype = loss.dtype
        return loss.to(torch.float64), signature


def _native_loss(
    wrapper: _LossModule, batch: Any, replay: ReplayState, *, grad: bool, autocast: bool = True
) -> Tensor:
    """Replay ``loss_fn`` with the model's own parameters, on clones of the captured buffers
    (under the captured autocast state, or with autocast off)."""
    _restore_attrs(replay.attrs)
    _restore_rng(replay.rng)
    buffers = {f"model.{n}": b.clone() for n, b in replay.buffers.items()}
    with torch.set_grad_enabled(grad), _autocast(replay.autocast if autocast else None):
        return _loss_tensor(functional_call(wrapper, buffers, (batch,), strict=False))


def _loss_tensor(out: Any, name: str = "loss_fn") -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"`{name}` must return a scalar loss Tensor, got {type(out).__name__} {_short(out)}")
    if out.numel() != 1:
        raise ValueError(f"`{name}` must return a scalar loss, got a tensor of shape {tuple(out.shape)}")
    if not out.is_floating_point():
        raise ValueError(f"`{name}` must return a floating-point loss, got dtype {out.dtype}")
    return out.reshape(())


def _loss_value(name: str, value: Any) -> Tensor | float:
    if isinstance(value, Tensor):
        return _loss_tensor(value, name).detach()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"`{name}` must be a scalar Tensor or a float, got {type(value).__name__} {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _autograd_gradients(
    model: nn.Module, loss_fn: Callable, batch: Any, replay: ReplayState, params: dict[str, nn.Parameter]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run the training forward on cloned buffers and take ``torch.autograd.grad``."""
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    if not trainable:
        raise ValueError(
            f"`model` has no parameter with requires_grad=True to check ({len(params)} parameters, all frozen)"
        )
    loss = _native_loss(_LossModule(model, loss_fn), batch, replay, grad=True)
    if not bool(torch.isfinite(loss.detach())):
        raise ValueError(f"`loss_fn` must return a finite loss, got {loss.item()!r}")
    if not loss.requires_grad:
        raise ValueError("`loss_fn` returned a loss that does not require grad: no parameter reaches it")
    grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
    return loss.detach(), {n: g for n, g in zip(trainable, grads) if g is not None}


def _autocast_gaps(
    model: nn.Module, loss_fn: Callable, batch: Any, replay: ReplayState, grad_map: dict[str, Tensor],
    reduce: Callable[[Tensor], Tensor] | None,
) -> dict[str, Tensor]:
    """``grad - reference`` per tensor, where ``reference`` is autograd's gradient of the same
    replayed loss with autocast off (the same code in the parameters' own precision).

    A gradient computed under fp16/bf16 autocast differs from the exact one by rounding
    that cancellation in batch sums makes large for small elements. Each probe's
    tolerance gets ``|<gap, v>|``: the verdict then holds the gradient to the precision
    of the reference, which carries any bug in the backward code just as the autocast
    gradient does, so bugs stay visible while rounding does not raise alarms. The gap
    itself is judged per tensor (:func:`_judge_gap`), which catches a backward that only
    misbehaves in low precision. With ``reduce`` the gaps are averaged across processes
    (one collective of the gradient's size), as the gradient under test is.
    """
    params = dict(model.named_parameters())
    names = list(grad_map)
    loss = _native_loss(_LossModule(model, loss_fn), batch, replay, grad=True, autocast=False)
    if not loss.requires_grad:
        return {}
    with _autocast(None):  # on CPU the backward runs under the caller's autocast state
        reference = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    gaps = {
        n: grad_map[n].detach().to(torch.float64) - (0.0 if r is None else r.detach().to(torch.float64))
        for n, r in zip(names, reference)
    }
    if reduce is not None:
        flat = reduce(torch.cat([g.reshape(-1) for g in gaps.values()]))
        gaps = {n: part.view_as(g) for (n, g), part in zip(gaps.items(), flat.split([g.numel() for g in gaps.values()]))}
    return gaps


def _gap_norms(grad: Tensor, gap: Tensor, host: _HostValues) -> tuple[int, int]:
    """Host indices of ``||gap||`` and ``||reference||``."""
    return host.add(gap.norm()), host.add((grad.detach().to(torch.float64) - gap).norm())


def _judge_gap(t: TensorCheck, gap: float, scale: float, precision: str) -> TensorCheck:
    """Record the autocast gap ``gap / scale`` of a tensor; fail it when rounding cannot explain it.

    ``scale`` is ``||g_ref||`` plus the model's gradient RMS times ``sqrt(numel)``, so that
    a tensor whose true gradient is 0 (pure rounding noise in both) is not judged on
    noise.
    """
    ratio = gap / scale if scale > 0 else (0.0 if gap == 0 else math.inf)
    limit = _GAP_LIMIT[precision]
    if t.verdict != "pass" or not ratio > limit:
        return dataclasses.replace(t, precision_gap=ratio)
    reason = (
        f"the gradient computed under {precision} autocast differs from the same code's gradient without "
        f"autocast by {ratio:.2g} (relative), more than {precision} rounding explains (limit {limit:.2g}): a "
        "backward that misbehaves in low precision (such as a custom Function that ignores the GradScaler's "
        "scaling of grad_output, or a low-precision-only kernel)"
    )
    return dataclasses.replace(t, verdict="fail", reason=reason, precision_gap=ratio,
                               error_ratio=max(t.error_ratio, ratio / limit))


def _given_gradients(grads: str | Mapping[str, Tensor], params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    if grads == "existing":
        return {n: p.grad.detach() for n, p in params.items() if p.requires_grad and p.grad is not None}
    out = {}
    for name, g in grads.items():
        if name not in params:
            raise ValueError(f"`grads` names {name!r}, which is not a parameter of `model`")
        if not isinstance(g, Tensor):
            raise TypeError(f"`grads[{name!r}]` must be a Tensor, got {type(g).__name__}")
        if tuple(g.shape) != tuple(params[name].shape):
            raise ValueError(
                f"`grads[{name!r}]` must have the parameter's shape {tuple(params[name].shape)}, got {tuple(g.shape)}"
            )
        out[name] = g.detach()
    return out


def _names(names: Any, params: Mapping[str, nn.Parameter]) -> frozenset[str]:
    if isinstance(names, str) or not isinstance(names, Collection):
        raise ValueError(f"`names` must be None or a collection of parameter names, got {_short(names)}")
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"`names` must name parameters of `model`, got unknown {unknown!r}")
    return frozenset(names)


def _skip_reasons(params: dict[str, nn.Parameter], grad_map: dict[str, Tensor]) -> dict[str, str]:
    """Why each parameter without a usable gradient is skipped."""
    reasons = {}
    for name, p in params.items():
        if not p.requires_grad:
            reasons[name] = "frozen (requires_grad=False)"
        elif not p.is_floating_point():
            reasons[name] = f"not a floating-point parameter ({p.dtype})"
        elif name not in grad_map:
            reasons[name] = "no gradient in this step (unused by the loss, or .grad is None)"
        elif not grad_map[name].is_floating_point():
            reasons[name] = f"gradient is not floating-point ({grad_map[name].dtype})"
    return reasons


def _plan(grad_map: dict[str, Tensor], seed: int, coordinates: int, directions: int) -> dict[str, list]:
    """Probe specs per tensor, from one seeded host generator (no device RNG used)."""
    gen = torch.Generator().manual_seed(seed)
    plan: dict[str, list] = {}
    for name, g in grad_map.items():
        numel = g.numel()
        specs: list[tuple[str, int]] = [("coordinate", i) for i in _sample(numel, min(coordinates, numel), gen)]
        specs += [("direction", int(torch.randint(0, 2**62, (1,), generator=gen))) for _ in range(directions)]
        plan[name] = specs
    return plan


class _KinkRow(NamedTuple):
    """The kink record of one probe: device results and their host indices."""

    kinks: _ProbeKinks
    crossed: range
    margin: range
    replacement: bool


def _resample(
    ev: _Evaluation, grad_map: dict[str, Tensor], rows: dict[str, list], kink_log: dict[str, list], seed: int,
    budget: int, step: float, ref: _Reference, host: _HostValues, gaps: Mapping[str, Tensor] | None = None,
) -> None:
    """Replace coordinate probes that crossed a kink by fresh coordinates, up to ``budget``
    per tensor, drawn from a generator seeded by ``seed`` (deterministic given the seed).

    Each round costs one host transfer: the crossed flags of the previous round's
    coordinate probes, all tensors together; there are at most ``budget + 1`` rounds,
    since every round but the last draws a replacement.
    """
    gen = torch.Generator().manual_seed(seed ^ _RESAMPLE_SALT)
    taken = {name: {v for kind, v, _ in rs if kind == "coordinate"} for name, rs in rows.items()}
    left = dict.fromkeys(rows, budget)
    pending = {
        name: [k for (kind, _, _), k in zip(rows[name], kink_log[name]) if kind == "coordinate"] for name in rows
    }
    while any(pending.values()):
        round_host = _HostValues(host.reduce)  # under data parallelism every process takes the same decisions
        flags = {name: [round_host.add(k.kinks.any_crossed()) for k in ks] for name, ks in pending.items()}
        values = round_host.fetch()
        pending = {}
        for name, idx in flags.items():
            numel = grad_map[name].numel()
            n = min(sum(values[i] > 0 for i in idx), left[name], numel - len(taken[name]))
            if n <= 0:
                continue
            fresh = _sample_excluding(numel, n, gen, taken[name])
            left[name] -= n
            start = len(kink_log[name])
            rows[name] += _probe_tensor(ev, name, grad_map[name], [("coordinate", i) for i in fresh], step, ref,
                                        host, kink_log[name], replacement=True, gap=(gaps or {}).get(name))
            pending[name] = kink_log[name][start:]


def _sample_excluding(n: int, k: int, gen: torch.Generator, taken: set[int]) -> list[int]:
    """``k`` distinct integers in ``[0, n)`` not in ``taken`` (which is updated)."""
    chosen: list[int] = []
    while len(chosen) < k:
        if n - len(taken) <= 4 * k:
            free = [i for i in range(n) if i not in taken]
            order = torch.randperm(len(free), generator=gen)[: k - len(chosen)].tolist()
            picks = [free[i] for i in order]
        else:
            picks = torch.randint(0, n, (2 * k,), generator=gen).tolist()
        for i in picks:
            if i not in taken and len(chosen) < k:
                taken.add(i)
                chosen.append(i)
    return chosen


def _sample(n: int, k: int, gen: torch.Generator) -> list[int]:
    """``k`` distinct integers in ``[0, n)`` without materialising ``randperm(n)`` for large ``n``."""
    if k == 0:
        return []
    if n <= 4096 or 4 * k >= n:
        return torch.randperm(n, generator=gen)[:k].tolist()
    chosen: list[int] = []
    seen: set[int] = set()
    while len(chosen) < k:
        for i in torch.randint(0, n, (2 * k,), generator=gen).tolist():
            if i not in seen:
                seen.add(i)
                chosen.append(i)
                if len(chosen) == k:
                    break
    return chosen


def _probe_tensor(
    ev: _Evaluation, name: str, grad: Tensor, specs: list, step: float, ref: _Reference | None, host: _HostValues,
    kink_log: list | None = None, replacement: bool = False, gap: Tensor | None = None,
) -> list:
    """Evaluate every probe of one tensor at ±h and ±2h; returns host indices of the results.

    With a kink reference, one :class:`_KinkRow` per probe is appended to ``kink_log``.
    ``gap``: the autocast gradient minus the reference gradient (see :func:`_autocast_gaps`);
    its signed projection ``<gap, v>`` is recorded per probe.
    """
    key = f"model.{name}"
    theta = ev.shadow[key]
    rows = []
    for kind, value in specs:
        if kind == "coordinate":
            flat = theta.view(-1)
            orig = flat[value].clone()
            h = step * torch.clamp(orig.abs(), min=1.0)

            def perturbed(s: float) -> Mapping[str, Tensor]:
                flat[value] = orig + s * h
                return ev.shadow

            a = grad.detach().reshape(-1)[value].to(torch.float64)
            s_abs, vnorm = a.abs(), torch.ones((), dtype=torch.float64, device=a.device)
            gap_v = gap.reshape(-1)[value] if gap is not None else torch.zeros_like(a)
        else:
            gen = torch.Generator(device=theta.device).manual_seed(value)
            v = torch.randn(theta.shape, generator=gen, device=theta.device, dtype=torch.float64)
            h = step * torch.clamp(theta.pow(2).mean().sqrt(), min=1.0)

            def perturbed(s: float) -> Mapping[str, Tensor]:
                return {**ev.shadow, key: theta + (s * h) * v}

            gv = grad.detach().to(torch.float64) * v
            a, s_abs, vnorm = gv.sum(), gv.abs().sum(), v.norm()
            gap_v = (gap * v).sum() if gap is not None else torch.zeros_like(a)
            del gv
        losses = []
        kinks = _ProbeKinks(ref, theta.device) if ref is not None else None
        for s in (1.0, -1.0, 2.0, -2.0):
            loss, _ = ev.float64(perturbed(s), kinks and kinks.next_pass(margins=abs(s) == 2.0))
            losses.append(loss)
        kink = kinks.any_crossed() if kinks is not None else False
        if kinks is not None and kink_log is not None:
            kink_log.append(_KinkRow(kinks, host.extend(kinks.crossed), host.extend(kinks.margin), replacement))
        if kind == "coordinate":
            flat[value] = orig
            d1, d2 = (orig + h) - (orig - h), (orig + 2 * h) - (orig - 2 * h)  # the steps float64 really took
        else:
            d1, d2 = 2 * h, 4 * h
        n1 = (losses[0] - losses[1]) / d1
        n2 = (losses[2] - losses[3]) / d2
        lmax = torch.stack([x.abs() for x in losses]).max()
        rows.append((kind, value, [host.add(x) for x in (a, n1, n2, s_abs, vnorm, lmax, h, kink, gap_v)]))
    return rows


def _grad_stats(g: Tensor, host: _HostValues) -> tuple[int, int]:
    bad = ~torch.isfinite(g.detach()).reshape(-1)
    return host.add(bad.any()), host.add(bad.to(torch.uint8).argmax())


def _gradient_rms(grad_map: dict[str, Tensor], host: _HostValues) -> int:
    total = None
    count = 0
    for g in grad_map.values():
        g = g.detach()
        sq = torch.where(torch.isfinite(g), g, torch.zeros_like(g)).to(torch.float64).pow(2).sum()
        total = sq if total is None else total + sq.to(total.device)
        count += g.numel()
    return host.add((total / max(count, 1)).sqrt())


def _replay_problem(
    train: float | None, native: float | None, replayed: float, shadow_rtol: float, own: bool
) -> str | None:
    """Why the replay cannot be trusted, or None."""
    if train is not None and native is not None and not own:
        if not math.isfinite(native) or abs(native - train) > _REPLAY_RTOL * max(abs(train), abs(native)) + 1e-30:
            return (
                f"replayed loss {native!r} differs from the training loss {train!r}: the loss is not "
                "reproducible from the captured RNG and buffers (randomness outside torch's RNG, "
                "a loss_fn that differs from the loss that was backpropagated, or a scaled loss)"
            )
    reference = native if native is not None else train
    if reference is None:
        return None
    if abs(replayed - reference) > shadow_rtol * max(abs(reference), abs(replayed)) + 1e-12:
        return (
            f"float64 replay gives loss {replayed!r} but the model in its own precision gives {reference!r} "
            f"(relative tolerance {shadow_rtol:g}): the model does not behave the same on a float64 copy"
        )
    return None


def _grad_precision(grad: Tensor, replay: ReplayState, model: nn.Module, *, autocast: bool = True) -> str:
    """The precision the gradient was computed in: its dtype, autocast (unless ``autocast``
    is False: the precision without it), or TF32."""
    dtype = grad.dtype
    if dtype in (torch.float16, torch.bfloat16):
        return str(dtype).replace("torch.", "")
    enabled, autocast_dtype = replay.autocast.get(grad.device.type, (False, None))
    if enabled and autocast:
        return "bfloat16" if autocast_dtype == torch.bfloat16 else "float16"
    if dtype == torch.float32 and grad.device.type == "cuda":
        has_conv = any("Conv" in type(m).__name__ for m in model.modules())
        if torch.backends.cuda.matmul.allow_tf32 or (torch.backends.cudnn.allow_tf32 and has_conv):
            return "tf32"
    return "float64" if dtype == torch.float64 else "float32"


def _judge(
    name: str, shape: tuple[int, ...], rows: list, gstats: tuple[int, int], values: list[float], scale_idx: int,
    rtol: float,
) -> TensorCheck:
    any_bad, first_bad = (values[i] for i in gstats)
    probes = []
    atol = _ATOL_RATIO * rtol * values[scale_idx]
    nonfinite_probe = None
    for kind, value, idx in rows:
        a, n1, n2, s_abs, vnorm, lmax, h, kink, gap_v = (values[i] for i in idx)
        index = tuple(int(i) for i in np.unravel_index(value, shape)) if kind == "coordinate" else None
        error = abs(n1 - a)
        error_bar = abs(n1 - n2) / 3.0 + _LOSS_ROUNDING * lmax / h
        tolerance = rtol * max(s_abs, abs(n1)) + atol * vnorm + _ERROR_BAR_MULT * error_bar + _GAP_MULT * abs(gap_v)
        probe = Probe(
            kind=kind,
            index=index,
            direction_seed=None if kind == "coordinate" else value,
            autograd=a,
            numerical=n1,
            error=error,
            error_bar=error_bar,
            tolerance=tolerance,
            step=h,
            kink=bool(kink),
        )
        probes.append(probe)
        if nonfinite_probe is None and not all(math.isfinite(x) for x in (a, n1, n2)):
            nonfinite_probe = probe
    if any_bad:
        where = "[" + ", ".join(str(int(i)) for i in np.unravel_index(int(first_bad), shape)) + "]"
        return TensorCheck(name, shape, "nonfinite", probes=tuple(probes),
                           reason=f"non-finite gradient, first at '{name}'{where}")
    if nonfinite_probe is not None:
        return TensorCheck(name, shape, "nonfinite", probes=tuple(probes),
                           reason=f"non-finite perturbed loss at '{name}'{nonfinite_probe.where}")
    judged = [p for p in probes if not p.kink]
    if not judged:
        return TensorCheck(name, shape, "kink", probes=tuple(probes),
                           reason="every probe crossed a kink of a non-smooth op")
    num = np.array([p.numerical for p in judged])
    ana = np.array([p.autograd for p in judged])
    bars = np.array([p.error_bar for p in judged])
    denom = float(np.linalg.norm(num) + np.linalg.norm(ana))
    rel = float(np.linalg.norm(num - ana)) / denom if denom > 0 else 0.0
    bar = float(np.linalg.norm(bars)) / denom if denom > 0 else 0.0
    ratio = max(p.error / p.tolerance if p.tolerance > 0 else (math.inf if p.error > 0 else 0.0) for p in judged)
    verdict = "fail" if any(p.failed for p in judged) else "pass"
    return TensorCheck(name, shape, verdict, rel_error=rel, error_bar=bar, error_ratio=float(ratio),
                       probes=tuple(probes))


def _attach_kinks(
    tc: TensorCheck, log: list[_KinkRow], ref: _Reference | None, values: list[float], near: float
) -> TensorCheck:
    """Add the kink events of each probe (host values), their margins and the replacements."""
    if ref is None or not log or len(log) != len(tc.probes):
        return tc
    probes, events = [], []
    for i, (probe, row) in enumerate(zip(tc.probes, log)):
        found = []
        stop = len(ref) if row.kinks.diverged is None else row.kinks.diverged
        for k in range(stop):
            crossed, m = values[row.crossed[k]] > 0, values[row.margin[k]]
            if crossed or m != math.inf:  # this op call was moved by the probe
                margin = m if m != math.inf else math.nan  # crossed, margin not computable
                found.append(KinkEvent(tc.name, i, k, ref.modules[k], ref.names[k], ref.kinds[k], margin, crossed,
                                       at_kink=m == 0.0, near=crossed or margin < near))
        if row.kinks.diverged is not None:  # the sequence of non-smooth ops changed (control flow)
            k, known = row.kinks.diverged, row.kinks.diverged < len(ref)
            op = row.kinks.diverged_op or (ref.names[k] if known else "?")
            found.append(KinkEvent(tc.name, i, k, ref.modules[k] if known else None, f"{op} (op sequence changed)",
                                   "discontinuity", math.nan, True, at_kink=False, near=True))
        margins = [e.margin for e in found if not math.isnan(e.margin)]
        probes.append(dataclasses.replace(
            probe, kink_margin=min(margins, default=math.inf), at_kink=any(e.at_kink for e in found),
            replacement=row.replacement,
        ))
        events += found
    return dataclasses.replace(tc, probes=tuple(probes), kink_events=tuple(events),
                               resampled=sum(r.replacement for r in log))
