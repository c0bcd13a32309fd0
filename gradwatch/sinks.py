"""Where reports go: TensorBoard and Python logging.

Sinks only format what a :class:`~gradwatch.report.Report` holds; every scalar comes
from :func:`gradwatch.report.metrics`, the one key scheme.

Example:
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> sink = TensorBoardSink(SummaryWriter("runs/demo"))  # doctest: +SKIP
    >>> sink.write(report, step=100)                          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import re
import warnings
import weakref
from typing import Any, Protocol

import numpy as np
import torch.distributed as dist

from gradwatch._validate import _non_negative_int
from gradwatch.report import (
    _WORST_TENSORS, KinkSite, KinkWarning, Report, _check_prefix, _check_report, _fmt, metrics,
)

__all__ = ["KinkWarnings", "LoggingSink", "Sink", "TensorBoardSink"]

_log = logging.getLogger("gradwatch")


class Sink(Protocol):
    """Anything with ``write(report, step)``."""

    def write(self, report: Report, step: int) -> None: ...


class TensorBoardSink:
    """Writes each report to TensorBoard, and lays out a dashboard for it.

    Per check, at the training step: the scalars of :func:`~gradwatch.metrics`, a
    histogram ``<prefix>/probe_rel_error`` of the per-probe relative errors
    (:attr:`~gradwatch.Report.probe_rel_errors`), a markdown table ``<prefix>/report``
    of every tensor (:meth:`~gradwatch.Report.markdown`), a markdown table
    ``<prefix>/worst_tensors`` naming the tensor of each rank of the worst-tensors chart
    (:meth:`~gradwatch.Report.worst_markdown`) and, when probes came near kinks,
    ``<prefix>/kinks`` naming the modules and ops (:meth:`~gradwatch.Report.kink_markdown`).

    The sink also writes a custom-scalars layout (TensorBoard's ``Custom Scalars`` tab):
    a category named after the prefix with the charts of the whole check (the 10 worst
    tensors' error / tolerance by rank and the worst against the fail threshold, the
    worst relative error, failures, kink fraction, kink margin, and the 0/1 ``failed`` and
    kink counts per tensor, flat unless something happens), then one category per module
    group (:func:`_module_group`: ``layers.3`` for ``layers.3.attn.q.weight``, the
    top-level module otherwise) with the error / tolerance, relative error, error bar and
    precision gap of its tensors, so a deep model's charts stay a few lines each. The layout is written
    at the first check and rewritten when a check names a tensor it does not hold yet
    (TensorBoard reads a run's last layout), once per writer and prefix (two sinks on
    one writer do not repeat it; a second prefix rewrites it with both), and only on
    rank zero when ``torch.distributed`` is initialized: TensorBoard merges the layouts
    of all runs under a logdir, so one is enough.

    Args:
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (anything with
            ``add_scalar``, ``add_text``, ``add_histogram`` and ``add_custom_scalars``).
        prefix: First component of every key.

    Example:
        >>> TensorBoardSink(SummaryWriter("runs"), prefix="gradwatch")  # doctest: +SKIP
    """

    def __init__(self, writer: Any, *, prefix: str = "gradwatch") -> None:
        for attr in ("add_scalar", "add_text", "add_histogram", "add_custom_scalars"):
            if not callable(getattr(writer, attr, None)):
                raise TypeError(f"`writer` must be a SummaryWriter (needs .{attr}), got {type(writer).__name__}")
        _check_prefix(prefix)
        self.writer = writer
        self.prefix = prefix
        self._own_layouts: dict[str, tuple[str, ...]] = {}  # for a writer that cannot be weakly referenced

    def write(self, report: Report, step: int) -> None:
        """Log the report at ``step``: the scalars of the key scheme, the per-probe
        histogram, the table of every tensor, the worst-tensors table, the kink table when
        probes came near kinks, the capsule of each failing tensor when there are some, and the
        dashboard layout when it lacks a tensor."""
        _check_report(report)
        _non_negative_int("step", step)
        self._lay_out(report)
        for key, value in metrics(report, prefix=self.prefix).items():
            self.writer.add_scalar(key, value, step)
        errors = [e for e in report.probe_rel_errors if math.isfinite(e)]
        if errors:
            self.writer.add_histogram(f"{self.prefix}/probe_rel_error", np.asarray(errors, dtype=np.float64), step)
        self.writer.add_text(f"{self.prefix}/report", report.markdown(), step)
        worst = report.worst_markdown()
        if worst:
            self.writer.add_text(f"{self.prefix}/worst_tensors", worst, step)
        kinks = report.kink_markdown()
        if kinks:
            self.writer.add_text(f"{self.prefix}/kinks", kinks, step)
        capsules = report.capsule_markdown()
        if capsules:
            self.writer.add_text(f"{self.prefix}/capsules", capsules, step)
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()

    def _lay_out(self, report: Report) -> None:
        """Write the custom-scalars layout unless this writer's already holds every tensor of ``report``."""
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        try:
            laid_out = _LAID_OUT.setdefault(self.writer, {})
        except TypeError:  # a writer that cannot be weakly referenced: per sink
            laid_out = self._own_layouts
        known = laid_out.get(self.prefix)
        wanted = tuple(report.tensors) + tuple(_REFERENCE_MARK + r.name for r in report.references)
        if known is not None and all(name in known for name in wanted):
            return
        known = known or ()
        laid_out[self.prefix] = known + tuple(n for n in wanted if n not in known)
        layout: dict[str, dict[str, list]] = {}
        for prefix, names in laid_out.items():  # one layout per run is read: it holds every prefix
            layout.update(_layout(prefix, names))
        self.writer.add_custom_scalars(layout)


# marks the reference comparisons (ReferenceCheck.name) among the tensor names of a layout
_REFERENCE_MARK = "\0"
# writer -> {prefix: tensor names} of the layouts written to it
_LAID_OUT: "weakref.WeakKeyDictionary[Any, dict[str, tuple[str, ...]]]" = weakref.WeakKeyDictionary()


def _module_group(name: str) -> str:
    """The dashboard group of a parameter: its module path up to the first numeric
    component (``layers.3`` for ``layers.3.attn.q.weight``, ``0`` for ``0.weight`` of a
    ``Sequential``), else its top-level module (``fc1``), or ``(model)`` for a
    parameter of the model itself. A module-local tensor ``<module>::<tensor>`` is in its module's group."""
    module, local, _ = name.rpartition("::")
    path = module.split(".") if local else name.split(".")[:-1]
    if not path:
        return "(model)"
    for i, part in enumerate(path):
        if part.isdigit():
            return ".".join(path[: i + 1])
    return path[0]


def _layout(prefix: str, names: tuple[str, ...]) -> dict[str, dict[str, list]]:
    """The custom-scalars layout of one prefix, in ``SummaryWriter.add_custom_scalars`` form.

    Charts are ``Multiline`` charts of anchored regexes over the keys of
    :func:`~gradwatch.metrics`. The module-group charts name their tensors
    (``(a|b|c)``), so a group never shows another group's tensors. Relative error and
    error bar are multiline charts rather than ``Margin`` charts: a margin band needs
    lower and upper series (``rel_error ± error_bar``, not logged keys), and on a
    correct model ``rel_error - error_bar`` is negative, which a log axis cannot draw.
    """
    p = re.escape(prefix)

    def chart(*regexes: str) -> list:
        return ["Multiline", [f"^{p}/{r}$" for r in regexes]]

    main = {
        f"worst {_WORST_TENSORS} tensors by rank: error/tolerance vs fail threshold (names: text worst_tensors)":
            chart("(worst/[0-9]+|fail_threshold)"),
        "error/tolerance: worst tensor vs fail threshold": chart("(error_ratio_max|fail_threshold)"),
        "rel_error: worst tensor": chart("rel_error_max"),
        "failures and failed per tensor": chart("(failures|failed/.*)"),
        "kink_fraction (probes that crossed a kink)": chart("kink_fraction"),
        "kink_margin_min (below 1: crossed)": chart("kink_margin_min"),
        "kinks per tensor (probes that crossed)": chart("kinks/.*"),
    }
    layout = {prefix: main}
    refs = [n[len(_REFERENCE_MARK):] for n in names if n.startswith(_REFERENCE_MARK)]
    names = tuple(n for n in names if not n.startswith(_REFERENCE_MARK))
    if refs:  # module-local checks with a registered reference (gradwatch.register_reference)
        alt = "(" + "|".join(re.escape(n) for n in refs) + ")"
        layout[f"{prefix}: references"] = {
            "references: error/tolerance vs fail threshold": chart(f"(reference_error_ratio/{alt}|fail_threshold)"),
            "references: rel_diff per output and gradient": chart(f"reference_rel_diff/{alt}"),
            "references: failures": chart("reference_failures"),
        }
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_module_group(name), []).append(name)
    for group, members in groups.items():
        alt = "(" + "|".join(re.escape(n) for n in members) + ")"
        layout[f"{prefix}: module {group}"] = {
            f"{group}: error/tolerance vs fail threshold": chart(f"(error_ratio/{alt}|fail_threshold)"),
            f"{group}: rel_error": chart(f"rel_error/{alt}"),
            f"{group}: error_bar": chart(f"error_bar/{alt}"),
            f"{group}: precision_gap": chart(f"precision_gap/{alt}"),
        }
    return layout


