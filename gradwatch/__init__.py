"""gradwatch: check, during real training, that the gradients are the gradients of the loss.

Example:
    >>> import gradwatch
    >>> report = gradwatch.check(model, loss_fn, batch)  # doctest: +SKIP
    >>> watch = gradwatch.GradWatch(model, loss_fn, every_n_steps=100, logdir="runs")  # doctest: +SKIP
"""

from gradwatch.engine import check
from gradwatch.hook import GradWatch
from gradwatch.replay import ReplayState, capture
from gradwatch.report import (
    GradientCheckError,
    GradientCheckWarning,
    KinkEvent,
    KinkSite,
    KinkWarning,
    Probe,
    Report,
    TensorCheck,
    UnreliableCheckWarning,
    metrics,
)
from gradwatch.sinks import KinkWarnings, LoggingSink, TensorBoardSink

__all__ = [
    "GradWatch",
    "GradientCheckError",
    "GradientCheckWarning",
    "KinkEvent",
    "KinkSite",
    "KinkWarning",
    "KinkWarnings",
    "LoggingSink",
    "Probe",
    "ReplayState",
    "Report",
    "TensorBoardSink",
    "TensorCheck",
    "UnreliableCheckWarning",
    "capture",
    "check",
    "metrics",
]

__version__ = "0.1.0"
