"""Gradients: which gradients a check compares, and which tensors it skips (private).

Beside the rooms of the engine (see :mod:`gradwatch.engine`): the gradients under test
(computed here for ``grads="autograd"`` by a training step replayed on cloned buffers, or
the given ``.grad`` or mapping, validated), the ``names`` selection, why a parameter is
not checked, which checked tensors get probes of their own (:func:`_own_probes`), and
:class:`_ReferenceStats`, which takes what a check needs of each
tensor's float64 reference gradient as the backward produces it, so the reference is
never held whole.

It imports :mod:`gradwatch._evaluation`, :mod:`gradwatch._judging` and
:mod:`gradwatch._probing` (the reference terms of a probe), never :mod:`gradwatch.engine`
nor :mod:`gradwatch.testing`, which import it.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Mapping

import torch
from torch import Tensor, nn

from gradwatch._evaluation import _HostValues, _native_loss, _short
from gradwatch._judging import _gap_values, _square_sum
from gradwatch._probing import _ref_terms
from gradwatch._validate import _one_of
from gradwatch.replay import ReplayState, _LossModule

__all__: list[str] = []

_GRADS = ("autograd", "existing")
_NOT_SELECTED = "not selected for this check (checked in turn within the overhead budget)"
#: ``per_tensor="auto"``: a check of more tensors than this gives probes of their own only to
#: the tensors a joint probe weighs too little, at most this many (:func:`_own_probes`).
_OWN_PROBES = 16
#: A tensor whose gradient RMS is below this fraction of the RMS over the checked tensors
#: weighs too little in a joint probe (its weight is floored, see :mod:`gradwatch._joint`).
_LOW_RATIO = 1e-3


def _grads_option(grads: Any) -> str | Mapping[str, Tensor]:
    """Validate a ``grads`` argument: "autograd", "existing" or a mapping name -> Tensor."""
    if isinstance(grads, str):
        return _one_of("grads", grads, _GRADS)
    if not isinstance(grads, Mapping):
        raise ValueError(f"`grads` must be 'autograd', 'existing' or a mapping name -> Tensor, got {grads!r}")
    return grads


def _given_gradients(grads: str | Mapping[str, Tensor], params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """The gradients under test when they are given: the current ``.grad`` ("existing") or
    a mapping name -> tensor, checked against the parameters' names and shapes."""
    if grads == "existing":
        return {n: p.grad.detach() for n, p in params.items() if p.requires_grad and p.grad is not None}
    out = {}
    for name, g in grads.items():
        if name not in params:
            raise ValueError(f"`grads` names {name!r}, which is not a parameter of `model`")
        if not isinstance(g, Tensor):
            raise TypeError(f"`grads[{name!r}]` must be a Tensor, got {type(g).__name__}")
        if tuple(g.shape) != tuple(params[name].shape):
            raise ValueError(
                f"`grads[{name!r}]` must have the parameter's shape {tuple(params[name].shape)}, got {tuple(g.shape)}"
            )
        out[name] = g.detach()
    return out


def _names(names: Any, params: Mapping[str, nn.Parameter]) -> frozenset[str]:
    """Validate a ``names`` argument: a collection of names of ``params``."""
    if isinstance(names, str) or not isinstance(names, Collection):
        raise ValueError(f"`names` must be None or a collection of parameter names, got {_short(names)}")
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"`names` must name parameters of `model`, got unknown {unknown!r}")
    return frozenset(names)


