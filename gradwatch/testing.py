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

import dataclasses
import functools
from typing import Any, Callable, Collection, Mapping

import torch
from torch import Tensor, nn

from gradwatch._gradients import (
    _LOW_RATIO,
    _NOT_SELECTED,
    _autograd_gradients,
    _given_gradients,
    _grads_option,
    _names,
)
from gradwatch._validate import _bool, _callable, _module, _seed
from gradwatch.engine import _check_with, _train_is_replay
from gradwatch.options import ProbeOptions
from gradwatch.replay import _restore_attrs, _restore_rng, capture
from gradwatch.report import Report, _handle

__all__ = ["assert_gradients", "TEST_OPTIONS"]

#: The probe options of :func:`assert_gradients` by default, for a test rather than a
#: training step: every perturbed loss evaluated on a float64 copy of the model (a model
#: that cannot run in float64 raises instead of falling back), one joint probe first, then,
#: when the per-tensor stage runs, 16 random coordinates and 4 random directions per tensor,
#: and up to 8 replacement coordinates per tensor for those that crossed a kink. The seed
#: (0, the same probes on every run) is :func:`assert_gradients`' own argument.
TEST_OPTIONS = ProbeOptions(coordinates=16, directions=4, joint=1, precision="float64", kink_resamples=8)

#: A tensor whose gradient RMS is below this fraction of the RMS over the checked tensors
#: weighs too little in a joint probe (its weight is floored, see :mod:`gradwatch._joint`):
#: it gets per-tensor probes at once (the same ratio as a check's ``per_tensor="auto"``).
_GROUP_RATIO = _LOW_RATIO


