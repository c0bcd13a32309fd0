"""Locating: what follows a failing tensor (private).

A room of the engine (see :mod:`gradwatch.engine`) after :mod:`gradwatch._probing`: a
failure of a check that measured no noise is measured again before it stands
(:func:`_remeasure`), and a failing tensor is narrowed down to one element, confirmed by a
coordinate probe (:func:`_locate`): a failing coordinate names itself, a precision gap is
located where ``|g - g_ref|`` is largest, and a failing direction is bisected over the
flat index (rows first, then columns), one host transfer per level; a large float64 copy
is bisected a chunk at a time (:func:`_bisect_in_chunks`).

It imports :mod:`gradwatch._evaluation`, :mod:`gradwatch._judging` and
:mod:`gradwatch._probing` (whose probes it runs), never :mod:`gradwatch._joint` nor
:mod:`gradwatch.engine`, which call it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from gradwatch import _sizes
from gradwatch._evaluation import _HostValues
from gradwatch._judging import _Judge, _loss_noise, _ratio
from gradwatch._probing import _CheckContext, _direction, _direction_chunks, _direction_step, _probe, _RefView
from gradwatch.report import Probe, TensorCheck

__all__: list[str] = []


def _remeasure(
    ctx: _CheckContext, judge: _Judge, tc: TensorCheck, rows: list, grad: Tensor, g_ref: Tensor | None,
    values: list[float], gstats: tuple[int, int], gap: Mapping[str, int] | None,
) -> TensorCheck:
    """A failing tensor of a check that measured no noise (``richardson=False``): its
    failing probes are evaluated again at ``±h`` and ``±2h`` from a recorded unperturbed
    pass (``ctx``, from :meth:`_CheckContext.on`), so their error bars get the truncation
    estimate and the loss noise measured from their own fourth differences, and the tensor
    is judged again. A fail verdict stands only if it survives its measured noise. ``rows``
    and ``values`` are updated in place."""
    host = _HostValues(ctx.reduce)
    failing = [i for i, p in enumerate(tc.probes) if p.failed]
    fresh = {i: _probe(ctx, tc.name, grad, g_ref, rows[i][:2], host) for i in failing}
    i_loss0 = host.add(ctx.loss0)
    offset = len(values)
    values.extend(host.fetch())
    for i, (kind, value, idx) in fresh.items():
        rows[i] = (kind, value, {k: j + offset for k, j in idx.items()})
    measured = _loss_noise({tc.name: [rows[i] for i in failing]}, values, ctx.ev, values[i_loss0 + offset])
    again = copy.copy(judge)
    again.noise = max(judge.noise, measured)
    return again.tensor(tc.name, tc.shape, rows, gstats, gap)


def _locate(ctx: _CheckContext, judge: _Judge, tc: TensorCheck, grad: Tensor, g_ref: Tensor | None) -> Probe | None:
    """The element responsible for a failure, confirmed by a coordinate probe; None if already named.

    A precision gap is located where ``|g - g_ref|`` is largest. A failing direction is
    bisected over the flat index (row-major, so rows first, then columns): each level
    evaluates the direction restricted to the first half and follows the half with the
    larger disagreement, one host transfer per level. The direction is zero on the
    excluded elements, and a bisection that ends on one names none.
    """
    judged = [p for p in tc.probes if not p.kink]
    if any(p.failed and p.kind == "coordinate" for p in judged):
        return None
    ev, excluded = ctx.ev, ctx.excluded.get(tc.name)
    key = f"model.{tc.name}"
    theta = ev.shadow[key]
    numel = theta.numel()
    chunked = (theta.dtype == torch.float64 and numel > _sizes.CHUNK and theta.is_contiguous() and ev.in_place(key)
               and (g_ref is None or isinstance(g_ref, _RefView)))
    if tc.gap_ratio > 1.0 and tc.gap_index is not None:
        flat = int(np.ravel_multi_index(tc.gap_index, tc.shape)) if tc.shape else 0
        gap = True
    else:
        failing = [p for p in judged if p.failed and p.kind == "direction"]
        if not failing:
            return None
        worst = max(failing, key=lambda p: _ratio(p.error, p.tolerance))
        err = worst.numerical - (worst.reference if worst.reference is not None else worst.autograd)
        base_step = ctx.base_step(theta.dtype)
        if chunked:  # nothing of the tensor's size held but its float64 copy
            h = _direction_step(theta, base_step, excluded)
            del theta  # a reference pass may replace the copy (see _Evaluation._widened_pass)
            flat = _bisect_in_chunks(ctx, tc.name, grad, g_ref, worst.direction_seed, h, err)
            return _confirm(ctx, judge, tc, flat, False, grad, g_ref)
        if isinstance(g_ref, _RefView):  # the whole reference of this tensor, again
            g_ref = g_ref.tensor()
        cmp = (g_ref if g_ref is not None else grad).detach().to(device=theta.device, dtype=torch.float64)
        cmp = cmp.reshape(-1)
        v = _direction(theta, worst.direction_seed, excluded.mask if excluded is not None else None).reshape(-1)
        h = _direction_step(theta.to(torch.float64), base_step, excluded)
        theta64 = theta.to(torch.float64).reshape(-1)
        lo, hi = 0, numel
        while hi - lo > 1:
            mid = (lo + hi) // 2
            part = torch.zeros_like(v)
            part[lo:mid] = v[lo:mid]
            if ev.in_place(key):  # in place on the float64 copy, undone by copying the parameter back
                with ev.moved([(key, lambda t: t.view(-1).add_(h * part))]) as shadow:
                    up, _ = ev(shadow)
                with ev.moved([(key, lambda t: t.view(-1).sub_(h * part))]) as shadow:
                    down, _ = ev(shadow)
            else:
                up, _ = ev({**ev.shadow, key: (theta64 + h * part).to(theta.dtype).reshape(theta.shape)})
                down, _ = ev({**ev.shadow, key: (theta64 - h * part).to(theta.dtype).reshape(theta.shape)})
            level = _HostValues(ctx.reduce)  # one transfer per level; the same decision on every rank
            i = level.add((up.to(torch.float64) - down.to(torch.float64)) / (2 * h) - (cmp * part).sum())
            left = level.fetch()[i]
            right = err - left
            lo, hi, err = (lo, mid, left) if abs(left) >= abs(right) else (mid, hi, right)
        flat, gap = lo, False
    return _confirm(ctx, judge, tc, flat, gap, grad, g_ref)


def _located_there(tc: TensorCheck, local: str) -> TensorCheck:
    """A failing tensor that a module-local check of the same step covers (as ``local``,
    ``'module::param'``): that check, which evaluates its module alone, locates the element."""
    note = f"its element is located by the module-local check of the same step (see '{local}')"
    return dataclasses.replace(tc, reason=f"{tc.reason}; {note}" if tc.reason else note)


def _failed_there(tc: TensorCheck, local: TensorCheck) -> TensorCheck:
    """The whole-model verdict of a tensor without probes of its own that a module-local check of
    the same step failed (``local``, named ``'module::param'``): left out of the joint probes, it
    fails on that check's evidence, which evaluated its module alone and located the element."""
    note = ("the module-local check of the same step failed it, evaluating its module alone, and locates its "
            f"element (see '{local.name}'); left out of the whole model's joint probe, which verifies the others")
    return dataclasses.replace(tc, verdict="fail", reason=note, rel_error=local.rel_error, error_bar=local.error_bar,
                               error_ratio=local.error_ratio, resolving_power=math.nan)


