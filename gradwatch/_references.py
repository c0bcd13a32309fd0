"""Registered reference implementations (private home of :func:`gradwatch.register_reference`).

This module owns the registry of plain-PyTorch references (by module instance, by module
class, by ``torch.library`` custom op) and the comparison of a recorded call
(:class:`gradwatch._recording._Record`) with its reference: :func:`_reference_checks` runs
the reference on the same recorded inputs (float64 where it supports it, else float32),
takes the gradients of ``<grad_out, ref(x)>`` by autograd, and compares outputs, input
gradients and parameter gradients with what the module produced, within one kernel's
rounding (``_REFERENCE_RTOL``, widened by the measured rounding of the reference run in the
module's own precision). Each comparison is a :class:`~gradwatch.report.ReferenceCheck`
(``Report.references``).

Example:
    >>> _precision_of(torch.zeros(1, dtype=torch.bfloat16)), _REFERENCE_RTOL["bfloat16"]
    ('bfloat16', 0.02)
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from gradwatch._recording import _op_name, _OpModule, _Record
from gradwatch._validate import _callable
from gradwatch.replay import _isolated, _restore_rng
from gradwatch.report import ReferenceCheck

__all__ = ["register_reference", "_REFERENCES_BY_MODULE", "_REFERENCES_BY_CLASS", "_REFERENCES_BY_OP",
           "_REFERENCE_RTOL", "_reference_for", "_reference_checks", "_run_reference", "_precision_of"]

#: Relative tolerance of a comparison with a registered reference, by the lower precision of the
#: two: one kernel's rounding, far tighter than the whole-model RTOL of gradwatch.engine (the
#: measured rounding of the reference run in the module's precision, times _NOISE_FACTOR, widens it).
_REFERENCE_RTOL = {"float64": 1e-9, "float32": 1e-4, "tf32": 1e-2, "float16": 1e-2, "bfloat16": 2e-2}
_NOISE_FACTOR = 4.0


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


_REFERENCES_BY_MODULE: "weakref.WeakKeyDictionary[nn.Module, Callable]" = weakref.WeakKeyDictionary()
_REFERENCES_BY_CLASS: dict[type, Callable] = {}
_REFERENCES_BY_OP: dict[str, Callable] = {}  # "ns::name" of a custom op -> reference_fn(*args, **kwargs)


def register_reference(target: nn.Module | type, reference_fn: Callable[..., Any]) -> None:
    """Register a plain-PyTorch reference implementation of a module (instance or class).

    At a module-local check (:func:`check_module`, or ``GradWatch(modules=...)``) the
    reference runs on the same recorded inputs, in float64 where it supports it (else
    float32): ``reference_fn(module, *args, **kwargs)``, with the module's parameters
    cast alike. Its outputs and the gradients of ``<grad_out, reference(x)>`` wrt every
    checked input and parameter are compared with what the module produced (its
    forward, its backward), with tolerances for the precisions involved; each comparison
    is a :class:`~gradwatch.report.ReferenceCheck` in ``Report.references`` and a failing
    one fails the report, naming the module and the quantity (``output[0]``,
    ``input[1]``, ``weight``). Registering the same target again replaces its reference.

    A ``torch.library`` custom op (the ``custom_op`` result, an OpOverload or its packet)
    is registered with ``reference_fn(*args, **kwargs)``: ``GradWatch`` then records one
    call of that op in each checked step (the first at the first check, then the next call
    at each check, in turn) and checks it alone, named ``ns::op``
    (``gwtest::attention::input[1]``), besides the modules it watches; and
    ``check_module(op, inputs)`` checks one call directly.

    Args:
        target: An ``nn.Module`` instance, an ``nn.Module`` subclass (every instance), or a
            custom op.
        reference_fn: ``reference_fn(module, *args, **kwargs)`` (``reference_fn(*args,
            **kwargs)`` for an op) returning the same structure of outputs as the forward.

    Raises:
        TypeError: If ``target`` is none of these, or ``reference_fn`` is not callable.

    Example:
        >>> gradwatch.register_reference(FusedAttention, lambda m, q, k, v: torch.softmax(
        ...     q @ k.transpose(-1, -2) * m.scale, -1) @ v)  # doctest: +SKIP
    """
    _callable("reference_fn", reference_fn)
    op = _op_name(target)
    if isinstance(target, nn.Module):
        _REFERENCES_BY_MODULE[target] = reference_fn
    elif isinstance(target, type) and issubclass(target, nn.Module):
        _REFERENCES_BY_CLASS[target] = reference_fn
    elif op is not None:
        _REFERENCES_BY_OP[op] = reference_fn
    else:
        raise TypeError(f"`target` must be an nn.Module instance or subclass, or a torch.library custom op, "
                        f"got {target!r}")


def _reference_for(module: nn.Module) -> Callable | None:
    if isinstance(module, _OpModule):
        fn = _REFERENCES_BY_OP.get(module.op_name)
        return None if fn is None else (lambda m, *args, **kwargs: fn(*args, **kwargs))
    fn = _REFERENCES_BY_MODULE.get(module)
    if fn is not None:
        return fn
    for cls in type(module).__mro__:
        if cls in _REFERENCES_BY_CLASS:
            return _REFERENCES_BY_CLASS[cls]
    return None


class _RefCall(nn.Module):
    def __init__(self, module: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.module = module
        self._fn = fn

    def forward(self, args: tuple, kwargs: dict) -> Any:
        return self._fn(self.module, *args, **kwargs)


def _run_reference(record: _Record, fn: Callable, dtype: torch.dtype) -> tuple[list, dict[str, Tensor]]:
    """The reference outputs (by output leaf index) and gradients of ``<grad_out, ref>``."""
    from torch.func import functional_call

    leaves = []
    wrt: dict[str, Tensor] = {}
    for i, leaf in enumerate(record.call_leaves()):
        if isinstance(leaf, Tensor) and leaf.is_floating_point():
            x = leaf.detach().to(dtype)
            if i in record.inputs:
                x.requires_grad_(True)
                wrt[record.inputs[i]] = x
            leaves.append(x)
        else:
            leaves.append(leaf)
    args, kwargs = pytree.tree_unflatten(leaves, record.spec)
    params = {}
    for n, p in record.module.named_parameters():
        q = p.detach().to(dtype) if p.is_floating_point() else p.detach()
        if p.is_floating_point() and p.requires_grad:
            q.requires_grad_(True)
            wrt[n] = q
        params[f"module.{n}"] = q
    buffers = {f"module.{n}": (b.to(dtype) if b.is_floating_point() else b).clone()
               for n, b in record.replay.buffers.items()}
    with _isolated(record.module), torch.enable_grad():
        _restore_rng(record.replay.rng)
        out = functional_call(_RefCall(record.module, fn), {**params, **buffers}, (args, kwargs), strict=False)
        outs = pytree.tree_leaves(out)
        total = None
        for i, g in record.grad_outputs.items():
            if g is None or i >= len(outs) or not outs[i].requires_grad:
                continue
            term = (outs[i] * g.to(outs[i].dtype)).sum()
            total = term if total is None else total + term
        grads: dict[str, Tensor] = {}
        if total is not None and wrt:
            got = torch.autograd.grad(total, list(wrt.values()), allow_unused=True)
            grads = {n: (g if g is not None else torch.zeros_like(wrt[n])) for n, g in zip(wrt, got)}
    return [o.detach() if isinstance(o, Tensor) else o for o in outs], grads


def _precision_of(t: Tensor) -> str:
    return {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
            torch.bfloat16: "bfloat16"}.get(t.dtype, "float32")


def _reference_checks(record: _Record) -> tuple[ReferenceCheck, ...]:
    """Compare the module's recorded outputs and gradients with its registered reference."""
    fn = _reference_for(record.module)
    if fn is None:
        return ()
    ref_dtype = None
    err: Exception | None = None
    for dtype in (torch.float64, torch.float32):
        try:
            outs, grads = _run_reference(record, fn, dtype)
            ref_dtype = dtype
            break
        except Exception as e:  # the reference lacks this dtype: try the next
            err = e
    if ref_dtype is None:
        return (ReferenceCheck(module=record.name, quantity="reference", verdict="skipped",
                               reason=f"the reference raised {type(err).__name__}: {err}"),)
    ref_prec = _precision_of(torch.empty((), dtype=ref_dtype))
    # the reference in the module's own precision too, when lower: how far rounding alone moves each
    # quantity from the high-precision reference (the measured part of the tolerance)
    low = next((t.dtype for t in record.outputs.values() if _eps(t.dtype) > _eps(ref_dtype)), None)
    low_outs, low_grads = None, {}
    if low is not None:
        try:
            low_outs, low_grads = _run_reference(record, fn, low)
        except Exception:  # the reference lacks that precision: the tolerance table alone
            low_outs, low_grads = None, {}
    quantities: list[tuple[str, Tensor, Tensor | None, Tensor | None]] = []

    def pick(seq: list | None, i: int) -> Tensor | None:
        return seq[i] if seq is not None and i < len(seq) and isinstance(seq[i], Tensor) else None

    for i, out in record.outputs.items():
        quantities.append((f"output[{i}]", out, pick(outs, i), pick(low_outs, i)))
    for i, name in record.inputs.items():
        if name in record.grad_inputs:
            quantities.append((name, record.grad_inputs[name], grads.get(name), low_grads.get(name)))
    for n, p in record.module.named_parameters():  # a parameter the module gave no gradient: zeros
        if p.is_floating_point() and p.requires_grad:
            quantities.append((n, record.param_grads.get(n, torch.zeros_like(p)), grads.get(n), low_grads.get(n)))
    # one host transfer: per quantity ||a - r||, ||a||, ||r||, ||r_low - r||
    rows = []
    for q, a, r, r_low in quantities:
        if r is None or tuple(r.shape) != tuple(a.shape):
            rows.append(None)
            continue
        a64, r64 = a.detach().to(torch.float64), r.detach().to(torch.float64)
        noise = ((r_low.detach().to(torch.float64) - r64).norm() if r_low is not None and r_low.shape == r.shape
                 else torch.zeros((), dtype=torch.float64, device=r64.device))
        rows.append(torch.stack([(a64 - r64).norm(), a64.norm(), r64.norm(), noise.to(r64.device)]))
    present = [r for r in rows if r is not None]
    host = iter(torch.stack(present).cpu().tolist() if present else [])  # one transfer
    norms = {q: next(host) for (q, *_), row in zip(quantities, rows) if row is not None}

    def is_output(q: str) -> bool:
        return q.startswith("output[")

    # the largest reference RMS among outputs, and among gradients
    rms = {kind: max((norms[q][2] / math.sqrt(max(a.numel(), 1)) for q, a, *_ in quantities
                      if q in norms and is_output(q) == kind), default=0.0) for kind in (True, False)}
    out: list[ReferenceCheck] = []
    for q, a, r, _ in quantities:
        if q not in norms:
            out.append(ReferenceCheck(module=record.name, quantity=q, verdict="skipped",
                                      reason="the reference gives no value of that shape"))
            continue
        diff, na, nr, noise = norms[q]
        prec = _precision_of(a)
        base = max(_REFERENCE_RTOL[prec], _REFERENCE_RTOL[ref_prec])
        # floor for a true value of 0 (a gradient that is rounding noise): the quantity's own
        # scale is too small then, so the module's largest RMS of that kind sets it
        floor = base * rms[is_output(q)] * math.sqrt(a.numel())
        limit = max(base * (na + nr), _NOISE_FACTOR * noise) + floor
        tol = limit / (na + nr) if na + nr > 0 else base
        rel = 0.0 if diff == 0 else diff / (na + nr) if na + nr > 0 else math.inf
        ratio = 0.0 if diff == 0 else (diff / limit if limit > 0 else math.inf)
        out.append(ReferenceCheck(module=record.name, quantity=q, verdict="fail" if ratio > 1 else "pass",
                                  rel_diff=rel, error_ratio=ratio, tolerance=tol,
                                  precision=f"{prec} vs reference {ref_prec}"))
    return tuple(out)
