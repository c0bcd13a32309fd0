"""The check engine: central differences against autograd's gradient.

:func:`check` knows nothing about training loops, Lightning or TensorBoard. Adapters
decide when to call it and which gradient to compare; it returns a frozen
:class:`~gradwatch.report.Report`.

Numerics (see ``shared/design.md`` §3 and the README):

* ``precision="float64"`` evaluates every perturbed loss on a float64 copy of the
  parameters, buffers and floating inputs (``torch.func.functional_call``), from the
  RNG state and buffers the training forward started from, so dropout masks and batch
  statistics match. Inside it, casts to a lower precision keep float64 and random ops
  draw in the native dtype (:mod:`gradwatch._float64`). ``"native"`` evaluates in the model's own dtype with a step scaled
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

  - the code test, per probe: ``|numerical - reference| <= 3·error_bar +
    1e-6·(‖g_ref∘v‖ + G_t·‖v‖) + 1e-9·G_ref·‖v‖``: a wrong backward formula is wrong in
    float64 too, so it is judged at float64 accuracy, and the absolute floor scales
    with the tensor's own reference RMS ``G_t`` (a bug in a tensor whose gradients
    are 1e-6 of the model's is caught; a true gradient of 0 stays quiet);
  - the precision test, per tensor: ``‖g - g_ref‖ <= max(rtol·‖g_ref‖, k_n·s) +
    max(eps·G_ref, 8·eps·|L|)·√n``, where ``s = ‖g(θ) - g(θ')‖`` is *measured*: the
    native gradient replayed at ``θ`` and at ``θ`` moved by 4 ulps (random signs),
    which re-randomises the rounding of every op (and shows nondeterministic
    kernels), amplified by the conditioning of the computation as the training
    gradient's own rounding is; ``k_n = 4 + 30/√n``. It catches what only the
    training gradient has: tensor hooks, code that edits ``.grad`` (neither is part
    of the replays), a kernel wrong only in low precision (wrong in both replays).
    Below float32 (TF32, bf16/fp16 autocast), whose rounding a move by float32 ulps
    does not re-randomise, ``rtol`` from :data:`RTOL` keeps its floor ``rtol/2·G_ref``.
    The replay at ``θ`` also records the branches of the non-smooth ops: where the
    training precision took another branch than the float64 pass (an element within
    rounding of a kink), the precision test is not applied and each tensor says why.

  Without a reference (native precision, the smallest budgeted check, or a backward
  that fails in float64) the code test uses ``rtol·‖g∘v‖ + max(rtol/2·G, 8·eps·|L|)·‖v‖``
  instead. ``‖g∘v‖`` (the root sum of squares of the terms of ``<g, v>``) never cancels,
  so a direction whose terms cancel raises no false alarm; ``G`` (the RMS of the model's
  gradient) is the floor for a tensor whose true gradient is 0, such as a conv bias
  before BatchNorm, and ``8·eps·|L|`` the floor when every gradient is 0 or rounding
  noise. A check that measured no noise (``richardson=False``) re-measures a failing
  probe at ``±2h`` from an unperturbed pass before the fail stands, and a probe whose
  perturbed losses were equal although the loss moves at a larger step (rounding
  flattened it) is not judged (``Probe.flat``).
* Probes whose perturbed passes took another branch of a non-smooth op than the
  unperturbed pass are marked as kinks and never count towards a failure. Crossed
  coordinates are replaced by fresh ones (``kink_resamples`` per tensor), and every
  non-smooth op a probe moved is reported with its module and margin
  (:mod:`gradwatch.kinks`).
* Joint probes (``joint``, :mod:`gradwatch._joint`): one random direction over every
  checked tensor at once, each tensor's term weighted alike, judged like a direction
  probe; so one probe (two float64 passes) covers the whole model. A passing one
  verifies the tensors without a verdict of their own; a failing one is bisected over
  the tensors (group testing), and the tensor it names is confirmed and localised.
* A failing tensor is localised: a failing coordinate names its element, a precision
  gap its largest element, and a failing direction is bisected over the flat index
  (rows first, then columns) and confirmed by a coordinate probe.
* Elements that cannot be probed are left out once per check
  (:func:`gradwatch._probing._exclusions`): the ``padding_idx`` row of ``nn.Embedding``
  and ``nn.EmbeddingBag`` (PyTorch gives it no gradient by design) and non-finite
  parameter values (masked ``-inf`` logits). Coordinates avoid them, directions are zero
  there, and :attr:`~gradwatch.report.TensorCheck.excluded` says so. Empty tensors are
  skipped, and a loss that underflows in the training precision makes the check unreliable.

The engine has three rooms of its own; :func:`check` only wires them together:

* :mod:`gradwatch._evaluation`: evaluating the loss at given parameters from the
  replayed state (float64 or native, sequential or vmapped), and one host transfer;
* :mod:`gradwatch._probing`: the probe plan, the points and central differences of a
  probe, kink resampling and the bisection that localises a failure;
* :mod:`gradwatch._judging`: tolerances, replay fidelity, loss noise and verdicts.
* :mod:`gradwatch._joint`: joint probes over every tensor, their kink retries at smaller
  steps, group testing and the verdicts they give.

All probe arithmetic stays on the model's device; results reach the host in one
transfer per check (plus one per bisection level when a direction fails, and one before
probing: which parameters hold non-finite values).

Memory: a float64 check holds one float64 copy of the parameters (the shadow) and,
transiently, about one float64 tensor of the size of one parameter tensor. The float64
reference gradient is never held whole: a tensor hook hands each tensor's to
:class:`_ReferenceStats` as the backward produces it (the terms of the planned probes and
joint directions, the precision test's gap, the sum of squares), and what a failure or a
kink resample needs later is taken from the float64 backward run again. A tensor whose
copy is more than a quarter of the shadow (a module-local check of one large Linear) gets
its reference in a backward of its own, without its copy (the forward widens the parameter
where it is used), so its copy and its reference gradient are never held together. Points
are made in place on the shadow, one tensor at a time, and undone by copying the parameter
back (exactly; never by subtracting); directions of tensors above ``_sizes.CHUNK`` elements are
drawn again from their seeds a chunk at a time at every use, also in the bisection of a
failure. The precision test's two native replays run with the shadow released (made again
from the parameters when needed). Under data parallelism (``reduce``) the reference is
all-reduced and held whole. Batched evaluation stacks the perturbed copies of the probed tensor.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import secrets
import time
from typing import Any, Callable, Collection, Iterator, Mapping

import torch
from torch import Tensor, nn

from gradwatch._evaluation import (
    DEFAULT_STEP,
    _choose_precision,
    _dtype_name,
    _Evaluation,
    _HostValues,
    _loss_value,
    _native_loss,
    _reduced,
    _short,
)
from gradwatch._judging import (
    _SHADOW_RTOL,
    RTOL,
    _attach_kinks,
    _gap_values,
    _grad_precision,
    _grad_stats,
    _gradient_rms,
    _Judge,
    _loss_noise,
    _loss_spread,
    _measure_spread,
    _nonfinite_loss,
    _replay_problem,
    _square_sum,
    _underflow,
)
from gradwatch._probing import (
    _exclusions,
    _flat_probes,
    _locate,
    _plan,
    _probe_tensor,
    _ref_terms,
    _References,
    _RefView,
    _remeasure,
    _resample,
)
from gradwatch._joint import _joint_lines, _joint_probes, _joint_verdicts
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
from gradwatch.options import ProbeOptions
from gradwatch.replay import ReplayState, _isolated, _LossModule, capture
from gradwatch.report import Report, TensorCheck

__all__ = ["check", "DEFAULT_STEP", "DEFAULT_SHADOW_BYTES", "PRECISIONS", "RTOL"]

#: Largest float64 copy of parameters and buffers ``precision="auto"`` makes (2 GiB).
DEFAULT_SHADOW_BYTES = 2 * 2**30
#: Where perturbed losses are evaluated.
PRECISIONS = ("float64", "native", "auto")

_GRADS = ("autograd", "existing")
_EVALUATIONS = ("auto", "batched", "sequential")
_NOT_SELECTED = "not selected for this check (checked in turn within the overhead budget)"
#: True while a caller runs :func:`check` with a ``train_loss`` that the replay itself
#: computed (``assert_gradients``, as ``grads="autograd"`` does inside): the training loss
#: then is the native replay, so no second one is run to compare with it.
_TRAIN_IS_REPLAY: contextvars.ContextVar[bool] = contextvars.ContextVar("_TRAIN_IS_REPLAY", default=False)


@contextlib.contextmanager
def _train_is_replay(flag: bool) -> Iterator[None]:
    """Within it, :func:`check`'s ``train_loss`` is the replay's own loss when ``flag``."""
    token = _TRAIN_IS_REPLAY.set(flag)
    try:
        yield
    finally:
        _TRAIN_IS_REPLAY.reset(token)


def _check_with(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    options: ProbeOptions,
    *,
    seed: int | None = None,
    grads: str | Mapping[str, Tensor] = "autograd",
    replay: ReplayState | None = None,
    train_loss: Tensor | float | None = None,
    names: Collection[str] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Report:
    """:func:`check` with its probe options as one :class:`~gradwatch.ProbeOptions` (what
    every caller inside gradwatch uses)."""
    return check(model, loss_fn, batch, seed=seed, grads=grads, replay=replay, train_loss=train_loss, names=names,
                 reduce=reduce, **dataclasses.asdict(options))


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
    joint: int = 1,
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
            keeps honest, and kinks are recorded as crossings without margins. Without
            ``±2h`` passes there is no precision test either (nor its two native replays):
            the probes are judged against the float64 reference by the code test alone.
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
        joint: Joint probes per check: random directions over every checked tensor at
            once, each tensor's term weighted alike (see :mod:`gradwatch._joint`), two
            float64 passes each (four with ``richardson``), so one probe covers the
            whole model. A failing joint probe is bisected over the tensors and the
            tensor it names is localised to an element; a passing one verifies jointly
            every tensor without a verdict of its own. They are reported in
            ``report.joint`` (``Probe.kind == "joint"``). 0 disables them; with
            ``joint`` > 0, ``coordinates`` and ``directions`` may both be 0 (only the
            joint probes: the adapters' checks under a budget).

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
    _probe_options(coordinates, directions, kinks, min_directions=0, joint=joint)
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
        excluded = _exclusions({n: params[n] for n in grad_map if n not in skipped}, model)
        skipped.update({n: f"every element is excluded ({ex.description})" for n, ex in excluded.items()
                        if ex.count == params[n].numel()})
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
        own = not richardson and not reference and coordinates + directions + joint > 0
        plan = _plan(every, seed, coordinates, directions, excluded)

        def evaluate(mode: str) -> tuple:
            ev = _Evaluation(model, loss_fn, batch, replay, kinks, mode, how, reduce is not None, richardson)
            ev.own_reference = own and ev.batched is False
            lines = _joint_lines(ev, grad_map, seed, joint, step, excluded)
            # the reference gradient is never held whole: what the probes, the joint lines and the
            # precision test need of it is computed as the float64 backward produces each tensor's
            stats = _ReferenceStats(grad_map, plan, [line for _, line in lines], excluded, gap=richardson)
            loss0, signature, ref_stats = ev.base(every, reference, stats=None if reduce is not None else stats)
            ev.loss0 = loss0
            held = None
            if ref_stats is not None and reduce is not None:  # data parallel: the mean over ranks, as .grad
                held = _reduced(ref_stats, reduce)
                ref_stats = {name: stats(name, g) for name, g in held.items()}
            kink_log: dict[str, list] = {name: [] for name in grad_map}
            source = _References(ev, every, excluded, held)
            refs = {name: _RefView(name, ref_stats[name]["terms"], source) if ref_stats is not None else None
                    for name in grad_map}
            if ref_stats is not None:
                for j, (_, line) in enumerate(lines):
                    line.set_reference([ref_stats[n]["joint"][j] for n in line.names])
            rows = {
                name: _probe_tensor(ev, name, grad_map[name], refs[name], plan[name], step, signature, loss0,
                                    host, kink_log[name], excluded=excluded.get(name))
                for name in grad_map if not (ev.lossy or ev.unreplayable)  # else unreliable: no point in probing
            }
            jrows = [] if ev.lossy or ev.unreplayable else _joint_probes(ev, lines, signature, loss0, host)
            return ev, loss0, signature, ref_stats, kink_log, refs, rows, jrows

        try:
            evaluation, loss0, signature, ref_grads, kink_log, refs, rows, jrows = evaluate(mode)
        except Exception as err:
            if precision != "auto" or mode != "float64":
                raise
            mode, mode_reason = "native", f"float64 evaluation raised {type(err).__name__}: {err}"
            host = _HostValues(reduce)  # drop what the float64 attempt queued
            evaluation, loss0, signature, ref_grads, kink_log, refs, rows, jrows = evaluate(mode)
        replayed_train = grads == "autograd" or (_TRAIN_IS_REPLAY.get() and train_loss is not None)
        native_loss = train_loss if replayed_train else evaluation.native()
        probe = not (evaluation.lossy or evaluation.unreplayable)
        if probe and (signature is not None or evaluation.own_reference and kinks) and kink_resamples:
            _resample(evaluation, grad_map, refs, rows, kink_log, seed, kink_resamples, step, signature, loss0, host,
                      excluded)
        # checks that compute the reference and measure their noise (richardson) also measure the
        # rounding of the training precision and run the precision test; the smallest check (no ±2h
        # passes) judges the backward code against the reference alone: two native replays fewer
        precision_test = ref_grads is not None and probe and richardson
        # the training step replayed, without tensor hooks on the parameters, is the spread's replay at θ
        at = (train_loss, grad_map) if (replayed_train and isinstance(train_loss, Tensor) and
                                        not any(params[n]._backward_hooks for n in grad_map)) else None
        spread = _measure_spread(evaluation, params, list(grad_map), signature, seed, host, at) if precision_test else None
        gstats = {name: _grad_stats(g, host) for name, g in grad_map.items()}
        gaps = {name: {k: host.add(v) for k, v in ref_grads[name]["gap"].items()}
                for name in grad_map} if precision_test else {}
        scale = _gradient_rms(every, host)
        ref_scale = _gradient_rms(every, host, {n: r["square"] for n, r in ref_grads.items()}) if ref_grads else None
        if loss0 is None:  # own-reference probes: the first probe's midpoint stands for L(θ)
            first = next(idx for rs in [*rows.values(), [(None, None, r.idx) for r in jrows]] for _, _, idx in rs)
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
            reason = evaluation.unreplayable or _replay_problem(
                train, native, None if across else replayed, _SHADOW_RTOL[grad_precision], replayed_train, mode,
                spread=_loss_spread(spread, values, native),
            )
            if reason is None:
                reason = _underflow(native if native is not None else train, None if across else replayed,
                                    grad_precision, mode)
            if reason is None and evaluation.lossy:
                reason = (
                    f"`loss_fn` returned a {_dtype_name(evaluation.loss_dtype)} loss on the float64 copy of the "
                    "model: something casts to a lower precision "
                    "(such as .float()), so central differences would measure rounding noise; keep the loss in "
                    "the dtype of its inputs"
                )
        if reason is None and nonfinite is None:
            _flat_probes(evaluation, rows, values, reduce, float(torch.finfo(first_grad.dtype).eps), replayed, excluded)
        noise = _loss_noise({**rows, "": [("joint", r.seed, r.idx) for r in jrows]}, values, evaluation, replayed)
        judge = _Judge(
            reduce=reduce,
            values=values,
            noise=noise,
            rtol=RTOL[grad_precision],
            scale=values[scale],
            ref_scale=values[ref_scale] if ref_scale is not None else None,
            native=mode == "native",
            loss=replayed,
            eps=float(torch.finfo(first_grad.dtype).eps),
            gaps=gaps,
            spread=spread,
            low=grad_precision in ("tf32", "float16", "bfloat16"),
        )
        tensors: dict[str, TensorCheck] = {}
        # an evaluation with ±2h passes, for failures of a check that measured no noise
        measured = None if richardson else (
            lambda: _Evaluation(model, loss_fn, batch, replay, kinks, mode, "sequential", reduce is not None,
                                share=evaluation)
        )
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
                if not richardson and tensors[name].verdict == "fail":  # noise not measured: measure it first
                    tensors[name] = _remeasure(measured(), judge, tensors[name], rows[name], grad_map[name], refs[name],
                                               every, step, values, gstats[name], gaps.get(name),
                                               excluded.get(name))
                tensors[name] = _attach_kinks(tensors[name], kink_log[name], values, near_kink_margin)
                if localize and tensors[name].verdict == "fail":
                    located = _locate(evaluation, judge, tensors[name], grad_map[name], refs[name], step, signature,
                                      loss0, excluded.get(name))
                    if located is not None:
                        tensors[name] = dataclasses.replace(tensors[name], located=located)
            if name in excluded:
                tensors[name] = dataclasses.replace(tensors[name], excluded=excluded[name].description,
                                                    excluded_count=excluded[name].count)
        joint_probes: tuple = ()
        if jrows and nonfinite is None and reason is None:
            joint_probes, tensors = _joint_verdicts(evaluation, judge, jrows, tensors, grad_map, refs, step,
                                                    signature, loss0, localize, excluded, measured)
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
        kept_casts=evaluation.kept_casts[0],
        kept_cast_sites=evaluation.kept_casts[1],
        joint=joint_probes,
    )


class _ReferenceStats:
    """What a check needs of each tensor's float64 reference gradient ``g_ref``, computed
    from ``g_ref`` alone (one tensor-sized temporary at a time), so the reference is never
    held whole: the terms ``<g_ref, v>`` of its planned probes, its terms of each joint
    direction, the precision test's distance from the gradient under test (``gap``), and
    the sum of its squares (for ``G_ref``)."""

    def __init__(self, grads: Mapping[str, Tensor], plan: Mapping[str, list], lines: list,
                 excluded: Mapping[str, Any], *, gap: bool) -> None:
        self.grads, self.plan, self.lines, self.excluded, self.gap = grads, plan, lines, excluded, gap

    def __call__(self, name: str, g_ref: Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {"square": _square_sum(g_ref)}
        if name not in self.grads:  # not checked in this check: only its share of G_ref
            return out
        mask = self.excluded[name].mask if name in self.excluded else None
        out["terms"] = {tuple(spec): _ref_terms(g_ref, tuple(spec), mask) for spec in self.plan[name]}
        out["joint"] = [line.reference_terms(name, g_ref) for line in self.lines]
        if self.gap:
            out["gap"] = _gap_values(self.grads[name], g_ref)
        return out


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
        elif p.numel() == 0:
            reasons[name] = f"empty tensor (shape {tuple(p.shape)}): no element to check"
    return reasons