class LoggingSink:
    """One line per check on the ``gradwatch`` logger: INFO when clean or skipped, WARNING otherwise.

    The line is :meth:`Report.summary <gradwatch.Report.summary>` cut to
    159 characters: step, verdict, tensor counts, the worst tensor with
    its rel_error and error/tolerance, and the seconds the check took; a long reason is cut
    in the line and kept whole in :attr:`Report.reason <gradwatch.Report.reason>`. At
    Python's default WARNING level a clean check prints nothing; a failing or unreliable
    one prints its line. There is no progress bar: a check's time is budgeted
    (``max_overhead``) and reported on this line.

    Example:
        >>> LoggingSink().write(report, step=200)  # doctest: +SKIP
        gradwatch step 200: PASS (6 pass; worst '2.weight' rel_error 3.1e-08, err/tol 0.034; 0.19s)
    """

    def write(self, report: Report, step: int) -> None:
        """Log the report's summary line; ``step`` is validated, the summary carries it."""
        _check_report(report)
        _non_negative_int("step", step)
        level = logging.INFO if report.verdict in ("pass", "skipped") else logging.WARNING
        _log.log(level, "%s", report.summary(max_chars=_LOG_LINE_CHARS))


#: Longest log line of a check (:class:`LoggingSink`); a longer summary is cut.
_LOG_LINE_CHARS = 159

