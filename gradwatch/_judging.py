"""Judging: tolerances and verdicts from the values a check brought to the host.

One room of the engine (see :mod:`gradwatch.engine`): the device statistics a verdict
needs (gradient RMS, gap to the float64 reference), whether the replay can be trusted,
the loss noise, and :class:`_Judge`, which turns probe values into
:class:`~gradwatch.report.Probe` and :class:`~gradwatch.report.TensorCheck` verdicts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch import _sizes
from gradwatch._evaluation import _dtype_name, _HostValues, _native_gradients
from gradwatch._precision import _SAFETY, _Noise
from gradwatch.kinks import _ProbeKinks
from gradwatch.replay import ReplayState
from gradwatch.report import RESOLVING_BOUND, KinkEvent, Probe, TensorCheck

if TYPE_CHECKING:
    from gradwatch._evaluation import _Evaluation

__all__: list[str] = []

#: Relative tolerance by the precision the gradient was computed in (precision test,
#: and the code test when there is no float64 reference).
RTOL = {
    "float64": 1e-7,
    "float32": 1e-4,
    "tf32": 1e-2,
    "float16": 0.1,
    "bfloat16": 0.2,
}
#: Precisions below float32, whose rounding a move by float32 ulps does not re-randomise.
_BELOW_FLOAT32 = ("tf32", "float16", "bfloat16")
#: Code-test tolerance against the float64 reference, relative and absolute (× the
#: tensor's own reference RMS, so a tensor with small gradients is judged at its scale).
_REF_RTOL = 1e-6
#: The same, by the precision the float64 evaluation was measured to compute in
#: (:mod:`gradwatch._precision`): a kernel that computes in float32 inside has a float32
#: backward too, so its reference gradient is only that accurate.
_MEASURED_REF_RTOL = {"float64": _REF_RTOL, "~float32": RTOL["float32"], "below float32": RTOL["tf32"]}
#: Code-test absolute floor as a fraction of the whole model's reference RMS ``G_ref``:
#: far above float64 rounding of a gradient that is truly 0, far below any real gradient.
_REF_GLOBAL = 1e-9
#: Without a reference: absolute floor in units of the gradient dtype's eps × |L|, which
#: holds when every gradient is 0 or rounding noise (no other tensor sets a scale).
_NOISE_ULPS = 8.0
#: Measured spread (precision test, fidelity check): the native gradient is recomputed at
#: the parameters and at the parameters moved by this many units in their last place
#: (random signs), which re-randomises the rounding of every op; nondeterministic kernels
#: add their own run-to-run spread.
_SPREAD_ULPS = 4.0
#: Parameters of at most this many elements in all are moved together (:func:`_moved_together`).
_MOVED_TOGETHER = 1 << 12
#: Multiple of the measured spread ``‖g(θ) - g(θ')‖`` allowed for ``‖g - g_ref‖``: a
#: tensor of n elements gets ``_SPREAD_MULT + _SPREAD_SMALL/√n`` (few elements: few
#: degrees of freedom, a heavier tail).
_SPREAD_MULT = 4.0
_SPREAD_SMALL = 30.0
#: The fidelity check allows this multiple of the measured loss spread, at most
#: ``_SPREAD_LOSS_CAP·|L|`` (randomness outside torch's RNG moves the loss far more).
_SPREAD_LOSS_MULT = 8.0
_SPREAD_LOSS_CAP = 1e-3
#: Absolute tolerance as a fraction of ``rtol`` times the gradient RMS.
_ATOL_RATIO = 0.5
#: Without a float64 reference (no gap to judge), the training gradient is still compared
#: with the central differences: above its precision's tolerance and this fraction of the
#: derivative, it fails (a hook or an edited ``.grad``: a factor of 2 is a gross error).
_COARSE_RTOL = 1e-2
#: Resolving power: a derivative is taken to be at least this multiple of the gradient dtype's
#: rounding of ``|L|`` (:data:`_NOISE_ULPS`): a gradient that is 0 at that rounding (a bias
#: before BatchNorm, a model whose loss does not depend on a tensor) has no relative error to
#: resolve; it is judged against that absolute floor.
_ZERO_FLOOR = 100.0
#: With a float64 reference, a tensor whose float64 gradient along a probe is above this
#: fraction of the model's ``G_ref`` is resolved relative to its own gradient (see
#: :meth:`_Judge.probe`).
_ZERO_REL = 1e-12
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


def _nonfinite(t: Tensor) -> Tensor:
    """``~torch.isfinite(t)`` of a floating tensor, a chunk at a time for a large contiguous
    tensor (it makes a temporary of ``t``'s size). Computed as ``isnan(t - t)``: ``t - t``
    is NaN exactly where ``t`` is NaN or ±Inf (and 0 elsewhere), two kernels where
    ``isfinite`` runs five, which matters on tiny tensors (``assert_gradients``)."""
    t = t.detach()
    if t.numel() <= _sizes.CHUNK or not t.is_contiguous():
        return torch.isnan(t - t)
    out = torch.empty(t.shape, dtype=torch.bool, device=t.device)
    flat, dest = t.reshape(-1), out.view(-1)
    chunk = _sizes.CHUNK
    for lo in range(0, flat.numel(), chunk):
        part = flat[lo : lo + chunk]
        dest[lo : lo + chunk] = torch.isnan(part - part)
    return out


def _grad_stats(g: Tensor, host: _HostValues) -> tuple[int, int]:
    bad = _nonfinite(g).reshape(-1)
    return host.add(bad.any()), host.add(bad.to(torch.uint8).argmax())


def _gap(g: Tensor, g_ref: Tensor, host: _HostValues) -> dict[str, int]:
    """Distance of the gradient under test from the float64 reference, and where it is largest."""
    return {k: host.add(v) for k, v in _gap_values(g, g_ref).items()}


def _gap_values(g: Tensor, g_ref: Tensor) -> dict[str, Tensor]:
    """:func:`_gap`'s device values, with one tensor-sized float64 temporary at a time
    (computed while the reference backward produces ``g_ref``)."""
    if g_ref.numel() > _sizes.CHUNK and g_ref.is_contiguous():  # a chunk at a time
        return _chunked_gap(g, g_ref)
    diff = g.detach().to(device=g_ref.device, dtype=torch.float64, copy=True).reshape(-1)
    diff.sub_(g_ref.reshape(-1))
    out = {"gap": torch.linalg.vector_norm(diff), "worst": diff.abs_().argmax()}
    del diff
    out["ref_norm"] = torch.linalg.vector_norm(g_ref)
    out["ref_rms"] = g_ref.pow(2).mean().sqrt() if g_ref.numel() else g_ref.new_zeros(())
    out["ref_bad"] = _nonfinite(g_ref).any()
    return out


def _chunked_gap(g: Tensor, g_ref: Tensor) -> dict[str, Tensor]:
    """:func:`_gap_values` of a large tensor, a chunk at a time (sums of chunk sums)."""
    flat_g, flat_r = g.detach().reshape(-1), g_ref.reshape(-1)
    gap = ref = None
    maxima, where = [], []
    for lo, hi in _sizes.spans(g_ref.numel()):
        r = flat_r[lo:hi]
        d = flat_g[lo:hi].to(device=g_ref.device, dtype=torch.float64, copy=True).sub_(r)
        gap_c, ref_c = d.pow(2).sum(), r.pow(2).sum()
        gap, ref = (gap_c, ref_c) if gap is None else (gap + gap_c, ref + ref_c)
        m, j = d.abs_().max(0)
        maxima.append(m)
        where.append(j + lo)
    return {
        "gap": gap.sqrt(),
        "worst": torch.stack(where)[torch.stack(maxima).argmax()],
        "ref_norm": ref.sqrt(),
        "ref_rms": (ref / g_ref.numel()).sqrt(),
        "ref_bad": _nonfinite(g_ref).any(),
    }


def _square_sum(g: Tensor) -> Tensor:
    """Sum of the squares of the finite elements of ``g``, in float64 (one float64
    temporary, or one chunk of it for a large tensor)."""
    if g.numel() > _sizes.CHUNK and g.is_contiguous():
        flat, total = g.detach().reshape(-1), None
        for lo, hi in _sizes.spans(g.numel()):
            t = flat[lo:hi].to(torch.float64, copy=True)
            part = t.masked_fill_(~torch.isfinite(t), 0.0).pow_(2).sum()
            total = part if total is None else total + part
        return total
    t = g.detach().to(torch.float64, copy=True)
    return t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).pow_(2).sum()


def _gradient_rms(grad_map: Mapping[str, Tensor], host: _HostValues,
                  squares: Mapping[str, Tensor] | None = None) -> int:
    """RMS of the finite elements of every gradient of ``grad_map`` (``squares``: their
    :func:`_square_sum`, when computed already)."""
    total = None
    count = 0
    for name, g in grad_map.items():
        sq = squares[name] if squares is not None else _square_sum(g)
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
    train: float | None, native: float | None, replayed: float | None, shadow_rtol: float, own: bool, mode: str,
    spread: float = 0.0, terms: float = 0.0,
) -> str | None:
    """Why the replay cannot be trusted, or None (``replayed`` None: not compared).

    ``spread``: the run-to-run spread of the native loss gradwatch measured (two native
    replays, see :func:`_measure_spread`); the native replay may differ from the
    training loss by a multiple of it (nondeterministic kernels), capped far below
    what randomness outside torch's RNG or a scaled loss does. ``terms``: the root sum of
    squares of the loss's terms when known (a module-local check's ``‖g_out∘y‖₂``), which the
    tolerances are relative to when larger than the loss: a sum that cancels (a module before
    BatchNorm, whose output gradient is orthogonal to its output) rounds relative to its terms."""
    if train is not None and native is not None and not own:
        slack = _REPLAY_RTOL * max(abs(train), abs(native), terms) + 1e-30
        if math.isfinite(spread):
            slack += min(_SPREAD_LOSS_MULT * spread, _SPREAD_LOSS_CAP * abs(train))
        if not math.isfinite(native) or abs(native - train) > slack:
            return (
                f"replayed loss {native!r} differs from the training loss {train!r}: the loss is not "
                "reproducible from the captured RNG and buffers (randomness outside torch's RNG, "
                "a loss_fn that differs from the loss that was backpropagated, or a scaled loss)"
            )
    reference = native if native is not None else train
    if reference is None or replayed is None:
        return None
    rtol = shadow_rtol if mode == "float64" else _REPLAY_RTOL
    if abs(replayed - reference) > rtol * max(abs(reference), abs(replayed), terms) + 1e-12:
        return (
            f"{mode} replay gives loss {replayed!r} but the model in its own precision gives {reference!r} "
            f"(relative tolerance {rtol:g}): the model does not behave the same on the {mode} evaluation"
        )
    return None


def _unreliable(
    ev: _Evaluation, train: float | None, native: float | None, replayed: float | None, precision: str, own: bool,
    spread: float, terms: float = 0.0,
) -> str | None:
    """Why a check whose losses are finite cannot be trusted, or None: the float64 evaluation
    cannot draw the training forward's random numbers, the replay does not reproduce the
    training loss (:func:`_replay_problem`), the loss underflows in the training precision
    (:func:`_underflow`), or the float64 evaluation returned a loss below float64.

    ``replayed``: the replayed loss (None: not compared); ``precision``: the training
    precision; ``own``: the training loss is the native replay's own; ``spread``: the
    measured run-to-run spread of the native loss (:func:`_loss_spread`); ``terms``: the root sum of
    squares of the loss's terms when known (:func:`_replay_problem`)."""
    mode = ev.mode
    reason = ev.unreplayable or _replay_problem(train, native, replayed, _SHADOW_RTOL[precision], own, mode,
                                                spread=spread, terms=terms)
    if reason is None:
        reason = _underflow(native if native is not None else train, replayed, precision, mode)
    if reason is None and ev.lossy:
        reason = (
            f"`loss_fn` returned a {_dtype_name(ev.loss_dtype)} loss on the float64 copy of the "
            "model: something casts to a lower precision "
            "(such as .float()), so central differences would measure rounding noise; keep the loss in "
            "the dtype of its inputs"
        )
    return reason


