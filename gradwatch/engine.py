"""The check engine: central differences against autograd's gradient.

:func:`check` knows nothing about training loops, Lightning or TensorBoard. Adapters
decide when to call it and which gradient to compare; it returns a frozen
:class:`~gradwatch.report.Report`.

Numerics in short (for users: ``docs/how-it-works.md``; the design: ``shared/design.md``
§3; every tolerance in full: :class:`gradwatch._judging._Judge`):

* ``precision="float64"`` evaluates every perturbed loss on a float64 copy of the
  parameters, buffers and floating inputs, from the RNG state and buffers the training
  forward started from (lower-precision casts keep float64, random ops draw in the native
  dtype: :mod:`gradwatch._float64`); ``"native"`` evaluates in the model's own dtype with
  a step scaled to it; ``"auto"`` takes float64 when the copy fits ``max_shadow_bytes``
  and the model runs in float64, native otherwise.
* Each probe takes four evaluations, ``θ ± h·v`` and ``θ ± 2h·v``: the central
  difference ``D(h)`` in float64, ``(4·D(h) - D(2h)) / 3`` natively, with an error bar
  of ``|D(h) - D(2h)| / 3`` plus the loss's rounding, measured from their fourth
  difference.
* In float64 the engine also takes the *reference*, autograd's gradient of the float64
  copy, and a tensor fails either of two tests. The code test, per probe:
  ``|numerical - reference| <= 3·error_bar + 1e-6·(‖g_ref∘v‖ + G_t·‖v‖) +
  1e-9·G_ref·‖v‖`` (``G_t``: the tensor's own reference RMS). The precision test, per
  tensor: ``‖g - g_ref‖ <= max(rtol·‖g_ref‖, k_n·s) + max(eps·G_ref, 8·eps·|L|)·√n``,
  ``s`` the measured spread of the native gradient replayed at ``θ`` and 4 ulps away,
  ``k_n = 4 + 30/√n`` (below float32 the floor stays ``rtol/2·G_ref``); not applied
  where the training precision took another branch of a non-smooth op than the float64
  pass. Without a reference the code test allows ``rtol·‖g∘v‖ + max(rtol/2·G,
  8·eps·|L|)·‖v‖`` (``G``: the model's gradient RMS). A check without ``±2h`` passes
  measures a failing probe again before the fail stands; a probe whose losses rounding
  flattened is not judged (``Probe.flat``).
* Probes that took another branch of a non-smooth op than the unperturbed pass are kinks
  and never count towards a failure; crossed coordinates are replaced (``kink_resamples``
  per tensor), and every op a probe moved is reported (:mod:`gradwatch.kinks`).
* Joint probes (:mod:`gradwatch._joint`) probe every checked tensor along one direction;
  a failing one is bisected over the tensors. A failing tensor is localised to an element
  (:mod:`gradwatch._locating`).
* Elements that cannot be probed (``padding_idx`` rows, non-finite parameter values) are
  left out once per check (:func:`gradwatch._probing._exclusions`); empty tensors are
  skipped, and a loss that underflows in the training precision makes the check
  unreliable.

:func:`check` validates its arguments, binds the probe options into one
:class:`~gradwatch.ProbeOptions` and runs ``_check_with``, the check every caller inside
gradwatch runs with such an object. ``_check_with`` only wires the engine's rooms
together, step by step (the gradients under test, the tensors to check, the probes, one
host transfer, the replay's fidelity, the verdicts):

* :mod:`gradwatch._gradients`: the gradients under test, which tensors are skipped, and
  what the check takes of the float64 reference gradient as the backward produces it;
* :mod:`gradwatch._evaluation`: evaluating the loss at given parameters from the
  replayed state (float64 or native, sequential or vmapped), and one host transfer;
* :mod:`gradwatch._probing`: the probe plan, the points and central differences of a
  probe and kink resampling; what every probe of a check shares travels as one
  ``_CheckContext``;
* :mod:`gradwatch._locating`: a failure measured again and localised to an element;
* :mod:`gradwatch._judging`: tolerances, replay fidelity, loss noise and verdicts;
* :mod:`gradwatch._joint`: joint probes over every tensor, their kink retries at smaller
  steps, group testing and the verdicts they give.

The rooms import each other in one direction only (``_evaluation`` <- ``_judging`` <-
``_probing`` <- ``_locating`` <- ``_joint`` <- ``engine``, and ``_probing`` <-
``_gradients`` <- ``engine``), and take large tensors a chunk of
:data:`gradwatch._sizes.CHUNK` elements at a time.

All probe arithmetic stays on the model's device; results reach the host in one
transfer per check (plus one per bisection level when a direction fails, and one before
probing: which parameters hold non-finite values).

Memory: a float64 check holds one float64 copy of the parameters (the shadow) and,
transiently, about one float64 tensor of the size of one parameter tensor. The float64
reference gradient is never held whole (:class:`~gradwatch._gradients._ReferenceStats`;
what a failure or a kink resample needs later comes from the float64 backward run again),
and a tensor whose copy is a large share of the shadow gets it in a backward of its own,
without its copy (:data:`gradwatch._evaluation._ALONE`). Points are made in place on the
shadow, one tensor at a time, and undone by copying the parameter back (exactly; never by
subtracting); directions of tensors above ``_sizes.CHUNK`` elements are drawn again from
their seeds a chunk at a time at every use, also in the bisection of a failure. The
precision test's two native replays run with the shadow released. Under data parallelism
(``reduce``) the reference is all-reduced and held whole. Batched evaluation stacks the
perturbed copies of the probed tensor.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import secrets
import time
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from gradwatch._evaluation import (
    DEFAULT_STEP,
    _choose_precision,
    _dtype_name,
    _Evaluation,
    _HostValues,
    _loss_value,
    _reduced,
)
from gradwatch._gradients import (
    _NOT_SELECTED,
    _autograd_gradients,
    _given_gradients,
    _grads_option,
    _names,
    _own_probes,
    _ReferenceStats,
    _skip_reasons,
)
from gradwatch._joint import _joint_lines, _joint_probes, _joint_verdicts, _JointRow
from gradwatch._judging import (
    RTOL,
    _attach_kinks,
    _grad_precision,
    _grad_stats,
    _gradient_rms,
    _Judge,
    _loss_noise,
    _loss_spread,
    _measure_spread,
    _nonfinite_loss,
    _Spread,
    _unreliable,
)
from gradwatch._locating import _failed_there, _locate, _located_there, _remeasure
from gradwatch._precision import _measure_noise, _measured_step, _Noise, _precision_name, _relative
from gradwatch._probing import (
    _CheckContext,
    _Excluded,
    _exclusions,
    _flat_probes,
    _plan,
    _probe_tensor,
    _References,
    _RefView,
    _resample,
)
from gradwatch import _sizes
from gradwatch._validate import _callable, _module, _seed
from gradwatch.options import DEFAULT_SHADOW_BYTES, PRECISIONS, ProbeOptions, _batched_conflict
from gradwatch.kinks import _Reference
from gradwatch.replay import ReplayState, _isolated, capture
from gradwatch.report import Report, TensorCheck

__all__ = ["check", "DEFAULT_STEP", "DEFAULT_SHADOW_BYTES", "PRECISIONS", "RTOL"]

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
    per_tensor: str = "auto",
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
        per_tensor: Which checked tensors get their own ``coordinates`` and
            ``directions``: ``"all"``, or ``"auto"``: all of them in a check of at most 16
            tensors (or natively, or without joint probe or float64 reference); above
            that the joint probes, group testing and the float64 reference's precision
            test verify every tensor, and only tensors whose gradient RMS is below 1e-3 of
            the model's (which a joint probe weighs too little; at most 16) get probes of
            their own; the check then takes at least 2 joint probes. The others are
            reported ``pass`` "verified jointly" (or ``fail`` when a joint probe names
            them), so a check costs about the same on 600 tensors as on 20.

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
    _module("model", model)
    _callable("loss_fn", loss_fn)
    seed = _seed("seed", seed)
    if reduce is not None:
        _callable("reduce", reduce)
    if evaluation == "batched" and (kinks is True or reduce is not None):  # names `reduce` too, unlike the options'
        raise ValueError(f"{_batched_conflict(evaluation, kinks)}, reduce={reduce!r}")
    options = ProbeOptions(
        coordinates=coordinates, directions=directions, joint=joint, step=step, precision=precision,
        max_shadow_bytes=max_shadow_bytes, evaluation=evaluation, kinks=kinks, kink_resamples=kink_resamples,
        near_kink_margin=near_kink_margin, richardson=richardson, reference=reference, localize=localize,
        per_tensor=per_tensor,
    )
    _grads_option(grads)
    if replay is not None and not isinstance(replay, ReplayState):
        raise TypeError(f"`replay` must be a gradwatch.ReplayState from gradwatch.capture(), got {type(replay).__name__}")
    if grads == "autograd" and (replay is not None or train_loss is not None):
        raise ValueError(
            "`replay` and `train_loss` describe a training step that already happened; they only apply "
            f"with grads='existing' or a mapping, got grads='autograd' with replay={type(replay).__name__}, "
            f"train_loss={train_loss!r}"
        )
    if names is not None:
        names = _names(names, dict(model.named_parameters()))
    return _check_with(model, loss_fn, batch, options, seed=seed, grads=grads, replay=replay, train_loss=train_loss,
                       names=names, reduce=reduce)


@dataclasses.dataclass(frozen=True)
class _LocalFindings:
    """What the module-local checks of a step found, for the whole-model check that follows them.

    Attributes:
        failed: The tensors they failed: qualified name -> the local check's verdict (named
            ``'module::param'``). A tensor without probes of its own in the whole-model check (the
            smallest check) is left out of its joint probes and fails as located there, the joint
            probes verifying the others (a failing joint probe over every tensor verified none of
            them, and its confirming probe and group testing cost a failing step-0 check of tiny
            Hugging Face models ~55%); one with probes of its own is tried first by a failing joint
            probe, named without group testing and located there.
        float64_kernels: The kernels (:attr:`Report.kernels`) their float64 evaluations were
            measured computing in float64: a smallest check whose graph holds no other custom
            backward code computes in float64, and measures no precision of its own (four float64
            evaluations of the whole model fewer; ~40% of a failing step-0 check of tiny T5).
    """

    failed: Mapping[str, TensorCheck] = dataclasses.field(default_factory=dict)
    float64_kernels: frozenset[str] = frozenset()

    @property
    def names(self) -> dict[str, str]:
        """Each failed tensor's name in the local check (``'module::param'``)."""
        return {n: t.name for n, t in self.failed.items()}


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
    local: _LocalFindings | None = None,
    loss_terms: Tensor | None = None,
) -> Report:
    """:func:`check` with its probe options as one :class:`~gradwatch.ProbeOptions`: the check
    every caller inside gradwatch runs. The other arguments are :func:`check`'s, not validated
    again (``options`` validated itself), but ``local``: what the module-local checks of the same
    step found (:class:`_LocalFindings`); ``loss_terms``: the root sum of squares of the loss's
    terms (a module-local check's ``‖g_out∘y‖₂``, see :func:`~gradwatch._judging._replay_problem`).

    The steps: the gradients under test (:func:`_gradients`) and the tensors to check
    (:func:`_select`); the probes, in float64 when it runs (:func:`_probe_all`, native
    otherwise); what the verdicts need of the device, in one host transfer
    (:func:`_queue_statistics`); whether the replay can be trusted; the verdicts of each
    tensor (:func:`_tensor_verdict`) and of the joint probes. What the check freed goes back
    to the system at its end (:func:`gradwatch._sizes.release`).
    """
    report = _check_once(model, loss_fn, batch, options, seed=seed, grads=grads, replay=replay,
                         train_loss=train_loss, names=names, reduce=reduce, local=local or _LocalFindings(),
                         loss_terms=loss_terms)
    _sizes.released(_bytes64(model.parameters()))  # the float64 copy and what the stages freed
    return report