def _autograd_gradients(
    model: nn.Module, loss_fn: Callable, batch: Any, replay: ReplayState, params: dict[str, nn.Parameter]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run the training forward on cloned buffers and take ``torch.autograd.grad``."""
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    if not trainable:
        raise ValueError(
            f"`model` has no parameter with requires_grad=True to check ({len(params)} parameters, all frozen)"
        )
    loss = _native_loss(_LossModule(model, loss_fn), batch, replay, grad=True)
    if not loss.requires_grad:
        raise ValueError("`loss_fn` returned a loss that does not require grad: no parameter reaches it")
    grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
    return loss.detach(), {n: g for n, g in zip(trainable, grads) if g is not None}


def _skip_reasons(params: dict[str, nn.Parameter], grad_map: dict[str, Tensor]) -> dict[str, str]:
    """Why each parameter without a usable gradient is skipped."""
    reasons = {}
    for name, p in params.items():
        if not p.requires_grad:
            reasons[name] = "frozen (requires_grad=False)"
        elif not p.is_floating_point():
            reasons[name] = f"not a floating-point parameter ({p.dtype})"
        elif name not in grad_map:
            reasons[name] = "no gradient in this step (unused by the loss, or .grad is None)"
        elif not grad_map[name].is_floating_point():
            reasons[name] = f"gradient is not floating-point ({grad_map[name].dtype})"
        elif p.numel() == 0:
            reasons[name] = f"empty tensor (shape {tuple(p.shape)}): no element to check"
    return reasons


def _own_probes(
    plan: Mapping[str, list], checked: Mapping[str, Tensor], reduce: Callable[[Tensor], Tensor] | None,
) -> dict[str, list]:
    """The probe plan of ``per_tensor="auto"`` over the ``checked`` gradients: ``plan`` itself
    for at most :data:`_OWN_PROBES` tensors; above that only the tensors whose gradient RMS is
    below :data:`_LOW_RATIO` of the RMS over every checked tensor keep their probes (the
    smallest first, at most :data:`_OWN_PROBES`), the others' lists are emptied: the joint
    probes and the float64 reference's precision test verify them, and group testing gives
    the tensor a failing joint probe names a probe of its own. The probes kept are the ones
    ``plan`` drew for those tensors. One host transfer (the squared norms; averaged across
    processes with ``reduce``, so every process keeps the same probes)."""
    names = [n for n in checked if plan.get(n)]
    if len(names) <= _OWN_PROBES:
        return dict(plan)
    host = _HostValues(reduce)
    idx = [host.add(_square_sum(checked[n].detach())) for n in names]
    values = host.fetch()
    sq = [values[i] for i in idx]
    numel = [checked[n].numel() for n in names]
    finite = [(q, k) for q, k in zip(sq, numel) if q == q and q != float("inf")]
    rms2 = sum(q for q, _ in finite) / max(sum(k for _, k in finite), 1)
    low = sorted((q / k, n) for n, q, k in zip(names, sq, numel) if q / k < _LOW_RATIO**2 * rms2)
    keep = {n for _, n in low[:_OWN_PROBES]}
    return {n: (specs if n in keep or n not in checked else []) for n, specs in plan.items()}


class _ReferenceStats:
    """What a check needs of each tensor's float64 reference gradient ``g_ref``, computed
    from ``g_ref`` alone (one tensor-sized temporary at a time), so the reference is never
    held whole: the terms ``<g_ref, v>`` of its planned probes, its terms of each joint
    direction, the precision test's distance from the gradient under test (``gap``), and
    the sum of its squares (for ``G_ref``)."""

    def __init__(self, grads: Mapping[str, Tensor], plan: Mapping[str, list], lines: list,
                 excluded: Mapping[str, Any], *, gap: bool) -> None:
        self.grads, self.plan, self.lines, self.excluded, self.gap = grads, plan, lines, excluded, gap

    def __call__(self, name: str, g_ref: Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {"square": _square_sum(g_ref)}
        if name not in self.grads:  # not checked in this check: only its share of G_ref
            return out
        mask = self.excluded[name].mask if name in self.excluded else None
        out["terms"] = {tuple(spec): _ref_terms(g_ref, tuple(spec), mask) for spec in self.plan[name]}
        zero = g_ref.new_zeros((), dtype=torch.float64)  # a line that leaves the tensor out reads none of it
        out["joint"] = [line.reference_terms(name, g_ref) if name in line.names else (zero, zero) for line in self.lines]
        if self.gap:
            out["gap"] = _gap_values(self.grads[name], g_ref)
        return out