def _underflow(native: float | None, replayed: float | None, precision: str, mode: str) -> str | None:
    """Why the loss in the training precision underflowed where the float64 replay did not, or None.

    A loss below the smallest normal number of its precision (``1.7e-56`` replayed,
    ``0.0`` in float32) has a gradient that is rounding, not the derivative: a precision
    gap then says nothing about the backward. The ``+1e-12`` slack of
    :func:`_replay_problem` lets such a loss through, so it is told apart here.
    """
    if mode != "float64" or native is None or replayed is None or replayed == 0 or precision == "float64":
        return None
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(precision, torch.float32)
    tiny = float(torch.finfo(dtype).tiny)
    if abs(replayed) >= tiny or abs(native - replayed) <= _SHADOW_RTOL[precision] * abs(replayed):
        return None
    return (
        f"the loss underflows in {_dtype_name(dtype)}: it is {native!r} where the float64 replay gives "
        f"{replayed!r}, below {_dtype_name(dtype)}'s smallest normal number {tiny:.3g}, so the {precision} "
        "gradient is rounding, not the derivative; scale the loss up or compute it in log space"
    )


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
    dtype = ev.lowest_dtype if ev.lowest_dtype is not None else torch.float64  # the lowest precision computed in
    floor = _ROUNDING_FLOOR * float(torch.finfo(dtype).eps) * abs(loss0) if math.isfinite(loss0) else 0.0
    fourth = [
        values[idx["fourth"]] for probes in rows.values() for _, _, idx in probes
        if "fourth" in idx and not values[idx["kink"]]
    ]
    fourth = [f for f in fourth if math.isfinite(f)]
    measured = math.sqrt(sum(f * f for f in fourth) / len(fourth)) / _FOURTH_DIFF_NOISE if fourth else 0.0
    return max(measured, floor)


