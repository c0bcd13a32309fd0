"""Results of a gradient check: frozen dataclasses, the failure type, the logged keys.

Everything a sink writes comes from a :class:`Report`. The logged-key scheme lives in
one function, :func:`metrics`.

Example:
    >>> report = gradwatch.check(model, loss_fn, batch, seed=0)  # doctest: +SKIP
    >>> report.ok, report.tensors["0.weight"].rel_error            # doctest: +SKIP
    (True, 3.1e-08)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

__all__ = [
    "RESOLVING_BOUND",
    "VERDICTS",
    "GradientCheckError",
    "GradientCheckWarning",
    "KinkEvent",
    "KinkSite",
    "KinkWarning",
    "ModuleCheck",
    "OnFailure",
    "UnreliableCheckWarning",
    "Probe",
    "ReferenceCheck",
    "Report",
    "TensorCheck",
    "failure_message",
    "local_name",
    "metrics",
]

VERDICTS = ("pass", "fail", "inconclusive", "kink", "nonfinite", "skipped")

#: A tensor whose check could not have failed a relative gradient error below this
#: (its :attr:`TensorCheck.resolving_power`) is ``"inconclusive"``, never ``"pass"``: 5%,
#: well above what a float64 evaluation resolves (~1e-6) or a kernel computing in float32
#: inside (~1e-4 with the measured step), below the errors real backward bugs make.
RESOLVING_BOUND = 0.05

#: Ranks of the worst-tensors chart: ``<prefix>/worst/0`` .. ``<prefix>/worst/9``.
_WORST_TENSORS = 10

_FIX_HINT = (
    "the gradient autograd produced for this tensor is not the derivative of the loss: "
    "check the backward of custom autograd.Functions, kernels and gradient hooks on the "
    "path from this tensor to the loss"
)

_LOCAL_HINT = (
    "this module's own backward is not the derivative of its forward (checked in isolation, on the inputs and "
    "output gradient of the training step): check its custom autograd.Functions, kernels and tensor hooks"
)


@dataclass(frozen=True)
class KinkEvent:
    """One non-smooth op call that one probe moved.

    The margin is ``min |z₀| / |z - z₀|`` over the op's elements, for its switching
    input ``z`` (the ReLU input, ``a - b`` of ``maximum``, the gap between a max-pool
    window's winner and runner-up) at the unperturbed point (``z₀``) and in the
    probe's ``±2h`` passes: the distance to the kink in units of the widest move.

    Attributes:
        tensor: Name of the parameter tensor the probe perturbed.
        probe: Index of the probe in that tensor's ``TensorCheck.probes``.
        call: Position of the op call among the forward's non-smooth op calls.
        module: Qualified ``named_modules()`` name of the module whose forward called
            the op (``""`` for the model itself), or ``None`` for code outside the
            model's modules (a functional call in the loss function).
        op: The aten op name, such as ``"relu"`` or ``"max_pool2d_with_indices"``.
            When a pass ran another sequence of non-smooth ops (data-dependent
            control flow), one event ``"<op> (op sequence changed)"`` of kind
            ``"discontinuity"`` marks the first differing call (its module is the
            reference's at that position, None past its end).
        kind: ``"kink"`` (the derivative jumps) or ``"discontinuity"`` (the value
            jumps: round/floor/ceil, comparisons feeding arithmetic, sign).
        margin: Below 1: a pass went past the kink (linear estimate). NaN when the op
            crossed but gives no margin (mode, cummax/cummin, fractional max-pool,
            argsort, amax/amin, or a change in the sequence of ops).
        crossed: Some pass of the probe took another branch than the unperturbed pass
            (exact, from the branch codes). Such probes never count towards a failure.
        at_kink: An element sat exactly at the kink (``z₀ == 0``, a ReLU input of
            exactly 0, a max-pool tie), where autograd's derivative is a convention.
        near: ``crossed`` or ``margin`` below the check's ``near_kink_margin``.

    Example:
        >>> [(e.module, e.op, e.margin) for e in report.kink_events if e.near]  # doctest: +SKIP
        [('enc.1', 'relu', 0.0083)]
    """

    tensor: str
    probe: int
    call: int
    module: str | None
    op: str
    kind: str
    margin: float
    crossed: bool
    at_kink: bool = False
    near: bool = False


@dataclass(frozen=True)
class KinkSite:
    """The kink events of one check grouped by ``(module, op, kind)``.

    Attributes:
        module: As in :class:`KinkEvent`.
        op: The aten op name.
        kind: ``"kink"`` or ``"discontinuity"``.
        events: Probe/op-call pairs that moved this op.
        near: How many of them were near (or crossed).
        crossed: How many crossed.
        at_kink: How many had an element exactly at the kink.
        margin_min: Smallest margin (NaN when none is known).

    Example:
        >>> report.kink_sites(near_only=True)[0].where  # doctest: +SKIP
        "relu in module 'enc.1'"
    """

    module: str | None
    op: str
    kind: str
    events: int
    near: int
    crossed: int
    at_kink: int
    margin_min: float

    @property
    def where(self) -> str:
        """``relu in module 'enc.1'``, ``relu in the model's own forward`` or ``relu outside the model's modules``."""
        if self.module is None:
            return f"{self.op} outside the model's modules"
        return f"{self.op} in the model's own forward" if self.module == "" else f"{self.op} in module {self.module!r}"


@dataclass(frozen=True)
class Probe:
    """One comparison of a numerical directional derivative with autograd.

    A coordinate probe perturbs one element (``index`` is its tuple index); a
    direction probe perturbs the whole tensor along a random Gaussian direction that
    ``torch.randn(shape, generator=torch.Generator(device).manual_seed(direction_seed),
    dtype=torch.float64)`` regenerates, zero on the tensor's excluded elements
    (:attr:`TensorCheck.excluded`).

    Attributes:
        kind: ``"coordinate"``, ``"direction"`` or ``"joint"`` (one direction over every
            checked tensor at once; :attr:`Report.joint`).
        index: Element index for coordinate probes, else ``None``.
        direction_seed: Seed of the direction for direction probes, else ``None``.
        autograd: ``<grad, v>`` from the gradient under test.
        numerical: Central difference ``(L(θ+hv) - L(θ-hv)) / 2h`` in float64.
        error: ``|numerical - reference|`` when there is a float64 reference (the code
            test; the precision gap is judged per tensor), else ``|numerical - autograd|``.
        error_bar: Estimated error of ``numerical`` (truncation from a second step
            size, plus rounding of the loss evaluations).
        tolerance: Largest ``error`` that counts as agreement (see the README).
        step: The step ``h`` used.
        kink: True when the ±h passes took different branches of a non-smooth op;
            such probes never count towards a failure.
        kink_margin: Smallest margin of the kink events of this probe (inf: it moved
            no non-smooth op; see :class:`KinkEvent`).
        at_kink: An element of an op it moved sat exactly at the kink.
        replacement: Drawn to replace a coordinate probe that crossed a kink.
        reference: ``<g_ref, v>`` from autograd on the float64 copy of the model (the
            same backward code without low-precision rounding), or ``None``.
        flat: The perturbed losses were all equal although the loss moves at a larger
            step: rounding to a lower precision inside the forward flattened it, so
            the numerical value 0 measures nothing; such probes are not judged.
        grad_error: With a float64 reference, ``|numerical - autograd|``: the gradient
            training used, compared with the central differences too (NaN without one).
        grad_tolerance: Its tolerance, in the training gradient's precision.
        resolving_power: The smallest relative error of this directional derivative the
            probe would have failed: ``tolerance / max(|numerical|, |compared|, G·‖v‖)``
            (``G``: the RMS of the model's gradient).
    """

    kind: str
    index: tuple[int, ...] | None
    direction_seed: int | None
    autograd: float
    numerical: float
    error: float
    error_bar: float
    tolerance: float
    step: float
    kink: bool
    kink_margin: float = math.inf
    at_kink: bool = False
    replacement: bool = False
    reference: float | None = None
    flat: bool = False
    grad_error: float = math.nan
    grad_tolerance: float = math.nan
    resolving_power: float = math.nan

    @property
    def rel_error(self) -> float:
        """``error / (|numerical| + |compared value|)``, 0 when both are 0."""
        compared = self.autograd if self.reference is None else self.reference
        return _safe_ratio(self.error, abs(self.numerical) + abs(compared))

    @property
    def failed(self) -> bool:
        """True when the probe disagrees beyond its tolerance, crossed no kink and was not flat."""
        return (not self.kink) and not self.flat and not (self.error <= self.tolerance)

    @property
    def where(self) -> str:
        """``[3, 7]`` for a coordinate, ``<direction seed=...>`` for a direction."""
        if self.index is not None:
            return _index(self.index)
        return f"<random direction, seed={self.direction_seed}>"


@dataclass(frozen=True)
class TensorCheck:
    """The check of one parameter tensor.

    Attributes:
        name: The ``named_parameters()`` name.
        shape: The parameter's shape.
        verdict: One of ``"pass"``, ``"fail"``, ``"inconclusive"`` (nothing failed, but
            the check could not have failed an error below :data:`RESOLVING_BOUND`: see
            ``resolving_power``; ``reason`` says why and what resolves it), ``"kink"``
            (every probe crossed a kink, nothing could be verified), ``"nonfinite"``
            (NaN/Inf in the gradient or a perturbed loss) or ``"skipped"`` (frozen, no
            gradient, or the check was unreliable).
        resolving_power: The smallest relative gradient error this check would have
            failed: the best :attr:`Probe.resolving_power` of its judged probes. A pass
            means a bug above it would have failed here; NaN when nothing was judged.
        reference_broken: The float64 path of the code is wrong: autograd's gradient of
            the float64 copy disagrees with central differences while the training
            gradient agrees with them (the training gradient is verified; a kernel whose
            float64 backward is broken, not used in training).
        rel_error: Seed-article relative error over the probes that crossed no kink,
            ``||n - a|| / (||n|| + ||a||)``; NaN when there is none.
        error_bar: Numerical error of the check in the same relative units.
        error_ratio: Largest ``error / tolerance`` over those probes and of the
            precision gap; above 1 fails.
        probes: Every probe, kinked ones and replacements included.
        reason: Why the verdict is not a plain pass/fail, or ``None``.
        kink_events: Every non-smooth op call a probe of this tensor moved.
        resampled: Replacement coordinates drawn because coordinate probes crossed
            a kink (``check(kink_resamples=...)`` bounds it).
        precision_gap: ``||g - g_ref|| / (||g_ref|| + G_ref·sqrt(numel)/2)`` between
            the gradient under test ``g`` and autograd's gradient ``g_ref`` of the same
            code on the float64 copy (``G_ref``: RMS of the model's ``g_ref``): what the
            training precision (float32, TF32, fp16/bf16 autocast) added. NaN
            without a float64 reference.
        gap_ratio: ``‖g - g_ref‖`` over the precision test's limit, which allows the
            rounding spread gradwatch measured for this tensor (see
            :mod:`gradwatch.engine`), at least ``gradwatch.engine.RTOL`` of that
            precision; above 1 fails.
        gap_index: Element where ``|g - g_ref|`` is largest, or ``None``.
        located: For a failing tensor, the coordinate probe at the element the failure
            was narrowed down to, or ``None`` (a failing coordinate already names one).
        excluded: Which elements were never probed and why, or ``None``: rows PyTorch
            gives no gradient by design (``padding_idx`` of ``nn.Embedding`` and
            ``nn.EmbeddingBag``) and non-finite parameter values (such as masked logits
            held as ``-inf``). Coordinates avoid them and directions are zero there.
        excluded_count: Number of those elements.
    """

    name: str
    shape: tuple[int, ...]
    verdict: str
    rel_error: float = math.nan
    error_bar: float = math.nan
    error_ratio: float = math.nan
    resolving_power: float = math.nan
    reference_broken: bool = False
    probes: tuple[Probe, ...] = ()
    reason: str | None = None
    kink_events: tuple[KinkEvent, ...] = ()
    resampled: int = 0
    precision_gap: float = math.nan
    gap_ratio: float = math.nan
    gap_index: tuple[int, ...] | None = None
    located: Probe | None = None
    excluded: str | None = None
    excluded_count: int = 0

    @property
    def kink_count(self) -> int:
        """Number of probes that crossed a kink."""
        return sum(p.kink for p in self.probes)

    @property
    def worst(self) -> Probe | None:
        """The probe that best shows the failure: the located one, else the non-kinked
        probe with the largest ``error / tolerance``.

        A failing coordinate is preferred over a failing direction, since it names
        an element.
        """
        if self.located is not None:
            return self.located
        valid = [p for p in self.probes if not p.kink and not p.flat]
        if not valid:
            return None
        failing_coords = [p for p in valid if p.failed and p.kind == "coordinate"]
        pool = failing_coords or valid
        return max(pool, key=lambda p: _safe_ratio(p.error, p.tolerance))

    @property
    def message(self) -> str:
        """One line saying where, how much and what to do; empty unless failing."""
        return failure_message(self)

    @property
    def short_message(self) -> str:
        """The start of :attr:`message`: where and how much (``'fc1.weight'[3, 7]:
        autograd=... numerical=... rel_err=...``), without tolerance and hint."""
        return failure_message(self, short=True)


def local_name(module: str, tensor: str) -> str:
    """The name of a tensor of a module-local check: ``<module>::<tensor>`` (``blocks.1.attn::weight``,
    ``blocks.1.attn::input[0]``), or ``tensor`` alone for an unnamed module (a direct
    :func:`gradwatch.check_module` call). The same names key the logged metrics.

    Example:
        >>> local_name("blocks.1.attn", "input[0]")
        'blocks.1.attn::input[0]'
    """
    return f"{module}::{tensor}" if module else tensor


@dataclass(frozen=True)
class ModuleCheck:
    """How one module-local check ran (:mod:`gradwatch.local`); its tensors are in
    ``Report.tensors`` as ``<module>::<tensor>``.

    Attributes:
        module: Qualified module name (``""`` for a direct :func:`gradwatch.check_module` call).
        precision: Where its perturbed losses were evaluated: ``"float64"``, ``"native"``, or
            ``"float32"`` (a float16/bfloat16 module without float64, upcast); ``""`` when skipped.
        precision_reason: Why that precision.
        reason: Why the module was not checked (called more than once in the step, parameters
            shared with modules outside it, no gradient reached it), else ``None``.
        seconds: Wall time of its check.

    Example:
        >>> [(m.module, m.precision) for m in report.modules]  # doctest: +SKIP
        [('attn', 'native')]
    """

    module: str
    precision: str = ""
    precision_reason: str = ""
    reason: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class ReferenceCheck:
    """One comparison of a module with its registered reference (:func:`gradwatch.register_reference`).

    Attributes:
        module: Qualified module name (``""`` for a direct call).
        quantity: ``output[i]`` (a forward output leaf), ``input[...]`` (the gradient of an
            input) or a parameter name (its gradient).
        verdict: ``"pass"``, ``"fail"`` or ``"skipped"`` (``reason`` says why).
        rel_diff: ``||a - r|| / (||a|| + ||r||)`` between what the module produced ``a`` and
            the reference ``r`` (0 when both are 0).
        error_ratio: ``||a - r||`` over its limit ``tolerance·(||a|| + ||r||)`` plus a floor
            for a true value of 0 (``tolerance`` times the largest RMS of the module's
            quantities of that kind); above 1 fails.
        tolerance: The larger relative tolerance of the two precisions
            (``gradwatch.engine.RTOL``).
        precision: ``"<module precision> vs reference <reference precision>"``.
        reason: Why it was skipped, else ``None``.

    Example:
        >>> [(r.name, r.rel_diff) for r in report.references if r.failed]  # doctest: +SKIP
        [('attn::input[1]', 0.31)]
    """

    module: str
    quantity: str
    verdict: str
    rel_diff: float = math.nan
    error_ratio: float = math.nan
    tolerance: float = math.nan
    precision: str = ""
    reason: str | None = None

    @property
    def name(self) -> str:
        """``<module>::<quantity>`` (:func:`local_name`)."""
        return local_name(self.module, self.quantity)

    @property
    def failed(self) -> bool:
        """True when the module disagrees with its reference beyond the tolerance."""
        return self.verdict == "fail"

    @property
    def message(self) -> str:
        """One line naming the module and quantity; empty unless failing."""
        if not self.failed:
            return ""
        what = "forward output" if self.quantity.startswith("output[") else "gradient"
        return (
            f"'{self.name}': {what} differs from the registered reference by rel_diff {_fmt(self.rel_diff)} "
            f"({_fmt(self.error_ratio)} times the tolerance {_fmt(self.tolerance)}, {self.precision}): "
            + ("check the module's forward kernel" if what == "forward output"
               else "check the module's backward kernel (or the reference)")
        )


@dataclass(frozen=True)
class Report:
    """The result of one check.

    Attributes:
        tensors: Parameter name to :class:`TensorCheck`, in ``named_parameters()``
            order. Treat as read-only.
        seed: Seed of the probe sampler; passing it again reproduces the probes.
        precision: Where the perturbed losses were evaluated: ``"float64"`` (a float64
            copy) or ``"native"`` (the model's own dtype).
        precision_reason: Why that precision was used (``"requested"``, or what
            ``precision="auto"`` measured).
        reference: True when the probes were also compared with autograd's gradient
            of the float64 copy (float64 evaluation with a float64-capable backward).
        grad_dtype: Dtype of the gradient under test.
        grad_precision: Precision that gradient was computed in, which sets the
            tolerance: its dtype, ``"tf32"`` on CUDA with TF32 enabled, or the
            autocast dtype.
        train_loss: Loss of the training forward, when known.
        replay_loss: The same loss replayed by gradwatch in float64.
        reliable: False when the replay did not reproduce the training forward;
            then no tensor is judged and ``reason`` says why.
        reason: Why the check is unreliable or was skipped, else ``None``.
        seconds: Wall time of the check.
        step: Training step the check belongs to, when an adapter sets it.
        evaluation: How the perturbed losses were evaluated: ``"batched"`` (vmapped
            over many probes per call) or ``"sequential"`` (one call per evaluation).
        evaluation_reason: Why the evaluation was sequential, else ``None``.
        measured_precision: What the float64 evaluation really computes in, measured from
            how its loss moves under tiny moves of every parameter (``"float64"``,
            ``"~float32"`` when a kernel casts to float32 inside, ``"below float32"``), or
            ``None`` (native evaluation: its dtype). Steps and error bars follow it.
        loss_noise: The measured rounding noise of one loss evaluation relative to ``|L|``
            (``None``: not measured).
        kernels: The backward code on the float64 evaluation's graph that is not torch's own
            (custom ``autograd.Function``s as ``module.QualName``, ``torch.library`` ops), when
            the check looked (the smallest check does, and measures the precision only when there
            is some); ``measured_precision`` is theirs, torch's own ops compute in float64.
        kept_casts: Casts to a lower floating precision (``.float()``, ``.to(torch.float32)``,
            ``dtype=`` arguments) that the float64 evaluation kept in float64, per evaluation.
        kept_cast_sites: ``"module: op float64->float32"`` of the first few of them.
        joint: The joint probes (``Probe.kind == "joint"``): one random direction over
            every checked tensor at once, each tensor's term weighted alike
            (``direction_seed`` is the joint seed). A passing one verifies jointly the
            tensors without a verdict of their own (their ``reason`` says so); a
            failing one is narrowed down to a tensor, which fails (see
            ``check(joint=...)``). Not part of :attr:`probes` (which lists each tensor's own).
        references: Comparisons of module-local checks with registered references
            (:class:`ReferenceCheck`); a failing one fails the report.
        modules: How each module-local check ran (:class:`ModuleCheck`).
        capsules: The capsule (:mod:`gradwatch.capsule`, ``gradwatch repro``) of each failing
            tensor, and of each failing reference comparison (``"<module>::<quantity> (reference)"``),
            when the adapter wrote one: name -> file path. The first failure of a module (or of
            the whole model) is kept, so a later failure names that earlier capsule.
    """

    tensors: Mapping[str, TensorCheck]
    seed: int
    precision: str = "float64"
    precision_reason: str = ""
    reference: bool = False
    grad_dtype: str = "float32"
    grad_precision: str = "float32"
    train_loss: float | None = None
    replay_loss: float | None = None
    reliable: bool = True
    reason: str | None = None
    seconds: float = 0.0
    step: int | None = None
    evaluation: str = "sequential"
    evaluation_reason: str | None = None
    measured_precision: str | None = None
    loss_noise: float | None = None
    kernels: tuple[str, ...] = ()
    kept_casts: int = 0
    kept_cast_sites: tuple[str, ...] = ()
    joint: tuple[Probe, ...] = ()
    references: tuple[ReferenceCheck, ...] = ()
    modules: tuple[ModuleCheck, ...] = ()
    capsules: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """False exactly when some tensor's verdict is ``"fail"`` or ``"nonfinite"``, or a
        reference comparison fails."""
        return not self.failures and not self.reference_failures

    @property
    def reference_failures(self) -> list[ReferenceCheck]:
        """The failing comparisons with registered references."""
        return [r for r in self.references if r.failed]

    @property
    def failures(self) -> list[TensorCheck]:
        """TensorChecks whose verdict is ``"fail"`` or ``"nonfinite"``."""
        return [t for t in self.tensors.values() if t.verdict in ("fail", "nonfinite")]

    @property
    def probes(self) -> list[Probe]:
        """Every probe of every tensor."""
        return [p for t in self.tensors.values() for p in t.probes]

    @property
    def kink_fraction(self) -> float:
        """Fraction of probes that crossed a kink (0 when there are no probes)."""
        probes = self.probes
        return _safe_ratio(sum(p.kink for p in probes), len(probes))

    @property
    def kink_events(self) -> list[KinkEvent]:
        """Every non-smooth op call a probe moved, all tensors together."""
        return [e for t in self.tensors.values() for e in t.kink_events]

    @property
    def kink_counts(self) -> dict[str, int]:
        """Per tensor, the number of probes that crossed a kink."""
        return {name: t.kink_count for name, t in self.tensors.items()}

    @property
    def kink_resamples(self) -> int:
        """Replacement coordinates drawn for probes that crossed a kink, all tensors."""
        return sum(t.resampled for t in self.tensors.values())

    @property
    def kink_margin_min(self) -> float:
        """Closest approach to a kink over all events (NaN when there is none)."""
        margins = [e.margin for e in self.kink_events if not math.isnan(e.margin)]
        return min(margins) if margins else math.nan

    def kink_sites(self, *, near_only: bool = False) -> list[KinkSite]:
        """Kink events grouped by ``(module, op, kind)``, closest first.

        Args:
            near_only: Keep only sites with a near (or crossed) event.
        """
        groups: dict[tuple, list[KinkEvent]] = {}
        for e in self.kink_events:
            groups.setdefault((e.module, e.op, e.kind), []).append(e)
        sites = []
        for (module, op, kind), evs in groups.items():
            margins = [e.margin for e in evs if not math.isnan(e.margin)]
            site = KinkSite(module, op, kind, len(evs), sum(e.near for e in evs), sum(e.crossed for e in evs),
                            sum(e.at_kink for e in evs), min(margins) if margins else math.nan)
            if site.near or not near_only:
                sites.append(site)
        return sorted(sites, key=lambda s: (-s.crossed, math.inf if math.isnan(s.margin_min) else s.margin_min))

    def kink_markdown(self) -> str:
        """A markdown table of the modules and ops near kinks ("" when none is near)."""
        sites = self.kink_sites(near_only=True)
        if not sites:
            return ""
        rows = [
            f"gradwatch: probes came near kinks at {len(sites)} op(s); kink_fraction "
            f"{self.kink_fraction:.3g}, {self.kink_resamples} replacement coordinate(s) drawn",
            "",
            "| module | op | kind | near | crossed | at kink | min margin |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in sites:
            module = "(outside modules)" if s.module is None else (s.module or "(model)")
            cells = [module, s.op, s.kind, str(s.near), str(s.crossed), str(s.at_kink), _fmt(s.margin_min)]
            rows.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        return "\n".join(rows)

    @property
    def rel_error_max(self) -> float:
        """Largest ``rel_error`` over the judged tensors (NaN when none)."""
        values = [t.rel_error for t in self.tensors.values() if not math.isnan(t.rel_error)]
        return max(values) if values else math.nan

    @property
    def error_ratio_max(self) -> float:
        """Largest ``error_ratio`` over the judged tensors (NaN when none); above 1 fails."""
        values = [t.error_ratio for t in self.tensors.values() if not math.isnan(t.error_ratio)]
        return max(values) if values else math.nan

    @property
    def verdict(self) -> str:
        """``"fail"``, ``"unreliable"``, ``"nonfinite"``, ``"skipped"``, ``"inconclusive"`` (no
        tensor passed, some could not be resolved) or ``"pass"`` for the whole check.

        ``"skipped"``: an adapter decided not to check this step (``reason`` says why,
        such as a GradScaler skipping the optimizer step); every tensor is skipped.
        """
        verdicts = {t.verdict for t in self.tensors.values()}
        if "fail" in verdicts or self.reference_failures:
            return "fail"
        if "nonfinite" in verdicts:
            return "nonfinite"
        if not self.reliable:
            return "unreliable"
        if self.tensors and all(t.verdict == "skipped" for t in self.tensors.values()):
            return "skipped"
        if "inconclusive" in verdicts and "pass" not in verdicts:  # nothing verified
            return "inconclusive"
        return "pass"

    def summary(self, *, max_chars: int | None = None) -> str:
        """One line, the log line of a check: step, verdict, counts, worst tensor, time.

        The worst tensor is the failing one (else the passing one) with the largest
        ``error_ratio``, shown with its ``rel_error``; an unreliable or skipped check
        ends with its reason.

        Args:
            max_chars: Longest line (at least 40): a longer one has its reason cut
                (``...``; :attr:`reason` keeps it whole), then the middle of the worst
                tensor's name. ``None``: no limit.

        Example:
            ``gradwatch step 200: FAIL (1 fail, 5 pass; worst '0.bias' rel_error 0.94, err/tol 7.2e+05; 0.30s)``
        """
        if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 40):
            raise ValueError(f"`max_chars` must be an int of at least 40 or None, got {max_chars!r}")
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.verdict] = counts.get(t.verdict, 0) + 1
        parts = ", ".join(f"{n} {v}" for v, n in counts.items())
        if self.reference_failures:
            parts += f", {len(self.reference_failures)} reference fail"
        step = "" if self.step is None else f"step {self.step}: "

        def line(worst: str) -> str:
            return f"gradwatch {step}{self.verdict.upper()} ({parts}; {worst}; {self.seconds:.2f}s)"

        text = line(self._worst())
        reason = f" - {self.reason}" if self.reason else ""
        if max_chars is not None:  # a very long tensor name: cut its middle, leaving the reason 30 chars
            room = max_chars - min(len(reason), 30)
            if len(text) > room:
                text = line(self._worst(cut=len(text) - room))
        text += reason
        if max_chars is not None and len(text) > max_chars:
            text = text[: max_chars - 3].rstrip() + "..."
        return text

    def _worst(self, cut: int = 0) -> str:
        """``worst '<name>' rel_error ..., err/tol ...`` for :meth:`summary`, with
        ``cut`` more characters than ``...`` taken out of the middle of the name (it keeps 8)."""
        by_verdict = {v: [t for t in self.tensors.values() if t.verdict == v] for v in ("fail", "nonfinite")}
        if not by_verdict["fail"] and by_verdict["nonfinite"]:
            return f"worst {_cut_middle(by_verdict['nonfinite'][0].name, cut)!r} nonfinite"
        pool = by_verdict["fail"] or [t for t in self.tensors.values() if t.verdict == "pass"]
        pool = [t for t in pool if not math.isnan(t.error_ratio)]
        if not pool:
            return "no tensor judged"
        worst = max(pool, key=lambda t: t.error_ratio)
        name = _cut_middle(worst.name, cut)
        return f"worst {name!r} rel_error {_fmt(worst.rel_error)}, err/tol {_fmt(worst.error_ratio)}"

    def markdown(self) -> str:
        """The summary line and a markdown table of every tensor, failing ones first.

        Columns: tensor, verdict (``fail`` and ``nonfinite`` in bold), ``rel_error``,
        the index of the tensor's :attr:`TensorCheck.worst` probe, and that probe's
        autograd and numerical values. A tensor without a judged probe (kink,
        nonfinite, skipped) shows its reason instead of an index. Comparisons with registered
        references (:attr:`references`) follow in a second table: ``rel_diff``, error/tolerance
        and the precisions compared.

        Example:
            >>> print(report.markdown())  # doctest: +SKIP
            gradwatch FAIL (1 pass, 1 fail; worst 'fc1.bias' rel_error 0.94, err/tol 7.3e+05; 0.95s)
            <BLANKLINE>
            | tensor | verdict | rel_error | worst index | autograd | numerical |
            |---|---|---|---|---|---|
            | `fc1.bias` | **fail** | 0.94 | `[14]` | -7.9e-04 | -0.025 |
            | `fc1.weight` | pass | 3.2e-07 | `[11, 6]` | -3.2e-03 | -3.2e-03 |
        """
        bad = ("fail", "nonfinite")
        rows = ["| tensor | verdict | rel_error | worst index | autograd | numerical |", "|---|---|---|---|---|---|"]
        for t in sorted(self.tensors.values(), key=lambda t: t.verdict not in bad):  # stable: failing first
            w = t.worst if t.verdict in ("pass", "fail") else None
            cells = [f"`{t.name}`", f"**{t.verdict}**" if t.verdict in bad else t.verdict, _fmt(t.rel_error)]
            cells += [f"`{w.where}`", _fmt(w.autograd), _fmt(w.numerical)] if w else [t.reason or "", "-", "-"]
            rows.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        head = self.summary()
        text = head if len(rows) == 2 else head + "\n\n" + "\n".join(rows)
        if self.references:  # module-local comparisons with registered references, failing first
            refs = ["| reference | verdict | rel_diff | error/tolerance | precisions |", "|---|---|---|---|---|"]
            for r in sorted(self.references, key=lambda r: not r.failed):
                cells = [f"`{r.name}`", "**fail**" if r.failed else r.verdict, _fmt(r.rel_diff), _fmt(r.error_ratio),
                         r.precision or (r.reason or "")]
                refs.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
            text += "\n\n" + "\n".join(refs)
        return text

    def capsule_markdown(self) -> str:
        """A markdown table naming the capsule of each failing tensor ("" when none was written).

        The logged text ``<prefix>/capsules``, which ``gradwatch report`` reads back.

        Example:
            >>> print(report.capsule_markdown())  # doctest: +SKIP
            gradwatch step 200: the capsules of the failing tensors (rerun: gradwatch repro CAPSULE)
            <BLANKLINE>
            | tensor | capsule |
            |---|---|
            | `0.bias` | `runs/gradwatch/capsules/step-200-model.pt` |
        """
        if not self.capsules:
            return ""
        step = "" if self.step is None else f" step {self.step}"
        rows = [f"gradwatch{step}: the capsules of the failing tensors (rerun: gradwatch repro CAPSULE)", "",
                "| tensor | capsule |", "|---|---|"]
        rows += [f"| `{name}` | `{path}` |" for name, path in self.capsules.items()]
        return "\n".join(rows)

    def worst_tensors(self, n: int = _WORST_TENSORS) -> list[TensorCheck]:
        """The ``n`` judged tensors with the largest ``error_ratio``, largest first.

        Judged: a finite ``error_ratio`` (verdict ``pass`` or ``fail`` with a probe that
        crossed no kink). Rank ``k`` of this list is the logged ``<prefix>/worst/<k>``.

        Example:
            >>> [t.name for t in report.worst_tensors(3)]  # doctest: +SKIP
            ['0.bias', '3.weight', '0.weight']
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"`n` must be a non-negative int, got {n!r}")
        judged = [t for t in self.tensors.values() if not math.isnan(t.error_ratio)]
        return sorted(judged, key=lambda t: -t.error_ratio)[:n]  # stable: model order among ties

    def worst_markdown(self) -> str:
        """A markdown table naming the series of the worst-tensors chart ("" when no tensor was judged).

        One row per rank ``k`` of :meth:`worst_tensors` (the logged ``<prefix>/worst/<k>``):
        the tensor, its verdict (``fail`` in bold), error / tolerance and ``rel_error``.

        Example:
            >>> print(report.worst_markdown())  # doctest: +SKIP
            gradwatch step 200: the 10 tensors with the largest error/tolerance (chart series worst/0..9; above 1 fails)
            <BLANKLINE>
            | rank | tensor | verdict | error/tol | rel_error |
            |---|---|---|---|---|
            | 0 | `0.bias` | **fail** | 1.2e+07 | 0.98 |
        """
        worst = self.worst_tensors()
        if not worst:
            return ""
        step = "" if self.step is None else f" step {self.step}"
        rows = [
            f"gradwatch{step}: the {len(worst)} tensors with the largest error/tolerance (chart series "
            f"worst/0..{len(worst) - 1}; above 1 fails)",
            "",
            "| rank | tensor | verdict | error/tol | rel_error |",
            "|---|---|---|---|---|",
        ]
        for k, t in enumerate(worst):
            verdict = f"**{t.verdict}**" if t.verdict == "fail" else t.verdict
            cells = [str(k), f"`{t.name}`", verdict, _fmt(t.error_ratio), _fmt(t.rel_error)]
            rows.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        return "\n".join(rows)

    @property
    def probe_rel_errors(self) -> list[float]:
        """Per-probe relative errors ``|n - a| / (|n| + |a|)`` (0 when both are 0).

        ``n`` is a probe's numerical derivative and ``a`` its autograd value, over the
        probes that crossed no kink of the judged tensors (verdict ``pass`` or
        ``fail``): the one-probe case of :attr:`TensorCheck.rel_error`, which pools the
        same probes per tensor. (:attr:`Probe.rel_error` compares with the float64
        reference instead, when there is one.)

        Example:
            >>> max(report.probe_rel_errors)  # doctest: +SKIP
            0.98
        """
        return [
            _safe_ratio(abs(p.numerical - p.autograd), abs(p.numerical) + abs(p.autograd))
            for t in self.tensors.values()
            if t.verdict in ("pass", "fail")
            for p in t.probes
            if not p.kink and not p.flat
        ]

    def metrics(self, prefix: str = "gradwatch") -> dict[str, float]:
        """The scalars to log, keyed by the one documented scheme; see :func:`metrics`."""
        return metrics(self, prefix=prefix)

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.tensors:
            width = max(len("tensor"), *(len(n) for n in self.tensors)) + 2
            lines.append(
                f"  {'tensor':<{width}}{'verdict':<11}{'rel_error':>11}{'error_bar':>11}"
                f"{'err/tol':>9}{'probes':>8}{'kinks':>7}"
            )
            for t in self.tensors.values():
                lines.append(
                    f"  {t.name:<{width}}{t.verdict:<11}{_fmt(t.rel_error):>11}"
                    f"{_fmt(t.error_bar):>11}{_fmt(t.error_ratio):>9}{len(t.probes):>8}"
                    f"{t.kink_count:>7}" + (f"  ({t.reason})" if t.reason else "")
                    + (f"  (not probed: {t.excluded})" if t.excluded and t.excluded not in (t.reason or "") else "")
                )
        near = self.kink_sites(near_only=True)
        if near:
            lines.append(
                "  near kinks: "
                + "; ".join(f"{k.where} (margin {_fmt(k.margin_min)}, {k.crossed} crossed)" for k in near[:3])
                + (f"; {len(near) - 3} more" if len(near) > 3 else "")
                + (f"; {self.kink_resamples} coordinates redrawn" if self.kink_resamples else "")
            )
        broken = [t.name for t in self.tensors.values() if t.reference_broken]
        if broken:
            lines.append("  float64 path broken (the training gradient verified without it): "
                         + ", ".join(f"'{n}'" for n in broken))
        if self.measured_precision not in (None, "float64"):
            lines.append(
                f"  the float64 evaluation computes in {self.measured_precision} inside (measured loss noise "
                f"{_fmt(self.loss_noise)} of |L|, "
                + (f"kernels {', '.join(repr(k) for k in self.kernels)}" if self.kernels else "a kernel that casts down")
                + "): steps and error bars follow it"
            )
        if self.kept_casts:
            lines.append(
                f"  kept float64 through {self.kept_casts} cast(s) to a lower precision: "
                + "; ".join(self.kept_cast_sites)
                + ("; ..." if self.kept_casts > len(self.kept_cast_sites) else "")
            )
        if self.modules:
            lines.append("  module-local checks: " + "; ".join(
                f"{m.module or '(module)'} skipped ({m.reason})" if m.reason is not None
                else f"{m.module or '(module)'} in {m.precision}"
                + ("" if m.precision == "float64" else f" ({_cut_end(m.precision_reason, 90)})")
                for m in self.modules))
        lines += ["  " + t.message for t in self.failures]
        lines += ["  " + r.message for r in self.reference_failures]
        lines += _capsule_lines(self)
        return "\n".join(lines)


class GradientCheckError(AssertionError):
    """Raised when a check finds a gradient that disagrees with the loss.

    It is an ``AssertionError`` so that test runners report it as a failed check.

    Attributes:
        report: The :class:`Report` with every tensor's result.
    """

    def __init__(self, report: Report) -> None:
        self.report = report
        super().__init__(_report_failure_text(report))

    def __reduce__(self):  # keep pickling (multiprocessing, DDP) working
        return (type(self), (self.report,))


class GradientCheckWarning(UserWarning):
    """Category of the warnings issued for ``on_failure="warn"``."""


class UnreliableCheckWarning(UserWarning):
    """Category of the warning issued when a replay did not reproduce the training loss."""


class KinkWarning(UserWarning):
    """Category of the warning that kinks kept tensors from being verified (each tensor once
    per run, :class:`~gradwatch.KinkWarnings`); mere proximity to a kink is logged at INFO."""


OnFailure = Union[str, Callable[[Report], object]]
_ON_FAILURE = ("warn", "raise")


def _check_on_failure(value: object) -> OnFailure:
    """Validate an ``on_failure`` argument: "warn", "raise" or a callable."""
    if callable(value) or value in _ON_FAILURE:
        return value  # type: ignore[return-value]
    raise ValueError(f"`on_failure` must be 'warn', 'raise' or a callable taking the Report, got {value!r}")


def _handle(report: Report, on_failure: OnFailure) -> None:
    """Act on a finished report: the one place a GradientCheckError is raised.

    A failing report is warned about, raised or handed to the callable; an
    unreliable one always gets an :class:`UnreliableCheckWarning`.
    """
    if not report.reliable:
        warnings.warn(report.summary(), UnreliableCheckWarning, stacklevel=4)
    if report.ok:
        return
    if on_failure == "raise":
        raise GradientCheckError(report)
    if on_failure == "warn":
        warnings.warn(_report_failure_text(report), GradientCheckWarning, stacklevel=4)
    else:
        on_failure(report)  # type: ignore[operator]


def failure_message(tensor: TensorCheck, *, short: bool = False) -> str:
    """The one-line failure message of a tensor, or ``""`` when it did not fail.

    ``short`` stops after the values of the worst probe (no tolerance, no hint); a
    message without a probe (a precision gap alone, non-finite values) is whole either way.

    Example:
        ``'enc.0.weight'[3, 7]: autograd=1.2e-03 numerical=9.8e-04 rel_err=0.22
        (tolerance 1.1e-05); <what to look at>``
    """
    if not isinstance(tensor, TensorCheck):
        raise TypeError(f"`tensor` must be a gradwatch.TensorCheck, got {type(tensor).__name__}")
    if not isinstance(short, bool):
        raise ValueError(f"`short` must be a bool, got {short!r}")
    if tensor.verdict == "nonfinite":
        return f"'{tensor.name}': {tensor.reason}"
    if tensor.verdict != "fail":
        return ""
    gap = tensor.gap_ratio > 1.0
    hint = (
        f"it differs from the same module's backward run in float32 on the same inputs by "
        f"{_fmt(tensor.precision_gap)} ({_fmt(tensor.gap_ratio)} times the tolerance of one kernel's rounding): "
        "look at kernels that are wrong only in low precision or only for the training's memory layout "
        "(a non-contiguous grad_output)"
        if gap and "::" in tensor.name
        else f"it differs from autograd's gradient of the same code in float64 by {_fmt(tensor.precision_gap)} "
        f"({_fmt(tensor.gap_ratio)} times the tolerance of its precision): look at tensor hooks, code that "
        "edits .grad, and kernels that are wrong only in low precision"
        if gap
        else _LOCAL_HINT if "::" in tensor.name
        else _FIX_HINT
    )
    w = tensor.worst
    if w is None or (gap and "::" in tensor.name and not w.failed):  # a local gap: its probes judged the float32 code
        return f"'{tensor.name}'{_index(tensor.gap_index)}: {hint}"
    head = (
        f"'{tensor.name}'{w.where}: autograd={_fmt(w.autograd)} numerical={_fmt(w.numerical)} "
        f"rel_err={_fmt(w.rel_error)}"
    )
    if short:
        return head
    tol_rel = _safe_ratio(w.tolerance, abs(w.numerical) + abs(w.autograd))
    return (
        f"{head} (tolerance {_fmt(tol_rel)}; tensor rel_error {_fmt(tensor.rel_error)} "
        f"over {len(tensor.probes)} probes); {hint}"
    )


def _index(index: tuple[int, ...] | None) -> str:
    return "" if index is None else "[" + ", ".join(str(i) for i in index) + "]"


def _report_failure_text(report: Report) -> str:
    """Text of a failing report: the summary line, then one message per failure, then the capsules."""
    return "\n".join([report.summary()] + [t.message for t in report.failures]
                     + [r.message for r in report.reference_failures] + _capsule_lines(report))


def _capsule_lines(report: Report) -> list[str]:
    """``  capsule PATH: name, name`` per capsule of the failing tensors."""
    by_path: dict[str, list[str]] = {}
    for name, path in report.capsules.items():
        by_path.setdefault(path, []).append(name)
    lines = []
    for path, names in by_path.items():
        listed = ", ".join(repr(n) for n in names)
        if any("::" in n for n in names):  # a module-local capsule
            lines.append(f"  capsule of {listed}: {path} (rerun: gradwatch repro {path})")
        else:
            lines.append(f"  capsule of {listed}: {path} (rerun: gradwatch.load_capsule(path).check(model, loss_fn))")
    return lines


def metrics(report: Report, *, prefix: str = "gradwatch") -> dict[str, float]:
    """Build the logged scalars of a report. This is the one key scheme.

    Keys (``<param>`` is the ``named_parameters()`` name)::

        <prefix>/rel_error/<param>   E_rel over the non-kinked probes of that tensor
        <prefix>/rel_error_max       worst tensor
        <prefix>/error_bar/<param>   numerical error of that check, same units
        <prefix>/error_ratio/<param> largest error / tolerance of that tensor's probes
                                     and precision gap; above 1 fails
        <prefix>/error_ratio_max     worst tensor
        <prefix>/fail_threshold      1.0, the error_ratio above which a tensor fails
                                     (a reference line for the dashboard)
        <prefix>/failed/<param>      1 when that tensor's verdict is "fail", else 0
        <prefix>/inconclusive/<param>  1 when that tensor's verdict is "inconclusive"
                                     (the check could not resolve an error of
                                     RESOLVING_BOUND), else 0
        <prefix>/resolving_power/<param>  smallest relative gradient error that
                                     tensor's check would have failed
        <prefix>/resolving_bound     RESOLVING_BOUND (a reference line: above it a
                                     tensor is inconclusive, not passed)
        <prefix>/inconclusive        tensors with verdict "inconclusive"
        <prefix>/kinks/<param>       probes of that tensor that crossed a kink
        <prefix>/precision_gap/<param>  relative gap to the same code's float64
                                     gradient (float64 evaluation only)
        <prefix>/kink_fraction       probes that crossed a kink / all probes
        <prefix>/kink_margin_min     closest approach to a kink (KinkEvent.margin)
        <prefix>/failures            tensors with verdict "fail"
        <prefix>/check_seconds       wall time of the check
        <prefix>/worst/<k>           error_ratio of the k-th worst judged tensor,
                                     k = 0..9 (Report.worst_tensors; which tensor
                                     each rank is: Report.worst_markdown)
        <prefix>/reference_rel_diff/<module>::<quantity>
                                     module-local checks with a registered reference:
                                     rel_diff of an output or gradient to the reference
        <prefix>/reference_error_ratio/<module>::<quantity>
                                     its error / tolerance; above 1 fails
        <prefix>/reference_failed/<module>::<quantity>
                                     1 when that comparison fails, else 0
        <prefix>/reference_failures  failing reference comparisons (only in a check
                                     that compared with a reference)

    Tensors of module-local checks are named ``<module>::<tensor>`` (:func:`local_name`:
    ``blocks.1.attn::weight``, ``blocks.1.attn::input[0]``) and have the per-tensor keys above.

    :class:`~gradwatch.TensorBoardSink` also writes, per check, entries that are
    not scalars and so are not returned here: the histogram
    ``<prefix>/probe_rel_error`` (:attr:`Report.probe_rel_errors`), the markdown
    texts ``<prefix>/report`` (:meth:`Report.markdown`) and ``<prefix>/worst_tensors``
    (:meth:`Report.worst_markdown`, the tensor of each ``worst/<k>`` rank), plus
    ``<prefix>/kinks`` (:meth:`Report.kink_markdown`) when probes came near kinks,
    ``<prefix>/capsules`` (:meth:`Report.capsule_markdown`, each failing tensor's capsule file,
    read back by ``gradwatch report``) when a failing check wrote or names capsules, and
    a custom-scalars layout (the ``Custom Scalars`` dashboard) charting these keys, at
    the first check and again when a check names a new tensor.

    Skipped tensors (frozen, no gradient, unreliable check) have no per-tensor keys;
    tensors without a judged probe (all probes kinked) have only ``failed`` and
    ``kinks``; a check that moved no non-smooth op has no ``kink_margin_min``; NaN is
    never logged.

    Args:
        report: The report to flatten.
        prefix: First component of every key.

    Returns:
        Key to float.

    Example:
        >>> metrics(report)["gradwatch/failures"]  # doctest: +SKIP
        0.0
    """
    _check_report(report)
    _check_prefix(prefix)
    out: dict[str, float] = {}
    for name, t in report.tensors.items():
        if not math.isnan(t.rel_error):
            out[f"{prefix}/rel_error/{name}"] = t.rel_error
        if not math.isnan(t.error_bar):
            out[f"{prefix}/error_bar/{name}"] = t.error_bar
        if not math.isnan(t.precision_gap):
            out[f"{prefix}/precision_gap/{name}"] = t.precision_gap
        if not math.isnan(t.error_ratio):
            out[f"{prefix}/error_ratio/{name}"] = t.error_ratio
        if not math.isnan(t.resolving_power):
            out[f"{prefix}/resolving_power/{name}"] = t.resolving_power
        if t.verdict != "skipped":
            out[f"{prefix}/failed/{name}"] = float(t.verdict == "fail")
            out[f"{prefix}/inconclusive/{name}"] = float(t.verdict == "inconclusive")
            out[f"{prefix}/kinks/{name}"] = float(t.kink_count)
    if not math.isnan(report.rel_error_max):
        out[f"{prefix}/rel_error_max"] = report.rel_error_max
    if not math.isnan(report.error_ratio_max):
        out[f"{prefix}/error_ratio_max"] = report.error_ratio_max
    out[f"{prefix}/fail_threshold"] = 1.0
    out[f"{prefix}/kink_fraction"] = report.kink_fraction
    if not math.isnan(report.kink_margin_min):
        out[f"{prefix}/kink_margin_min"] = report.kink_margin_min
    out[f"{prefix}/failures"] = float(len(report.failures))
    out[f"{prefix}/inconclusive"] = float(sum(t.verdict == "inconclusive" for t in report.tensors.values()))
    out[f"{prefix}/resolving_bound"] = RESOLVING_BOUND
    out[f"{prefix}/check_seconds"] = report.seconds
    for k, t in enumerate(report.worst_tensors()):
        out[f"{prefix}/worst/{k}"] = t.error_ratio
    for r in report.references:
        if not math.isnan(r.rel_diff):
            out[f"{prefix}/reference_rel_diff/{r.name}"] = r.rel_diff
        if not math.isnan(r.error_ratio):
            out[f"{prefix}/reference_error_ratio/{r.name}"] = r.error_ratio
        if r.verdict != "skipped":
            out[f"{prefix}/reference_failed/{r.name}"] = float(r.failed)
    if report.references:
        out[f"{prefix}/reference_failures"] = float(len(report.reference_failures))
    return out


def _check_report(report: object) -> Report:
    if not isinstance(report, Report):
        raise TypeError(f"`report` must be a gradwatch.Report, got {type(report).__name__}")
    return report


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
        raise ValueError(f"`prefix` must be a non-empty str not ending in '/', got {prefix!r}")
    return prefix


def _cut_middle(name: str, cut: int) -> str:
    """``name`` with ``cut + 3`` characters of its middle replaced by ``...`` (8 kept at least)."""
    if cut <= 0:
        return name
    keep = max(len(name) - cut - 3, 8)
    if keep >= len(name):
        return name
    return name[: keep - keep // 2] + "..." + name[len(name) - keep // 2:]


def _cut_end(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _safe_ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "-"
    return f"{x:.2g}" if abs(x) >= 0.01 and abs(x) < 1000 else f"{x:.1e}"

