"""gradwatch: check, during real training, that the gradients are the gradients of the loss.

Example:
    >>> import gradwatch
    >>> report = gradwatch.check(model, loss_fn, batch)  # doctest: +SKIP
    >>> gradwatch.assert_gradients(layer, loss_fn, batch)  # in a unit test  # doctest: +SKIP
    >>> watch = gradwatch.GradWatch(model, loss_fn, every_n_steps=100, logdir="runs")  # doctest: +SKIP
    >>> callback = gradwatch.GradWatchCallback(every_n_steps=100)  # doctest: +SKIP
    >>> hf_callback = gradwatch.GradWatchTrainerCallback()  # doctest: +SKIP

``GradWatchCallback`` (from :mod:`gradwatch.lightning`, for ``lightning.pytorch`` and
``pytorch_lightning``) and ``GradWatchTrainerCallback`` (from :mod:`gradwatch.hf`, for
``transformers.Trainer``) are imported on first access, and import neither Lightning nor
transformers until a callback is used, so ``import gradwatch`` imports none of them.
"""

from gradwatch.capsule import Capsule, load_capsule
from gradwatch.engine import check
from gradwatch.hook import GradWatch
from gradwatch.kinks import register_kink
from gradwatch.local import check_module, register_reference
from gradwatch.options import ProbeOptions
from gradwatch.replay import ReplayState, capture
from gradwatch.report import (
    RESOLVING_BOUND,
    GradientCheckError,
    GradientCheckWarning,
    KinkEvent,
    KinkSite,
    KinkWarning,
    ModuleCheck,
    Probe,
    ReferenceCheck,
    Report,
    TensorCheck,
    UnreliableCheckWarning,
    metrics,
)
from gradwatch.sinks import KinkWarnings, LoggingSink, TensorBoardSink
from gradwatch.testing import assert_gradients

__all__ = [
    "RESOLVING_BOUND",
    "Capsule",
    "GradWatch",
    "GradWatchCallback",
    "GradWatchTrainerCallback",
    "GradientCheckError",
    "GradientCheckWarning",
    "KinkEvent",
    "KinkSite",
    "KinkWarning",
    "KinkWarnings",
    "LoggingSink",
    "ModuleCheck",
    "Probe",
    "ProbeOptions",
    "ReferenceCheck",
    "ReplayState",
    "Report",
    "TensorBoardSink",
    "TensorCheck",
    "UnreliableCheckWarning",
    "assert_gradients",
    "capture",
    "check",
    "check_module",
    "load_capsule",
    "metrics",
    "register_kink",
    "register_reference",
]

__version__ = "0.2.0"


def __getattr__(name: str):
    if name == "GradWatchCallback":  # lazy: importing Lightning is slow and optional for plain loops
        from gradwatch.lightning import GradWatchCallback

        return GradWatchCallback
    if name == "GradWatchTrainerCallback":
        from gradwatch.hf import GradWatchTrainerCallback

        return GradWatchTrainerCallback
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"GradWatchCallback", "GradWatchTrainerCallback"})