def _tensor_noise(rows: Mapping[str, list], values: list[float]) -> dict[str, float]:
    """Per tensor, the loss noise its own probes' fourth differences measured (kinked probes
    left out; see :func:`_loss_noise`), where it has any."""
    out = {}
    for name, probes in rows.items():
        fourth = [values[idx["fourth"]] for _, _, idx in probes if "fourth" in idx and not values[idx["kink"]]]
        fourth = [f for f in fourth if math.isfinite(f)]
        if fourth:
            out[name] = math.sqrt(sum(f * f for f in fourth) / len(fourth)) / _FOURTH_DIFF_NOISE
    return out


@dataclasses.dataclass
class _Spread:
    """Host indices of what :func:`_measure_spread` measured (see :func:`_Judge.tensor`)."""

    grads: dict[str, int]  # per tensor: ‖g(θ) - g(θ')‖ of two native replays
    loss: int  # |L(θ) - L(θ')| of the same replays
    at: int  # L(θ) of the first replay (with the check's native replay, a third sample of the spread)
    crossed: range | None  # per op of the float64 pass: the native pass took another branch
    reference: Any  # the float64 pass's kink reference (names and modules of those ops)
    diverged: int | None  # where the native pass's sequence of non-smooth ops left the float64 one
    diverged_flag: int  # host index: 1 when it did (the same decision on every process)