def _check_once(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    options: ProbeOptions,
    *,
    seed: int | None,
    grads: str | Mapping[str, Tensor],
    replay: ReplayState | None,
    train_loss: Tensor | float | None,
    names: Collection[str] | None,
    reduce: Callable[[Tensor], Tensor] | None,
    local: _LocalFindings,
    loss_terms: Tensor | None,
) -> Report:
    """The body of :func:`_check_with` (its locals, the float64 copy included, are freed when it returns)."""
    started = time.perf_counter()
    if seed is None:
        seed = secrets.randbits(62)
    params = dict(model.named_parameters())
    with _isolated(model):
        # the gradients under test, the tensors to check, the precisions
        replay, train_loss, given = _gradients(model, loss_fn, batch, grads, replay, train_loss, params)
        selection = _select(model, params, given, names)
        request = _Request(model, loss_fn, batch, replay, options, seed, reduce)
        first_grad = next(iter(selection.checked.values()))
        eps = float(torch.finfo(first_grad.dtype).eps)
        grad_precision = _grad_precision(first_grad, replay, model)
        mode, mode_reason = _choose_precision(options.precision, model, replay, options.max_shadow_bytes)
        plan = _plan(selection.every, seed, options.coordinates, options.directions, selection.excluded)
        # the probes, in float64 if it runs ("auto" falls back to native), queued for one host transfer
        host = _HostValues(reduce)
        try:
            own = _tensor_plan(plan, selection, options, mode, reduce)
            if any(plan[n] and not own[n] for n in selection.checked) and options.joint < _JOINT_WITHOUT_OWN:
                # tensors without probes of their own: a second joint direction (a miss needs both to miss)
                request = dataclasses.replace(request, options=dataclasses.replace(options, joint=_JOINT_WITHOUT_OWN))
            probed = _probe_all(request, selection, own, mode, host, local, loss_terms)
        except Exception as err:
            if options.precision != "auto" or mode != "float64":
                raise
            mode, mode_reason = "native", f"float64 evaluation raised {type(err).__name__}: {err}"
            host = _HostValues(reduce)  # drop what the float64 attempt queued
            probed = _probe_all(request, selection, plan, mode, host, local)
        ctx = probed.ctx
        replayed_train = grads == "autograd" or (_TRAIN_IS_REPLAY.get() and train_loss is not None)
        native_loss = train_loss if replayed_train else ctx.ev.native()
        usable = ctx.ev.usable
        if usable and (ctx.signature is not None or ctx.ev.own_reference and options.kinks) and options.kink_resamples:
            _resample(ctx, selection.checked, probed.refs, probed.rows, probed.kink_log, seed, options.kink_resamples,
                      host)
        # checks that compute the reference and measure their noise (richardson) also measure the
        # rounding of the training precision and run the precision test; the smallest check (no ±2h
        # passes) runs it only for a gradient farther from the reference than the precision's
        # tolerance: two native replays fewer when none is
        precision_test = probed.ref_stats is not None and usable and options.richardson
        # the training step replayed, without tensor hooks on the parameters, is the spread's replay at θ
        at = (train_loss, selection.checked) if (
            replayed_train and isinstance(train_loss, Tensor)
            and not any(params[n]._backward_hooks for n in selection.checked)) else None
        spread = (_measure_spread(ctx.ev, params, list(selection.checked), ctx.signature, seed, host, at)
                  if precision_test else None)
        _sizes.released(_bytes64(selection.every.values()))  # the native replays
        stats = _queue_statistics(selection, probed, precision_test, host)
        i_native = host.add(native_loss) if isinstance(native_loss, Tensor) else None
        i_train = host.add(train_loss) if isinstance(train_loss, Tensor) else None
        i_terms = host.add(loss_terms) if loss_terms is not None else None
        values = host.fetch()
        terms = values[i_terms] if i_terms is not None else 0.0

        # whether the check can be trusted, then the verdicts
        train = values[i_train] if i_train is not None else train_loss
        native = values[i_native] if i_native is not None else None
        replayed = values[stats.loss0]
        reason = None
        nonfinite = _nonfinite_loss(train, replayed)
        if nonfinite is None:
            # a midpoint across a kink is O(h·slope) from L(θ), not O(h²): only the native replay is
            # compared then (that probe is not judged anyway)
            across = stats.mid_kink is not None and values[stats.mid_kink] > 0
            reason = _unreliable(ctx.ev, train, native, None if across else replayed, grad_precision, replayed_train,
                                 _loss_spread(spread, values, native), terms)
        if reason is None and nonfinite is None:
            _flat_probes(ctx, probed.rows, values, eps, replayed)
        noise = _loss_noise({**probed.rows, "": [("joint", r.seed, r.idx) for r in probed.jrows]}, values, ctx.ev,
                            replayed)

        def judging(values: list[float], spread: _Spread | None) -> _Judge:
            return _Judge(
                values=values, noise=noise, precision=grad_precision, eps=eps, native=mode == "native",
                loss=max(abs(replayed), terms),  # a sum that cancels rounds relative to its terms
                scale=values[stats.scale], ref_scale=values[stats.ref_scale] if stats.ref_scale is not None else None,
                gaps=stats.gaps, spread=spread, measured=probed.noise, rows=probed.rows,
            )

        judge = judging(values, spread)
        if (stats.gaps and not precision_test and usable and reason is None and nonfinite is None
                and judge.gaps_beyond(selection.checked)):
            # the smallest check: a gradient farther from the reference than the precision's tolerance
            # (a hook, an edited .grad, or rounding the precision test excuses) runs the precision test now
            spread = _measure_spread(ctx.ev, params, list(selection.checked), ctx.signature, seed, host, at)
            values = host.fetch()
            judge = judging(values, spread)
        # an evaluation with ±2h passes, for failures of a check that measured no noise
        measured = None if options.richardson else (
            lambda: request.evaluation(mode, "sequential", richardson=True, share=ctx.ev))
        tensors: dict[str, TensorCheck] = {}
        for name, p in params.items():
            shape = tuple(p.shape)
            if name in selection.skipped:
                tensors[name] = TensorCheck(name, shape, "skipped", reason=selection.skipped[name])
            elif nonfinite is not None:
                tensors[name] = TensorCheck(name, shape, "nonfinite", reason=nonfinite)
            elif reason is not None:
                tensors[name] = TensorCheck(name, shape, "skipped", reason="check unreliable: " + reason)
            else:
                tensors[name] = _tensor_verdict(name, shape, selection, probed, judge, stats, options, measured,
                                                local.names.get(name))
                if name in probed.left_out:
                    tensors[name] = _failed_there(tensors[name], local.failed[name])
            if name in selection.excluded:
                tensors[name] = dataclasses.replace(tensors[name], excluded=selection.excluded[name].description,
                                                    excluded_count=selection.excluded[name].count)
        joint_probes: tuple = ()
        if probed.jrows and nonfinite is None and reason is None:
            joint_probes, tensors = _joint_verdicts(ctx, judge, probed.jrows, tensors, selection.checked, probed.refs,
                                                    options.localize, measured, local.names)
    return Report(
        tensors=tensors,
        seed=seed,
        precision=mode,
        precision_reason=mode_reason,
        reference=probed.ref_stats is not None,
        grad_dtype=_dtype_name(first_grad.dtype),
        grad_precision=grad_precision,
        train_loss=train,
        replay_loss=replayed,
        reliable=reason is None,
        reason=reason,
        seconds=time.perf_counter() - started,
        evaluation="batched" if ctx.ev.batched else "sequential",
        evaluation_reason=ctx.ev.batch_reason,
        measured_precision=probed.noise.precision if probed.noise is not None else None,
        loss_noise=probed.noise.relative if probed.noise is not None else None,
        kernels=ctx.ev.kernels or (),
        kept_casts=ctx.ev.kept_casts[0],
        kept_cast_sites=ctx.ev.kept_casts[1],
        joint=joint_probes,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _Request:
    """What one check evaluates: the loss of ``model`` on ``batch`` from the ``replay`` state,
    probed as ``options`` say with the probe sampler's ``seed``; ``reduce``: the data-parallel
    mean (None: one process)."""

    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    batch: Any
    replay: ReplayState
    options: ProbeOptions
    seed: int
    reduce: Callable[[Tensor], Tensor] | None

    def evaluation(self, mode: str, how: str, *, richardson: bool, share: _Evaluation | None = None) -> _Evaluation:
        """An evaluation of the loss in ``mode`` ("float64" or "native"), batched or
        sequential as ``how`` asks, with ``±2h`` passes when ``richardson``; ``share``: an
        evaluation whose float64 copy it uses."""
        return _Evaluation(self.model, self.loss_fn, self.batch, self.replay, self.options.kinks, mode, how,
                           self.reduce is not None, richardson, share=share)


@dataclasses.dataclass(frozen=True)
class _Selection:
    """Which tensors a check probes, and why the others are not.

    Attributes:
        skipped: Why each parameter that is not checked is not (frozen, no gradient, every
            element excluded, not selected by ``names``).
        excluded: The elements of each tensor that are never probed (:func:`_exclusions`).
        every: Every usable gradient, by name: it sets the probe plan and the gradient scale
            of the tolerances, also where ``names`` checks fewer tensors.
        checked: The gradients checked (``every`` less the tensors ``names`` leaves out).
    """

    skipped: dict[str, str]
    excluded: dict[str, _Excluded]
    every: dict[str, Tensor]
    checked: dict[str, Tensor]


@dataclasses.dataclass
class _Probed:
    """What probing the checked tensors left on the device, before the check's host transfer.

    Attributes:
        ctx: What every probe shares: the evaluation, the step, the unperturbed pass.
        ref_stats: Per tensor, what :class:`_ReferenceStats` took of its float64 reference
            gradient (None: no reference).
        refs: Per checked tensor, its float64 reference (None: no reference).
        kink_log: Per checked tensor, the kink record of each probe.
        rows: Per checked tensor, ``(kind, value, host indices)`` of each probe (empty when
            the evaluation is not usable).
        jrows: The joint probes.
        noise: The measured noise of the float64 evaluation (None: not measured).
        left_out: The tensors the joint probes leave out: the module-local checks of the step
            failed them, and they have no probes of their own (:class:`_LocalFindings`).
    """

    ctx: _CheckContext
    ref_stats: dict[str, dict[str, Any]] | None
    refs: dict[str, _RefView | None]
    kink_log: dict[str, list]
    rows: dict[str, list]
    jrows: list[_JointRow]
    noise: _Noise | None = None
    left_out: frozenset[str] = frozenset()



@dataclasses.dataclass(frozen=True)
class _Statistics:
    """Host indices of what the verdicts need besides the probes (queued for the check's transfer).

    Attributes:
        gstats: Per checked tensor, whether its gradient holds a non-finite value, and the first.
        gaps: Per checked tensor, the precision test's distance from the reference (only
            when the precision test runs).
        scale: The RMS of every usable gradient (``G``).
        ref_scale: The RMS of their float64 reference (``G_ref``; None without a reference).
        loss0: The replayed loss ``L(θ)``.
        mid_kink: Whether the probe whose midpoint stands for ``L(θ)`` crossed a kink (None:
            ``L(θ)`` was evaluated).
    """

    gstats: dict[str, tuple[int, int]]
    gaps: dict[str, dict[str, int]]
    scale: int
    ref_scale: int | None
    loss0: int
    mid_kink: int | None


def _gradients(
    model: nn.Module, loss_fn: Callable, batch: Any, grads: str | Mapping[str, Tensor], replay: ReplayState | None,
    train_loss: Tensor | float | None, params: dict[str, nn.Parameter],
) -> tuple[ReplayState, Tensor | float | None, dict[str, Tensor]]:
    """The gradients under test, the state the training forward started from and its loss:
    computed here for ``grads="autograd"`` (a training step replayed from the current state),
    else the given ones (``replay`` None: the current state)."""
    if grads == "autograd":
        replay = capture(model)
        train_loss, grad_map = _autograd_gradients(model, loss_fn, batch, replay, params)
        return replay, train_loss, grad_map
    grad_map = _given_gradients(grads, params)
    if replay is None:
        replay = capture(model)
    if train_loss is not None:
        train_loss = _loss_value("train_loss", train_loss)
    return replay, train_loss, grad_map


def _select(
    model: nn.Module, params: dict[str, nn.Parameter], grad_map: dict[str, Tensor], names: Collection[str] | None,
) -> _Selection:
    """The tensors with a usable gradient, their excluded elements, and those ``names`` selects;
    raises ValueError when there is nothing to check."""
    skipped = _skip_reasons(params, grad_map)
    excluded = _exclusions({n: params[n] for n in grad_map if n not in skipped}, model)
    skipped.update({n: f"every element is excluded ({ex.description})" for n, ex in excluded.items()
                    if ex.count == params[n].numel()})
    every = {n: g for n, g in grad_map.items() if n not in skipped}  # sets the probes and tolerances
    if names is not None:
        skipped.update({n: _NOT_SELECTED for n in params if n not in names and n not in skipped})
    checked = {n: g for n, g in every.items() if n not in skipped}
    if not checked:
        raise ValueError(
            "`model` has no parameter with a gradient to check: "
            + "; ".join(f"{n}: {r}" for n, r in skipped.items())
            if skipped
            else "`model` has no parameters"
        )
    return _Selection(skipped, excluded, every, checked)


#: Joint probes of a check in which ``per_tensor="auto"`` left tensors without probes of their
#: own: a single random direction misses a wrong gradient with probability about
#: ``tolerance / error`` (about 1% on the README's transformer), two independent ones need both to miss.
_JOINT_WITHOUT_OWN = 2


def _bytes64(tensors: Iterable[Tensor]) -> int:
    """Bytes of a float64 copy of ``tensors``: about what a stage of the check frees (for
    :func:`gradwatch._sizes.released`, which gives memory back to the system every few MiB)."""
    return 8 * sum(t.numel() for t in tensors)


def _tensor_plan(
    plan: dict[str, list], selection: _Selection, options: ProbeOptions, mode: str,
    reduce: Callable[[Tensor], Tensor] | None,
) -> dict[str, list]:
    """The probes of each tensor's own: ``plan`` with ``per_tensor="all"``, natively, without a
    joint probe or without the float64 reference; else :func:`_own_probes` (above 16 tensors,
    only those a joint probe weighs too little keep theirs)."""
    if options.per_tensor == "all" or mode != "float64" or not options.joint or not options.reference:
        return plan
    return _own_probes(plan, selection.checked, reduce)


def _probe_all(
    request: _Request, selection: _Selection, plan: dict[str, list], mode: str, host: _HostValues,
    local: _LocalFindings | None = None, loss_terms: Tensor | None = None,
) -> _Probed:
    """Evaluate the unperturbed pass (with the float64 reference gradient when the options ask
    for it), every planned probe and the joint probes in ``mode``; their device values join
    ``host``. Nothing is probed when the evaluation is not usable (the check is unreliable).
    ``local``: what the module-local checks of this step found (:class:`_LocalFindings`: a tensor
    they failed without probes of its own is left out of the joint probes, and kernels they
    measured computing in float64 are not measured again); ``loss_terms``: a module-local check's
    ``‖g_out∘y‖₂`` (its measured noise is relative to it)."""
    options, checked, excluded = request.options, selection.checked, selection.excluded
    local = local if local is not None else _LocalFindings()
    left_out = frozenset(n for n in local.failed if n in checked and not plan[n])
    ev = request.evaluation(mode, options.evaluation, richardson=options.richardson)
    # The smallest check (±h only, no reference gradient, sequential) skips the
    # unperturbed pass: each probe's +h pass is its own kink reference, and the
    # midpoint of its ±h losses stands for the unperturbed loss (O(h²) away).
    ev.own_reference = not options.richardson and not options.reference and ev.batched is False
    lines = _joint_lines(ev, {n: g for n, g in checked.items() if n not in left_out}, request.seed, options.joint,
                         options.step, excluded)
    _sizes.released(_bytes64(checked.values()))  # the chunks their terms were summed from
    # the reference gradient is never held whole: what the probes, the joint lines and the
    # precision test need of it is computed as the float64 backward produces each tensor's
    stats = _ReferenceStats(checked, plan, [line for _, line in lines], excluded, gap=True)
    loss0, signature, ref_stats = ev.base(selection.every, options.reference,
                                          stats=None if request.reduce is not None else stats)
    ev.loss0 = loss0
    _sizes.released(_bytes64(selection.every.values()))  # the float64 activations of the reference pass
    step, noise = _measured(request, ev, selection, loss0, lines, signature, local.float64_kernels, loss_terms)
    held = None
    if ref_stats is not None and request.reduce is not None:  # data parallel: the mean over ranks, as .grad
        held = _reduced(ref_stats, request.reduce)
        ref_stats = {name: stats(name, g) for name, g in held.items()}
    ctx = _CheckContext(ev, step, signature, loss0, excluded, request.reduce)
    kink_log: dict[str, list] = {name: [] for name in checked}
    source = _References(ev, selection.every, excluded, held)
    refs = {name: _RefView(name, ref_stats[name]["terms"], source) if ref_stats is not None else None
            for name in checked}
    if ref_stats is not None:
        for j, (_, line) in enumerate(lines):
            line.set_reference([ref_stats[n]["joint"][j] for n in line.names])
    rows = {}
    # a model whose float64 copy is a few MiB: the passes' activations back to the system after each tensor
    large = _bytes64(selection.every.values()) >= _sizes.TRIM_BYTES
    for name in checked if ev.usable else ():  # else unreliable: no point in probing
        rows[name] = _probe_tensor(ctx, name, checked[name], refs[name], plan[name], host, kink_log[name])
        if plan[name] and large:
            _sizes.release()
    jrows = _joint_probes(ctx, lines, host) if ev.usable else []
    _sizes.released(_bytes64(selection.every.values()))
    return _Probed(ctx, ref_stats, refs, kink_log, rows, jrows, noise, left_out)


def _measured(
    request: _Request, ev: _Evaluation, selection: _Selection, loss0: Tensor | None, lines: list,
    signature: _Reference | None, float64_kernels: frozenset[str] = frozenset(), loss_terms: Tensor | None = None,
) -> tuple[float | None, _Noise | None]:
    """The base step of the probes and the measured noise of the float64 evaluation
    (:mod:`gradwatch._precision`); the joint ``lines`` are rescaled to that step. A step the
    options set is kept, and native evaluation measures nothing (its dtype is what it computes
    in); nor does the smallest check of a graph whose kernels are all in ``float64_kernels``.
    ``loss_terms``: a module-local check's ``‖g_out∘y‖₂``, the scale its noise is relative to."""
    options = request.options
    # the smallest check (no unperturbed pass) measures nothing up front: a probe that fails it
    # is measured again with ±2h passes before the verdict stands (see _remeasure)
    if not ev.float64 or not ev.usable or loss0 is None:
        return options.step, None
    if (not options.richardson and ev.kernels is not None and float64_kernels.issuperset(ev.kernels)
            and request.reduce is None):
        # the smallest check of a graph of torch's own ops alone, or of kernels the module-local checks
        # of this step measured computing in float64: it computes in float64 (four evaluations of the
        # seven of a tiny Hugging Face model's smallest check, not spent)
        return options.step, None
    sigma, loss = _measure_noise(ev, [f"model.{n}" for n in selection.every], request.seed, request.reduce, loss0,
                                 signature, loss_terms)
    relative = _relative(sigma, loss)
    noise = _Noise(sigma, relative, _precision_name(relative))
    if options.step is not None:
        return options.step, noise
    step = _measured_step(relative, options.richardson)
    if step <= DEFAULT_STEP:
        return None, noise
    for _, line in lines:
        line.h0 = line.h0 * (step / DEFAULT_STEP)
        line.h = line.h0
    return step, noise


def _queue_statistics(
    selection: _Selection, probed: _Probed, precision_test: bool, host: _HostValues,
) -> _Statistics:
    """Queue on ``host`` what the verdicts need besides the probes: the non-finite flags of
    each gradient, the precision test's gaps, the gradient scales and the replayed loss."""
    ref_stats = probed.ref_stats
    gstats = {name: _grad_stats(g, host) for name, g in selection.checked.items()}
    # without the precision test (the smallest check) the gap is still judged: beyond the precision's
    # tolerance, the precision test runs then (see _check_once)
    gaps = {name: {k: host.add(v) for k, v in ref_stats[name]["gap"].items()}
            for name in selection.checked} if ref_stats is not None else {}
    scale = _gradient_rms(selection.every, host)
    squares = {n: r["square"] for n, r in ref_stats.items()} if ref_stats else None
    ref_scale = _gradient_rms(selection.every, host, squares) if ref_stats else None
    if probed.ctx.loss0 is None:  # own-reference probes: the first probe's midpoint stands for L(θ)
        first = next(idx for rs in [*probed.rows.values(), [(None, None, r.idx) for r in probed.jrows]]
                     for _, _, idx in rs)
        loss0, mid_kink = first["mid"], first["kink"]
    else:
        loss0, mid_kink = host.add(probed.ctx.loss0), None
    return _Statistics(gstats, gaps, scale, ref_scale, loss0, mid_kink)


def _tensor_verdict(
    name: str, shape: tuple[int, ...], selection: _Selection, probed: _Probed, judge: _Judge, stats: _Statistics,
    options: ProbeOptions, measured: Callable[[], _Evaluation] | None, local: str | None = None,
) -> TensorCheck:
    """The verdict of one checked tensor from its probes: a failure in a check that measured
    no noise is measured again first (``measured``: a factory of an evaluation with ``±2h``
    passes), kink events are attached, and a failure is localised (``options.localize``), unless
    a module-local check of the same step failed the tensor (``local``: its name there)."""
    ctx, rows, grad, g_ref = probed.ctx, probed.rows[name], selection.checked[name], probed.refs[name]
    gstats, gap = stats.gstats[name], stats.gaps.get(name)
    tc = judge.tensor(name, shape, rows, gstats, gap)
    if not options.richardson and tc.verdict == "fail":  # noise not measured: measure it first
        tc = _remeasure(ctx.on(measured(), selection.every), judge, tc, rows, grad, g_ref, judge.values, gstats, gap)
    tc = _attach_kinks(tc, probed.kink_log[name], judge.values, options.near_kink_margin)
    if options.localize and tc.verdict == "fail" and local is not None:
        return _located_there(tc, local)
    if options.localize and tc.verdict == "fail":
        located = _locate(ctx, judge, tc, grad, g_ref)
        if located is not None:
            tc = dataclasses.replace(tc, located=located)
    return tc
