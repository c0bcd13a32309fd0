"""Joint probes: one random direction over every checked tensor at once (private).

A room of the engine beside :mod:`gradwatch._probing`. One joint probe perturbs all
checked tensors together along ``v = (w_1·z_1, ..., w_T·z_T)``, where ``z_t`` is the
Gaussian direction :func:`gradwatch._probing._direction` draws for tensor ``t`` and
``w_t`` a per-tensor weight, and compares one central difference (two float64 passes
at ``±h``; four with the Richardson passes) with ``Σ_t <g_t, v_t>``. It is judged by
:class:`~gradwatch._judging._Judge` exactly like a direction probe (against the float64
reference when the check computed it, else against the gradient with the tolerance of
its precision; the tolerance is built from the root sum of squares of all the terms).

Weights: ``w_t ∝ 1 / max(‖g_t‖, 0.1·G·√n_t)`` (``G``: RMS of the model's gradient),
normalised so the largest is 1. Every tensor's term ``<g_t, v_t>`` then has the same
spread, so a wrong gradient in a small tensor weighs as much as one in a large tensor,
and a tensor whose true gradient is 0 (a conv bias before BatchNorm) does not blow up
the step. A tensor whose gradient holds NaN/Inf gets weight 0 (it is reported
``nonfinite`` on its own). No weight needs a host transfer.

Kinks: a joint direction moves every ReLU/max-pool input of the model at once, so it
starts at a step :data:`_FIRST` times the check's (crossings scale with the step; a
CNN with BatchNorm, ReLU and max-pool crossed at the default step in 5 of 5 seeds, at
1/32 of it in 3 of 5, at 1/256 in 0 of 5), and when the recorder says the probe crossed a kink it is redone
with the step shrunk by :data:`_SHRINK`, up to :data:`_RETRIES` times; one small host
transfer per retry. Float64 rounding stays far below the tolerances at these steps and
is in the error bar. A probe that still crosses verifies nothing (``kink=True``). When
the unperturbed pass ran no non-smooth op at all, the perturbed passes run without the
recorder (its dispatch costs more than the passes of a tiny op): what that gives up is
noticing a perturbed pass whose data-dependent Python control flow runs a non-smooth op
the unperturbed pass did not (the difference quotient is then judged as if smooth).

Localisation: a failing joint probe is bisected over the tensor list (group testing:
the direction restricted to the first half of the tensors, one host transfer per
level, ``⌈log2 T⌉`` levels), the tensor it names is confirmed by a direction probe of
its own along the same direction, and :func:`~gradwatch._locating._locate` then names
the element.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from torch import Tensor

from gradwatch import _sizes
from gradwatch._evaluation import _Evaluation, _HostValues
from gradwatch._judging import (
    _Judge,
    _KinkRow,
    _loss_noise,
    _nonfinite,
    _ratio,
    _summary,
    _training_confirmed,
    _unresolved,
    _unresolved_note,
)
from gradwatch._locating import _locate, _located_there
from gradwatch._probing import _CheckContext, _chunked_terms, _direction, _direction_chunks, _Excluded, _probe
from gradwatch.kinks import _ProbeKinks
from gradwatch.report import Probe, TensorCheck

__all__: list[str] = []

#: Mixed into the check's seed for the joint directions (independent of the plan's).
_JOINT_SALT = 0x4A4F494E54
#: Floor of a tensor's effective gradient norm, as a fraction of ``G·√n_t``.
_WEIGHT_FLOOR = 0.1
#: Step of a joint probe relative to the check's, then the factor of each retry after a
#: kink crossing, and the number of retries.
_FIRST = 1.0 / 256.0
_SHRINK = 1.0 / 32.0
_RETRIES = 2
#: Joint directions (and float64 gradients) over at most this many elements in all (64 KiB
#: of float64 for both) are kept for the check instead of drawn again at every use: on tiny
#: ops (``assert_gradients``) the redraws cost as much as a pass; above it nothing
#: tensor-sized is kept for every tensor (memory stays bounded: they are drawn again).
_CACHE_ELEMENTS = 1 << 12


@functools.lru_cache(maxsize=64)
def _joint_seeds(seed: int, count: int) -> tuple[int, ...]:
    """Seeds of the ``count`` joint probes of a check (deterministic given its seed; kept
    for the last few seeds: ``assert_gradients`` draws the same ones at every call)."""
    state = np.random.SeedSequence([seed & (2**63 - 1), _JOINT_SALT]).generate_state(count, np.uint64)
    return tuple(int(s >> np.uint64(2)) for s in state)


def _tensor_seeds(seed: int, names: list[str]) -> list[int]:
    """Seed of each tensor's Gaussian part of the joint direction ``seed``."""
    return list(_seed_list(seed, len(names)))