def _measure_spread(
    ev: _Evaluation, params: Mapping[str, Tensor], names: list[str], signature: Any, seed: int, host: _HostValues,
    replayed: tuple[Tensor, Mapping[str, Tensor]] | None = None,
) -> _Spread | None:
    """Rounding the training precision incurs, measured: the native gradient replayed at
    ``θ`` and at ``θ'`` (every floating parameter moved by :data:`_SPREAD_ULPS` units in
    its last place, random signs), which differ by what rounding (and nondeterministic
    kernels) contribute, amplified by the conditioning of the computation exactly as
    the training gradient's own rounding is.

    The replay at ``θ`` also records the branches of the non-smooth ops and compares
    them with the float64 pass (``signature``): where they differ, the training
    gradient and the float64 reference are gradients of different branches.

    ``replayed``: the loss and gradients at ``θ`` of a native replay already run (the
    training step of ``grads="autograd"``, when no parameter holds a tensor hook: the
    same computation as this replay); when no branch is to be compared (the float64 pass
    ran no non-smooth op) they stand for the replay at ``θ``, which is not run again.

    Returns None when a replay raises (the precision test then keeps its fixed
    tolerance). Only checks that compute the float64 reference pay for it.
    """
    try:
        kinks = None
        if signature is not None and ev.recorder is not None and len(signature):
            device = signature.codes[0].device
            kinks = _ProbeKinks(signature, device).next_pass(margins=False)
        recorder = ev.recorder.compare_into(kinks) if kinks is not None else None
        ev.release()  # the float64 copy is not needed by native replays (made again when needed)
        moved, together = {}, {}
        small = sum(p.numel() for p in params.values() if p.is_floating_point()) <= _MOVED_TOGETHER
        for i, (n, p) in enumerate(params.items()):
            if not p.is_floating_point() or p.numel() == 0:
                moved[n] = p
                continue
            gen = torch.Generator(device=p.device).manual_seed((seed + 7919 * i) % 2**62)
            sign = torch.randint(0, 2, p.shape, generator=gen, device=p.device, dtype=torch.int8)
            if small:
                together[n] = (p.detach(), sign, _SPREAD_ULPS * float(torch.finfo(p.dtype).eps))
                continue
            moved[n] = _moved(p.detach(), sign, _SPREAD_ULPS * float(torch.finfo(p.dtype).eps))
            del sign
        if together:
            moved.update(zip(together, _moved_together(*zip(*together.values()))))
        # θ' first, its gradient kept; then θ, each gradient compared as the backward produces it
        loss1, g1 = _native_gradients(ev.wrapper, ev.batch, ev.replay, moved, names)
        del moved

        def spread(name: str, a: Tensor) -> Tensor:
            b = g1.get(name)
            if b is None:
                return None
            if a.numel() > _sizes.CHUNK and a.is_contiguous() and b.is_contiguous():  # a chunk at a time
                fa, fb, total = a.reshape(-1), b.reshape(-1), None
                for lo, hi in _sizes.spans(a.numel()):
                    d = fa[lo:hi].to(torch.float64, copy=True).sub_(fb[lo:hi])
                    part = d.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).pow_(2).sum()
                    total = part if total is None else total + part
                return total.sqrt()
            d = a.to(torch.float64, copy=True).reshape(-1)
            d.sub_(b.reshape(-1))
            return torch.linalg.vector_norm(d.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0))

        if replayed is not None and recorder is None:
            loss0, g0 = replayed[0], {n: spread(n, replayed[1][n]) for n in names if n in replayed[1]}
        else:
            loss0, g0 = _native_gradients(ev.wrapper, ev.batch, ev.replay, params, names, recorder, stats=spread)
        del g1
    except Exception:  # noqa: BLE001 (a replay that cannot run: keep the fixed tolerance)
        return None
    grads = {}
    for n in names:
        d = g0.get(n)
        grads[n] = host.add(0.0) if d is None else host.add(d)
    return _Spread(
        grads=grads,
        loss=host.add((loss0.to(torch.float64) - loss1.to(torch.float64)).abs()),
        at=host.add(loss0),
        crossed=host.extend(kinks.crossed) if kinks is not None else None,
        reference=signature,
        diverged=kinks.diverged if kinks is not None else None,
        diverged_flag=host.add(float(kinks is not None and kinks.diverged is not None)),
    )