def _confirm(
    ctx: _CheckContext, judge: _Judge, tc: TensorCheck, flat: int, gap: bool, grad: Tensor, g_ref: Tensor | None,
) -> Probe | None:
    """The coordinate probe of element ``flat`` that confirms a localisation (None when the
    element is excluded from probing)."""
    excluded = ctx.excluded.get(tc.name)
    if excluded is not None and bool(np.isin(flat, excluded.flat)):
        return None
    host = _HostValues(ctx.reduce)
    kind, value, idx = _probe(ctx, tc.name, grad, g_ref, ("coordinate", flat), host)
    return judge.probe(kind, value, idx, tc.shape, gap=not gap, values=host.fetch(), name=tc.name)


def _bisect_in_chunks(
    ctx: _CheckContext, name: str, grad: Tensor, g_ref: "_RefView | None", seed: int, h: Tensor, err: float,
) -> int:
    """:func:`_locate`'s bisection of a failing direction over a large float64 copy, holding
    nothing else of its size: the direction restricted to ``[lo, mid)`` is drawn a chunk
    at a time and added in place on the copy, and its reference term ``Σ g_ref·v`` over
    ``[lo, mid)`` takes a float64 backward of its own (the reference is not kept) until
    ``[lo, hi)`` fits in one chunk, whose reference and direction are then kept. The same
    halves, points and decisions as the bisection of the whole tensors."""
    ev, excluded = ctx.ev, ctx.excluded.get(name)
    key = f"model.{name}"
    numel = ev.shadow[key].numel()
    mask = excluded.mask if excluded is not None else None

    def spans(t: Tensor, lo: int, hi: int) -> Iterator[tuple[int, int, Tensor]]:
        """``(a, b, v[a:b])`` of the direction over ``[lo, hi)`` (``t``: a tensor of its
        numel and device; the draws before ``lo`` are made and dropped)."""
        for a, b, v in _direction_chunks(t, seed, mask):
            if a >= hi:
                return
            if b > lo:
                yield max(a, lo), min(b, hi), v[max(a, lo) - a : min(b, hi) - a]

    def restricted(c: Tensor, lo: int, hi: int) -> Tensor:  # Σ c·v over [lo, hi), c flat
        return torch.stack([(v * c[a:b].to(torch.float64)).sum() for a, b, v in spans(c, lo, hi)]).sum()

    def reference(stats: Callable[[Tensor], Tensor]) -> Tensor:
        if g_ref is None:  # no float64 reference: the gradient under test
            return stats(grad.detach().reshape(-1))
        return g_ref.source.run([name], lambda _, g: stats(g.detach().reshape(-1)))[name]

    def move(lo: int, mid: int, s: float) -> Callable[[Tensor], None]:
        def apply(theta: Tensor) -> None:
            flat = theta.view(-1)
            for a, b, v in spans(flat, lo, mid):
                flat[a:b].add_((s * h) * v)
        return apply

    lo, hi, kept = 0, numel, None
    while hi - lo > 1:
        if kept is None and hi - lo <= _sizes.CHUNK:  # one chunk left: keep its reference and direction
            c = reference(lambda g, lo=lo, hi=hi: g[lo:hi].to(torch.float64, copy=True))
            v = torch.cat([v for _, _, v in spans(c.new_zeros(()).expand(numel), lo, hi)])
            kept = (lo, c * v)
        mid = (lo + hi) // 2
        with ev.moved([(key, move(lo, mid, 1.0))]) as shadow:
            up, _ = ev(shadow)
        with ev.moved([(key, move(lo, mid, -1.0))]) as shadow:
            down, _ = ev(shadow)
        if kept is not None:
            ref = kept[1][lo - kept[0] : mid - kept[0]].sum()
        else:
            ref = reference(lambda g, lo=lo, mid=mid: restricted(g, lo, mid))
        level = _HostValues(ctx.reduce)  # one transfer per level; the same decision on every rank
        i = level.add((up.to(torch.float64) - down.to(torch.float64)) / (2 * h) - ref)
        left = level.fetch()[i]
        right = err - left
        lo, hi, err = (lo, mid, left) if abs(left) >= abs(right) else (mid, hi, right)
    return lo
