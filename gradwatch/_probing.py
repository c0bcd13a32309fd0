"""Probing: which coordinates and directions are probed, and how one probe is evaluated.

One room of the engine (see :mod:`gradwatch.engine`): the seeded probe plan, the points
``θ ± s·h·v`` of a probe and their central differences, the replacement of coordinates
that crossed a kink, and the bisection that localises a failing direction.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
from torch import Tensor

from gradwatch._evaluation import _Evaluation, _HostValues
from gradwatch._judging import _Judge, _ratio
from gradwatch.kinks import _ProbeKinks, _Reference
from gradwatch.report import Probe, TensorCheck

__all__: list[str] = []

#: Mixed into the seed of the replacement-coordinate generator (independent of the plan's).
_RESAMPLE_SALT = 0x5DEECE66D


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
    return judge.probe(kind, value, idx, tc.shape, gap=not gap, values=host.fetch(), name=tc.name)
