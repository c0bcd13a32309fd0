"""Module-local checks: one module (or one custom kernel call) checked in isolation.

This module owns the module-local *check* of a recorded call: :func:`check_module` (the
public entry point), :func:`_check_record` and the upcast check of a float16/bfloat16
module, the report of a skipped record, and merging local reports into the whole-model
report. Recording the call is :mod:`gradwatch._recording`, comparing it with a registered
reference :mod:`gradwatch._references` (:func:`register_reference` lives there and is
re-exported here), choosing the modules :mod:`gradwatch._suspects`.

During a training step a :class:`~gradwatch._recording._Recording` records, for each watched module, its
inputs, the RNG state and buffers its forward started from, the gradient that flowed
into its outputs (``grad_out``), the module's *own* contribution to the gradient of each
input (``grad_input``) and its parameters' gradients. The check then reuses the whole
engine (:func:`gradwatch.check`) on a wrapper module whose parameters are the module's
parameters plus the recorded floating inputs (``input[0]``, ...) and whose loss is the
scalar ``<grad_out, f(x; θ)>`` (summed over the floating outputs): its gradient wrt
``θ`` and ``x`` is exactly the module's parameter gradient and ``grad_input``, so the
float64 evaluation, error bars, joint probes, kinks, bisection and :class:`~gradwatch.Report`
apply unchanged. The float64 copy is the module's, so memory scales with that module's
float64 copy plus its activations, not with the model's (benchmarks/memory.py). A module whose forward raises in float64 (a kernel
without float64) is checked natively by the engine (``precision="auto"``); one that ran in
float16/bfloat16 is checked on a float32 copy: its own backward in float32 numerically
(float32 tolerances), and the training's low-precision gradients against that float32
backward at the same point, within one kernel's rounding (``_upcast_check``).

Names: a local tensor is ``<module>::<tensor>`` (:func:`gradwatch.report.local_name`), such as
``blocks.1.attn::weight`` or ``blocks.1.attn::input[0]`` (``input[i]`` the i-th positional
argument, ``input[i][j]`` nested, ``input[key]`` a keyword argument); the same names key
the logged metrics.

:func:`register_reference` registers a plain-PyTorch reference of a module (instance or
class); at a check it runs on the same recorded inputs (float64 where it supports it) and
its outputs and input/parameter gradients (autograd of ``<grad_out, ref(x)>``) are compared
with what the module produced (:class:`~gradwatch.report.ReferenceCheck`, ``Report.references``).
A ``torch.library`` custom op can be registered too: the hook then records one call of that
op in each checked step (the next call at each check step, in turn) and checks it alone
(module name ``ns::op``).

Internal API (stable; the hook and the sharded path build on it):

* ``_check_record(record, *, seed, options=ProbeOptions(), reduce=None, reference=True) -> Report``: the
  local check of one record (``options``: a :class:`~gradwatch.ProbeOptions`; ``reduce``: the
  cross-rank mean of sharded training), its tensors named ``<module>::<tensor>``;
  ``_skipped_record(record, seed, reason)`` reports a skipped one.
* ``_merge(report, local_reports) -> Report``: the whole-model report with the local
  tensors, reference comparisons (``Report.references``) and module checks
  (``Report.modules``: precision and skip reason per module) added.
* ``_local_reports(recording, seed, options, full) -> (reports, options)``: every record checked (or
  skipped with its reason), seeds derived from ``seed`` and the record's position
  (:func:`gradwatch._seeds._derive_seed`).
* ``_float64_bytes(model)``: the size of a model's float64 copy (when the adapters check
  modules locally instead of the whole model).

Example:
    >>> report = gradwatch.check_module(attn, (q, k, v), grad_out, seed=0)  # doctest: +SKIP
    >>> report.ok, list(report.tensors)                                      # doctest: +SKIP
    (True, ['input[0]', 'input[1]', 'input[2]'])
"""

from __future__ import annotations

import copy
import dataclasses
import math
import secrets
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from gradwatch._evaluation import _dtype_name, _native_gradients
from gradwatch._recording import _op_name, _OpModule, _Record, _Recording
from gradwatch._references import _REFERENCE_RTOL, _precision_of, _reference_checks, register_reference
from gradwatch._seeds import _derive_seed
from gradwatch._validate import _module, _seed
from gradwatch.engine import _check_with
from gradwatch.options import DEFAULT_SHADOW_BYTES, ProbeOptions
from gradwatch.replay import ReplayState, _isolated, _LossModule
from gradwatch.report import KinkEvent, ModuleCheck, Report, TensorCheck, local_name

__all__ = ["check_module", "register_reference"]

