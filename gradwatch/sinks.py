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
from typing import Any, Protocol

from gradwatch._validate import _non_negative_int
from gradwatch.report import Report, _check_prefix, _check_report, metrics

__all__ = ["LoggingSink", "Sink", "TensorBoardSink"]

_log = logging.getLogger("gradwatch")


class Sink(Protocol):
    """Anything with ``write(report, step)``."""

    def write(self, report: Report, step: int) -> None: ...


class TensorBoardSink:
    """Writes a report's scalars and, when not all clean, a markdown text entry.

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
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()


class LoggingSink:
    """One line per check on the ``gradwatch`` logger: INFO when clean, WARNING otherwise.

    Example:
        >>> LoggingSink().write(report, step=0)  # doctest: +SKIP
    """

    def write(self, report: Report, step: int) -> None:
        """Log the report's summary line; ``step`` is validated, the summary carries it."""
        _check_report(report)
        _non_negative_int("step", step)
        level = logging.INFO if report.verdict == "pass" else logging.WARNING
        _log.log(level, "%s", report.summary())
