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
import warnings
from typing import Any, Protocol

from gradwatch._validate import _non_negative_int
from gradwatch.report import KinkWarning, Report, _check_prefix, _check_report, _fmt, metrics

__all__ = ["KinkWarnings", "LoggingSink", "Sink", "TensorBoardSink"]

_log = logging.getLogger("gradwatch")


class Sink(Protocol):
    """Anything with ``write(report, step)``."""

    def write(self, report: Report, step: int) -> None: ...


class TensorBoardSink:
    """Writes a report's scalars, a markdown text entry when the check is not clean,
    and a kink-proximity text entry (``<prefix>/kinks``) naming the modules and ops
    that probes came near.

    Args:
        writer: A ``torch.utils.tensorboard.SummaryWriter`` (anything with
            ``add_scalar``, ``add_text`` and ``flush``).
        prefix: First component of every key.

    Example:
        >>> TensorBoardSink(SummaryWriter("runs"), prefix="gradwatch")  # doctest: +SKIP
    """

    def __init__(self, writer: Any, *, prefix: str = "gradwatch") -> None:
        for attr in ("add_scalar", "add_text"):
            if not callable(getattr(writer, attr, None)):
                raise TypeError(f"`writer` must be a SummaryWriter (needs .{attr}), got {type(writer).__name__}")
        _check_prefix(prefix)
        self.writer = writer
        self.prefix = prefix

    def write(self, report: Report, step: int) -> None:
        """Log the report at ``step``: the scalars of the key scheme, plus a text entry
        naming each failing tensor's worst coordinate when the check is not a pass."""
        _non_negative_int("step", step)
        for key, value in metrics(report, prefix=self.prefix).items():
            self.writer.add_scalar(key, value, step)
        if report.verdict != "pass":
            self.writer.add_text(f"{self.prefix}/report", report.markdown(), step)
        kinks = report.kink_markdown()
        if kinks:
            self.writer.add_text(f"{self.prefix}/kinks", kinks, step)
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()


class LoggingSink:
    """One line per check on the ``gradwatch`` logger: INFO when clean or skipped, WARNING otherwise.

    Example:
        >>> LoggingSink().write(report, step=0)  # doctest: +SKIP
    """

    def write(self, report: Report, step: int) -> None:
        """Log the report's summary line; ``step`` is validated, the summary carries it."""
        _check_report(report)
        _non_negative_int("step", step)
        level = logging.INFO if report.verdict in ("pass", "skipped") else logging.WARNING
        _log.log(level, "%s", report.summary())


class KinkWarnings:
    """Kink-proximity warnings: one :class:`~gradwatch.KinkWarning` the first time a
    ``(module, op)`` comes near a kink, never again for it (however many steps).

    Attributes:
        seen: The ``(module, op)`` pairs already warned about.

    Example:
        >>> sink = KinkWarnings()
        >>> sink.write(report, step=0)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.seen: set[tuple[str | None, str]] = set()

    def write(self, report: Report, step: int) -> None:
        """Warn about each near ``(module, op)`` of ``report`` not warned about before."""
        _check_report(report)
        _non_negative_int("step", step)
        for site in report.kink_sites(near_only=True):
            key = (site.module, site.op)
            if key in self.seen:
                continue
            self.seen.add(key)
            what = "a discontinuity" if site.kind == "discontinuity" else "the kink"
            warnings.warn(
                f"gradwatch step {step}: probes came near {what} of {site.where} (margin {_fmt(site.margin_min)}; "
                f"{site.near} near, {site.crossed} crossed, {site.at_kink} exactly at it, of {site.events} probe/op "
                "pairs). Probes that cross are not judged and coordinates are redrawn (kink_resamples); "
                "gradwatch/kink_fraction and gradwatch/kink_margin_min track this over training. "
                "Not repeated for this module and op.",
                KinkWarning,
                stacklevel=2,
            )