def _moved(p: Tensor, sign: Tensor, rel: float) -> Tensor:
    """``(p64 + rel·|p64|·(2·sign - 1)).to(p.dtype)`` with ``p64`` the float64 value of ``p``,
    computed a chunk of :data:`~gradwatch._sizes.CHUNK` elements at a time (the same values as at once)."""
    if not p.is_contiguous() or p.numel() <= _sizes.CHUNK:  # at once (the same values)
        p64 = p.to(torch.float64)
        return (p64 + rel * p64.abs() * (sign.to(torch.float64) * 2 - 1)).to(p.dtype)
    out = torch.empty_like(p)
    flat, signs, dest = p.reshape(-1), sign.reshape(-1), out.view(-1)
    for lo, hi in _sizes.spans(flat.numel()):  # (memory back to the system every few chunks)
        p64 = flat[lo:hi].to(torch.float64)
        dest[lo:hi] = (p64 + rel * p64.abs() * (signs[lo:hi].to(torch.float64) * 2 - 1)).to(p.dtype)
    return out


def _moved_together(ps: tuple[Tensor, ...], signs: tuple[Tensor, ...], rels: tuple[float, ...]) -> list[Tensor]:
    """:func:`_moved` of several small tensors at once: each of its ops applied to every
    tensor in one ``torch._foreach`` call (the same elementwise ops in the same order, so the
    same values; on a tiny op a call per tensor and op costs more than the arithmetic)."""
    p64 = [p.to(torch.float64) for p in ps]
    step = torch._foreach_abs(p64)
    torch._foreach_mul_(step, list(rels))  # rel·|p64|
    pm = [s.to(torch.float64) for s in signs]
    torch._foreach_mul_(pm, 2.0)
    torch._foreach_sub_(pm, 1.0)  # 2·sign - 1
    torch._foreach_mul_(step, pm)
    return [x.to(p.dtype) for x, p in zip(torch._foreach_add(p64, step), ps)]


def _loss_spread(spread: _Spread | None, values: list[float], native: float | None) -> float:
    """Run-to-run spread of the native loss: the largest difference among the spread's two
    replays and the check's own native replay (three samples: one pair alone is too often
    close by chance), 0 when nothing was measured."""
    if spread is None:
        return 0.0
    at = values[spread.at]
    gaps = [values[spread.loss]] + ([abs(at - native)] if native is not None and math.isfinite(native) else [])
    return max(gaps)


def _branch_note(spread: _Spread | None, values: list[float]) -> str | None:
    """Why the precision test is off: the native pass took another branch than the float64
    one (naming the first such op), or None."""
    if spread is None or spread.crossed is None:
        return None
    ref = spread.reference
    first = next((k for k, i in enumerate(spread.crossed) if values[i] > 0), None)
    diverged = spread.diverged if values[spread.diverged_flag] > 0 else None
    if first is None and diverged is None:
        return None
    if first is None or (diverged is not None and spread.diverged is not None and spread.diverged < first):
        k, what = spread.diverged if spread.diverged is not None else 0, "ran another sequence of non-smooth ops than"
    else:
        k, what = first, "took another branch than"
    op = ref.names[k] if k < len(ref) else "?"
    module = ref.modules[k] if k < len(ref) else None
    where = f"{op} in '{module}'" if module else op
    return (
        f"precision test not applied: the training-precision pass {what} the float64 pass at {where} "
        "(an element within rounding of a kink), so the two gradients belong to different branches; "
        "judged against the float64 reference only"
    )