_LOW = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- the wrapper


class _Local(nn.Module):
    """``<grad_out, module(inputs)>`` as a model: the recorded floating inputs are its
    parameters (``input[0]``, ...), the module its submodule ``module``."""

    def __init__(self, record: _Record, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._record = record
        self._order: dict[int, str] = {}
        for i, name in record.inputs.items():
            leaf = record.leaves[i]
            self.register_parameter(name, nn.Parameter(leaf.to(dtype) if dtype is not None else leaf.clone()))
            self._order[i] = name
        self.module = record.module

    def forward(self, batch: tuple) -> Tensor:
        constants, grad_outputs = batch
        leaves = self._record.call_leaves()
        for i, name in self._order.items():
            leaves[i] = getattr(self, name)
        for i, c in constants.items():
            leaves[i] = c
        args, kwargs = pytree.tree_unflatten(leaves, self._record.spec)
        return _pairing(self.module(*args, **kwargs), grad_outputs)


def _pairing(output: Any, grad_outputs: Mapping[int, Tensor]) -> Tensor:
    """``sum_i <grad_outputs[i], output leaf i>`` in the outputs' dtype."""
    leaves = pytree.tree_leaves(output)
    total = None
    for i, g in grad_outputs.items():
        term = (leaves[i] * g.to(leaves[i].dtype)).sum()
        total = term if total is None else total + term.to(total.dtype)
    return total


def _terms(record: _Record, batch: tuple) -> Tensor:
    """``‖g∘y‖₂``, the root sum of squares of the terms of the pairing :func:`_pairing` (the
    recorded outputs): the scale its rounding takes (each term's, added up as a random walk). The
    pairing cancels where the output gradient is orthogonal to the output (a module before
    BatchNorm) and rounds relative to its terms, not to itself (the engine's ``loss_terms``)."""
    with torch.no_grad():
        outputs = [o.to(torch.float64).square() if isinstance(o, Tensor) else o for o in _unflatten_outputs(record)]
        return _pairing(outputs, {i: g.to(torch.float64).square() for i, g in batch[1].items()}).sqrt()


def _local_loss(model: nn.Module, batch: Any) -> Tensor:
    return model(batch)


def _batch(record: _Record, dtype: torch.dtype | None = None) -> tuple:
    """``(constants, grad_outputs)``: floating inputs that need no gradient and the
    gradients into the outputs (zeros for an output that received none)."""
    constants = {
        i: (leaf.to(dtype) if dtype is not None and leaf.dtype in _LOW else leaf)
        for i, leaf in enumerate(record.leaves)
        if isinstance(leaf, Tensor) and leaf.is_floating_point() and i not in record.inputs
    }
    grads = {}
    for i, out in record.outputs.items():
        g = record.grad_outputs.get(i)
        g = torch.zeros_like(out) if g is None else g
        grads[i] = g.to(dtype) if dtype is not None and g.dtype in _LOW else g
    return constants, grads


def _grads(record: _Record) -> dict[str, Tensor]:
    out = {name: record.grad_inputs[name] for name in record.inputs.values() if name in record.grad_inputs}
    out.update({f"module.{n}": g for n, g in record.param_grads.items()})
    return out


def _replay(record: _Record) -> ReplayState:
    state = record.replay
    return dataclasses.replace(state, buffers={f"module.{n}": b for n, b in state.buffers.items()})


def _tensor_name(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def _qualify(report: Report, module: str) -> Report:
    """The report of a wrapper with tensors and kink modules named after the module."""

    def event(e: KinkEvent) -> KinkEvent:
        where = e.module
        if where is not None:
            where = module if where in ("", "module") else (
                (f"{module}.{where[len('module.'):]}" if module else where[len("module."):])
                if where.startswith("module.") else where)
        return dataclasses.replace(e, tensor=local_name(module, _tensor_name(e.tensor)), module=where)

    tensors = {}
    for name, t in report.tensors.items():
        q = local_name(module, _tensor_name(name))
        tensors[q] = dataclasses.replace(t, name=q, kink_events=tuple(event(e) for e in t.kink_events))
    return dataclasses.replace(report, tensors=tensors)


# --------------------------------------------------------------------------- checking


def _check_record(record: _Record, *, seed: int, options: ProbeOptions = ProbeOptions(),
                  reduce: Callable[[Tensor], Tensor] | None = None, reference: bool = True) -> Report:
    """Check one recorded module call with the engine; tensors named ``<module>::<tensor>``.

    ``options``: the probe options (:class:`~gradwatch.ProbeOptions`; the defaults unless
    given); ``reduce``: the cross-rank mean of sharded training (:func:`gradwatch.check`'s
    ``reduce``). A module whose float64 evaluation raises is checked in its own precision,
    upcast to float32 when it ran in float16/bfloat16.
    """
    problem = record.problem()
    if problem is not None:
        return _skipped_record(record, seed, problem)
    grads = _grads(record)
    batch = _batch(record)
    with torch.no_grad():
        train_loss = _pairing(_unflatten_outputs(record), batch[1])
    wrapper = _Local(record)
    report = _check_with(wrapper, _local_loss, batch, options, grads=grads, replay=_replay(record),
                         train_loss=train_loss, seed=seed, reduce=reduce, loss_terms=_terms(record, batch))
    if report.precision == "native" and options.precision == "auto" and _low_precision(record):
        report = _upcast_check(record, grads, seed, options, report.precision_reason, reduce=reduce)
    report = _qualify(report, record.name)
    report = dataclasses.replace(report, modules=(ModuleCheck(record.name, report.precision, report.precision_reason,
                                                              seconds=report.seconds),))
    if reference:
        refs = _reference_checks(record)
        if refs:
            report = dataclasses.replace(report, references=refs)
    return report


def _unflatten_outputs(record: _Record) -> list:
    n = max(record.outputs) + 1 if record.outputs else 0
    leaves: list = [None] * n
    for i, out in record.outputs.items():
        leaves[i] = out
    return leaves


def _low_precision(record: _Record) -> bool:
    floats = [t for t in record.leaves if isinstance(t, Tensor) and t.is_floating_point()]
    floats += [p for p in record.module.parameters() if p.is_floating_point()]
    return any(t.dtype in _LOW for t in floats)


def _upcast_check(record: _Record, grads: dict[str, Tensor], seed: int, options: ProbeOptions, why: str, *,
                  reduce: Callable[[Tensor], Tensor] | None = None) -> Report:
    """Check a float16/bfloat16 module without float64 in float32, on a float32 copy of the
    module and its inputs, in two parts:

    * its backward code: the gradient of ``<grad_out, module32(x)>`` that the module's own
      backward gives in float32 is checked numerically in float32 (float32 tolerances), which
      a wrong formula fails;
    * what training got: the recorded float16/bfloat16 gradients are compared with that float32
      gradient at the same point; a gap beyond one kernel's rounding (``_REFERENCE_RTOL``) fails
      the tensor (``precision_gap``, ``gap_ratio``): a kernel wrong only in low precision or
      only for the training's memory layout (a non-contiguous ``grad_output``).
    """
    module32 = copy.deepcopy(record.module)
    for p in module32.parameters():
        if p.dtype in _LOW:
            p.data = p.data.float()
    for name, b in list(module32.named_buffers()):
        if b.dtype in _LOW:
            owner = module32.get_submodule(name.rpartition(".")[0]) if "." in name else module32
            owner._buffers[name.rpartition(".")[2]] = b.float()
    up = dataclasses.replace(record, module=module32)
    up.leaves = [t.float() if isinstance(t, Tensor) and t.dtype in _LOW else t for t in record.leaves]
    state = record.replay
    up.replay = dataclasses.replace(state, buffers={n: b.float() if b.dtype in _LOW else b
                                                    for n, b in state.buffers.items()},
                                    autocast={d: (False, dt) for d, (_, dt) in state.autocast.items()})
    batch = _batch(up, torch.float32)
    wrapper = _Local(up)
    report = _check_with(wrapper, _local_loss, batch, dataclasses.replace(options, precision="native"), seed=seed,
                         reduce=reduce, loss_terms=_terms(up, batch))
    params = {n: p.detach() for n, p in wrapper.named_parameters()}
    _, g32 = _native_gradients(_LossModule(wrapper, _local_loss), batch, _replay(up), params,
                               [n for n in grads if n in params])
    names = [n for n in grads if n in g32 and tuple(g32[n].shape) == tuple(grads[n].shape)]
    if names:
        rows = []
        for n in names:
            a, r = grads[n].detach().to(torch.float64), g32[n].detach().to(torch.float64)
            d = (a - r).reshape(-1)
            rows.append(torch.stack([d.norm(), a.norm(), r.norm(), d.abs().argmax().to(torch.float64)]))
        values = dict(zip(names, torch.stack(rows).cpu().tolist()))  # one transfer
        scale = max(v[2] / math.sqrt(max(grads[n].numel(), 1)) for n, v in values.items())
        tensors = dict(report.tensors)
        for n, (diff, na, nr, idx) in values.items():
            rtol = _REFERENCE_RTOL[_precision_of(grads[n])]
            limit = rtol * (na + nr) + rtol * scale * math.sqrt(grads[n].numel())
            ratio = 0.0 if diff == 0 else (diff / limit if limit > 0 else math.inf)
            t = tensors[n]
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(int(idx)), grads[n].shape))
            t = dataclasses.replace(t, precision_gap=0.0 if diff == 0 else diff / (na + nr), gap_ratio=ratio,
                                    gap_index=index if ratio > 1 else None)
            if ratio > 1 and t.verdict in ("pass", "kink", "skipped"):
                t = dataclasses.replace(t, verdict="fail", error_ratio=max(ratio, t.error_ratio)
                                        if not math.isnan(t.error_ratio) else ratio)
            tensors[n] = t
        report = dataclasses.replace(report, tensors=tensors)
    return dataclasses.replace(report, precision="float32", grad_dtype=_dtype_name(next(iter(grads.values())).dtype),
                               grad_precision=_precision_of(next(iter(grads.values()))),
                               precision_reason=f"{why}; its backward checked in float32 (inputs and parameters "
                                                "upcast), and the training gradients compared with it")