def assert_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    *,
    grads: str | Mapping[str, Tensor] = "autograd",
    coordinates: int = TEST_OPTIONS.coordinates,
    directions: int = TEST_OPTIONS.directions,
    precision: str = TEST_OPTIONS.precision,
    seed: int | None = 0,
    kinks: bool = TEST_OPTIONS.kinks,
    kink_resamples: int = TEST_OPTIONS.kink_resamples,
    near_kink_margin: float = TEST_OPTIONS.near_kink_margin,
    step: float | None = TEST_OPTIONS.step,
    names: Collection[str] | None = None,
    allow_unverified: bool = False,
    joint: int = TEST_OPTIONS.joint,
    thorough: bool = False,
) -> Report:
    """Assert that autograd's gradient of ``loss_fn(model, batch)`` matches central differences.

    The check is :func:`gradwatch.check` with test-time defaults (:data:`TEST_OPTIONS`):
    perturbed losses evaluated on a float64 copy of the model, and ``seed=0`` so that a
    test draws the same probes on every run. It runs in two stages:

    1. Joint probes first (``joint``, default 1): every element of the gradient is
       compared with autograd's gradient of the float64 copy (the reference: a tensor
       hook, code that edits ``.grad`` or a kernel wrong only in low precision shows
       there), and one random Gaussian direction over all tensors at once, each
       tensor's term weighted alike, verifies the reference numerically at float64
       accuracy; an error confined to a few elements of any tensor moves it. A handful
       of loss evaluations whatever the number of tensors, about as many as
       ``torch.autograd.gradcheck(fast_mode=True)`` takes for two inputs. Tensors whose
       gradient is below 1e-3 of the others' RMS (a branch scaled by 1e-6) weigh too
       little in a joint probe and get per-tensor probes right away.
    2. Per-tensor probes (``coordinates`` random elements and ``directions`` random
       Gaussian directions per tensor), only when the joint stage did not pass cleanly:
       something failed (so that every wrong tensor is named, at an element), or every
       joint probe crossed a kink; always with ``thorough=True``.

    Probes that cross a kink of a non-smooth op (ReLU at 0, max-pool ties,
    clamp/abs/maximum boundaries) are not judged: coordinates are redrawn and joint
    probes retried at smaller steps, as in ``check``.

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
        coordinates: Random elements probed per tensor in the per-tensor stage.
        directions: Random Gaussian directions probed per tensor in the per-tensor stage.
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
        joint: Joint probes over every tensor in the first stage (and beside the
            per-tensor probes in the second); 0 runs the per-tensor stage alone.
        thorough: Always probe every tensor with its own coordinates and directions
            too (the second stage), even when the joint stage passed: tens of times the
            loss evaluations on a small model.

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
    options = dataclasses.replace(
        TEST_OPTIONS, coordinates=coordinates, directions=directions, joint=joint, precision=precision, kinks=kinks,
        kink_resamples=kink_resamples, near_kink_margin=near_kink_margin, step=step,
    )
    if coordinates + directions == 0:  # the per-tensor stage runs whenever the joint stage does not pass
        raise ValueError(f"`coordinates` + `directions` must be at least 1, got {coordinates} + {directions}")
    _bool("thorough", thorough)
    _seed("seed", seed)
    _bool("allow_unverified", allow_unverified)
    if names is not None:
        names = _names(names, dict(model.named_parameters()))

    replay, train_loss = None, None
    if isinstance(grads, str):
        params = dict(model.named_parameters())
        if grads == "autograd":
            replay = capture(model)  # its RNG states and attributes are put back, as _isolated does
            try:
                train_loss, grad_map = _autograd_gradients(model, loss_fn, batch, replay, params)
            finally:
                _restore_attrs(replay.attrs)
                _restore_rng(replay.rng)
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
    # the check of this test with given probe options and tensors (names)
    run = functools.partial(_check_with, model, loss_fn, batch, grads=grads, seed=seed, replay=replay,
                            train_loss=train_loss)
    report = None
    # with grads="autograd", train_loss is the replay's own loss: check replays it no second time
    with _train_is_replay(train_loss is not None):
        if options.joint and not thorough:  # joint probes first: per-tensor probes only when they do not pass cleanly
            report = _joint_check(run, grads, names, options)
        if report is None:  # every tensor its own probes, however many there are: each wrong one is named
            report = run(dataclasses.replace(options, per_tensor="all"), names=names)
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


def _joint_check(
    run: Callable[..., Report], grads: Any, names: Collection[str] | None, options: ProbeOptions,
) -> Report | None:
    """The check by joint probes, or None when it did not pass cleanly.

    Every element of the gradient is compared with the float64 reference (the precision
    test), and ``options.joint`` joint probes verify the reference numerically. Tensors whose
    gradient is far smaller than the others' (:func:`_scale_groups`) would weigh almost
    nothing in a joint probe: a second check gives them per-tensor probes (the coordinates
    and directions of ``options``), and the two reports are merged. Anything but a clean
    pass (a failure, a tensor not verified because every joint probe crossed a kink, an
    unreliable replay) returns None: the per-tensor check of every tensor then names each
    wrong tensor and its element. ``run(options, names=...)`` runs one check.
    """
    first, rest = _scale_groups(grads, names) if isinstance(grads, Mapping) else (None, [])
    merged: Report | None = None
    for group, stage in [(first, dataclasses.replace(options, coordinates=0, directions=0, localize=False)),
                         (rest, dataclasses.replace(options, joint=0, localize=False))]:
        if group is not None and not group:
            continue
        report = run(stage, names=names if group is None else group)
        covered = [t for t in report.tensors.values() if t.reason != _NOT_SELECTED]
        clean = report.reliable and report.ok and all(t.verdict in ("pass", "skipped") for t in covered)
        if not clean or (stage.joint and all(p.kink for p in report.joint)):
            return None
        if merged is None:
            merged = report
        else:
            tensors = {n: report.tensors[n] if n in group else t for n, t in merged.tensors.items()}
            merged = dataclasses.replace(merged, tensors=tensors, seconds=merged.seconds + report.seconds)
    return merged


def _scale_groups(grads: Mapping[str, Tensor], names: Collection[str] | None) -> tuple[list[str] | None, list[str]]:
    """The checked tensors a joint probe weighs fairly (None: all of them), and the others.

    A joint probe weighs each tensor's term alike, down to a floor of a tenth of the RMS of
    the covered gradients: a tensor whose gradient RMS is below :data:`_GROUP_RATIO` of
    that RMS (a branch scaled by 1e-6) would weigh almost nothing, and moves the loss by
    less than its float64 rounding at the joint probe's step. One host transfer (the
    squared norms).
    """
    chosen = [n for n, g in grads.items()
              if (names is None or n in names) and isinstance(g, Tensor) and g.is_floating_point() and g.numel()]
    if len(chosen) < 2:
        return None, []
    device = grads[chosen[0]].device
    norms = [torch.linalg.vector_norm(torch.nan_to_num(grads[n].detach(), nan=0.0, posinf=0.0, neginf=0.0),
                                      dtype=torch.float64).to(device) for n in chosen]
    sq = [x * x for x in torch.stack(norms).tolist()]
    rms2 = sum(sq) / sum(grads[n].numel() for n in chosen)
    low = [n for n, q in zip(chosen, sq) if q / grads[n].numel() < _GROUP_RATIO**2 * rms2]
    return (None, []) if not low else ([n for n in chosen if n not in low], low)