class _Judge:
    """Turns fetched probe values into :class:`Probe` and :class:`TensorCheck` verdicts."""

    def __init__(
        self, *, values: list[float], noise: float, precision: str, eps: float = 0.0, native: bool,
        loss: float = 0.0, scale: float, ref_scale: float | None, gaps: Mapping[str, Mapping[str, int]] | None = None,
        spread: _Spread | None = None, measured: _Noise | None = None,
        rows: Mapping[str, list] | None = None,
    ) -> None:
        """``values``: the check's fetched values; ``noise``: the loss noise (:func:`_loss_noise`);
        ``precision``: the precision the gradient was computed in (its tolerance :data:`RTOL`;
        below float32, TF32 and fp16/bf16, whose rounding a move by float32 ulps does not
        re-randomise, the precision test keeps its floor); ``eps``: the gradient dtype's eps
        and ``loss``: the replayed loss, for the absolute floor without a reference;
        ``native``: the losses were evaluated natively; ``scale`` and ``ref_scale``: the RMS of
        the model's gradient and of its float64 reference (None: no reference); ``gaps``:
        :func:`_gap` per tensor (their reference RMS sets each tensor's own code-test floor);
        ``spread``: :func:`_measure_spread` (None: no precision test ran, the gap is judged
        against the precision's tolerance alone, see :meth:`gaps_beyond`); ``measured``: the noise
        the float64 evaluation was measured to have (:mod:`gradwatch._precision`; None: not
        measured): :data:`~gradwatch._precision._SAFETY` times it floors ``noise``, and its
        reference is as accurate as the precision it says (:data:`_MEASURED_REF_RTOL`);
        ``rows``: the probes per tensor: natively or below float64, each tensor's probes take
        the loss noise they measured themselves when larger (:func:`_tensor_noise`: a tensor
        upstream of a kernel that rounds sees more than the check's pooled ``noise``)."""
        rtol = RTOL[precision]
        self.values = values
        if measured is not None and math.isfinite(measured.sigma):
            noise = max(noise, _SAFETY * measured.sigma)
        self.noise = noise
        below = native or (measured is not None and measured.precision != "float64")
        self.tensor_noise = _tensor_noise(rows, values) if rows is not None and below else {}
        self.ref_rtol = _MEASURED_REF_RTOL[measured.precision if measured is not None else "float64"]
        self.rtol = rtol
        loss_floor = _NOISE_ULPS * eps * abs(loss) if math.isfinite(loss) else 0.0
        self.loss_floor = loss_floor
        self.atol = max(_ATOL_RATIO * rtol * scale, loss_floor)
        self.ref_atol = _REF_GLOBAL * ref_scale if ref_scale is not None else None
        self.ref_scale = ref_scale
        self.scale = ref_scale if ref_scale is not None else scale  # the model's gradient RMS, G
        self.native = native
        self.eps = eps
        self.gaps = gaps or {}
        self.spread = spread
        self.low = precision in _BELOW_FLOAT32
        self.branch_note = _branch_note(spread, values)
        self._name: str | None = None  # the tensor last judged (its floor, for a later probe)

    def _ref_atol(self, name: str | None) -> float | None:
        """Code-test absolute tolerance per unit of ``‖v‖``: the tensor's own reference RMS
        times ``_REF_RTOL``, plus a far smaller fraction of the model's."""
        if self.ref_atol is None:
            return None
        gap = self.gaps.get(name if name is not None else self._name)
        own = self.values[gap["ref_rms"]] if gap is not None and "ref_rms" in gap else self.ref_scale
        return self.ref_rtol * own + self.ref_atol

    def probe(
        self, kind: str, value: int, idx: Mapping[str, int], shape: tuple[int, ...], *, gap: bool = True,
        values: list[float] | None = None, name: str | None = None,
    ) -> Probe:
        """One probe. ``gap=False`` judges against the precision tolerance alone (a located
        gap); ``values``: fetched by a later transfer than the check's (localisation);
        ``name``: the tensor (None: the one last judged)."""
        values = self.values if values is None else values
        v = {k: values[i] for k, i in idx.items()}
        n1, n2, h = v["n1"], v["n2"], v["h"]
        numerical = (4 * n1 - n2) / 3 if self.native else n1
        noise = max(self.noise, self.tensor_noise.get(name if name is not None else self._name, 0.0))
        rounding = noise * (0.95 if self.native else math.sqrt(0.5)) / h if h > 0 else math.inf
        error_bar = abs(n1 - n2) / 3.0 + rounding
        a, a_ref = v["a"], v.get("a_ref")
        grad_tolerance = _ERROR_BAR_MULT * error_bar + self.rtol * v["rss"] + self.atol * v["vnorm"]
        grad_error = math.nan
        if a_ref is not None and gap:  # the code test: against the float64 reference
            error = abs(numerical - a_ref)
            tolerance = (_ERROR_BAR_MULT * error_bar + self.ref_rtol * v["rss_ref"]
                         + self._ref_atol(name) * v["vnorm"])
            grad_error = abs(numerical - a)  # and the gradient training used
            compared = a_ref
        else:
            error = abs(numerical - a)
            tolerance = grad_tolerance
            compared = a
        # the derivative's size: at least the model's gradient RMS along v and _ZERO_FLOOR times the
        # gradient dtype's rounding of |L| (a gradient that is 0 at the loss's rounding is judged
        # absolutely, against that floor); with a float64 reference, a tensor's own probe takes the
        # tensor's own gradient along v instead, unless that is 0 at the model's scale (a bias
        # before BatchNorm): a small but real gradient (a layer behind a layer scale of 1e-6) is
        # resolved relative to itself
        floor = max(self.scale * v["vnorm"], _ZERO_FLOOR * self.loss_floor * v["vnorm"])
        if kind != "joint" and a_ref is not None and gap and self.ref_scale > self.loss_floor and (
                v["rss_ref"] > _ZERO_REL * self.ref_scale * v["vnorm"]):
            floor = v["rss_ref"]
        size = max(abs(numerical), abs(compared), floor)
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
            flat=bool(v.get("flat", 0.0)),
            grad_error=grad_error,
            grad_tolerance=grad_tolerance if a_ref is not None and gap else math.nan,
            resolving_power=_ratio(tolerance, size),
        )

    def tensor(
        self, name: str, shape: tuple[int, ...], rows: list, gstats: tuple[int, int], gap: Mapping[str, int] | None
    ) -> TensorCheck:
        values = self.values
        self._name = name
        any_bad, first_bad = (values[i] for i in gstats)
        probes = tuple(self.probe(kind, value, idx, shape, name=name) for kind, value, idx in rows)
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
            numel = math.prod(shape)
            ref_norm = values[gap["ref_norm"]]
            limit = self._gap_limit(name, ref_norm, numel)
            gap_ratio = _ratio(values[gap["gap"]], limit)
            if self.branch_note is None:
                ratios.append(gap_ratio)
            gap_fields = {
                "precision_gap": _ratio(values[gap["gap"]], ref_norm + _ATOL_RATIO * self.ref_scale * math.sqrt(numel)),
                "gap_ratio": gap_ratio,
                "gap_index": tuple(int(i) for i in np.unravel_index(int(values[gap["worst"]]), shape)),
            }
        judged = [p for p in probes if not p.kink and not p.flat]
        broken = _reference_broken(judged)
        if broken:  # the training gradient is what the central differences confirm
            ratios = [_ratio(p.grad_error, p.grad_tolerance) for p in judged]
        else:
            ratios += [_ratio(p.error, p.tolerance) for p in judged]
        gap_fails = self.branch_note is None and gap_fields.get("gap_ratio", 0.0) > 1.0 and not broken
        failed = any(p.failed for p in judged) and not broken or gap_fails
        if gap is None and not broken:  # no precision test: a gross edit of the training gradient
            coarse = [p for p in judged if _coarse_fail(p)]
            failed = failed or bool(coarse)
            ratios += [_ratio(p.grad_error, max(p.grad_tolerance, _COARSE_RTOL * abs(p.numerical))) for p in coarse]
        flat = sum(p.flat for p in probes)
        if not judged and not failed and flat:
            return TensorCheck(name, shape, "skipped", probes=probes, reason=_FLAT + " (every probe)", **gap_fields)
        if not judged and not failed:
            return TensorCheck(name, shape, "kink", probes=probes,
                               reason="every probe crossed a kink of a non-smooth op", **gap_fields)
        notes = [self.branch_note] if gap is not None and self.branch_note else []
        notes += [_broken_note(judged)] if broken else []
        notes += [f"{_FLAT} ({flat} of {len(probes)} probes)"] if flat else []
        best = min(judged, key=lambda p: p.resolving_power, default=None)
        power = best.resolving_power if best is not None else math.nan
        verdict = "fail" if failed else "pass"
        if not failed and best is not None and _unresolved(best):
            verdict = "inconclusive"
            notes.insert(0, _unresolved_note(best))
        note = "; ".join(notes) or None
        return TensorCheck(name, shape, verdict, **_summary(judged),
                           error_ratio=float(max(ratios, default=math.nan)), probes=probes, reason=note,
                           resolving_power=power, reference_broken=broken, **gap_fields)

    def _gap_limit(self, name: str, ref_norm: float, numel: int) -> float:
        """The precision test's limit for ``‖g - g_ref‖``.

        With a measured spread: ``max(rtol·‖g_ref‖, k_n·spread) + max(eps·G_ref, 8·eps·|L|)·√n``, the
        rounding the training computation incurs on this tensor as measured, whatever the
        conditioning; a hook or an edited ``.grad`` is not part of the replays and a
        kernel wrong in low precision is wrong in both, so neither is excused. Without
        (or below float32, whose rounding a move by float32 ulps does not re-randomise,
        so the floor stays a fraction of the model's gradient):
        ``rtol·‖g_ref‖ + max(rtol/2·G_ref, 8·eps·|L|)·√n``. The ``|L|`` floor holds when every
        gradient is 0 or rounding noise, where no tensor sets a scale, and for a tensor whose own
        float64 gradient is (a bias before BatchNorm: its float32 gradient is rounding noise of
        larger terms): an RMS at most ``8·eps·|L|``. A tensor whose gradient sets a scale above
        it is judged without it, or it would excuse a hook that edits 1/8 of its rows by 2% (a
        BERT layer whose gradient RMS is 50 times ``8·eps·|L|``)."""
        sqrt_n = math.sqrt(numel)
        own = self.values[self.gaps[name]["ref_rms"]] if name in self.gaps else 0.0
        loss_floor = self.loss_floor * sqrt_n if min(own, self.ref_scale) <= self.loss_floor else 0.0
        if self.spread is None or name not in self.spread.grads:
            return self.rtol * ref_norm + max(_ATOL_RATIO * self.rtol * self.ref_scale * sqrt_n, loss_floor)
        measured = (_SPREAD_MULT + _SPREAD_SMALL / sqrt_n) * self.values[self.spread.grads[name]]
        floor = (_ATOL_RATIO * self.rtol if self.low else self.eps) * self.ref_scale * sqrt_n
        return max(self.rtol * ref_norm, measured) + max(floor, loss_floor)

    def gaps_beyond(self, grads: Mapping[str, Tensor]) -> bool:
        """Whether some gradient of ``grads`` is farther from its float64 reference than the
        precision test's limit allows without a measured spread (``rtol·‖g_ref‖`` plus the
        floors): a check that ran no precision test (the smallest) runs it then, since
        only the measured spread tells rounding from a hook or an edited ``.grad`` there."""
        values = self.values
        return any(
            values[gap["gap"]] > self._gap_limit(name, values[gap["ref_norm"]], grads[name].numel())
            for name, gap in self.gaps.items() if name in grads
        )


