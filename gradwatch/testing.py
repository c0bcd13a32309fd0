"""Unit-test helper: assert that a layer's gradient is the gradient of its loss.

:func:`assert_gradients` runs the same engine as the training-time adapters
(:func:`gradwatch.check`) with test-time defaults (more probes, float64, a fixed seed)
and turns anything but a verified pass into an ``AssertionError``, so a custom
``autograd.Function``, ``torch.library`` op, kernel wrapper or gradient hook can be
tested in pytest with one line.

Example:
    >>> import gradwatch, torch
    >>> layer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> batch = (torch.randn(16, 4), torch.randn(16, 1))
    >>> loss_fn = lambda model, b: torch.nn.functional.mse_loss(model(b[0]), b[1])
    >>> gradwatch.assert_gradients(layer, loss_fn, batch).verdict
    'pass'
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Mapping

import torch
from torch import Tensor, nn

from gradwatch._validate import _callable, _kink_options, _module, _one_of, _probe_options, _seed
from gradwatch.engine import PRECISIONS, _autograd_gradients, _given_gradients, _grads_option, check
from gradwatch.replay import _isolated, capture
from gradwatch.report import Report, _handle

__all__ = ["assert_gradients"]



def assert_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    *,
    grads: str | Mapping[str, Tensor] = "autograd",
    coordinates: int = 16,
    directions: int = 4,
    precision: str = "float64",
    seed: int | None = 0,
    kinks: bool = True,
    kink_resamples: int = 8,
    near_kink_margin: float = 10.0,
    step: float | None = None,
    names: Collection[str] | None = None,
    allow_unverified: bool = False,
) -> Report:
    """Assert that autograd's gradient of ``loss_fn(model, batch)`` matches central differences.

    The check is :func:`gradwatch.check` with test-time defaults: 16 random coordinates
    and 4 random Gaussian directions per tensor (a direction catches errors confined to
    a few elements, coordinates name the element), perturbed losses evaluated on a
    float64 copy of the model, and ``seed=0`` so that a test draws the same probes on
    every run. Probes that cross a kink of a non-smooth op (ReLU at 0, max-pool ties,
    clamp/abs/maximum boundaries) are not judged and are redrawn, as in ``check``.

    Which gradient (``grads``):

    * ``"autograd"`` (default): computed here, with ``torch.autograd.grad`` on the
      replayed forward, exactly what ``loss_fn(model, batch).backward()`` would
      accumulate into a zeroed ``.grad`` (tensor hooks on parameters included). No
      ``.grad`` is read or written, and RNG streams, buffers (BatchNorm statistics) and
      module attributes end as they were: nothing is lost, and a stale ``.grad`` from an
      earlier step cannot cause a false failure.
    * ``"existing"``: the current ``.grad`` (after your own ``backward()``, for code that
      edits ``.grad`` after accumulation). The loss is replayed from the current RNG
      state, so ``loss_fn`` must be deterministic (no dropout in training mode).
    * A mapping from parameter name to tensor: compare with those tensors only.

    With ``"autograd"`` and ``"existing"``, a trainable parameter that receives no
    gradient at all (a backward that returns ``None`` for it, an accidental detach of
    its whole path) is compared with a zero gradient, so the check verifies
    numerically that the loss really does not depend on it; ``gradwatch.check`` would
    skip it.

    Args:
        model: The module under test (a single layer or a small model around it). Its
            train/eval modes are used as they are.
        loss_fn: ``loss_fn(model, batch)`` returning a scalar loss tensor.
        batch: Anything ``loss_fn`` accepts.
        grads: ``"autograd"``, ``"existing"`` or a mapping name -> tensor (see above).
        coordinates: Random elements probed per tensor.
        directions: Random Gaussian directions probed per tensor.
        precision: Where perturbed losses are evaluated: ``"float64"`` (default; raises
            if the model cannot run in float64), ``"auto"`` or ``"native"`` (see
            :func:`gradwatch.check`).
        seed: Seed of the probe sampler (``None``: a new one per call, recorded in the
            report).
        kinks: Record non-smooth ops and exclude probes that cross a kink.
        kink_resamples: Replacement coordinates drawn per tensor for probes that crossed.
        near_kink_margin: Margin below which a kink counts as near.
        step: Base finite-difference step; ``None`` picks it from the precision.
        names: ``named_parameters()`` names to check; ``None`` checks every tensor.
        allow_unverified: Return the report instead of failing when the check could not
            verify a tensor: the replay was unreliable (a loss that is not reproducible
            or loses precision in float64), or every probe of a tensor crossed a kink.

    Returns:
        The :class:`~gradwatch.Report` of a check in which every checked tensor passed.

    Raises:
        GradientCheckError: (an ``AssertionError``) A tensor's gradient disagrees with
            the central differences, or a gradient or the loss holds NaN/Inf. The
            message has one line per failing tensor naming it and an element, such as
            ``'fc1.weight'[3, 7]: autograd=... numerical=... rel_err=...``;
            ``err.report`` holds the full report.
        AssertionError: Nothing could be verified for some tensor (see
            ``allow_unverified``); the message says why.
        ValueError: A bad argument (the message names it and its value), or no
            parameter with a gradient to check.
        TypeError: ``model`` is no module, ``loss_fn`` is not callable or returns no
            tensor.

    Example:
        A gradient hook that rescales the weight's gradient is caught and located:

        >>> import gradwatch, torch
        >>> layer = torch.nn.Linear(3, 2)
        >>> handle = layer.weight.register_hook(lambda g: 2 * g)
        >>> batch = torch.randn(8, 3)
        >>> gradwatch.assert_gradients(layer, lambda m, x: m(x).pow(2).mean(), batch)
        ... # doctest: +ELLIPSIS, +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        GradientCheckError: gradwatch FAIL (1 fail, 1 pass; ...)
        'weight'[...]: autograd=... numerical=... rel_err=...
    """
    _module("model", model)
    _callable("loss_fn", loss_fn)
    _grads_option(grads)
    _probe_options(coordinates, directions, kinks, min_directions=0)
    _kink_options(kink_resamples, near_kink_margin)
    _one_of("precision", precision, PRECISIONS)
    _seed("seed", seed)
    if not isinstance(allow_unverified, bool):
        raise ValueError(f"`allow_unverified` must be a bool, got {allow_unverified!r}")

    replay, train_loss = None, None
    if isinstance(grads, str):
        params = dict(model.named_parameters())
        if grads == "autograd":
            with _isolated(model):
                replay = capture(model)
                train_loss, grad_map = _autograd_gradients(model, loss_fn, batch, replay, params)
        else:
            grad_map = _given_gradients("existing", params)
            if not grad_map:
                raise ValueError(
                    "`grads='existing'` needs a populated .grad, but no parameter of `model` has one: call "
                    "loss_fn(model, batch).backward() first, or use the default grads='autograd'"
                )
        grads = {  # no gradient at all = a zero gradient, verified numerically
            n: grad_map[n] if n in grad_map else torch.zeros_like(p)
            for n, p in params.items()
            if p.requires_grad and p.is_floating_point()
        }
    report = check(
        model, loss_fn, batch, grads=grads, replay=replay, train_loss=train_loss, seed=seed,
        coordinates=coordinates, directions=directions, precision=precision, kinks=kinks,
        kink_resamples=kink_resamples, near_kink_margin=near_kink_margin, step=step, names=names,
    )
    if allow_unverified:
        _handle(report, "raise")
        return report
    if not report.reliable:
        raise AssertionError(
            f"gradwatch could not verify the gradients of {type(model).__name__}: the check was unreliable, "
            f"{report.reason} (pass allow_unverified=True to accept this)\n{report.summary()}"
        )
    _handle(report, "raise")  # the one place a GradientCheckError is raised
    unverified = [t for t in report.tensors.values() if t.verdict == "kink"]
    if unverified:
        sites = "; ".join(s.where for s in report.kink_sites(near_only=True)[:3]) or "unknown ops"
        raise AssertionError(
            f"gradwatch could not verify {', '.join(repr(t.name) for t in unverified)}: every probe crossed a kink "
            f"of a non-smooth op ({sites}), so nothing was compared; move the test point away from the kinks "
            f"(other inputs or parameters), or pass allow_unverified=True to accept this\n{report.summary()}"
        )
    return report