def _skipped_record(record: _Record, seed: int, reason: str) -> Report:
    """A local report whose tensors are all skipped with ``reason``."""
    names = list(dict.fromkeys(record.inputs.values())) or ["input"]
    names += [n for n, _ in record.module.named_parameters()]
    tensors = {}
    for n in names:
        q = local_name(record.name, n)
        tensors[q] = TensorCheck(q, (), "skipped", reason=f"module {record.name or '(module)'!r}: {reason}")
    return Report(tensors=tensors, seed=seed, reason=reason, modules=(ModuleCheck(record.name, reason=reason),))


def _merge(report: Report, local_reports: list[Report]) -> Report:
    """The whole-model report with the tensors and reference comparisons of local checks added."""
    tensors = dict(report.tensors)
    refs = list(report.references)
    modules = list(report.modules)
    seconds = report.seconds
    for r in local_reports:
        tensors.update(r.tensors)
        refs.extend(r.references)
        modules.extend(r.modules)
        seconds += r.seconds
    return dataclasses.replace(report, tensors=tensors, references=tuple(refs), modules=tuple(modules),
                               seconds=seconds)


def check_module(
    module: nn.Module,
    inputs: Any,
    grad_outputs: Any = None,
    *,
    kwargs: Mapping[str, Any] | None = None,
    grads: Mapping[str, Tensor] | None = None,
    name: str = "",
    seed: int | None = None,
    precision: str = "auto",
    coordinates: int = 4,
    directions: int = 1,
    max_shadow_bytes: int = DEFAULT_SHADOW_BYTES,
    reference: bool = True,
) -> Report:
    """Check one module call in isolation: its parameter *and input* gradients.

    Runs ``module(*inputs, **kwargs)`` and its backward with ``grad_outputs`` (unless
    ``grads`` gives the gradients to compare), then compares, with the engine of
    :func:`gradwatch.check`, the directional derivatives of ``<grad_outputs, module(x; θ)>``
    with the gradients of the floating inputs that require grad (``input[0]``, ...) and of
    the parameters. A module whose forward raises in float64 is checked in its own
    precision (on a float32 copy when it ran in float16/bfloat16). A reference registered with
    :func:`register_reference` is compared too (``Report.references``).

    Args:
        module: The module, or a ``torch.library`` custom op (its call checked alone).
        inputs: Positional arguments: a tensor or a tuple. Floating tensors with
            ``requires_grad=True`` are checked as ``input[i]``; others are constants.
        grad_outputs: Gradient flowing into the output (a tensor, or a structure like
            the output's); ``None`` draws a fixed random one (seeded by ``seed``).
        kwargs: Keyword arguments of the call.
        grads: Gradients under test by name (``input[0]``, parameter names): what a training
            backward produced. ``None`` computes them here with autograd.
        name: Module name used in the tensor names (``<name>::input[0]``).
        seed: Probe seed; ``None`` draws one (recorded in the report).
        precision: ``"float64"``, ``"native"`` or ``"auto"``.
        coordinates: Random elements probed per tensor.
        directions: Random directions probed per tensor.
        max_shadow_bytes: Largest float64 copy ``"auto"`` makes.
        reference: Compare with a registered reference when there is one.

    Returns:
        A :class:`~gradwatch.Report` whose tensors are ``input[...]`` and the parameters.

    Raises:
        ValueError: On invalid arguments, or when nothing of the call gets a gradient.

    Example:
        >>> q, k, v = (torch.randn(2, 4, 8, requires_grad=True) for _ in range(3))  # doctest: +SKIP
        >>> gradwatch.check_module(FusedAttention(), (q, k, v), seed=0).ok           # doctest: +SKIP
        True
    """
    op = _op_name(module)
    if op is not None:
        module = _OpModule(module, op)
    _module("module", module)
    if not isinstance(name, str):
        raise ValueError(f"`name` must be a str, got {name!r}")
    _seed("seed", seed)
    options = ProbeOptions(precision=precision, coordinates=coordinates, directions=directions,
                           max_shadow_bytes=max_shadow_bytes)
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ValueError(f"`kwargs` must be None or a mapping, got {type(kwargs).__name__}")
    if not isinstance(reference, bool):
        raise ValueError(f"`reference` must be a bool, got {reference!r}")
    if grads is not None and not isinstance(grads, Mapping):
        raise ValueError(f"`grads` must be None or a mapping name -> Tensor, got {type(grads).__name__}")
    if seed is None:
        seed = secrets.randbits(62)
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    kwargs = dict(kwargs or {})
    rec = _Recording({name: module})
    record = rec.records[name]
    with _isolated(module):
        saved = {n: (p.grad.clone() if p.grad is not None else None) for n, p in module.named_parameters()}
        try:
            with torch.enable_grad(), rec:
                out = module(*args, **kwargs)
                leaves = [t for t in pytree.tree_leaves(out)]
                if grad_outputs is None:
                    gen = torch.Generator(device="cpu").manual_seed(seed % 2**63)
                    gouts = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) if isinstance(t, Tensor)
                             and t.is_floating_point() else None for t in leaves]
                else:
                    gouts = pytree.tree_leaves(grad_outputs)
                    if len(gouts) != len(leaves):
                        raise ValueError(f"`grad_outputs` must match the module's {len(leaves)} output leaves, "
                                         f"got {len(gouts)}")
                pairs = [(t, g) for t, g in zip(leaves, gouts)
                         if isinstance(t, Tensor) and t.requires_grad and g is not None]
                if not pairs:
                    raise ValueError("`module` returned no floating output that requires grad: nothing to check")
                torch.autograd.backward([t for t, _ in pairs], [g.to(t) for t, g in pairs])
        finally:
            for n, p in module.named_parameters():
                p.grad = saved[n]
    if grads is not None:
        known = set(record.inputs.values()) | {n for n, _ in module.named_parameters()}
        for k, g in grads.items():
            if k not in known:
                raise ValueError(f"`grads` names {k!r}, which is neither a checked input nor a parameter: "
                                 f"expected some of {sorted(known)}")
            if not isinstance(g, Tensor):
                raise TypeError(f"`grads[{k!r}]` must be a Tensor, got {type(g).__name__}")
        record.grad_inputs = {k: g for k, g in grads.items() if k in record.inputs.values()}
        record.param_grads = {k: g for k, g in grads.items() if k not in record.inputs.values()}
    return _check_record(record, seed=seed, options=options, reference=reference)