def _coarse_fail(p: Probe) -> bool:
    """The training gradient disagrees with the central differences grossly (see :data:`_COARSE_RTOL`)."""
    return math.isfinite(p.grad_error) and p.grad_error > max(p.grad_tolerance, _COARSE_RTOL * abs(p.numerical))


def _training_confirmed(p: Probe) -> bool:
    """A probe that fails the code test where the training gradient agrees with the central
    differences and the reference differs from it beyond its precision (see
    :func:`_reference_broken`)."""
    return (p.failed and math.isfinite(p.grad_error) and p.grad_error <= p.grad_tolerance
            and abs(p.autograd - p.reference) > p.grad_tolerance)


def _reference_broken(judged: list[Probe]) -> bool:
    """The float64 reference, not the training gradient, disagrees with the central
    differences: some probe fails the code test, every probe's training gradient agrees
    with the central differences within its precision, and where the code test fails the
    reference differs from the training gradient beyond that precision too (a real bug in
    the backward is in both, so they agree)."""
    failing = [p for p in judged if p.failed]
    if not failing or not all(math.isfinite(p.grad_error) for p in judged):
        return False
    return (all(p.grad_error <= p.grad_tolerance for p in judged)
            and all(abs(p.autograd - p.reference) > p.grad_tolerance for p in failing))


