"""The check engine: central differences against autograd's gradient.

:func:`check` knows nothing about training loops, Lightning or TensorBoard. Adapters
decide when to call it and which gradient to compare; it returns a frozen
:class:`~gradwatch.report.Report`.

Numerics (see ``shared/design.md`` §3 and the README):

* ``precision="float64"`` evaluates every perturbed loss on a float64 copy of the
  parameters, buffers and floating inputs (``torch.func.functional_call``), from the
  RNG state and buffers the training forward started from, so dropout masks and batch
  statistics match. ``"native"`` evaluates in the model's own dtype with a step scaled
  to it; ``"auto"`` takes float64 when the copy fits ``max_shadow_bytes`` and the model
  runs in float64, native otherwise.
* Each probe takes four evaluations, ``θ ± h·v`` and ``θ ± 2h·v``. The numerical value
  is the central difference ``D(h)`` in float64 and the five-point value
  ``(4·D(h) - D(2h)) / 3`` natively. Its error bar adds the truncation estimate
  ``|D(h) - D(2h)| / 3`` and the rounding of the loss, measured from the fourth
  difference of the same evaluations (whose smooth part cancels).
* In float64 the engine also takes autograd's gradient of the float64 copy, the
  *reference*: the same backward code (custom Functions, module hooks) run without
  low-precision rounding. Two tests follow, and a tensor fails if either does:

  - the code test, per probe: ``|numerical - autograd| <= 3·error_bar +
    1e-6·(‖g_ref∘v‖ + G_ref·‖v‖) + |autograd - reference|``: a wrong backward formula
    is wrong in float64 too, so it is judged at float64 accuracy, while the measured
    precision gap ``|autograd - reference|`` is never mistaken for a bug;
  - the precision test, per tensor: ``‖g - g_ref‖ <= rtol·‖g_ref‖ + rtol/2·G_ref·√n``,
    with ``rtol`` from :data:`RTOL` for the precision the gradient was computed in
    (1e-4 for float32, looser under TF32 and bf16/fp16 autocast). It catches what only
    the training gradient has: tensor hooks, code that edits ``.grad``, a kernel
    wrong only in low precision.

  Without a reference (native precision, or a backward that fails in float64) the
  code test uses ``rtol·‖g∘v‖ + rtol/2·G·‖v‖`` instead. ``‖g∘v‖`` (the root sum of
  squares of the terms of ``<g, v>``) never cancels, so a direction whose terms cancel
  raises no false alarm, and ``G`` (the RMS of the model's gradient) is the floor for a
  tensor whose true gradient is 0, such as a conv bias before BatchNorm.
* Probes whose perturbed passes took another branch of a non-smooth op than the
  unperturbed pass are marked as kinks and never count towards a failure. Crossed
  coordinates are replaced by fresh ones (``kink_resamples`` per tensor), and every
  non-smooth op a probe moved is reported with its module and margin
  (:mod:`gradwatch.kinks`).
* A failing tensor is localised: a failing coordinate names its element, a precision
  gap its largest element, and a failing direction is bisected over the flat index
  (rows first, then columns) and confirmed by a coordinate probe.

All probe arithmetic stays on the model's device; results reach the host in one
transfer per check (plus one per bisection level when a direction fails).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Collection, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from gradwatch._validate import (
    _callable,
    _kink_options,
    _module,
    _one_of,
    _positive_float,
    _positive_int,
    _probe_options,
    _seed,
)
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

__all__ = ["check", "DEFAULT_STEP", "DEFAULT_SHADOW_BYTES", "PRECISIONS", "RTOL"]

#: Base step for float64 central differences, ``≈ eps64^(1/3)``; scaled by ``max(1, |θ|)``.
#: Native evaluation uses ``eps^(1/3)`` of the parameter's dtype.
DEFAULT_STEP = 6e-6
#: Largest float64 copy of parameters and buffers ``precision="auto"`` makes (2 GiB).
DEFAULT_SHADOW_BYTES = 2 * 2**30
#: Where perturbed losses are evaluated.
PRECISIONS = ("float64", "native", "auto")
#: Relative tolerance by the precision the gradient was computed in (precision test,
#: and the code test when there is no float64 reference).
RTOL = {
    "float64": 1e-7,
    "float32": 1e-4,
    "tf32": 1e-2,
    "float16": 0.1,
    "bfloat16": 0.2,
}
#: Code-test tolerance against the float64 reference, relative and absolute (× G_ref).
_REF_RTOL = 1e-6
#: Absolute tolerance as a fraction of ``rtol`` times the gradient RMS.
_ATOL_RATIO = 0.5
#: Multiple of the numerical error bar added to the tolerance.
_ERROR_BAR_MULT = 3.0
#: Smallest loss rounding assumed, in units of the evaluation dtype's eps × |L|.
_ROUNDING_FLOOR = 8.0
#: Native replay vs training loss: relative slack (nondeterministic kernels).
_REPLAY_RTOL = 1e-5
#: Float64 replay vs native loss, relative slack per training precision.
_SHADOW_RTOL = {"float64": 1e-9, "float32": 1e-3, "tf32": 1e-2, "float16": 5e-2, "bfloat16": 5e-2}
#: Noise of the fourth difference L(2h)+L(-2h)-4L(h)-4L(-h)+6L(0) in units of the loss noise.
_FOURTH_DIFF_NOISE = math.sqrt(70.0)

_GRADS = ("autograd", "existing")
_EVALUATIONS = ("auto", "batched", "sequential")
#: Batched and sequential unperturbed losses must agree to this relative tolerance.
_BATCH_RTOL = 64 * torch.finfo(torch.float64).eps
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
    step: float | None = None,
    precision: str = "auto",
    max_shadow_bytes: int = DEFAULT_SHADOW_BYTES,
    kinks: bool = True,
    kink_resamples: int = 4,
    near_kink_margin: float = 10.0,
    localize: bool = True,
    richardson: bool = True,
    reference: bool = True,
    replay: ReplayState | None = None,
    train_loss: Tensor | float | None = None,
    names: Collection[str] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
    evaluation: str = "auto",
) -> Report:
    """Compare the gradient of ``loss_fn(model, batch)`` with central differences.

    Args:
        model: The module whose parameters are checked. Its train/eval modes are used
            as they are.
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss tensor.
        batch: Anything ``loss_fn`` accepts; floating tensors inside tuples, lists,
            dicts and namedtuples are cast to float64 for float64 evaluation.
        seed: Seed of the probe sampler (coordinates and directions). ``None`` draws
            one at random; the report records it, so passing it again reproduces the
            check.
        grads: ``"autograd"``: compute the gradient here, leaving every ``.grad``
            untouched. ``"existing"``: compare with the current ``.grad``. A mapping
            from parameter name to tensor: compare with those tensors.
        coordinates: Random elements probed per tensor, drawn without replacement.
        directions: Random Gaussian directions over the whole tensor probed per
            tensor; they catch errors confined to a few elements. Keep at least 1
            (0 only for targeted tests of single coordinates; the adapters require 1).
        step: Base step ``h``; ``None`` takes 6e-6 in float64 and ``eps^(1/3)`` of
            the parameter dtype natively. It is scaled by ``max(1, |θ|)``.
        precision: ``"float64"``, ``"native"`` or ``"auto"`` (see the module notes).
        max_shadow_bytes: Largest float64 copy of parameters and buffers ``"auto"``
            makes before it evaluates natively.
        kinks: Record branches of non-smooth ops and exclude probes that cross one;
            the report lists every op a probe moved as a
            :class:`~gradwatch.report.KinkEvent` with its module and margin.
        kink_resamples: Replacement coordinates drawn per tensor, at most, for
            coordinate probes that crossed a kink (one host transfer per round of
            replacements). 0 disables resampling.
        near_kink_margin: A kink event with a margin below this is "near" (the
            margin is the distance to the kink in units of the ``±2h`` move).
        localize: Narrow a failing tensor down to an element (extra evaluations, only
            when something fails).
        richardson: Evaluate every probe at ``±2h`` too: the truncation estimate of the
            error bar and the measured rounding noise come from those passes. False
            halves the evaluations per probe (the adapters' smallest budgeted check);
            the error bar is then the rounding floor alone, which float64's tiny step
            keeps honest, and kinks are recorded as crossings without margins.
        reference: In float64 evaluation, also take autograd's gradient of the float64
            copy (the code test and the precision test, see above). False saves that
            backward (the adapters' smallest budgeted check): probes are then judged
            against the gradient itself with the tolerance of its precision. With
            ``richardson`` also False and sequential evaluation, the unperturbed float64
            pass is skipped too: each probe's ``+h`` pass is the kink reference of its
            ``-h`` pass, and the midpoint of the first probe's two losses is the replayed
            loss (``O(h²)`` from it; not compared with the training loss when that probe
            crossed a kink).
        replay: State captured with :func:`gradwatch.capture` right before the
            training forward. With ``grads="autograd"`` it must be ``None``; otherwise
            ``None`` means "replay from the current state".
        train_loss: Loss of the training forward, compared with the replayed loss
            before the check is trusted. Only with ``grads`` other than "autograd".
        names: ``named_parameters()`` names of the tensors to check; the others are
            reported ``skipped``. ``None`` checks every tensor with a gradient. The
            adapters use it to spread checks over steps within an overhead budget.
        reduce: For data-parallel training: averages a 1-D float64 device tensor
            across processes (every process must call ``check`` with the same
            ``seed`` and probe options, on its local batch). It is applied once per
            host transfer to every value the check collects (losses, directional
            derivatives, kink flags and margins; the float64 reference gradient too), so each process judges the mean loss
            against the mean gradient, which is what data-parallel ``.grad`` holds, and
            all processes take the same kink resampling decisions and return the same
            verdicts.
        evaluation: How the perturbed losses are evaluated. ``"batched"``: the 4
            evaluations of a probe in one call, ``torch.func.vmap`` over the stacked
            perturbed copies of the tensor (``randomness="same"``, so dropout masks
            match). The first batched call also evaluates the unperturbed tensor and
            must reproduce the sequential loss within 64 eps; models that cannot be
            vmapped (BatchNorm updating its running statistics, a custom
            ``autograd.Function`` without a vmap rule, data-dependent control flow) or
            do not reproduce fall back to ``"sequential"`` automatically. Kink
            recording needs one pass per evaluation, every process must run the same
            forwards with ``reduce``, and native precision keeps its rounded points,
            so batching needs ``kinks=False``, ``reduce=None`` and float64 evaluation.
            ``"auto"``: batched when those hold, else sequential.
            ``report.evaluation`` says which path ran and ``report.evaluation_reason`` why.

    Returns:
        A :class:`~gradwatch.report.Report`. ``report.ok`` is False when a tensor
        failed or held non-finite values; a replay that does not reproduce
        ``train_loss`` gives an unreliable report with no verdicts.

    Raises:
        TypeError: ``model`` is no module, ``loss_fn`` is not callable or returns no
            tensor, or a ``grads`` mapping holds something else than tensors.
        ValueError: Bad argument values, a non-scalar loss, or no parameter with a
            gradient to check.

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
    _probe_options(coordinates, directions, kinks, min_directions=0)
    _kink_options(kink_resamples, near_kink_margin)
    if reduce is not None:
        _callable("reduce", reduce)
    _one_of("evaluation", evaluation, _EVALUATIONS)
    if evaluation == "batched" and (kinks or reduce is not None):
        raise ValueError(
            "`evaluation='batched'` cannot record kinks (one pass per evaluation is needed) nor run with `reduce` "
            f"(every process must run the same forwards); pass kinks=False and reduce=None or evaluation='auto', "
            f"got evaluation={evaluation!r}, kinks={kinks!r}, reduce={reduce!r}"
        )
    if step is not None:
        _positive_float("step", step)
    _one_of("precision", precision, PRECISIONS)
    _positive_int("max_shadow_bytes", max_shadow_bytes)
    if not isinstance(localize, bool):
        raise ValueError(f"`localize` must be a bool, got {localize!r}")
    if not isinstance(richardson, bool):
        raise ValueError(f"`richardson` must be a bool, got {richardson!r}")
    if not isinstance(reference, bool):
        raise ValueError(f"`reference` must be a bool, got {reference!r}")
    _grads_option(grads)
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
        every = {n: g for n, g in grad_map.items() if n not in skipped}  # sets the probes and tolerances
        if names is not None:
            skipped.update({n: _NOT_SELECTED for n in params if n not in names and n not in skipped})
        grad_map = {n: g for n, g in every.items() if n not in skipped}
        if not grad_map:
            raise ValueError(
                "`model` has no parameter with a gradient to check: "
                + "; ".join(f"{n}: {r}" for n, r in skipped.items())
                if skipped
                else "`model` has no parameters"
            )
        first_grad = next(iter(grad_map.values()))
        grad_precision = _grad_precision(first_grad, replay, model)
        mode, mode_reason = _choose_precision(precision, model, replay, max_shadow_bytes)
        how = evaluation
        # The smallest check (±h only, no reference gradient, sequential) skips the
        # unperturbed pass: each probe's +h pass is its own kink reference, and the
        # midpoint of its ±h losses stands for the unperturbed loss (O(h²) away).
        own = not richardson and not reference and coordinates + directions > 0
        plan = _plan(every, seed, coordinates, directions)

        def evaluate(mode: str) -> tuple:
            ev = _Evaluation(model, loss_fn, batch, replay, kinks, mode, how, reduce is not None, richardson)
            ev.own_reference = own and ev.batched is False
            loss0, signature, ref_grads = ev.base(every, reference)
            ev.loss0 = loss0
            if ref_grads is not None and reduce is not None:  # data parallel: the mean over ranks, as .grad
                ref_grads = _reduced(ref_grads, reduce)
            kink_log: dict[str, list] = {name: [] for name in grad_map}
            refs = {name: ref_grads.get(name) if ref_grads is not None else None for name in grad_map}
            rows = {
                name: _probe_tensor(ev, name, grad_map[name], refs[name], plan[name], step, signature, loss0,
                                    host, kink_log[name])
                for name in grad_map if not ev.lossy  # else unreliable: no point in probing
            }
            return ev, loss0, signature, ref_grads, kink_log, refs, rows

        try:
            evaluation, loss0, signature, ref_grads, kink_log, refs, rows = evaluate(mode)
        except Exception as err:
            if precision != "auto" or mode != "float64":
                raise
            mode, mode_reason = "native", f"float64 evaluation raised {type(err).__name__}: {err}"
            host = _HostValues(reduce)  # drop what the float64 attempt queued
            evaluation, loss0, signature, ref_grads, kink_log, refs, rows = evaluate(mode)
        native_loss = train_loss if grads == "autograd" else evaluation.native()
        probe = not evaluation.lossy
        if probe and (signature is not None or evaluation.own_reference and kinks) and kink_resamples:
            _resample(evaluation, grad_map, refs, rows, kink_log, seed, kink_resamples, step, signature, loss0, host)
        gstats = {name: _grad_stats(g, host) for name, g in grad_map.items()}
        gaps = {name: _gap(grad_map[name], ref_grads[name], host) for name in grad_map} if ref_grads else {}
        scale = _gradient_rms(every, host)
        ref_scale = _gradient_rms(ref_grads, host) if ref_grads else None
        if loss0 is None:  # own-reference probes: the first probe's midpoint stands for L(θ)
            first = next(idx for rs in rows.values() for _, _, idx in rs)
            i_loss0, i_mid_kink = first["mid"], first["kink"]
        else:
            i_loss0, i_mid_kink = host.add(loss0), None
        i_native = host.add(native_loss) if isinstance(native_loss, Tensor) else None
        i_train = host.add(train_loss) if isinstance(train_loss, Tensor) else None
        values = host.fetch()

        train = values[i_train] if i_train is not None else train_loss
        native = values[i_native] if i_native is not None else None
        replayed = values[i_loss0]
        reason = None
        nonfinite = _nonfinite_loss(train, replayed)
        if nonfinite is None:
            # a midpoint across a kink is O(h·slope) from L(θ), not O(h²): only the native replay is
            # compared then (that probe is not judged anyway)
            across = i_mid_kink is not None and values[i_mid_kink] > 0
            reason = _replay_problem(train, native, None if across else replayed, _SHADOW_RTOL[grad_precision],
                                     grads == "autograd", mode)
            if reason is None and evaluation.lossy:
                reason = (
                    f"`loss_fn` returned a {_dtype_name(evaluation.loss_dtype)} loss on the float64 copy of the "
                    "model: something casts to a lower precision "
                    "(such as .float()), so central differences would measure rounding noise; keep the loss in "
                    "the dtype of its inputs"
                )
        noise = _loss_noise(rows, values, evaluation, replayed)
        judge = _Judge(
            reduce=reduce,
            values=values,
            noise=noise,
            rtol=RTOL[grad_precision],
            scale=values[scale],
            ref_scale=values[ref_scale] if ref_scale is not None else None,
            native=mode == "native",
        )
        tensors: dict[str, TensorCheck] = {}
        for name, p in params.items():
            shape = tuple(p.shape)
            if name in skipped:
                tensors[name] = TensorCheck(name, shape, "skipped", reason=skipped[name])
            elif nonfinite is not None:
                tensors[name] = TensorCheck(name, shape, "nonfinite", reason=nonfinite)
            elif reason is not None:
                tensors[name] = TensorCheck(name, shape, "skipped", reason="check unreliable: " + reason)
            else:
                tensors[name] = judge.tensor(name, shape, rows[name], gstats[name], gaps.get(name))
                tensors[name] = _attach_kinks(tensors[name], kink_log[name], values, near_kink_margin)
                if localize and tensors[name].verdict == "fail":
                    located = _locate(evaluation, judge, tensors[name], grad_map[name], refs[name], step, signature, loss0)
                    if located is not None:
                        tensors[name] = dataclasses.replace(tensors[name], located=located)
    return Report(
        tensors=tensors,
        seed=seed,
        precision=mode,
        precision_reason=mode_reason,
        reference=ref_grads is not None,
        grad_dtype=_dtype_name(first_grad.dtype),
        grad_precision=grad_precision,
        train_loss=train,
        replay_loss=replayed,
        reliable=reason is None,
        reason=reason,
        seconds=time.perf_counter() - started,
        evaluation="batched" if evaluation.batched else "sequential",
        evaluation_reason=evaluation.batch_reason,
    )


def _reduced(tensors: dict[str, Tensor], reduce: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Apply ``reduce`` to every tensor of ``tensors`` in one call (one collective)."""
    flat = _apply_reduce(reduce, torch.cat([t.reshape(-1) for t in tensors.values()]))
    parts = flat.split([t.numel() for t in tensors.values()])
    return {n: part.view_as(t) for (n, t), part in zip(tensors.items(), parts)}


def _apply_reduce(reduce: Callable[[Tensor], Tensor], stacked: Tensor) -> Tensor:
    reduced = reduce(stacked)
    if not isinstance(reduced, Tensor) or reduced.shape != stacked.shape:
        raise TypeError(
            f"`reduce` must return a tensor of shape {tuple(stacked.shape)}, got {type(reduced).__name__} "
            f"{tuple(getattr(reduced, 'shape', ()))}"
        )
    return reduced


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _choose_precision(precision: str, model: nn.Module, replay: ReplayState, budget: int) -> tuple[str, str]:
    """The evaluation precision and why."""
    if precision == "float64":
        return "float64", "requested"
    if precision == "native":
        return "native", "requested"
    tensors = [p for p in model.parameters()] + list(replay.buffers.values())
    size = sum(t.numel() * 8 for t in tensors if t.is_floating_point())
    if size > budget:
        return "native", f"the float64 copy would take {size / 2**20:.0f} MiB > max_shadow_bytes {budget / 2**20:.0f} MiB"
    return "float64", f"the float64 copy takes {size / 2**20:.2f} MiB <= max_shadow_bytes {budget / 2**20:.0f} MiB"


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
            reduced = _apply_reduce(self.reduce, stacked)
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
    """Runs ``loss_fn`` on replayed state, in float64 or in the model's own precision."""

    def __init__(
        self, model: nn.Module, loss_fn: Callable, batch: Any, replay: ReplayState, kinks: bool, mode: str,
        how: str = "sequential", reduced: bool = False, richardson: bool = True,
    ) -> None:
        self.wrapper = _LossModule(model, loss_fn)
        self.signs = _SIGNS if richardson else _SIGNS[:2]  # the points of every probe
        # batched: None until the first batched call succeeds (True) or fails (False)
        self.batched: bool | None = False
        if how == "sequential":
            self.batch_reason: str | None = "requested (evaluation='sequential')"
        elif kinks:
            self.batch_reason = "kink recording needs one forward pass per evaluation (kinks=True)"
        elif reduced:
            self.batch_reason = "data-parallel check (reduce): every process runs the same sequential forwards"
        elif mode != "float64":
            self.batch_reason = "native precision evaluates sequentially"
        else:
            self.batched, self.batch_reason = None, None
        self.loss0: Tensor | None = None  # the sequential unperturbed loss, set by check()
        self.own_reference = False  # no unperturbed pass: each probe's +h pass is its kink reference
        self.batch = batch
        self.replay = replay
        self.mode = mode
        # without Richardson passes (the smallest budgeted check) crossings are recorded, margins are not
        names = {id(m): n for n, m in model.named_modules()}
        self.recorder = _BranchRecorder(names, margins=richardson) if kinks else None
        self.float64 = mode == "float64"
        self.loss_dtype: torch.dtype | None = None
        with torch.no_grad():
            if self.float64:
                self.shadow = {
                    f"model.{n}": p.detach().to(torch.float64).contiguous() if p.is_floating_point() else p.detach()
                    for n, p in model.named_parameters()
                }
                self.buffers = {
                    f"model.{n}": b.to(torch.float64) if b.is_floating_point() else b
                    for n, b in replay.buffers.items()
                }
                self.inputs = _cast_floats(batch, torch.float64)
            else:  # the parameters themselves: perturbed points are always new tensors
                self.shadow = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
                self.buffers = {f"model.{n}": b for n, b in replay.buffers.items()}
                self.inputs = batch

    @property
    def lossy(self) -> bool:
        """True when the float64 evaluation returned a loss below float64."""
        return self.float64 and self.loss_dtype not in (None, torch.float64)

    def step(self, dtype: torch.dtype) -> float:
        """Default base step: 6e-6 in float64, ``eps^(1/3)`` of ``dtype`` natively."""
        return DEFAULT_STEP if self.float64 else float(torch.finfo(dtype).eps) ** (1 / 3)

    def native(self) -> Tensor:
        """The unperturbed loss in the model's own dtype, replayed (no graph)."""
        return _native_loss(self.wrapper, self.batch, self.replay, grad=False).detach()

    def _context(self):
        if self.float64:
            return _default_dtype(torch.float64), _autocast(None)
        return nullcontext(), _autocast(self.replay.autocast)

    def __call__(
        self, params: Mapping[str, Tensor], *, kinks: _ProbeKinks | None = None, grad: bool = False,
        record: bool = True,
    ) -> tuple[Tensor, _Reference | None]:
        """The loss at ``params``. Without ``kinks`` it also records the reference
        branches (None when kinks are off or ``record`` is False); with ``kinks`` the
        branches are compared with its reference and folded into it."""
        _restore_attrs(self.replay.attrs)
        _restore_rng(self.replay.rng)
        state = dict(params)
        state.update({k: v.clone() for k, v in self.buffers.items()})
        dtype_ctx, autocast_ctx = self._context()
        recording = self.recorder is not None and (record or kinks is not None)
        recorder = self.recorder.compare_into(kinks) if recording else nullcontext()
        try:
            with torch.set_grad_enabled(grad), dtype_ctx, autocast_ctx, recorder:
                out = functional_call(self.wrapper, state, (self.inputs,), strict=False)
        except Exception as err:
            where = "on the float64 copy of the model" if self.float64 else "in the model's own precision"
            err.add_note(
                f"gradwatch: raised while evaluating `loss_fn` {where}; "
                "the model, its buffers, .grad and the RNG stream were restored."
            )
            raise
        signature = self.recorder.take_reference() if recording and kinks is None else None
        loss = _loss_tensor(out)
        self.loss_dtype = loss.dtype
        return loss, signature

    def base(
        self, grad_map: Mapping[str, Tensor], reference: bool = True
    ) -> tuple[Tensor, Any, dict[str, Tensor] | None]:
        """Unperturbed loss, its signature, and in float64 (with ``reference``) the
        reference gradient."""
        if self.own_reference:
            return None, None, None
        if not (self.float64 and reference):
            loss, signature = self(self.shadow)
            return loss.detach().to(torch.float64), signature, None
        leaves = {f"model.{n}": self.shadow[f"model.{n}"].detach().requires_grad_(True) for n in grad_map}
        loss, signature = self({**self.shadow, **leaves}, grad=True)
        reference = None
        if loss.requires_grad and loss.dtype == torch.float64:
            try:
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            except RuntimeError:  # a backward without float64 support: judge against the gradient itself
                grads = None
            if grads is not None:
                reference = {
                    n: torch.zeros_like(leaves[f"model.{n}"]) if g is None else g.detach()
                    for n, g in zip(grad_map, grads)
                }
        return loss.detach().to(torch.float64), signature, reference

    def losses_batched(self, key: str, points: list[Tensor]) -> Tensor | None:
        """The losses at ``points`` (values of ``self.shadow[key]``) from one vmapped call,
        or None when batched evaluation is off or this model cannot be vmapped: the
        first call decides, and its error or mismatch becomes :attr:`batch_reason`."""
        if self.batched is False:
            return None
        theta = self.shadow[key]
        verify = self.batched is None  # the first call also evaluates θ, to compare with loss0
        stacked = torch.stack([*points, theta] if verify else points)
        try:
            out = self._vmapped(key, stacked)
        except Exception as err:
            if self.batched:  # it worked before: a real error of loss_fn
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            return self._fall_back(f"vmap failed: {type(err).__name__}: {first[:160]}")
        del stacked
        if verify:
            out, unperturbed = out[:-1], out[-1]
            gap = float((unperturbed - self.loss0).abs())  # one host transfer per check
            if not gap <= _BATCH_RTOL * float(self.loss0.abs()):
                return self._fall_back(
                    f"the vmapped loss at the unperturbed parameters differs from the sequential one by {gap:.3g} "
                    "(randomness or state that vmap does not replay)"
                )
            self.batched = True
        return out

    def _fall_back(self, reason: str) -> None:
        self.batched = False
        self.batch_reason = reason + "; evaluated sequentially"
        return None

    def _vmapped(self, key: str, stacked: Tensor) -> Tensor:
        _restore_attrs(self.replay.attrs)
        _restore_rng(self.replay.rng)
        base = dict(self.shadow)
        base.update({k: v.clone() for k, v in self.buffers.items()})

        def one(theta: Tensor) -> Tensor:
            state = dict(base)
            state[key] = theta
            return _loss_tensor(functional_call(self.wrapper, state, (self.inputs,), strict=False)).to(torch.float64)

        dtype_ctx, autocast_ctx = self._context()
        with torch.no_grad(), dtype_ctx, autocast_ctx, warnings.catch_warnings(), _quiet_vmap_fallback():
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            return torch.func.vmap(one, randomness="same")(stacked)


@contextmanager
def _quiet_vmap_fallback() -> Iterator[None]:
    """Silence vmap's fallback warning for ops without a batching rule (such as
    ``torch.library.custom_op`` ops, which vmap evaluates one sample at a time): called
    from inside a custom op's dispatch it is printed by C++ to stderr on every call, where
    the ``warnings`` filter cannot catch it. Re-enabled afterwards (torch's default)."""
    toggle = getattr(torch._C._functorch, "_set_vmap_fallback_warning_enabled", None)
    if toggle is None:
        yield
        return
    toggle(False)
    try:
        yield
    finally:
        toggle(True)


def _native_loss(wrapper: _LossModule, batch: Any, replay: ReplayState, *, grad: bool) -> Tensor:
    """Replay ``loss_fn`` with the model's own parameters, on clones of the captured buffers."""
    _restore_attrs(replay.attrs)
    _restore_rng(replay.rng)
    buffers = {f"model.{n}": b.clone() for n, b in replay.buffers.items()}
    with torch.set_grad_enabled(grad), _autocast(replay.autocast):
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
    if not loss.requires_grad:
        raise ValueError("`loss_fn` returned a loss that does not require grad: no parameter reaches it")
    grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
    return loss.detach(), {n: g for n, g in zip(trainable, grads) if g is not None}


def _grads_option(grads: Any) -> str | Mapping[str, Tensor]:
    """Validate a ``grads`` argument: "autograd", "existing" or a mapping name -> Tensor."""
    if isinstance(grads, str):
        return _one_of("grads", grads, _GRADS)
    if not isinstance(grads, Mapping):
        raise ValueError(f"`grads` must be 'autograd', 'existing' or a mapping name -> Tensor, got {grads!r}")
    return grads


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
    ev: _Evaluation, grad_map: dict[str, Tensor], refs: Mapping[str, Tensor | None], rows: dict[str, list],
    kink_log: dict[str, list], seed: int, budget: int, step: float | None, ref: _Reference, loss0: Tensor,
    host: _HostValues,
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
            rows[name] += _probe_tensor(ev, name, grad_map[name], refs[name], [("coordinate", i) for i in fresh], step,
                                        ref, loss0, host, kink_log[name], replacement=True)
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


def _direction(theta: Tensor, seed: int) -> Tensor:
    """The Gaussian direction of a direction probe, in float64 on the parameter's device."""
    gen = torch.Generator(device=theta.device).manual_seed(seed)
    return torch.randn(theta.shape, generator=gen, device=theta.device, dtype=torch.float64)


class _Line:
    """Points ``θ + s·h·v`` of one probe, as the evaluation dtype can hold them."""

    def __init__(self, theta: Tensor, kind: str, value: Any, base_step: float) -> None:
        self.theta = theta
        if kind == "coordinate":
            self.index = value
            self.orig = theta.reshape(-1)[value].to(torch.float64)
            self.h = base_step * torch.clamp(self.orig.abs(), min=1.0)
            self.v = None
        else:
            self.v = value
            self.theta64 = theta.to(torch.float64)  # no copy in float64 evaluation
            self.h = base_step * torch.clamp(self.theta64.pow(2).mean().sqrt(), min=1.0)

    def point(self, s: float) -> Tensor:
        if self.v is None:
            out = self.theta.clone()
            out.view(-1)[self.index] = (self.orig + s * self.h).to(self.theta.dtype)
            return out
        return (self.theta64 + (s * self.h) * self.v).to(self.theta.dtype)

    def run(self, ev: _Evaluation, key: str, s: float, kinks: _ProbeKinks | None) -> tuple[Tensor, Tensor]:
        point = self.point(s)
        # margins in the ±2h passes (those that move furthest towards a kink); none without them
        pass_kinks = kinks.next_pass(margins=abs(s) == 2.0) if kinks is not None else None
        loss, _ = ev({**ev.shadow, key: point}, kinks=pass_kinks, record=False)
        return loss.to(torch.float64), point

    def record(self, ev: _Evaluation, key: str) -> tuple[Tensor, Tensor, _Reference | None]:
        """The ``+h`` pass, recorded as the kink reference of the probe's other pass."""
        point = self.point(1.0)
        loss, signature = ev({**ev.shadow, key: point})
        return loss.to(torch.float64), point, signature


def _probe_tensor(
    ev: _Evaluation, name: str, grad: Tensor, g_ref: Tensor | None, specs: list, step: float | None,
    ref: _Reference | None, loss0: Tensor, host: _HostValues, kink_log: list | None = None,
    replacement: bool = False,
) -> list:
    """Evaluate every probe of one tensor; returns ``(kind, value, host indices)`` per probe.

    With a kink reference, one :class:`_KinkRow` per probe is appended to ``kink_log``.
    """
    return [_probe(ev, name, grad, g_ref, spec, step, ref, loss0, host, kink_log, replacement) for spec in specs]


def _probe(
    ev: _Evaluation, name: str, grad: Tensor, g_ref: Tensor | None, spec: tuple[str, int], step: float | None,
    ref: _Reference | None, loss0: Tensor, host: _HostValues, kink_log: list | None = None,
    replacement: bool = False,
) -> tuple[str, int, dict[str, int]]:
    """Evaluate one probe at ±h and ±2h (±h only without Richardson); returns host
    indices of its device scalars."""
    kind, value = spec
    key = f"model.{name}"
    theta = ev.shadow[key]
    base_step = step if step is not None else ev.step(theta.dtype)
    v = _direction(theta, value) if kind == "direction" else None
    line = _Line(theta, kind, v if v is not None else value, base_step)
    if v is None:
        g = None
        a = grad.detach().reshape(-1)[value].to(device=theta.device, dtype=torch.float64)
        rss, vnorm = a.abs(), torch.ones((), dtype=torch.float64, device=theta.device)
        a_ref = g_ref.reshape(-1)[value].to(torch.float64) if g_ref is not None else None
        rss_ref = a_ref.abs() if a_ref is not None else None
    else:
        g = grad.detach().to(device=theta.device, dtype=torch.float64).reshape(theta.shape)
        gv = g * v
        a, rss, vnorm = gv.sum(), gv.norm(), v.norm()
        if g_ref is not None:
            rv = g_ref.to(torch.float64) * v
            a_ref, rss_ref = rv.sum(), rv.norm()
            del rv
        else:
            a_ref = rss_ref = None
        del gv
    losses, points = {}, {}
    if ev.own_reference:
        losses[1.0], points[1.0], ref = line.record(ev, key)
    kinks = _ProbeKinks(ref, theta.device) if ref is not None else None
    batched = None
    if kinks is None and ev.batched is not False:
        points = {s: line.point(s) for s in ev.signs}
        batched = ev.losses_batched(key, [points[s] for s in ev.signs])
    if batched is not None:
        losses = dict(zip(ev.signs, batched))
    else:
        for s in ev.signs:
            if s not in losses:
                losses[s], points[s] = line.run(ev, key, s, kinks)
    kink = kinks.any_crossed() if kinks is not None else False
    if kinks is not None and kink_log is not None:
        kink_log.append(_KinkRow(kinks, host.extend(kinks.crossed), host.extend(kinks.margin), replacement))
    n1 = _difference(line, losses, points, 1.0, g, a)
    lmax = torch.stack([x.abs() for x in losses.values()]).max()
    out = {"a": a, "rss": rss, "vnorm": vnorm, "n1": n1, "n2": n1, "lmax": lmax, "h": line.h, "kink": kink}
    if ev.own_reference:
        out["mid"] = (losses[1.0] + losses[-1.0]) / 2
    if 2.0 in losses:
        out["n2"] = _difference(line, losses, points, 2.0, g, a)
        out["fourth"] = losses[2.0] + losses[-2.0] - 4 * (losses[1.0] + losses[-1.0]) + 6 * loss0
    if a_ref is not None:
        out["a_ref"], out["rss_ref"] = a_ref, rss_ref
    return kind, value, {k: host.add(x) for k, x in out.items()}


#: The points of one probe, in evaluation order: θ + h·v, θ - h·v, θ + 2h·v, θ - 2h·v.
_SIGNS = (1.0, -1.0, 2.0, -2.0)


def _difference(line: _Line, losses: dict, points: dict, s: float, g: Tensor | None, a: Tensor) -> Tensor:
    """``D(s·h)``: the central difference at ``±s·h`` along the probe's nominal direction."""
    up, down = losses[s], losses[-s]
    if line.v is None:  # the step the dtype really took
        i = line.index
        return (up - down) / (points[s].reshape(-1)[i].to(torch.float64) - points[-s].reshape(-1)[i].to(torch.float64))
    width = 2 * s * line.h
    nominal = (up - down) / width
    if line.theta.dtype == torch.float64:
        return nominal
    taken = (points[s].to(torch.float64) - points[-s].to(torch.float64)) / width
    return nominal + (a - (g * taken).sum())  # remove the part of the difference the rounded points add


def _grad_stats(g: Tensor, host: _HostValues) -> tuple[int, int]:
    bad = ~torch.isfinite(g.detach()).reshape(-1)
    return host.add(bad.any()), host.add(bad.to(torch.uint8).argmax())


def _gap(g: Tensor, g_ref: Tensor, host: _HostValues) -> dict[str, int]:
    """Distance of the gradient under test from the float64 reference, and where it is largest."""
    g = g.detach().to(device=g_ref.device, dtype=torch.float64).reshape(g_ref.shape)
    diff = (g - g_ref).reshape(-1)
    worst = diff.abs().argmax()
    out = {
        "gap": diff.norm(),
        "ref_norm": g_ref.norm(),
        "worst": worst,
        "ref_bad": (~torch.isfinite(g_ref)).any(),
    }
    return {k: host.add(v) for k, v in out.items()}


def _gradient_rms(grad_map: Mapping[str, Tensor], host: _HostValues) -> int:
    total = None
    count = 0
    for g in grad_map.values():
        g = g.detach()
        sq = torch.where(torch.isfinite(g), g, torch.zeros_like(g)).to(torch.float64).pow(2).sum()
        total = sq if total is None else total + sq.to(total.device)
        count += g.numel()
    return host.add((total / max(count, 1)).sqrt())


def _nonfinite_loss(train: float | None, replayed: float) -> str | None:
    """Why the unperturbed loss is unusable (NaN/Inf), naming where it appeared, or None."""
    if train is not None and not math.isfinite(train):
        return f"the training loss is {train!r}: fix the NaN/Inf in the forward before checking gradients"
    if not math.isfinite(replayed):
        return f"the replayed loss is {replayed!r}: `loss_fn` gives a NaN/Inf loss at the unperturbed parameters"
    return None


def _replay_problem(
    train: float | None, native: float | None, replayed: float | None, shadow_rtol: float, own: bool, mode: str
) -> str | None:
    """Why the replay cannot be trusted, or None (``replayed`` None: not compared)."""
    if train is not None and native is not None and not own:
        if not math.isfinite(native) or abs(native - train) > _REPLAY_RTOL * max(abs(train), abs(native)) + 1e-30:
            return (
                f"replayed loss {native!r} differs from the training loss {train!r}: the loss is not "
                "reproducible from the captured RNG and buffers (randomness outside torch's RNG, "
                "a loss_fn that differs from the loss that was backpropagated, or a scaled loss)"
            )
    reference = native if native is not None else train
    if reference is None or replayed is None:
        return None
    rtol = shadow_rtol if mode == "float64" else _REPLAY_RTOL
    if abs(replayed - reference) > rtol * max(abs(reference), abs(replayed)) + 1e-12:
        return (
            f"{mode} replay gives loss {replayed!r} but the model in its own precision gives {reference!r} "
            f"(relative tolerance {rtol:g}): the model does not behave the same on the {mode} evaluation"
        )
    return None


def _grad_precision(grad: Tensor, replay: ReplayState, model: nn.Module) -> str:
    """The precision the gradient was computed in: its dtype, autocast, or TF32."""
    dtype = grad.dtype
    if dtype in (torch.float16, torch.bfloat16):
        return _dtype_name(dtype)
    enabled, autocast_dtype = replay.autocast.get(grad.device.type, (False, None))
    if enabled:
        return "bfloat16" if autocast_dtype == torch.bfloat16 else "float16"
    if dtype == torch.float32 and grad.device.type == "cuda":
        has_conv = any("Conv" in type(m).__name__ for m in model.modules())
        if torch.backends.cuda.matmul.allow_tf32 or (torch.backends.cudnn.allow_tf32 and has_conv):
            return "tf32"
    return "float64" if dtype == torch.float64 else "float32"


def _loss_noise(rows: Mapping[str, list], values: list[float], ev: _Evaluation, loss0: float) -> float:
    """Rounding noise of one loss evaluation, measured from the probes' fourth differences.

    ``L(2h) + L(-2h) - 4L(h) - 4L(-h) + 6L(0)`` cancels the smooth part of the loss up to
    ``O(h^4)`` and leaves ``sqrt(70)`` times the evaluation noise; kinked probes are left out.
    It is floored at a few units in the last place of the loss.
    """
    dtype = ev.loss_dtype if ev.loss_dtype is not None else torch.float64
    floor = _ROUNDING_FLOOR * float(torch.finfo(dtype).eps) * abs(loss0) if math.isfinite(loss0) else 0.0
    fourth = [
        values[idx["fourth"]] for probes in rows.values() for _, _, idx in probes
        if "fourth" in idx and not values[idx["kink"]]
    ]
    fourth = [f for f in fourth if math.isfinite(f)]
    measured = math.sqrt(sum(f * f for f in fourth) / len(fourth)) / _FOURTH_DIFF_NOISE if fourth else 0.0
    return max(measured, floor)


class _Judge:
    """Turns fetched probe values into :class:`Probe` and :class:`TensorCheck` verdicts."""

    def __init__(
        self, *, reduce: Callable[[Tensor], Tensor] | None, values: list[float], noise: float, rtol: float,
        scale: float, ref_scale: float | None, native: bool,
    ) -> None:
        self.reduce = reduce
        self.values = values
        self.noise = noise
        self.rtol = rtol
        self.atol = _ATOL_RATIO * rtol * scale
        self.ref_atol = _REF_RTOL * ref_scale if ref_scale is not None else None
        self.ref_scale = ref_scale
        self.native = native

    def probe(
        self, kind: str, value: int, idx: Mapping[str, int], shape: tuple[int, ...], *, gap: bool = True,
        values: list[float] | None = None,
    ) -> Probe:
        """One probe. ``gap=False`` judges against the precision tolerance alone (a located
        gap); ``values``: fetched by a later transfer than the check's (localisation)."""
        values = self.values if values is None else values
        v = {k: values[i] for k, i in idx.items()}
        n1, n2, h = v["n1"], v["n2"], v["h"]
        numerical = (4 * n1 - n2) / 3 if self.native else n1
        rounding = self.noise * (0.95 if self.native else math.sqrt(0.5)) / h if h > 0 else math.inf
        error_bar = abs(n1 - n2) / 3.0 + rounding
        a, a_ref = v["a"], v.get("a_ref")
        if a_ref is not None and gap:  # the code test: against the float64 reference
            error = abs(numerical - a_ref)
            tolerance = _ERROR_BAR_MULT * error_bar + _REF_RTOL * v["rss_ref"] + self.ref_atol * v["vnorm"]
        else:
            error = abs(numerical - a)
            tolerance = _ERROR_BAR_MULT * error_bar + self.rtol * v["rss"] + self.atol * v["vnorm"]
        return Probe(
            kind=kind,
            index=tuple(int(i) for i in np.unravel_index(value, shape)) if kind == "coordinate" else None,
            direction_seed=None if kind == "coordinate" else value,
            autograd=a,
            numerical=numerical,
            error=error,
            error_bar=error_bar,
            tolerance=tolerance,
            step=h,
            kink=bool(v["kink"]),
            reference=a_ref,
        )

    def tensor(
        self, name: str, shape: tuple[int, ...], rows: list, gstats: tuple[int, int], gap: Mapping[str, int] | None
    ) -> TensorCheck:
        values = self.values
        any_bad, first_bad = (values[i] for i in gstats)
        probes = tuple(self.probe(kind, value, idx, shape) for kind, value, idx in rows)
        if any_bad:
            return TensorCheck(name, shape, "nonfinite", probes=probes,
                               reason=f"non-finite gradient, first at '{name}'{_where(int(first_bad), shape)}")
        if gap is not None and values[gap["ref_bad"]]:
            return TensorCheck(name, shape, "nonfinite", probes=probes,
                               reason=f"non-finite float64 autograd gradient of '{name}' at a finite loss")
        for p in probes:
            if not all(math.isfinite(x) for x in (p.autograd, p.numerical, p.error_bar)):
                return TensorCheck(name, shape, "nonfinite", probes=probes,
                                   reason=f"non-finite perturbed loss at '{name}'{p.where}")
        gap_fields: dict[str, Any] = {}
        ratios = []
        if gap is not None:
            numel = int(np.prod(shape)) if shape else 1
            ref_norm = values[gap["ref_norm"]]
            limit = self.rtol * ref_norm + _ATOL_RATIO * self.rtol * self.ref_scale * math.sqrt(numel)
            gap_ratio = _ratio(values[gap["gap"]], limit)
            ratios.append(gap_ratio)
            gap_fields = {
                "precision_gap": _ratio(values[gap["gap"]], limit / self.rtol),
                "gap_ratio": gap_ratio,
                "gap_index": tuple(int(i) for i in np.unravel_index(int(values[gap["worst"]]), shape)),
            }
        judged = [p for p in probes if not p.kink]
        ratios += [_ratio(p.error, p.tolerance) for p in judged]
        failed = any(p.failed for p in judged) or gap_fields.get("gap_ratio", 0.0) > 1.0
        if not judged and not failed:
            return TensorCheck(name, shape, "kink", probes=probes,
                               reason="every probe crossed a kink of a non-smooth op", **gap_fields)
        rel = bar = math.nan
        if judged:
            num = np.array([p.numerical for p in judged])
            ana = np.array([p.autograd for p in judged])
            denom = float(np.linalg.norm(num) + np.linalg.norm(ana))
            rel = _ratio(float(np.linalg.norm(num - ana)), denom)
            bar = _ratio(float(np.linalg.norm([p.error_bar for p in judged])), denom)
        return TensorCheck(name, shape, "fail" if failed else "pass", rel_error=rel, error_bar=bar,
                           error_ratio=float(max(ratios)), probes=probes, **gap_fields)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _where(flat: int, shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]"


def _locate(
    ev: _Evaluation, judge: _Judge, tc: TensorCheck, grad: Tensor, g_ref: Tensor | None, step: float | None,
    signature: Any, loss0: Tensor,
) -> Probe | None:
    """The element responsible for a failure, confirmed by a coordinate probe; None if already named.

    A precision gap is located where ``|g - g_ref|`` is largest. A failing direction is
    bisected over the flat index (row-major, so rows first, then columns): each level
    evaluates the direction restricted to the first half and follows the half with the
    larger disagreement, one host transfer per level.
    """
    judged = [p for p in tc.probes if not p.kink]
    if any(p.failed and p.kind == "coordinate" for p in judged):
        return None
    key = f"model.{tc.name}"
    theta = ev.shadow[key]
    numel = theta.numel()
    if tc.gap_ratio > 1.0 and tc.gap_index is not None:
        flat = int(np.ravel_multi_index(tc.gap_index, tc.shape)) if tc.shape else 0
        gap = True
    else:
        failing = [p for p in judged if p.failed and p.kind == "direction"]
        if not failing:
            return None
        worst = max(failing, key=lambda p: _ratio(p.error, p.tolerance))
        cmp = (g_ref if g_ref is not None else grad).detach().to(device=theta.device, dtype=torch.float64)
        cmp = cmp.reshape(-1)
        v = _direction(theta, worst.direction_seed).reshape(-1)
        base_step = step if step is not None else ev.step(theta.dtype)
        h = base_step * torch.clamp(theta.to(torch.float64).pow(2).mean().sqrt(), min=1.0)
        theta64 = theta.to(torch.float64).reshape(-1)
        err = worst.numerical - (worst.reference if worst.reference is not None else worst.autograd)
        lo, hi = 0, numel
        while hi - lo > 1:
            mid = (lo + hi) // 2
            part = torch.zeros_like(v)
            part[lo:mid] = v[lo:mid]
            up, _ = ev({**ev.shadow, key: (theta64 + h * part).to(theta.dtype).reshape(theta.shape)})
            down, _ = ev({**ev.shadow, key: (theta64 - h * part).to(theta.dtype).reshape(theta.shape)})
            level = _HostValues(judge.reduce)  # one transfer per level; the same decision on every rank
            i = level.add((up.to(torch.float64) - down.to(torch.float64)) / (2 * h) - (cmp * part).sum())
            left = level.fetch()[i]
            right = err - left
            lo, hi, err = (lo, mid, left) if abs(left) >= abs(right) else (mid, hi, right)
        flat, gap = lo, False
    host = _HostValues(judge.reduce)
    kind, value, idx = _probe(ev, tc.name, grad, g_ref, ("coordinate", flat), step, signature, loss0, host)
    return judge.probe(kind, value, idx, tc.shape, gap=not gap, values=host.fetch())


def _attach_kinks(tc: TensorCheck, log: list[_KinkRow], values: list[float], near: float) -> TensorCheck:
    """Add the kink events of each probe (host values), their margins and the replacements."""
    if not log or len(log) != len(tc.probes):
        return tc
    probes, events = [], []
    for i, (probe, row) in enumerate(zip(tc.probes, log)):
        ref = row.kinks.reference  # the unperturbed pass, or the probe's own +h pass
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
