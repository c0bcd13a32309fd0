"""Measured precision: how finely the float64 evaluation of the loss really resolves.

One room of the engine (see :mod:`gradwatch.engine`). A float64 copy of the model does
not make every kernel compute in float64: most Triton kernels (and many custom CUDA or
NumPy-backed ``autograd.Function``\\ s) take float64 tensors, cast them to float32 inside
and cast the result back. Their loss then carries float32 rounding, ~1e8 times float64's,
and central differences at float64's step (6e-6) measure that rounding instead of the
derivative. So the precision is measured, not assumed from dtypes:

every floating parameter of the float64 copy is moved by ``s·r·w·θ`` (``w`` 0.5 or 1.5 at
random, see :func:`_mover`), ``s ∈ {1, -1, 2, -2}`` and ``r`` = :data:`_RELATIVE` (a few
float32 units in the last place, which re-rounds every float32 cast inside, and ~1e9 float64
ones). The fourth
difference ``L(2) + L(-2) - 4L(1) - 4L(-1) + 6L(0)`` cancels the smooth part of the loss
up to ``O(r^4)`` (far below float64 rounding) and leaves ``√70`` times the evaluation's
rounding noise. The lines give the measured loss noise ``σ`` (:class:`_Noise`); with
``ε = σ/|L|`` the probes take the base step :func:`_measured_step` (``ε^(1/4)`` with the ±2h
passes, ``ε^(1/3)`` without; float64's 6e-6 at least, 1e-2 at most), the error bars take
:data:`_SAFETY` times ``σ`` as their floor, and the reference gradient the tolerance of the
precision measured (:class:`gradwatch._judging._Judge`).

It costs 4 evaluations and one host transfer per check (before the probes, whose step it
sets), 12 more and one more transfer where the evaluation is below float64, and holds no
tensor-sized copy: each parameter is moved in place on the float64 copy, a chunk at a time,
and restored by copying the parameter back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from gradwatch import _sizes
from gradwatch._evaluation import DEFAULT_STEP, _HostValues
from gradwatch.kinks import _ProbeKinks, _Reference

if TYPE_CHECKING:
    from gradwatch._evaluation import _Evaluation

__all__: list[str] = []

#: Relative move of every parameter: ``2^-21`` ≈ 4.8e-7, about 4–8 float32 units in the last
#: place (every float32 rounding inside the forward is redone) and ~2e9 float64 ones.
_RELATIVE = 2.0**-21
#: Lines measured (each a fourth difference: one sample of the noise). One tells the
#: precision apart (float64 ~1e-16 of ``|L|``, float32 inside ~1e-9: orders of magnitude);
#: where it finds the evaluation below float64, :data:`_MORE_DIRECTIONS` more make the
#: noise the error bars take a mean of several samples (one sample of a normal variable is
#: below half its scale 38% of the time, the mean square of four 9%).
_DIRECTIONS = 1
_MORE_DIRECTIONS = 3
#: Noise of the fourth difference in units of the loss noise.
_FOURTH = math.sqrt(70.0)
#: Below this relative noise the evaluation is float64 (a few hundred float64 units: sums of
#: many float64 roundings); above :data:`_FLOAT32`, below float32 (bfloat16/float16 inside).
_FLOAT64 = 1e-13
_FLOAT32 = 1e-5
#: The noise floor the error bars take is this multiple of the measured ``σ`` (one sample
#: of a normal variable: below a third of its scale 26% of the time, below half 38%).
_SAFETY = 2.0
#: Largest base step the measured noise may ask for (relative to the tensor's magnitude).
_MAX_STEP = 1e-2


@dataclass(frozen=True)
class _Noise:
    """The measured rounding noise of a float64 evaluation: ``sigma`` absolute, ``relative``
    to ``|L(θ)|``, and what that says it computes in (:func:`_precision_name`)."""

    sigma: float
    relative: float
    precision: str


def _measure_noise(ev: _Evaluation, keys: list[str], seed: int, reduce: Callable[[Tensor], Tensor] | None,
                   loss0: Tensor, signature: _Reference | None, terms: Tensor | None = None) -> tuple[float, float]:
    """The measured rounding noise ``σ`` of one evaluation of the loss, and ``|L(θ)|``, on the
    host (one transfer; under data parallelism the mean over processes, so every process
    takes the same step). ``loss0``: the unperturbed float64 loss; ``signature``: its kink
    reference (None: kinks not recorded): a line whose passes took another branch of a
    non-smooth op (a ReLU input within ~1e-6 of 0) measured a kink, not rounding, and is left
    out (none left: 0, float64's own step). ``terms``: the root sum of squares
    of the loss's terms, when it is a sum that cancels (a module-local check's ``‖g_out∘y‖₂``):
    the scale the noise is relative to when larger than ``|L(θ)|``."""
    keys = [k for k in keys if ev.in_place(k) and ev.shadow[k].is_floating_point() and ev.shadow[k].numel()]
    if not keys:
        return 0.0, 0.0
    base = loss0.detach().to(torch.float64)
    measure = _Lines(ev, keys, seed, reduce, base, signature, terms)
    f, loss = measure(range(_DIRECTIONS))
    if all(math.isfinite(x) for x in f) and _relative(_rms(f), loss) > _FLOAT64:  # below float64: more samples
        f += measure(range(_DIRECTIONS, _DIRECTIONS + _MORE_DIRECTIONS))[0]
    if not all(math.isfinite(x) for x in f):
        return math.inf, loss
    return _rms(f), loss


def _rms(fourths: list[float]) -> float:
    """The loss noise that fourth differences measured: their RMS over ``√70`` (0 for none)."""
    return math.sqrt(sum(x * x for x in fourths) / len(fourths)) / _FOURTH if fourths else 0.0


class _Lines:
    """The measuring lines of one check (see the module notes)."""

    def __init__(self, ev: _Evaluation, keys: list[str], seed: int, reduce: Callable[[Tensor], Tensor] | None,
                 base: Tensor, signature: _Reference | None, terms: Tensor | None = None) -> None:
        self.ev, self.keys, self.seed, self.reduce, self.base = ev, keys, seed, reduce, base
        self.scale = base.abs() if terms is None else torch.maximum(base.abs(), terms.detach().to(base))
        self.signature = signature if signature is not None and len(signature) else None

    def __call__(self, lines: range) -> tuple[list[float], float]:
        """The fourth differences of the loss along each of ``lines`` that crossed no kink (host
        values, one transfer) and ``|L(θ)|``."""
        ev, fourths, crossed = self.ev, [], []
        for d in lines:
            kinks = _ProbeKinks(self.signature, self.base.device) if self.signature is not None else None
            losses = {}
            for s in (1.0, -1.0, 2.0, -2.0):
                with ev.moved((key, _mover(s, (self.seed * 1000003 + 7919 * d + i) % 2**62))
                              for i, key in enumerate(self.keys)) as shadow:
                    loss, _ = ev(shadow, kinks=kinks.next_pass(margins=False) if kinks is not None else None,
                                 record=False)
                losses[s] = loss.detach().to(torch.float64)
            fourths.append(losses[2.0] + losses[-2.0] - 4 * (losses[1.0] + losses[-1.0]) + 6 * self.base)
            crossed.append(kinks.any_crossed().to(torch.float64) if kinks is not None else self.base.new_zeros(()))
        host = _HostValues(self.reduce)
        i_f = host.extend(torch.stack(fourths).abs())
        i_c = host.extend(torch.stack(crossed))
        i_l = host.add(self.scale)
        values = host.fetch()
        return [values[i] for i, c in zip(i_f, i_c) if values[c] == 0], values[i_l]


def _mover(s: float, seed: int) -> Callable[[Tensor], None]:
    """Move a float64 tensor in place by ``s·r·w·θ``, ``w`` 0.5 or 1.5 at random (from ``seed``
    and each element's index: the same at every ``s``). Every element moves away from 0 or
    towards it together, so sums of many of them (a layer's outputs, a kernel's inputs) move
    by ~``r`` too and are re-rounded in float32 (random signs would cancel in such sums, below
    float32's resolution); pre-activations keep their signs (no ReLU kink is crossed) except
    within ~``r`` of 0; the random part keeps a scale-invariant model (BatchNorm) moving."""

    def move(theta: Tensor) -> None:
        flat = theta.view(-1)
        for lo, hi in _sizes.spans(flat.numel()):
            part = flat[lo:hi]
            weights = _signs(lo, hi, seed, theta.device, theta.dtype).mul_(0.5).add_(1.0)  # 0.5 or 1.5
            part.addcmul_(part, weights, value=s * _RELATIVE)

    return move


def _signs(lo: int, hi: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """±1 for elements ``lo..hi`` of a flat tensor: a hash of each element's index and ``seed``,
    so the same signs whatever the chunks (int64 arithmetic wraps)."""
    h = torch.arange(lo, hi, dtype=torch.int64, device=device) * 2654435761 + (seed % 2**31)
    h = h ^ (h >> 13)
    h = h * 1274126177
    return ((h >> 16) & 1).to(dtype).mul_(2).sub_(1)


def _relative(noise: float, loss: float) -> float:
    """The measured noise relative to the loss (``inf`` when the loss is 0 and noise is not)."""
    if noise == 0.0:
        return 0.0
    return noise / loss if loss > 0 else math.inf


def _precision_name(relative: float) -> str:
    """What the measured relative noise says the evaluation computes in."""
    if relative <= _FLOAT64:
        return "float64"
    if relative <= _FLOAT32:
        return "~float32"
    return "below float32"


def _measured_step(relative: float, richardson: bool) -> float:
    """The base step for the measured relative noise ``ε``, within ``[DEFAULT_STEP, _MAX_STEP]``:
    ``ε^(1/3)``, the best step of a central difference (truncation ``O(h²)``), or ``ε^(1/4)``
    with Richardson's ``±2h`` passes, whose extrapolation leaves ``O(h⁴)``: a larger step, so
    the rounding the probe divides by ``h`` weighs less."""
    if not math.isfinite(relative):
        return _MAX_STEP
    if relative <= _FLOAT64:  # float64 inside: its own step
        return DEFAULT_STEP
    return min(max(DEFAULT_STEP, relative ** (1 / 4 if richardson else 1 / 3)), _MAX_STEP)