def _broken_note(judged: list[Probe]) -> str:
    """Why a tensor whose reference is broken passes, naming the worst disagreement."""
    worst = max((p for p in judged if p.failed), key=lambda p: _ratio(p.error, p.tolerance))
    return (
        f"the float64 path is broken, not the training gradient: at {worst.where} autograd's gradient of the "
        f"float64 copy is {worst.reference:.3g} where the central differences give {worst.numerical:.3g} and the "
        f"training gradient {worst.autograd:.3g} (which they verify); a kernel that is wrong only in float64 "
        "(training does not use it)"
    )


def _unresolved(best: Probe) -> bool:
    """Whether the probe that resolves a tensor best (smallest :attr:`Probe.resolving_power`)
    still could not have failed an error of :data:`RESOLVING_BOUND`: the check's own noise, or
    the tolerance of a low training precision (bfloat16's 0.2 without a float64 reference), kept
    it from seeing an error of that size."""
    return best.resolving_power > RESOLVING_BOUND


def _unresolved_note(best: Probe) -> str:
    """Why a tensor with no failure is inconclusive, and what resolves it."""
    return (
        f"inconclusive: this check could not have failed a gradient error below {best.resolving_power:.2g} "
        f"(bound {RESOLVING_BOUND:g}; numerical error bar {best.error_bar:.2g} on a derivative of "
        f"{abs(best.numerical):.2g}): the loss evaluation is too coarse for this tensor; give the kernel a float64 "
        "path, register a reference (gradwatch.register_reference) or check the module locally "
        "(gradwatch.check_module)"
    )


_FLAT = (
    "not judged: the perturbed losses were equal although the loss moves at a larger step; rounding to a lower "
    "precision inside the forward (such as a bfloat16 round trip) flattened the loss at the probe's step"
)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _where(flat: int, shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]"


class _KinkRow(NamedTuple):
    """The kink record of one probe: device results and their host indices (made by
    :mod:`gradwatch._probing` and :mod:`gradwatch._joint`, read by :func:`_attach_kinks`)."""

    kinks: _ProbeKinks
    crossed: range
    margin: range
    replacement: bool


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


def _summary(judged: list[Probe]) -> dict[str, float]:
    """``rel_error`` and ``error_bar`` of a tensor over its judged probes: the seed article's
    ``‖num - ana‖ / (‖num‖ + ‖ana‖)`` and the error bars' norm over the same denominator."""
    if not judged:
        return {"rel_error": math.nan, "error_bar": math.nan}
    num = np.array([p.numerical for p in judged])
    ana = np.array([p.autograd for p in judged])
    denom = float(np.linalg.norm(num) + np.linalg.norm(ana))
    return {"rel_error": _ratio(float(np.linalg.norm(num - ana)), denom),
            "error_bar": _ratio(float(np.linalg.norm([p.error_bar for p in judged])), denom)}
