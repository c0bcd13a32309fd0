"""Probing: which coordinates and directions are probed, and how one probe is evaluated.

One room of the engine (see :mod:`gradwatch.engine`): the elements of each tensor that
are never probed (:func:`_exclusions`), the seeded probe plan, the points ``θ ± s·h·v``
of a probe and their central differences, the views of the float64 reference gradient
the probes compare with, the replacement of coordinates that crossed a kink, and the
probes that rounding flattened. What follows a failing tensor (measuring it again,
localising it) is :mod:`gradwatch._locating`'s.

What every probe of one check shares (the evaluation, the step, the unperturbed pass, the
excluded elements, the data-parallel mean) travels as one :class:`_CheckContext`.

It imports :mod:`gradwatch._evaluation`, :mod:`gradwatch._judging` and
:mod:`gradwatch.kinks`, never the modules built on it (:mod:`gradwatch._locating`,
:mod:`gradwatch._joint`, :mod:`gradwatch._gradients`, :mod:`gradwatch.engine`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch import _sizes
from gradwatch._evaluation import _Evaluation, _HostValues
from gradwatch._judging import _NOISE_ULPS, _KinkRow, _nonfinite
from gradwatch.kinks import _ProbeKinks, _Reference

__all__: list[str] = []

#: Mixed into the seed of the replacement-coordinate generator (independent of the plan's).
_RESAMPLE_SALT = 0x5DEECE66D


@dataclass(frozen=True)
class _Excluded:
    """The elements of one tensor that are never probed, found once per check.

    Coordinates avoid them and directions are zero there (so is their share of a
    direction's step scale): elements PyTorch defines to get no gradient (the
    ``padding_idx`` row of ``nn.Embedding`` and ``nn.EmbeddingBag``) and non-finite
    parameter values (masked logits held as ``-inf``), where ``θ ± h`` means nothing.

    Attributes:
        flat: Their flat indices, sorted (host).
        mask: Bool tensor of the parameter's shape and device, True where an element
            may be probed.
        description: What is excluded and why, for the report.
    """

    flat: np.ndarray
    mask: Tensor
    description: str

    @property
    def count(self) -> int:
        """Number of excluded elements."""
        return len(self.flat)


@dataclass(frozen=True, eq=False)
class _CheckContext:
    """What every probe of one check shares, fixed once its unperturbed pass has run.

    Attributes:
        ev: The evaluation the probes run on.
        step: The base step ``h`` of the probes; None takes the evaluation's default for
            the parameter dtype (:meth:`base_step`).
        signature: The kink reference of the unperturbed pass (None: kinks are not recorded,
            or each probe's ``+h`` pass is its own reference).
        loss0: The unperturbed loss in float64 (None: no unperturbed pass, see
            :attr:`gradwatch._evaluation._Evaluation.own_reference`).
        excluded: The elements of each tensor that are never probed (:func:`_exclusions`).
        reduce: The cross-process mean of data-parallel training, applied at every host
            transfer (None: one process).
    """

    ev: _Evaluation
    step: float | None
    signature: _Reference | None
    loss0: Tensor | None
    excluded: Mapping[str, _Excluded]
    reduce: Callable[[Tensor], Tensor] | None = None

    def base_step(self, dtype: torch.dtype) -> float:
        """The base step of a tensor of ``dtype``: :attr:`step`, else the evaluation's default."""
        return self.step if self.step is not None else self.ev.step(dtype)

    def at_step(self, step: float | None) -> "_CheckContext":
        """This context with base step ``step``."""
        return dataclasses.replace(self, step=step)

    def on(self, ev: _Evaluation, grads: Mapping[str, Tensor]) -> "_CheckContext":
        """This context on evaluation ``ev`` (one with ``±2h`` passes, in a check that measured
        no noise), from an unperturbed pass of its own (no reference gradient) run now."""
        loss0, signature, _ = ev.base(grads, reference=False)
        ev.loss0 = loss0
        return dataclasses.replace(self, ev=ev, signature=signature, loss0=loss0)


def _exclusions(params: Mapping[str, Tensor], model: nn.Module) -> dict[str, _Excluded]:
    """The excluded elements of each tensor of ``params`` (parameters of ``model``) that has any.

    One host transfer for all tensors (whether each holds a non-finite value), plus one
    per tensor that does (its non-finite indices); ``padding_idx`` rows are known on the
    host.
    """
    if not params:
        return {}
    rows = _padding_rows(model)
    flags = [_nonfinite(p).any() for p in params.values()]
    device = flags[0].device
    nonfinite = torch.stack([f.to(device) for f in flags]).tolist()
    out = {}
    for (name, p), bad in zip(params.items(), nonfinite):
        padding = [(r, why) for r, why in rows.get(id(p), []) if 0 <= r < (p.shape[0] if p.dim() else 0)]
        if not padding and not bad:
            continue
        mask = torch.isfinite(p.detach()) if bad else torch.ones(p.shape, dtype=torch.bool, device=p.device)
        flat = torch.nonzero(~mask.reshape(-1)).reshape(-1).cpu().numpy() if bad else np.zeros(0, dtype=np.int64)
        parts = [f"row {r} excluded: {why}" for r, why in padding]
        if bad:
            where = "[" + ", ".join(str(int(i)) for i in np.unravel_index(int(flat[0]), tuple(p.shape))) + "]"
            parts.append(f"{len(flat)} non-finite element{'s' if len(flat) != 1 else ''} excluded (first at {where})")
        for r, _ in padding:
            mask[r] = False
            width = p[0].numel()
            flat = np.union1d(flat, np.arange(r * width, (r + 1) * width, dtype=np.int64))
        out[name] = _Excluded(flat.astype(np.int64), mask, "; ".join(parts))
    return out


def _eligible(name: str, param: Tensor, model: nn.Module) -> tuple[Tensor | None, str | None]:
    """The mask of the elements of ``param`` that may be probed and why the others may not;
    ``(None, None)`` when every element may be. One tensor's :func:`_exclusions`."""
    ex = _exclusions({name: param}, model).get(name)
    return (ex.mask, ex.description) if ex is not None else (None, None)


def _padding_rows(model: nn.Module) -> dict[int, list[tuple[int, str]]]:
    """Per parameter (by id), the rows PyTorch gives no gradient by design, and why."""
    rows: dict[int, list[tuple[int, str]]] = {}
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.padding_idx is not None:
            kind = "nn.EmbeddingBag" if isinstance(m, nn.EmbeddingBag) else "nn.Embedding"
            why = f"padding_idx of {kind} {mname!r}"
            rows.setdefault(id(m.weight), []).append((int(m.padding_idx), why))
    return rows


def _eligible_flat(excluded: np.ndarray, picks: list[int]) -> list[int]:
    """Map indices among the eligible elements to flat indices (``excluded`` sorted)."""
    if not picks:
        return []
    before = excluded - np.arange(len(excluded))  # eligible elements before each excluded one
    js = np.asarray(picks, dtype=np.int64)
    return (js + np.searchsorted(before, js, side="right")).tolist()


def _plan(
    grad_map: dict[str, Tensor], seed: int, coordinates: int, directions: int,
    excluded: Mapping[str, _Excluded] | None = None,
) -> dict[str, list]:
    """Probe specs per tensor, from one seeded host generator (no device RNG used).

    Coordinates are drawn among the elements ``excluded`` leaves eligible.
    """
    gen = torch.Generator().manual_seed(seed)
    plan: dict[str, list] = {}
    for name, g in grad_map.items():
        ex = excluded.get(name) if excluded else None
        numel = g.numel() - (ex.count if ex is not None else 0)
        picks = _sample(numel, min(coordinates, numel), gen)
        if ex is not None:
            picks = _eligible_flat(ex.flat, picks)
        specs: list[tuple[str, int]] = [("coordinate", i) for i in picks]
        specs += [("direction", int(torch.randint(0, 2**62, (1,), generator=gen))) for _ in range(directions)]
        plan[name] = specs
    return plan


def _resample(
    ctx: _CheckContext, grad_map: dict[str, Tensor], refs: Mapping[str, Tensor | None], rows: dict[str, list],
    kink_log: dict[str, list], seed: int, budget: int, host: _HostValues,
) -> None:
    """Replace coordinate probes that crossed a kink by fresh coordinates, up to ``budget``
    per tensor, drawn from a generator seeded by ``seed`` (deterministic given the seed).

    Each round costs one host transfer: the crossed flags of the previous round's
    coordinate probes, all tensors together; there are at most ``budget + 1`` rounds,
    since every round but the last draws a replacement. Excluded elements are never drawn.
    """
    gen = torch.Generator().manual_seed(seed ^ _RESAMPLE_SALT)
    excluded = ctx.excluded
    taken = {name: {v for kind, v, _ in rs if kind == "coordinate"} for name, rs in rows.items()}
    for name, ex in excluded.items():
        if name in taken:
            taken[name].update(ex.flat.tolist())
    left = dict.fromkeys(rows, budget)
    pending = {
        name: [k for (kind, _, _), k in zip(rows[name], kink_log[name]) if kind == "coordinate"] for name in rows
    }
    while any(pending.values()):
        round_host = _HostValues(host.reduce)  # under data parallelism every process takes the same decisions
        flags = {name: [round_host.add(k.kinks.any_crossed()) for k in ks] for name, ks in pending.items()}
        values = round_host.fetch()
        pending = {}
        drawn = {}
        for name, idx in flags.items():
            numel = grad_map[name].numel()
            n = min(sum(values[i] > 0 for i in idx), left[name], numel - len(taken[name]))
            if n <= 0:
                continue
            drawn[name] = _sample_excluding(numel, n, gen, taken[name])
            left[name] -= n
        views = {n: r for n, r in refs.items() if isinstance(r, _RefView) and n in drawn}
        if views:  # the reference at the fresh coordinates: one float64 backward for all tensors
            next(iter(views.values())).source.fetch(views, {n: [("coordinate", i) for i in drawn[n]] for n in views})
        for name, fresh in drawn.items():
            start = len(kink_log[name])
            rows[name] += _probe_tensor(ctx, name, grad_map[name], refs[name], [("coordinate", i) for i in fresh],
                                        host, kink_log[name], replacement=True)
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


def _direction_chunks(theta: Tensor, seed: int, mask: Tensor | None = None) -> Iterator[tuple[int, int, Tensor]]:
    """:func:`_direction` a chunk at a time, ``(lo, hi, values)`` over the flat index: the
    direction of a large tensor without holding it."""
    gen = torch.Generator(device=theta.device).manual_seed(seed)
    flat_mask = mask.reshape(-1) if mask is not None else None
    for lo, hi in _sizes.spans(theta.numel()):
        v = torch.randn(hi - lo, generator=gen, device=theta.device, dtype=torch.float64)
        yield lo, hi, (v if flat_mask is None else v.masked_fill_(~flat_mask[lo:hi], 0.0))


def _direction(theta: Tensor, seed: int, mask: Tensor | None = None) -> Tensor:
    """The Gaussian direction of a direction probe, in float64 on the parameter's device,
    zero where ``mask`` (the eligible elements, :class:`_Excluded`) is False. A tensor of
    more than :data:`~gradwatch._sizes.CHUNK` elements is drawn a chunk at a time (:func:`_direction_chunks`)."""
    if theta.numel() > _sizes.CHUNK:
        v = torch.empty(theta.shape, device=theta.device, dtype=torch.float64)
        flat = v.view(-1)
        for lo, hi, part in _direction_chunks(theta, seed, mask):
            flat[lo:hi] = part
        return v
    gen = torch.Generator(device=theta.device).manual_seed(seed)
    v = torch.randn(theta.shape, generator=gen, device=theta.device, dtype=torch.float64)
    return v if mask is None else v.masked_fill_(~mask, 0.0)


def _chunked_terms(g: Tensor, chunks: Iterator[tuple[int, int, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """``Σ g·v``, ``Σ (g·v)²`` and ``Σ v²`` over ``chunks`` of ``v`` (flat index), in float64,
    without a temporary of ``g``'s size."""
    flat = g.detach().reshape(-1)
    a = sq = vsq = None
    for lo, hi, v in chunks:
        vsq_c = v.pow(2).sum()
        t = v.mul_(flat[lo:hi])
        a_c, sq_c = t.sum(), t.pow_(2).sum()
        a, sq, vsq = (a_c, sq_c, vsq_c) if a is None else (a + a_c, sq + sq_c, vsq + vsq_c)
    return a, sq, vsq


def _direction_step(theta64: Tensor, base_step: float, excluded: _Excluded | None) -> Tensor:
    """``h`` of a direction probe: ``base_step · max(1, RMS of θ)``, over the eligible elements
    (a chunk at a time for a large tensor: no temporary of its size)."""
    eligible = theta64.numel() if excluded is None else max(theta64.numel() - excluded.count, 1)
    if theta64.numel() > _sizes.CHUNK and theta64.is_contiguous():
        flat, total = theta64.reshape(-1), None
        mask = excluded.mask.reshape(-1) if excluded is not None else None
        for lo, hi in _sizes.spans(theta64.numel()):
            c = flat[lo:hi] if mask is None else torch.where(mask[lo:hi], flat[lo:hi], 0.0)
            part = c.to(torch.float64).pow(2).sum()
            total = part if total is None else total + part
        return base_step * torch.clamp((total / eligible).sqrt(), min=1.0)
    if excluded is None:
        return base_step * torch.clamp(theta64.pow(2).mean().sqrt(), min=1.0)
    rms = (torch.where(excluded.mask, theta64, 0.0).pow(2).sum() / eligible).sqrt()
    return base_step * torch.clamp(rms, min=1.0)


def _ref_terms(g_ref: Tensor, spec: tuple[str, int], mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``<g_ref, v>`` and ``‖g_ref∘v‖`` of probe ``spec`` (one tensor of ``g_ref``'s size at most)."""
    kind, value = spec
    if kind == "coordinate":
        a_ref = g_ref.reshape(-1)[value].to(torch.float64).clone()  # not a view: g_ref is freed
        return a_ref, a_ref.abs()
    if g_ref.numel() > _sizes.CHUNK and g_ref.is_contiguous():  # a chunk of the direction at a time
        a_ref, sq, _ = _chunked_terms(g_ref, _direction_chunks(g_ref, value, mask))
        return a_ref, sq.sqrt()
    v = _direction(g_ref, value, mask)
    # in place when the layouts agree; a strided g_ref sets the order of the sum, as it always did
    rv = v.mul_(g_ref) if g_ref.is_contiguous() else g_ref.to(torch.float64) * v
    return rv.sum(), torch.linalg.vector_norm(rv)


class _References:
    """The float64 reference gradient of a check, without holding it whole.

    The terms the planned probes need are computed while the backward produces each
    tensor's reference (:meth:`gradwatch._evaluation._Evaluation.base` with ``stats``);
    what is needed later (replacement coordinates, the bisection of a failure) is taken
    from a float64 backward run again. Under data parallelism the reference is the mean
    over processes, held whole (``held``).
    """

    def __init__(self, ev: _Evaluation, every: Mapping[str, Tensor], masks: Mapping[str, _Excluded] | None,
                 held: Mapping[str, Tensor] | None = None) -> None:
        self.ev = ev
        self.every = every
        self.masks = masks or {}
        self.held = held

    def run(self, names: list[str], stats: Callable[[str, Tensor], Any]) -> dict[str, Any]:
        if self.held is not None:
            return {n: stats(n, self.held[n]) for n in names}
        out = self.ev.reference(self.every, names, stats)
        if out is None:
            raise RuntimeError("gradwatch: the float64 reference gradient could not be computed again")
        return out

    def fetch(self, views: Mapping[str, "_RefView"], wanted: Mapping[str, list]) -> None:
        """Add the terms of probes ``wanted`` (name -> specs) to ``views``, one backward for all."""
        wanted = {n: [s for s in specs if s not in views[n].terms] for n, specs in wanted.items() if n in views}
        wanted = {n: specs for n, specs in wanted.items() if specs}
        if not wanted:
            return

        def stats(name: str, g_ref: Tensor) -> dict:
            mask = self.masks[name].mask if name in self.masks else None
            return {spec: _ref_terms(g_ref, spec, mask) for spec in wanted[name]}

        for name, terms in self.run(list(wanted), stats).items():
            views[name].terms.update(terms)


class _RefView:
    """The float64 reference of one tensor: the terms of its probes, and the tensor on demand."""

    def __init__(self, name: str, terms: dict, source: _References) -> None:
        self.name = name
        self.terms = terms  # spec -> (<g_ref, v>, ‖g_ref∘v‖)
        self.source = source

    def of(self, spec: tuple[str, int]) -> tuple[Tensor, Tensor]:
        if spec not in self.terms:
            self.source.fetch({self.name: self}, {self.name: [spec]})
        return self.terms[spec]

    def tensor(self) -> Tensor:
        """The whole reference gradient of this tensor (a float64 backward run again)."""
        return self.source.run([self.name], lambda name, g: g)[self.name]


class _Line:
    """Points ``θ + s·h·v`` of one probe, as the evaluation dtype can hold them.

    When the evaluation allows it (a float64 copy), a point is made in place on the
    shadow and undone by copying the parameter back: no tensor-sized copy per point.
    A direction ``v`` left None (``seed`` given) is drawn again a chunk at a time at each
    use, so a probe of a large tensor holds nothing of its size but the shadow."""

    def __init__(self, theta: Tensor, kind: str, value: Any, base_step: float,
                 excluded: _Excluded | None = None, seed: int | None = None) -> None:
        self.theta = theta
        self.coordinate = kind == "coordinate"
        self.mask = excluded.mask if excluded is not None and kind != "coordinate" else None
        self.v = None
        if self.coordinate:
            self.index = value
            self.orig = theta.reshape(-1)[value].to(torch.float64)
            self.h = base_step * torch.clamp(self.orig.abs(), min=1.0)
        else:
            self.v, self.seed = value, seed
            self.theta64 = theta.to(torch.float64)  # no copy in float64 evaluation
            self.h = _direction_step(self.theta64, base_step, excluded)

    def direction(self) -> Tensor:
        """The whole direction (drawn when the line keeps none)."""
        return self.v if self.v is not None else _direction(self.theta, self.seed, self.mask)

    def point(self, s: float) -> Tensor:
        if self.coordinate:
            out = self.theta.clone()
            out.view(-1)[self.index] = (self.orig + s * self.h).to(self.theta.dtype)
            return out
        if self.v is None:  # whole points (batched evaluation stacks them): the direction kept too
            self.v = self.direction()
        return (self.theta64 + (s * self.h) * self.v).to(self.theta.dtype)

    def kept(self, point: Tensor) -> Tensor | None:
        """What :func:`_difference` needs of a point: a coordinate's element; a direction's
        point when rounded to a lower precision; else nothing."""
        if self.coordinate:
            return point.reshape(-1)[self.index].clone()
        return point if point.dtype != torch.float64 else None

    def _move(self, s: float) -> Callable[[Tensor], None]:
        if self.coordinate:
            def move(theta: Tensor) -> None:
                theta.view(-1)[self.index] = (self.orig + s * self.h).to(theta.dtype)
        else:
            def move(theta: Tensor) -> None:
                if theta.numel() > _sizes.CHUNK:  # elementwise, so the same values a chunk at a time
                    flat = theta.view(-1)
                    chunks = (_direction_chunks(theta, self.seed, self.mask) if self.v is None else
                              ((lo, hi, self.v.reshape(-1)[lo:hi]) for lo, hi in _sizes.spans(theta.numel())))
                    for lo, hi, v in chunks:
                        flat[lo:hi].add_((s * self.h) * v)
                    return
                theta.add_((s * self.h) * self.direction())  # the same rounding as θ + (s·h)·v
        return move

    def _at(self, ev: _Evaluation, key: str, s: float, **kwargs: Any) -> tuple[Tensor, Any, Tensor | None]:
        if not ev.in_place(key):
            point = self.point(s)
            loss, signature = ev({**ev.shadow, key: point}, **kwargs)
            return loss, signature, self.kept(point)
        with ev.moved([(key, self._move(s))]) as shadow:
            kept = self.kept(shadow[key])
            loss, signature = ev(shadow, **kwargs)
        return loss, signature, kept

    def run(self, ev: _Evaluation, key: str, s: float, kinks: _ProbeKinks | None) -> tuple[Tensor, Tensor | None]:
        # margins in the ±2h passes (those that move furthest towards a kink); none without them
        pass_kinks = kinks.next_pass(margins=abs(s) == 2.0) if kinks is not None else None
        loss, _, kept = self._at(ev, key, s, kinks=pass_kinks, record=False)
        return loss.to(torch.float64), kept

    def record(self, ev: _Evaluation, key: str) -> tuple[Tensor, Tensor | None, _Reference | None]:
        """The ``+h`` pass, recorded as the kink reference of the probe's other pass."""
        loss, signature, kept = self._at(ev, key, 1.0)
        return loss.to(torch.float64), kept, signature


def _probe_tensor(
    ctx: _CheckContext, name: str, grad: Tensor, g_ref: Tensor | None, specs: list, host: _HostValues,
    kink_log: list | None = None, replacement: bool = False,
) -> list:
    """Evaluate every probe of one tensor; returns ``(kind, value, host indices)`` per probe.

    With a kink reference, one :class:`_KinkRow` per probe is appended to ``kink_log``.
    """
    return [_probe(ctx, name, grad, g_ref, spec, host, kink_log, replacement) for spec in specs]


def _probe(
    ctx: _CheckContext, name: str, grad: Tensor, g_ref: Tensor | None, spec: tuple[str, int], host: _HostValues,
    kink_log: list | None = None, replacement: bool = False,
) -> tuple[str, int, dict[str, int]]:
    """Evaluate one probe at ±h and ±2h (±h only without Richardson); returns host
    indices of its device scalars. A direction is zero on the tensor's excluded elements."""
    kind, value = spec
    ev, excluded = ctx.ev, ctx.excluded.get(name)
    key = f"model.{name}"
    # first: a reference pass may make the float64 copy again (see _Evaluation._widened_pass)
    terms = g_ref.of(spec) if isinstance(g_ref, _RefView) else None
    theta = ev.shadow[key]
    # a large float64 copy probed in place: its direction is drawn a chunk at a time at each use
    chunked = (kind == "direction" and theta.dtype == torch.float64 and theta.numel() > _sizes.CHUNK
               and theta.is_contiguous() and ev.in_place(key) and (g_ref is None or terms is not None))
    line = _Line(theta, kind, None if kind == "direction" else value, ctx.base_step(theta.dtype), excluded,
                 seed=value if kind == "direction" else None)  # its step first
    mask = excluded.mask if excluded is not None else None
    line.v = _direction(theta, value, mask) if kind == "direction" and not chunked else None
    t = _probe_terms(line, grad, g_ref, terms)
    losses, points, kinks = _passes(ev, line, key, ctx.signature)
    kink = kinks.any_crossed() if kinks is not None else False
    if kinks is not None and kink_log is not None:
        kink_log.append(_KinkRow(kinks, host.extend(kinks.crossed), host.extend(kinks.margin), replacement))
    n1 = _difference(line, losses, points, 1.0, t.g, t.a)
    lmax = torch.stack([x.abs() for x in losses.values()]).max()
    out = {"a": t.a, "rss": t.rss, "vnorm": t.vnorm, "n1": n1, "n2": n1, "lmax": lmax, "h": line.h, "kink": kink}
    if ev.own_reference:
        out["mid"] = (losses[1.0] + losses[-1.0]) / 2
    if 2.0 in losses:
        out["n2"] = _difference(line, losses, points, 2.0, t.g, t.a)
        out["fourth"] = losses[2.0] + losses[-2.0] - 4 * (losses[1.0] + losses[-1.0]) + 6 * ctx.loss0
    if t.a_ref is not None:
        out["a_ref"], out["rss_ref"] = t.a_ref, t.rss_ref
    return kind, value, {k: host.add(x) for k, x in out.items()}


class _Terms(NamedTuple):
    """What one probe compares its central differences with, on the device (float64)."""

    a: Tensor  # <g, v> of the gradient under test
    rss: Tensor  # ‖g∘v‖, the root sum of squares of its terms (never cancels)
    vnorm: Tensor  # ‖v‖
    a_ref: Tensor | None  # <g_ref, v> of the float64 reference (None: no reference)
    rss_ref: Tensor | None  # ‖g_ref∘v‖
    g: Tensor | None  # the gradient in float64, kept when the points are rounded (for _difference)


def _probe_terms(line: _Line, grad: Tensor, g_ref: Tensor | None, terms: tuple[Tensor, Tensor] | None) -> _Terms:
    """The :class:`_Terms` of the probe along ``line``; ``terms``: the reference's, when taken
    already (:class:`_RefView`). A direction the line does not keep (a large float64 copy) is
    drawn a chunk at a time: no temporary of the tensor's size."""
    theta = line.theta
    if line.coordinate:
        a = grad.detach().reshape(-1)[line.index].to(device=theta.device, dtype=torch.float64)
        rss, vnorm = a.abs(), torch.ones((), dtype=torch.float64, device=theta.device)
        if terms is not None:
            a_ref, rss_ref = terms
        else:
            a_ref = g_ref.reshape(-1)[line.index].to(torch.float64) if g_ref is not None else None
            rss_ref = a_ref.abs() if a_ref is not None else None
        return _Terms(a, rss, vnorm, a_ref, rss_ref, None)
    v = line.v
    g = gv = None
    if v is None:  # chunked: no temporary of the tensor's size
        a, sq, vsq = _chunked_terms(grad.to(theta.device), _direction_chunks(theta, line.seed, line.mask))
        rss, vnorm = sq.sqrt(), vsq.sqrt()
    elif theta.dtype == torch.float64 and theta.numel() > _sizes.CHUNK:  # no temporary of the tensor's size
        flat_v = v.reshape(-1)
        a, sq, _ = _chunked_terms(grad.to(theta.device), ((lo, hi, flat_v[lo:hi].clone())
                                                          for lo, hi in _sizes.spans(theta.numel())))
        rss, vnorm = sq.sqrt(), torch.linalg.vector_norm(v)
    elif theta.dtype == torch.float64:  # points not rounded: <g, v> needs no float64 g kept
        gv = grad.detach().to(device=theta.device, dtype=torch.float64, copy=True).reshape(theta.shape)
        gv.mul_(v)
    else:
        g = grad.detach().to(device=theta.device, dtype=torch.float64).reshape(theta.shape)
        gv = g * v
    if gv is not None:
        a, rss, vnorm = gv.sum(), torch.linalg.vector_norm(gv), torch.linalg.vector_norm(v)
    del gv
    if terms is not None:
        a_ref, rss_ref = terms
    elif g_ref is not None:
        rv = g_ref.to(torch.float64) * v
        a_ref, rss_ref = rv.sum(), torch.linalg.vector_norm(rv)
        del rv
    else:
        a_ref = rss_ref = None
    return _Terms(a, rss, vnorm, a_ref, rss_ref, g)


def _passes(
    ev: _Evaluation, line: _Line, key: str, ref: _Reference | None,
) -> tuple[dict[float, Tensor], dict[float, Tensor | None], _ProbeKinks | None]:
    """The losses at the points of ``line`` (``θ ± h·v``, and ``θ ± 2h·v`` with Richardson
    passes), what :func:`_difference` needs of each point, and the kink record of the probe
    against ``ref`` (the unperturbed pass's; with own-reference probes, the probe's ``+h``
    pass). Batched in one vmapped call when the evaluation allows it and no kink is recorded."""
    losses, points = {}, {}
    if ev.own_reference:
        losses[1.0], points[1.0], ref = line.record(ev, key)
    kinks = _ProbeKinks(ref, line.theta.device) if ref is not None else None
    batched = None
    if kinks is None and ev.batched is not False:
        points = {s: line.point(s) for s in ev.signs}
        batched = ev.losses_batched(key, [points[s] for s in ev.signs])
        points = {s: line.kept(point) for s, point in points.items()}
    if batched is not None:
        losses = dict(zip(ev.signs, batched))
    else:
        for s in ev.signs:
            if s not in losses:
                losses[s], points[s] = line.run(ev, key, s, kinks)
    return losses, points, kinks


def _difference(line: _Line, losses: dict, points: dict, s: float, g: Tensor | None, a: Tensor) -> Tensor:
    """``D(s·h)``: the central difference at ``±s·h`` along the probe's nominal direction."""
    up, down = losses[s], losses[-s]
    if line.coordinate:  # the step the dtype really took (points hold the element)
        return (up - down) / (points[s].to(torch.float64) - points[-s].to(torch.float64))
    width = 2 * s * line.h
    nominal = (up - down) / width
    if line.theta.dtype == torch.float64:
        return nominal
    taken = (points[s].to(torch.float64) - points[-s].to(torch.float64)) / width
    if line.mask is not None:  # inf - inf on non-finite elements, which did not move
        taken = torch.where(line.mask, taken, 0.0)
    return nominal + (a - (g * taken).sum())  # remove the part of the difference the rounded points add


#: Step (relative to ``max(1, |θ|)``) at which a probe whose perturbed losses were equal
#: is evaluated again, to tell a loss that rounding flattened from one that does not move.
_FLAT_STEP = 1e-2
#: A loss change counts (predicted at ±h, or measured at ±_FLAT_STEP) above this many
#: units in the last place of the loss.
_FLAT_ULPS = 1e3


def _flat_probes(ctx: _CheckContext, rows: Mapping[str, list], values: list[float], grad_eps: float,
                 loss: float) -> None:
    """Mark probes whose perturbed losses were all equal (numerical value exactly 0) where
    autograd predicts a change well above the loss's rounding, and whose loss does move at
    the step :data:`_FLAT_STEP`: rounding flattened the loss there, so 0 is no
    measurement (``idx["flat"]``, judged by :class:`_Judge`). A loss that does not move at
    the larger step either is judged as usual: 0 is then the derivative. Costs two
    evaluations per such probe (rare: a tensor whose true gradient is 0 predicts no
    change, and an ``|autograd|`` within the gradient's rounding noise of ``|L|`` is no
    prediction), one transfer."""
    ev, excluded = ctx.ev, ctx.excluded
    eps = float(torch.finfo(ev.loss_dtype if ev.loss_dtype is not None else torch.float64).eps)
    candidates = []
    for name, probes in rows.items():
        for kind, value, idx in probes:
            if values[idx["kink"]] or values[idx["n1"]] != 0.0 or values[idx["n2"]] != 0.0:
                continue
            a = max(abs(values[idx["a"]]), abs(values[idx["a_ref"]]) if "a_ref" in idx else 0.0)
            threshold = _FLAT_ULPS * eps * values[idx["lmax"]]
            noise = _NOISE_ULPS * grad_eps * abs(loss) * values[idx["vnorm"]]  # the gradient's own rounding
            if not (2 * values[idx["h"]] * a > threshold and a > noise):
                continue
            candidates.append((name, kind, value, idx, threshold))
    if not candidates:
        return
    host = _HostValues(ctx.reduce)
    moved = []
    for name, kind, value, idx, _ in candidates:
        key = f"model.{name}"
        theta = ev.shadow[key]
        mask = excluded[name] if excluded and name in excluded else None
        v = _direction(theta, value, mask.mask if mask else None) if kind == "direction" else value
        line = _Line(theta, kind, v, _FLAT_STEP, mask)
        up, _ = line.run(ev, key, 1.0, None)
        down, _ = line.run(ev, key, -1.0, None)
        moved.append(host.add((up - down).abs()))
    fetched = host.fetch()
    for (name, kind, value, idx, threshold), i in zip(candidates, moved):
        if fetched[i] > threshold:
            values.append(1.0)
            idx["flat"] = len(values) - 1
