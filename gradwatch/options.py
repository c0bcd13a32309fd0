"""The probe options of a check: one frozen object, validated once.

:class:`ProbeOptions` holds how a check probes (how many coordinates and directions per
tensor, joint probes, the step, where losses are evaluated, kinks, the error bar's
passes, the reference gradient, localisation). :func:`gradwatch.check`,
:func:`gradwatch.check_module` and :func:`gradwatch.assert_gradients` build one from their
keyword arguments; the adapters (:class:`gradwatch.GradWatch`, the Lightning and Hugging
Face callbacks) take one as ``options=``. Inside gradwatch the options travel as this
object; a budget that shrinks a check makes a new one with :func:`dataclasses.replace`.

Example:
    >>> import dataclasses
    >>> options = ProbeOptions(coordinates=8, precision="float64")
    >>> options.directions, options.precision
    (1, 'float64')
    >>> dataclasses.replace(options, coordinates=0).coordinates
    0
    >>> ProbeOptions(coordinates=-1)
    Traceback (most recent call last):
        ...
    ValueError: `coordinates` must be a non-negative int, got -1
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradwatch._validate import _bool, _non_negative_int, _one_of, _positive_float, _positive_int

__all__ = ["ProbeOptions", "DEFAULT_SHADOW_BYTES", "PRECISIONS", "EVALUATIONS", "PER_TENSOR"]

#: Largest float64 copy of parameters and buffers ``precision="auto"`` makes (2 GiB).
DEFAULT_SHADOW_BYTES = 2 * 2**30
#: Where perturbed losses are evaluated.
PRECISIONS = ("float64", "native", "auto")
#: How the perturbed losses of a probe are evaluated.
EVALUATIONS = ("auto", "batched", "sequential")
#: Which checked tensors get probes of their own (``ProbeOptions.per_tensor``).
PER_TENSOR = ("auto", "all")


@dataclass(frozen=True, kw_only=True)
class ProbeOptions:
    """How a check probes the gradient (see :func:`gradwatch.check` for the details of each).

    Every field is validated when the object is made (also by :func:`dataclasses.replace`),
    with an error that names the option and the value.

    Args:
        coordinates: Random elements probed per tensor, drawn without replacement (the
            adapters: at most, under their overhead budget).
        directions: Random Gaussian directions over the whole tensor probed per tensor;
            they catch errors confined to a few elements. The adapters need at least 1.
        joint: Joint probes per check: random directions over every checked tensor at
            once. With ``joint`` > 0, ``coordinates`` and ``directions`` may both be 0.
        step: Base step ``h``; ``None`` takes 6e-6 in float64 and ``eps^(1/3)`` of the
            parameter dtype natively, scaled by ``max(1, |θ|)``.
        precision: ``"float64"``, ``"native"`` or ``"auto"``: where perturbed losses are
            evaluated.
        max_shadow_bytes: Largest float64 copy of parameters and buffers ``"auto"`` makes
            before it evaluates natively (and the adapters check modules locally instead).
        evaluation: ``"auto"``, ``"batched"`` (``torch.func.vmap`` over a probe's
            evaluations; needs ``kinks=False``) or ``"sequential"``.
        kinks: Record branches of non-smooth ops and exclude probes that cross one.
        kink_resamples: Replacement coordinates drawn per tensor, at most, for coordinate
            probes that crossed a kink.
        near_kink_margin: A kink event with a margin below this is "near".
        richardson: Evaluate every probe at ``±2h`` too (the error bar's truncation term
            and the measured rounding noise); False halves the evaluations per probe.
        reference: In float64 evaluation, also take autograd's gradient of the float64 copy.
        localize: Narrow a failing tensor down to an element.
        per_tensor: Which checked tensors get their own ``coordinates`` and ``directions``.
            ``"all"``: every one. ``"auto"``: every one when a check covers at most 16
            tensors, or evaluates natively, or has no joint probe or no float64 reference;
            above that the joint probes (group testing where one fails) and the float64
            reference's precision test verify every tensor, and only the tensors a joint
            probe weighs too little (gradient RMS below 1e-3 of the model's, at most 16 of
            them) get probes of their own, and the check takes at least 2 joint probes, so
            the cost of a check does not grow with the number of tensors. The adapters'
            checks take ``"all"``: their schedule sizes each tensor's probes within the
            overhead budget.

    Example:
        >>> ProbeOptions(kinks=False, evaluation="batched").evaluation
        'batched'
    """

    coordinates: int = 4
    directions: int = 1
    joint: int = 1
    step: float | None = None
    precision: str = "auto"
    max_shadow_bytes: int = DEFAULT_SHADOW_BYTES
    evaluation: str = "auto"
    kinks: bool = True
    kink_resamples: int = 4
    near_kink_margin: float = 10.0
    richardson: bool = True
    reference: bool = True
    localize: bool = True
    per_tensor: str = "auto"

    def __post_init__(self) -> None:
        # in the order gradwatch.check validated its arguments (the first bad one is named)
        _non_negative_int("coordinates", self.coordinates)
        _non_negative_int("directions", self.directions)
        _non_negative_int("joint", self.joint)
        if self.coordinates + self.directions + self.joint == 0:
            raise ValueError(
                f"`coordinates` + `directions` must be at least 1, got {self.coordinates} + {self.directions}"
            )
        _bool("kinks", self.kinks)
        _non_negative_int("kink_resamples", self.kink_resamples)
        _positive_float("near_kink_margin", self.near_kink_margin)
        _one_of("evaluation", self.evaluation, EVALUATIONS)
        if self.evaluation == "batched" and self.kinks:
            raise ValueError(_batched_conflict(self.evaluation, self.kinks))
        if self.step is not None:
            _positive_float("step", self.step)
        _one_of("precision", self.precision, PRECISIONS)
        _positive_int("max_shadow_bytes", self.max_shadow_bytes)
        for name in ("localize", "richardson", "reference"):
            _bool(name, getattr(self, name))
        _one_of("per_tensor", self.per_tensor, PER_TENSOR)


def _batched_conflict(evaluation: str, kinks: Any) -> str:
    """Why ``evaluation='batched'`` cannot run here (:func:`gradwatch.check` adds its ``reduce``)."""
    return (
        "`evaluation='batched'` cannot record kinks (one pass per evaluation is needed) nor run with "
        "`reduce` (every process must run the same forwards); pass kinks=False and reduce=None or "
        f"evaluation='auto', got evaluation={evaluation!r}, kinks={kinks!r}"
    )


def _options(name: str, value: Any) -> ProbeOptions:
    """Validate an adapter's ``options`` argument (``None``: the defaults)."""
    if value is None:
        return ProbeOptions()
    if not isinstance(value, ProbeOptions):
        raise TypeError(f"`{name}` must be None or a gradwatch.ProbeOptions, got {type(value).__name__} {value!r}"[:300])
    return value
