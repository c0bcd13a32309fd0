"""Judging: tolerances and verdicts from the values a check brought to the host.

One room of the engine (see :mod:`gradwatch.engine`): the device statistics a verdict
needs (gradient RMS, gap to the float64 reference), whether the replay can be trusted,
the loss noise, and :class:`_Judge`, which turns probe values into
:class:`~gradwatch.report.Probe` and :class:`~gradwatch.report.TensorCheck` verdicts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch._evaluation import _dtype_name, _HostValues
from gradwatch.replay import ReplayState
from gradwatch.report import KinkEvent, Probe, TensorCheck

if TYPE_CHECKING:
    from gradwatch._evaluation import _Evaluation
    from gradwatch._probing import _KinkRow

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
    dtype = ev.lowest_dtype if ev.lowest_dtype is not None else torch.float64  # the lowest precision computed in
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