#: A tensor is reported as kept from verification when a check with at least
#: ``_STUCK_MIN_PROBES`` meant probes judged none of them (verdict ``"kink"``: the redraws
#: crossed too), or when over the run fewer than half of the probes it was meant to get
#: were judged, once it was meant to get at least ``_STUCK_MIN_RUN_PROBES`` (a ReLU network
#: loses most direction probes and some coordinates to kinks by chance at every check).
_STUCK_MIN_PROBES = 4
_STUCK_MIN_RUN_PROBES = 8


class KinkWarnings:
    """Kinks: proximity to the INFO log, a :class:`~gradwatch.KinkWarning` only when kinks
    keep a tensor from being verified.

    Probes that cross a kink of a non-smooth op (ReLU at 0, max-pool ties, clamp
    boundaries) are not judged and crossed coordinates are redrawn, so coming near a
    kink is normal on correct models: the first time a ``(module, op)`` comes near one,
    one INFO line on the ``gradwatch`` logger says so (the dashboard charts
    ``kink_fraction``, ``kink_margin_min`` and ``kinks/<param>`` at every check).

    A warning is kept for when kinks kept a tensor from being verified: a check judged
    none of its probes (verdict ``"kink"``: its redraws crossed too) although it was
    meant to get at least 4 (a default check means 5), or over the run fewer than half
    of the probes it was meant to get (at least 8) were judged, redraws included. One
    warning per check names the tensors newly in that state (each is named once per
    run), the ops whose kinks their probes crossed, and what to do: a smaller step, more
    coordinates and redraws, and for a custom op, its :func:`gradwatch.register_kink`
    switching input.

    Attributes:
        seen: The ``(module, op)`` pairs already logged as near a kink.
        warned: The tensors already warned about.

    Example:
        >>> sink = KinkWarnings()
        >>> sink.write(report, step=0)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.seen: set[tuple[str | None, str]] = set()
        self.warned: set[str] = set()
        self._meant: dict[str, int] = {}  # tensor -> probes meant (redraws not counted), all checks
        self._judged: dict[str, int] = {}  # tensor -> probes judged (crossed no kink), all checks
        self._crossed: dict[str, dict[str, int]] = {}  # tensor -> op site -> crossing probes, all checks

    def write(self, report: Report, step: int) -> None:
        """Log each near ``(module, op)`` of ``report`` not logged before, and warn (once)
        naming the tensors that kinks newly kept from being verified."""
        _check_report(report)
        _non_negative_int("step", step)
        for site in report.kink_sites(near_only=True):
            key = (site.module, site.op)
            if key in self.seen:
                continue
            self.seen.add(key)
            what = "a discontinuity" if site.kind == "discontinuity" else "the kink"
            _log.info(
                "gradwatch step %d: probes came near %s of %s (margin %s; %d near, %d crossed of %d probe/op pairs)",
                step, what, site.where, _fmt(site.margin_min), site.near, site.crossed, site.events,
            )
        stuck: list[str] = []
        for name, t in report.tensors.items():
            if t.verdict in ("skipped", "nonfinite") or not t.probes:
                continue
            meant_now = len(t.probes) - t.resampled
            self._meant[name] = self._meant.get(name, 0) + meant_now
            judged_now = len(t.probes) - t.kink_count
            if t.verdict == "pass" and judged_now == 0:  # verified by the joint probe over every tensor
                judged_now = meant_now
            self._judged[name] = self._judged.get(name, 0) + judged_now
            sites = self._crossed.setdefault(name, {})
            for e in {e.probe: e for e in t.kink_events if e.crossed}.values():  # one op per crossing probe
                where = KinkSite(e.module, e.op, e.kind, 0, 0, 0, 0, math.nan).where
                sites[where] = sites.get(where, 0) + 1
            meant, judged = self._meant[name], self._judged[name]
            none_judged = t.verdict == "kink" and meant_now >= _STUCK_MIN_PROBES
            if name not in self.warned and (none_judged or (meant >= _STUCK_MIN_RUN_PROBES and 2 * judged < meant)):
                stuck.append(name)
        if not stuck:
            return
        self.warned.update(stuck)
        tensors = ", ".join(f"{n!r} ({self._judged[n]} of {self._meant[n]} probes judged)" for n in stuck[:5])
        more = f" and {len(stuck) - 5} more" if len(stuck) > 5 else ""
        crossings: dict[str, int] = {}
        for n in stuck:
            for where, count in self._crossed[n].items():
                crossings[where] = crossings.get(where, 0) + count
        ops = sorted(crossings.items(), key=lambda kv: -kv[1])
        named = "; ".join(f"{where} ({c} crossing{'s' if c > 1 else ''})" for where, c in ops[:3])
        warnings.warn(
            f"gradwatch step {step}: kinks kept {len(stuck)} tensor{'s' if len(stuck) > 1 else ''} from being "
            f"verified so far: {tensors}{more}. The other probes crossed kinks of non-smooth ops: "
            f"{named or 'unknown'}{'; ...' if len(ops) > 3 else ''}. To verify them: a smaller "
            "finite-difference step (`step=` of gradwatch.check / assert_gradients), more coordinates and "
            "redraws (`coordinates=`, `kink_resamples=`); if that op is a custom op you registered with "
            "gradwatch.register_kink, check that its switching input is zero only at the kink. "
            "Not repeated for these tensors.",
            KinkWarning,
            stacklevel=2,
        )