def _local_reports(recording: Any, seed: int, options: ProbeOptions,
                   full: ProbeOptions | None = None) -> tuple[list[Report], list[ProbeOptions]]:
    """The local check of every record (skipped ones with their reason), seeds derived from ``seed``,
    and the options each ran with. ``recording``: a :class:`~gradwatch._recording._Recording`, an
    :class:`~gradwatch._recording._OpCalls`, or a list of them. ``full``: where ``options`` is the
    smallest check (the joint probe alone at ±h), the options of a module whose check did not run
    in float64 (measured, or natively): it is checked again with them (the joint probe alone at ±h
    resolved a kernel computing in float32 inside to ~1e-2, the full check to ~3e-4)."""
    recordings = recording if isinstance(recording, (list, tuple)) else [recording]
    records = [r for rec in recordings for r in rec.records.values()]
    reports, used = [], []
    for i, record in enumerate(records):
        s = _derive_seed(seed, i + 1)
        opts = options
        try:
            report = _check_record(record, seed=s, options=options)
            if full is not None and report.reliable and not _in_float64(report):
                opts = full
                report = _check_record(record, seed=s, options=full)
        except Exception as err:  # a module the replay cannot run: say so, never stop the training
            report = _skipped_record(record, s, f"its module-local check raised {type(err).__name__}: {err}")
        reports.append(report)
        used.append(opts)
    return reports, used


def _in_float64(report: Report) -> bool:
    """Whether a check evaluated in float64 and was not measured computing below it."""
    return report.precision == "float64" and report.measured_precision in (None, "float64")


def _float64_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * 8 for t in tensors if t.is_floating_point())