@functools.lru_cache(maxsize=64)
def _seed_list(seed: int, count: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(int(torch.randint(0, 2**62, (1,), generator=gen)) for _ in range(count))


class _JointLine:
    """Points ``θ + s·h·v`` of one joint probe over several tensors, and its terms ``<g_t, v_t>``.

    Nothing tensor-sized is kept: each tensor's part of the direction is drawn again from
    its seed when needed, and a point is made in place on the float64 shadow, one tensor
    at a time, and undone by copying the parameters back (:meth:`_Evaluation.moved`)."""

    def __init__(
        self, ev: _Evaluation, names: list[str], seed: int, grads: Mapping[str, Tensor],
        base_step: float, excluded: Mapping[str, _Excluded] | None = None,
    ) -> None:
        self.ev = ev
        self.names = names
        self.keys = [f"model.{n}" for n in names]
        self.seeds = _tensor_seeds(seed, names)
        self.grads = grads
        thetas = [ev.shadow[k] for k in self.keys]
        device = thetas[0].device
        self.device = device
        self.dtypes = [t.dtype for t in thetas]
        self.masks = [excluded[n].mask if excluded and n in excluded else None for n in names]  # never probed
        # kept when small in all (read-only then: callers use the out-of-place ops)
        self._cache: dict[tuple[str, int] | str, Any] | None = (
            {} if sum(t.numel() for t in thetas) <= _CACHE_ELEMENTS else None)
        self._in_place = [ev.in_place(k) for k in self.keys]  # float64 copies, moved in place
        finite, norms = [], []
        for i in range(len(names)):
            if thetas[i].numel() > _sizes.CHUNK:  # a chunk at a time
                sq = None
                for _, _, g in self._g64_chunks(i, finite):
                    sq = g.pow_(2).sum() if sq is None else sq + g.pow_(2).sum()
                norms.append(sq.sqrt().to(device))
                continue
            g = self._g64(i, finite)
            norms.append(torch.linalg.vector_norm(g).to(device))
            del g
        norms = torch.stack(norms)
        numel = torch.tensor([float(t.numel()) for t in thetas], dtype=torch.float64, device=device)
        rms = (norms.pow(2).sum() / numel.sum()).sqrt()
        eff = torch.maximum(norms, _WEIGHT_FLOOR * rms * numel.sqrt()).clamp_min(1e-300)
        weights = eff.min() / eff
        weights = torch.where(torch.stack([f.to(device) for f in finite]), weights, torch.zeros_like(weights))
        self.weights = weights
        sq, count = 0, 0
        for t, m in zip(thetas, self.masks):
            if t.numel() > _sizes.CHUNK:
                flat, fm = t.reshape(-1), (m.reshape(-1) if m is not None else None)
                for lo, hi in _sizes.spans(t.numel()):
                    c = flat[lo:hi].to(torch.float64)
                    sq = sq + (c if fm is None else torch.where(fm[lo:hi], c, 0.0)).pow(2).sum().to(device)
                count = count + (float(t.numel()) if m is None else m.sum().to(device))
                continue
            t64 = t.to(torch.float64)
            sq = sq + (t64 if m is None else torch.where(m, t64, 0.0)).pow(2).sum().to(device)
            count = count + (float(t.numel()) if m is None else m.sum().to(device))
            del t64
        del thetas
        self.h0 = _FIRST * base_step * torch.clamp((sq / count).sqrt(), min=1.0)
        self.h = self.h0
        a_t, rss, vnorm = [], [], []
        for i in range(len(names)):
            if self.ev.shadow[self.keys[i]].numel() > _sizes.CHUNK:  # a chunk of g and v at a time
                a_i = sq_i = vsq_i = None
                for (_, _, g), (_, _, v) in zip(self._g64_chunks(i), self._chunks(i)):
                    vsq_c = v.pow(2).sum()
                    t = g.mul_(v)
                    a_c, sq_c = t.sum(), t.pow_(2).sum()
                    a_i, sq_i, vsq_i = ((a_c, sq_c, vsq_c) if a_i is None else (a_i + a_c, sq_i + sq_c, vsq_i + vsq_c))
                a_t.append(a_i.to(device))
                rss.append(sq_i.to(device))
                vnorm.append(vsq_i.to(device))
                continue
            v = self.direction(i)
            g = self._g64(i)
            term = g.mul(v) if self._cache is not None else g.mul_(v)  # <g_t, v_t> term by term
            a_t.append(term.sum().to(device))
            rss.append(term.pow_(2).sum().to(device))
            vnorm.append((v.pow(2) if self._cache is not None else v.pow_(2)).sum().to(device))
            del v, term
        self.a_t = a_t  # per tensor, for group testing
        self.a = torch.stack(self.a_t).sum()
        self.rss = torch.stack(rss).sum().sqrt()
        self.vnorm = torch.stack(vnorm).sum().sqrt()
        self.a_ref_t = self.a_ref = self.rss_ref = self.rss_ref_t = None

    def _g64(self, i: int, finite: list | None = None) -> Tensor:
        """The gradient of tensor ``i`` in float64, zero where it is not finite (a copy;
        read-only when the line keeps it, see :data:`_CACHE_ELEMENTS`)."""
        cache = self._cache
        if cache is not None and ("g", i) in cache:
            return cache[("g", i)]
        theta = self.ev.shadow[self.keys[i]]
        g = self.grads[self.names[i]].detach().to(device=theta.device, dtype=torch.float64, copy=True)
        g = g.reshape(theta.shape)
        if finite is None:
            g = g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        else:
            bad = _nonfinite(g)
            finite.append(~bad.any())
            g = g.masked_fill_(bad, 0.0)
        if cache is not None:
            cache[("g", i)] = g
        return g

    def _g64_chunks(self, i: int, finite: list | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """:meth:`_g64` a chunk at a time (flat index); appends the finite flag after the last."""
        theta = self.ev.shadow[self.keys[i]]
        flat = self.grads[self.names[i]].detach().reshape(-1)
        bad_any = None
        for lo, hi in _sizes.spans(theta.numel()):
            g = flat[lo:hi].to(device=theta.device, dtype=torch.float64, copy=True)
            bad = _nonfinite(g)
            bad_any = bad.any() if bad_any is None else bad_any | bad.any()
            yield lo, hi, g.masked_fill_(bad, 0.0)
        if finite is not None:
            finite.append(~bad_any)

    def _chunks(self, i: int, like: Tensor | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """:meth:`direction` a chunk at a time (flat index)."""
        theta = self.ev.shadow[self.keys[i]] if like is None else like
        w = self.weights[i].to(theta.device)
        for lo, hi, v in _direction_chunks(theta, self.seeds[i], self.masks[i]):
            yield lo, hi, v.mul_(w)

    def direction(self, i: int, like: Tensor | None = None) -> Tensor:
        """Tensor ``i``'s part of the direction, drawn again from its seed (``like``: a tensor
        of its shape and device, when its float64 copy is not there, see
        :meth:`_Evaluation._widened_pass`)."""
        if self._cache is not None and ("v", i) in self._cache:
            return self._cache[("v", i)]  # read-only
        theta = self.ev.shadow[self.keys[i]] if like is None else like
        v = _direction(theta, self.seeds[i], self.masks[i]).mul_(self.weights[i].to(theta.device))
        if self._cache is not None:
            self._cache[("v", i)] = v
        return v

    def _scaled(self) -> list[Tensor]:
        """``h·v`` of every tensor at the current step ``h``, kept with the line (read-only)."""
        kept = self._cache.get("hv")
        if kept is None or kept[0] is not self.h:
            kept = self._cache["hv"] = (self.h, [self.h * self.direction(i) for i in range(len(self.keys))])
        return kept[1]

    def reference_terms(self, name: str, g_ref: Tensor) -> tuple[Tensor, Tensor]:
        """``<g_ref, v_t>`` and ``‖g_ref∘v_t‖²`` of tensor ``name`` (while the backward produces ``g_ref``)."""
        i = self.names.index(name)
        if g_ref.numel() > _sizes.CHUNK and g_ref.is_contiguous():  # a chunk of the direction at a time
            a_ref, sq, _ = _chunked_terms(g_ref, self._chunks(i, g_ref))
            return a_ref.to(self.device), sq.to(self.device)
        v = self.direction(i, g_ref)
        # in place when the layouts agree; a strided g_ref sets the order of the sum, as it always did
        cached = self._cache is not None
        term = ((v.mul(g_ref) if cached else v.mul_(g_ref)) if g_ref.is_contiguous()
                else g_ref.to(torch.float64).reshape(v.shape) * v)
        return term.sum().to(self.device), term.pow_(2).sum().to(self.device)

    def set_reference(self, terms: list[tuple[Tensor, Tensor]]) -> None:
        """The reference terms of every tensor, in order (from :meth:`reference_terms`)."""
        self.a_ref_t = [a for a, _ in terms]
        self.a_ref = torch.stack(self.a_ref_t).sum()
        self.rss_ref = torch.stack([sq for _, sq in terms]).sum().sqrt()
        self.rss_ref_t = [sq for _, sq in terms]  # per tensor: its share of the probe (its resolving power)

    @contextmanager
    def at(self, s: float, lo: int = 0, hi: int | None = None) -> Iterator[tuple[dict, dict | None]]:
        """The state at ``θ + s·h·v`` moved along tensors ``lo:hi``, and the points that
        were rounded to a lower precision (for :meth:`difference`; None when there are none)."""
        hi = len(self.keys) if hi is None else hi
        ev = self.ev
        if self._cache is not None and s in (1.0, -1.0, 2.0, -2.0) and all(self._in_place[lo:hi]):
            # a kept line of float64 copies: h·v is kept for the passes at h (s·(h·v) is exactly
            # (s·h)·v) and every tensor moves in one call
            with ev.moved_along(self.keys[lo:hi], self._scaled()[lo:hi], s) as shadow:
                yield dict(shadow), None
            return
        inside = [i for i in range(lo, hi) if ev.in_place(self.keys[i])]
        points = {}
        for i in range(lo, hi):
            if not ev.in_place(self.keys[i]):
                theta64 = ev.shadow[self.keys[i]].to(torch.float64)
                points[self.keys[i]] = (theta64 + (s * self.h) * self.direction(i)).to(self.dtypes[i])

        def move(i: int) -> Callable[[Tensor], None]:
            def apply(theta: Tensor) -> None:
                if theta.numel() > _sizes.CHUNK:  # elementwise: the same values a chunk at a time
                    flat = theta.view(-1)
                    for lo, hi, v in self._chunks(i):
                        flat[lo:hi].add_((s * self.h) * v)
                    return
                theta.add_((s * self.h) * self.direction(i))
            return apply

        with ev.moved((self.keys[i], move(i)) for i in inside) as shadow:
            yield {**shadow, **points}, (points if any(d != torch.float64 for d in self.dtypes) else None)

    def difference(self, up: Tensor, down: Tensor, points: tuple[dict, dict] | None, s: float,
                   lo: int = 0, hi: int | None = None) -> Tensor:
        """``D(s·h)`` of tensors ``lo:hi`` along the nominal direction (rounded points corrected natively)."""
        hi = len(self.keys) if hi is None else hi
        nominal = (up.to(torch.float64) - down.to(torch.float64)) / (2 * s * self.h)
        if all(d == torch.float64 for d in self.dtypes) or points is None or points[0] is None:
            return nominal
        width = 2 * s * self.h
        fix = 0.0
        for i in range(lo, hi):
            key = self.keys[i]
            taken = (points[0][key].to(torch.float64) - points[1][key].to(torch.float64)) / width
            fix = fix + (self.a_t[i] - (self._g64(i) * taken).sum())
        return nominal + fix


class _JointRow(NamedTuple):
    """One joint probe: its seed, covered tensors, line and host indices."""

    seed: int
    names: list[str]
    line: _JointLine
    idx: dict[str, int]
    kinks: _KinkRow | None
    attempts: int
    shares: range | None = None  # host indices: per tensor, ‖w_t·g_ref_t∘v_t‖ (None: no reference)


def _joint_lines(
    ev: _Evaluation, grads: Mapping[str, Tensor], seed: int, count: int, step: float | None,
    excluded: Mapping[str, _Excluded] | None = None,
) -> list[tuple[int, _JointLine]]:
    """The ``count`` joint directions of a check over every tensor of ``grads``, with their seeds
    (made before the reference backward, which adds their reference terms)."""
    names = list(grads)
    if not names or count <= 0:
        return []
    out = []
    for jseed in _joint_seeds(seed, count):
        base = step if step is not None else ev.step(ev.shadow[f"model.{names[0]}"].dtype)
        out.append((jseed, _JointLine(ev, names, jseed, grads, base, excluded)))
    return out


def _joint_probes(ctx: _CheckContext, lines: list[tuple[int, _JointLine]], host: _HostValues) -> list[_JointRow]:
    """Evaluate the joint probes ``lines`` (:func:`_joint_lines`); their device values
    join ``host`` (the check's one transfer). A probe that crossed a kink is redone at a
    smaller step (one small transfer per retry, see the module notes)."""
    out = []
    for jseed, line in lines:
        names = line.names
        for attempt in range(_RETRIES + 1):
            line.h = line.h0 * _SHRINK**attempt if attempt else line.h0
            values, kinks = _evaluate(ctx, line)
            if kinks is None or attempt == _RETRIES:
                break
            check = _HostValues(host.reduce)  # every process takes the same decision
            i = check.add(kinks.any_crossed())
            if not check.fetch()[i] > 0:
                break
        row = _KinkRow(kinks, host.extend(kinks.crossed), host.extend(kinks.margin), False) if kinks else None
        shares = host.extend(torch.stack(line.rss_ref_t).sqrt()) if line.rss_ref_t is not None else None
        out.append(_JointRow(jseed, names, line, {k: host.add(x) for k, x in values.items()}, row, attempt + 1,
                             shares))
    return out


def _evaluate(ctx: _CheckContext, line: _JointLine) -> tuple[dict, Any]:
    """The passes of one joint probe at ``line.h``: device values as :func:`_probe` returns them."""
    ev, ref, loss0 = ctx.ev, ctx.signature, ctx.loss0
    losses: dict[float, Tensor] = {}
    points: dict[float, dict] = {}
    if ev.own_reference:  # no unperturbed pass: the +h pass is the kink reference
        with line.at(1.0) as (state, points[1.0]):
            loss, ref = ev(state)
        losses[1.0] = loss.to(torch.float64)
    # an unperturbed pass that ran no non-smooth op: the perturbed passes run without the
    # recorder (see the module notes)
    kinks = _ProbeKinks(ref, line.h0.device) if ref is not None and (len(ref) or ev.own_reference) else None
    for s in ev.signs:
        if s in losses:
            continue
        pass_kinks = kinks.next_pass(margins=abs(s) == 2.0) if kinks is not None else None
        with line.at(s) as (state, points[s]):
            loss, _ = ev(state, kinks=pass_kinks, record=False)
        losses[s] = loss.to(torch.float64)
    n1 = line.difference(losses[1.0], losses[-1.0], (points[1.0], points[-1.0]), 1.0)
    out = {
        "a": line.a, "rss": line.rss, "vnorm": line.vnorm, "n1": n1, "n2": n1, "h": line.h,
        "kink": kinks.any_crossed() if kinks is not None else False,
    }
    if ev.own_reference:
        out["mid"] = (losses[1.0] + losses[-1.0]) / 2
    if 2.0 in losses:
        out["n2"] = line.difference(losses[2.0], losses[-2.0], (points[2.0], points[-2.0]), 2.0)
        out["fourth"] = losses[2.0] + losses[-2.0] - 4 * (losses[1.0] + losses[-1.0]) + 6 * loss0
    if line.a_ref is not None:
        out["a_ref"], out["rss_ref"] = line.a_ref, line.rss_ref
    return out, kinks


def _judge_joint(judge: _Judge, row: _JointRow) -> Probe:
    """The :class:`Probe` (``kind="joint"``) of one joint probe, with its kink margin."""
    probe = judge.probe("joint", row.seed, row.idx, ())
    if row.kinks is None:
        return probe
    margins = [judge.values[i] for i in row.kinks.margin]
    margins = [m for m in margins if m != math.inf and not math.isnan(m)]
    return dataclasses.replace(probe, kink_margin=min(margins, default=math.inf),
                               at_kink=any(m == 0.0 for m in margins))


def _group(ctx: _CheckContext, row: _JointRow, probe: Probe) -> str:
    """Group testing: bisect the failing joint probe over its tensors; returns the name
    of the tensor holding (the larger part of) the disagreement. Each level evaluates the
    direction restricted to the first half at ``±h`` and follows the half whose
    disagreement is larger; one host transfer per level."""
    ev, line = ctx.ev, row.line
    cmp = line.a_ref_t if (line.a_ref_t is not None and probe.reference is not None) else line.a_t
    err = probe.numerical - (probe.reference if probe.reference is not None else probe.autograd)
    lo, hi = 0, len(line.names)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        with line.at(1.0, lo, mid) as (state, up_pt):
            up, _ = ev(state, record=False)
        with line.at(-1.0, lo, mid) as (state, down_pt):
            down, _ = ev(state, record=False)
        level = _HostValues(ctx.reduce)  # the same decision on every process
        i = level.add(line.difference(up, down, (up_pt, down_pt), 1.0, lo, mid) - torch.stack(cmp[lo:mid]).sum())
        left = level.fetch()[i]
        right = err - left
        lo, hi, err = (lo, mid, left) if abs(left) >= abs(right) else (mid, hi, right)
    return line.names[lo]


def _joint_verdicts(
    ctx: _CheckContext, judge: _Judge, rows: list[_JointRow], tensors: dict[str, TensorCheck],
    grads: Mapping[str, Tensor], refs: Mapping[str, Tensor | None], localize: bool,
    measured: Callable[[], _Evaluation] | None = None, located_locally: Mapping[str, str] | None = None,
) -> tuple[tuple[Probe, ...], dict[str, TensorCheck]]:
    """The joint probes and the tensor verdicts they change.

    * A passing joint probe verifies every tensor it covers jointly: a tensor without a
      verdict of its own (no probe, or every own probe crossed a kink) passes, with
      ``reason`` saying so and its ``rel_error``/``error_ratio`` those of the joint probe.
    * A failing one is bisected over its tensors (``localize``): the tensor it names
      fails, with a confirming direction probe added to its probes and the element
      located; tensors with no verdict of their own are reported ``skipped`` (not
      verified). Without ``localize`` they all fail ("somewhere in these tensors").
      ``located_locally``: the tensors the module-local checks of the same step failed (name ->
      their name there); one of them is confirmed first, and named without group testing when
      its direction probe fails; it is located by that check, not here.
    * A joint probe that crossed a kink at every step it tried verifies nothing.
    * In a check that measured no noise (``measured``: a factory of an evaluation with
      ``±2h`` passes), the confirming probe is evaluated from an unperturbed pass at
      ``±h`` and ``±2h`` and judged with the noise it measures; if it passes, the joint
      failure is put down to unmeasured noise and the tensors it covered stay unverified.
    """
    probes = tuple(_judge_joint(judge, r) for r in rows)
    out = dict(tensors)
    if not rows:
        return probes, out
    covered = rows[0].names
    judged = [(r, p) for r, p in zip(rows, probes) if not p.kink]
    finite = [(r, p) for r, p in judged if all(math.isfinite(x) for x in (p.autograd, p.numerical, p.error_bar))]
    failing = [(r, p) for r, p in finite if p.failed]
    unverified = {n for n in covered if out[n].verdict in ("kink",) or (out[n].verdict == "pass" and not out[n].probes)}
    if len(finite) < len(judged):
        for n in unverified:
            out[n] = dataclasses.replace(out[n], verdict="nonfinite",
                                         reason="non-finite perturbed loss in the joint probe over every tensor")
        return probes, out
    if failing and all(_training_confirmed(p) for _, p in failing):
        return probes, _broken_reference(out, covered, unverified)
    if failing:
        row, worst = max(failing, key=lambda rp: _ratio(rp[1].error, rp[1].tolerance))
        if not localize:
            for n in covered:
                if out[n].verdict != "fail":
                    out[n] = dataclasses.replace(
                        out[n], verdict="fail", error_ratio=_ratio(worst.error, worst.tolerance),
                        reason=f"the joint probe over {len(covered)} tensors failed; not narrowed down (localize=False)",
                    )
            return probes, out
        # a tensor the module-local check of this step failed is tried first: confirmed along its part
        # of the joint direction, it is named without group testing over the whole model
        guided, confirm = next((n for n in covered if located_locally and n in located_locally), None), None
        if guided is not None:
            confirm, small = _confirm_joint(ctx, judge, row, guided, grads, refs, out[guided].shape, measured)
            if not confirm.failed:  # the disagreement lies elsewhere
                guided, confirm = None, None
        name = guided if guided is not None else _group(ctx, row, worst)
        how = f"the module-local check of this step failed '{name}'" if guided else f"group testing named '{name}'"
        for n in unverified - {name}:
            out[n] = dataclasses.replace(out[n], verdict="skipped", reason=(
                f"not verified: the joint probe over {len(covered)} tensors failed and {how}"))
        if confirm is None:
            confirm, small = _confirm_joint(ctx, judge, row, name, grads, refs, out[name].shape, measured)
        if measured is not None and not confirm.failed and not confirm.kink:
            for n in unverified:
                out[n] = dataclasses.replace(out[n], verdict="skipped", reason=(
                    f"not verified: the joint probe over {len(covered)} tensors failed in a check that measured no "
                    f"noise, and the direction probe of '{name}' along it passed with its noise measured"))
            if name not in unverified:
                out[name] = dataclasses.replace(out[name], probes=out[name].probes + (confirm,))
            return probes, out
        if out[name].reference_broken and not (confirm.grad_error > confirm.grad_tolerance):
            # the joint probe failed on the float64 path that tensor's own probes found broken; the
            # training gradient agrees with the central differences along it too
            out[name] = dataclasses.replace(out[name], probes=out[name].probes + (confirm,))
            return probes, out
        tc = _named(out[name], worst, confirm)
        if tc.located is None and located_locally and name in located_locally:
            tc = _located_there(tc, located_locally[name])
        elif tc.located is None:
            located = _locate(ctx.at_step(small), judge, tc, grads[name], refs.get(name))
            if located is not None:
                tc = dataclasses.replace(tc, located=located)
        out[name] = tc
        return probes, out
    if not judged:  # every joint probe crossed a kink at every step tried
        for n in unverified:
            if not out[n].probes:
                out[n] = dataclasses.replace(out[n], reason=(
                    "its only probe, the joint probe over every tensor, crossed a kink of a non-smooth op"))
        return probes, out
    if judged:
        p = max((q for _, q in judged), key=lambda q: _ratio(q.error, q.tolerance))
        ratio = _ratio(p.error, p.tolerance)
        compared = p.reference if p.reference is not None else p.autograd
        denom = abs(p.numerical) + abs(compared)
        row, best = min(judged, key=lambda rq: rq[1].resolving_power)
        for n in unverified:
            gap = out[n].gap_ratio
            mine = dataclasses.replace(best, resolving_power=_share_power(row, best, n, judge.values))
            unresolved = _unresolved(mine)
            out[n] = dataclasses.replace(
                out[n], verdict="inconclusive" if unresolved else "pass",
                rel_error=_ratio(abs(p.numerical - p.autograd), denom),
                error_bar=_ratio(p.error_bar, denom),
                error_ratio=max(ratio, gap) if not math.isnan(gap) else ratio,
                resolving_power=mine.resolving_power,
                reason=(_unresolved_note(mine) + " (its share of the joint probe over every tensor)") if unresolved
                else f"verified jointly: the joint probe over {len(covered)} tensors passed (Report.joint)",
            )
    return probes, out


#: A tensor whose share of a joint probe is below this fraction of the whole is taken to have a
#: gradient of 0 at the model's scale (a bias before BatchNorm): judged with the joint probe's
#: own resolving power times √n, not relative to its share.
_ZERO_SHARE = 1e-9


def _share_power(row: _JointRow, probe: Probe, name: str, values: list[float]) -> float:
    """The resolving power of a passing joint probe for one tensor it covers: the smallest
    relative error of that tensor's gradient that would have moved the probe beyond its
    tolerance, ``tolerance / ‖w_t·g_ref_t∘v_t‖`` (the root sum of squares of the tensor's
    float64 reference terms, weighted as in the probe). A tensor whose gradient the joint
    weighs at its floor (a layer behind a small layer scale) gets a coarse one: it is
    inconclusive, not passed, unless its own probes resolve it. Without a reference, and for a
    tensor whose float64 gradient is 0 at the model's scale, each tensor is taken to hold
    ~1/√n of the probe."""
    shares = [values[i] for i in row.shares] if row.shares is not None else []
    whole = math.sqrt(sum(x * x for x in shares))
    mine = shares[row.names.index(name)] if shares and name in row.names else 0.0
    size = _ratio(probe.tolerance, probe.resolving_power)  # the joint derivative's size (its floors included)
    if mine <= _ZERO_SHARE * max(whole, size):
        return probe.resolving_power * math.sqrt(len(row.names))
    return _ratio(probe.tolerance, mine)


def _broken_reference(out: dict[str, TensorCheck], covered: list[str], unverified: set[str]) -> dict[str, TensorCheck]:
    """The joint probes failed against the float64 reference while the training gradient
    agrees with their central differences (:func:`_training_confirmed`): the float64 path is
    broken, not the training gradient. A tensor that failed on its gap from that reference
    alone (the smallest check's coarse gap test) passes with ``reference_broken``; one without
    a verdict of its own is verified jointly against the training gradient."""
    out = dict(out)
    note = ("the float64 path is broken, not the training gradient: the joint probe over every tensor disagrees "
            "with autograd's gradient of the float64 copy and agrees with the training gradient (which it verifies)")
    for n in covered:
        t = out[n]
        own = [p for p in t.probes if not p.kink and not p.flat]
        if t.verdict == "fail" and not any(p.failed for p in own) and t.gap_ratio > 1:
            out[n] = dataclasses.replace(t, verdict="pass", reference_broken=True, reason=note)
        elif n in unverified:
            out[n] = dataclasses.replace(t, verdict="pass", reason=note)
    return out


def _confirm_joint(
    ctx: _CheckContext, judge: _Judge, row: _JointRow, name: str, grads: Mapping[str, Tensor],
    refs: Mapping[str, Tensor | None], shape: tuple[int, ...], measured: Callable[[], _Evaluation] | None,
) -> tuple[Probe, float]:
    """The direction probe of tensor ``name`` (named by group testing) along its part of the
    failing joint probe ``row``, and the step it ended at: from the step the joint probe
    ended at, shrunk on kinks (up to :data:`_RETRIES` times); in a check that measured no
    noise (``measured``), from the check's own step and an unperturbed pass of its own, judged
    with the noise it measures."""
    ev = ctx.ev
    i = row.names.index(name)
    # confirmed along the same direction, from the step the joint probe ended at, shrunk on kinks
    small = ctx.base_step(ev.shadow[f"model.{name}"].dtype) * _FIRST
    small *= _SHRINK ** (row.attempts - 1)
    if measured is not None:  # from the check's own step: at the joint's, rounding inside the forward dominates
        small = ctx.base_step(ev.shadow[f"model.{name}"].dtype)
    by, judge_by = ctx, judge
    if measured is not None:  # no noise measured: confirm from an unperturbed pass with ±2h passes
        by = ctx.on(measured(), grads)
    spec = ("direction", row.line.seeds[i])
    for _ in range(_RETRIES + 1):
        host = _HostValues(ctx.reduce)
        kind, value, idx = _probe(by.at_step(small), name, grads[name], refs.get(name), spec, host)
        i_loss0 = host.add(by.loss0) if measured is not None else None
        fetched = host.fetch()
        if measured is not None:
            judge_by = copy.copy(judge)
            noise = _loss_noise({name: [(kind, value, idx)]}, fetched, by.ev, fetched[i_loss0])
            judge_by.noise = max(judge.noise, noise)
        confirm = judge_by.probe(kind, value, idx, shape, values=fetched)
        if not confirm.kink:
            break
        small *= _SHRINK
    return confirm, small


def _named(tc: TensorCheck, worst: Probe, confirm: Probe) -> TensorCheck:
    """The failing verdict of the tensor group testing named for the failing joint probe
    ``worst``, with its confirming direction probe ``confirm``."""
    ratio = max(_ratio(worst.error, worst.tolerance), _ratio(confirm.error, confirm.tolerance))
    if confirm.failed:
        why = None
    elif confirm.kink:
        why = ("the joint probe failed and group testing named this tensor; its own direction probe along the "
               "same direction crossed a kink at every step tried")
    else:
        why = ("the joint probe failed and group testing named this tensor; its own direction probe along the "
               f"same direction passed (err/tol {_ratio(confirm.error, confirm.tolerance):.3g})")
    return dataclasses.replace(tc, verdict="fail", probes=tc.probes + (confirm,), reason=why,
                               error_ratio=max(ratio, tc.error_ratio) if not math.isnan(tc.error_ratio) else ratio,
                               **_summary([p for p in tc.probes + (confirm,) if not p.kink]))
