"""Module-local checks: one module (or one custom kernel call) checked in isolation.

During a training step a :class:`_Recording` records, for each watched module, its
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

* ``_Recording(modules, *, model=None)``: context manager around a forward and backward;
  ``modules`` maps qualified names to modules. ``.records`` maps each name to a
  :class:`_Record` (``reason`` set when it cannot be checked: called more than once,
  parameters shared with modules outside it, no gradient reached it).
* ``_check_record(record, *, seed, options, reference=True) -> Report``: the local check of one
  record (options: engine keyword arguments such as ``coordinates``, ``precision``), its
  tensors named ``<module>::<tensor>``; ``_skipped_record(record, seed, reason)`` reports a skipped one.
* ``_merge(report, local_reports) -> Report``: the whole-model report with the local
  tensors, reference comparisons (``Report.references``) and module checks
  (``Report.modules``: precision and skip reason per module) added.
* ``_OpCalls(turns=None)``: ``TorchFunctionMode`` around a forward and backward; records one
  call of each custom op with a registered reference as a ``_Record`` named ``ns::op``:
  call ``turns[op]`` (0 by default), and advances ``turns`` to the next call on exit.
* ``_Suspects(model)``: context manager (a ``TorchFunctionMode`` plus module hooks); around
  one forward with grad it finds the modules whose forward runs custom backward code
  (``.names``: qualified name -> why); ``_discover(model, loss_fn, batch, replay)`` runs that
  forward from a captured state and leaves RNG, buffers and attributes as they were.
* ``_resolve_modules(model, modules)``: validates ``modules`` (None, "suspects", list of
  modules or names) -> None / "suspects" / {name: module}.
* ``_local_reports(recording, seed, options) -> list[Report]``: every record checked (or
  skipped with its reason), seeds derived from ``seed`` and the record's position.

Example:
    >>> report = gradwatch.check_module(attn, (q, k, v), grad_out, seed=0)  # doctest: +SKIP
    >>> report.ok, list(report.tensors)                                      # doctest: +SKIP
    (True, ['input[0]', 'input[1]', 'input[2]'])
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import secrets
import weakref
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from gradwatch._seeds import _derive_seed
from gradwatch._validate import _callable, _module, _one_of, _seed
from gradwatch.engine import DEFAULT_SHADOW_BYTES, PRECISIONS, check
from gradwatch.replay import ReplayState, _isolated, capture
from gradwatch.report import KinkEvent, ModuleCheck, ReferenceCheck, Report, TensorCheck, local_name

__all__ = ["check_module", "register_reference"]

_LOW = (torch.float16, torch.bfloat16)
#: Relative tolerance of a comparison with a registered reference, by the lower precision of the
#: two: one kernel's rounding, far tighter than the whole-model RTOL of gradwatch.engine (the
#: measured rounding of the reference run in the module's precision, times _NOISE_FACTOR, widens it).
_REFERENCE_RTOL = {"float64": 1e-9, "float32": 1e-4, "tf32": 1e-2, "float16": 1e-2, "bfloat16": 2e-2}
_NOISE_FACTOR = 4.0


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


# --------------------------------------------------------------------------- recording


class _Tap(torch.autograd.Function):
    """Identity (a copy, so in-place use on either side stays legal) whose backward hands the
    gradient to ``sink(key, grad)`` and passes it on unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, sink: Callable, key: Any) -> Tensor:  # type: ignore[override]
        ctx.sink, ctx.key = sink, key
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        ctx.sink(ctx.key, grad)
        return grad, None, None


@dataclasses.dataclass
class _Record:
    """What one module's call recorded during a training step.

    Attributes:
        name: Qualified module name (``named_modules()``), ``""`` for a direct call.
        module: The module.
        calls: Forward calls seen while recording.
        spec: Tree spec of ``(args, kwargs)``; ``leaves`` their leaves (tensors cloned, detached).
        inputs: Leaf index -> ``input[...]`` name of the floating leaves that required grad.
        outputs: The floating output leaves (cloned, detached), by output leaf index.
        grad_outputs: Gradient that flowed into each of those outputs (None: none did).
        grad_inputs: ``input[...]`` name -> the module's own contribution to its gradient.
        param_grads: Parameter name (relative to the module) -> gradient of this step.
        replay: RNG state, buffers and autocast the forward started from.
        reason: Why the module cannot be checked, else None.
    """

    name: str
    module: nn.Module
    calls: int = 0
    spec: Any = None
    leaves: list = dataclasses.field(default_factory=list)
    inputs: dict = dataclasses.field(default_factory=dict)
    outputs: dict = dataclasses.field(default_factory=dict)
    grad_outputs: dict = dataclasses.field(default_factory=dict)
    grad_inputs: dict = dataclasses.field(default_factory=dict)
    param_grads: dict = dataclasses.field(default_factory=dict)
    replay: ReplayState | None = None
    reason: str | None = None
    stateful: list = dataclasses.field(default_factory=list)

    def call_leaves(self) -> list:
        """The recorded leaves for one replayed call: mutable non-tensor arguments (a
        transformers ``Cache`` that the call updates) as fresh copies of their state at the
        recorded call, so every evaluation starts from that state."""
        leaves = list(self.leaves)
        for i in self.stateful:
            leaves[i] = copy.deepcopy(leaves[i])
        return leaves

    def _sink(self, key: Any, grad: Tensor) -> None:
        kind, k = key
        store = self.grad_outputs if kind == "out" else self.grad_inputs
        g = grad.detach().clone()
        store[k] = g if store.get(k) is None else store[k] + g

    def problem(self) -> str | None:
        """Why this record cannot be checked (after the backward), else None."""
        if self.reason is not None:
            return self.reason
        if self.calls == 0:
            return "not called in this step"
        if self.calls > 1:
            return (f"called {self.calls} times in one step (weight sharing or recurrence): its gradients mix "
                    "the calls, so it is not checked locally (the whole-model check covers it)")
        if not any(g is not None for g in self.grad_outputs.values()):
            return "no gradient reached its outputs in this step"
        if not self.inputs and not self.param_grads:
            return "neither an input nor a parameter of it received a gradient in this step"
        return None


#: Argument types that no call can mutate (anything else that is not a tensor is copied).
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, slice, type, enum.Enum, torch.dtype, torch.device,
              torch.layout, torch.memory_format)


def _stateful(leaf: Any) -> bool:
    return not isinstance(leaf, _IMMUTABLE) and not callable(leaf)


def _leaf_name(path: tuple) -> str:
    """``input[0]`` for args[0], ``input[0][1]`` nested, ``input[mask]`` for kwargs['mask']."""
    parts = []
    for k in path[1:]:
        key = getattr(k, "idx", getattr(k, "key", getattr(k, "name", k)))
        parts.append(f"[{key}]")
    return "input" + "".join(parts)


def _flatten_inputs(args: tuple, kwargs: dict) -> tuple[list, list[str], Any]:
    flat, spec = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    paths = [p for p, _ in flat]
    leaves = [v for _, v in flat]
    names = []
    for path in paths:
        # (args, kwargs) -> args index / kwargs key first
        names.append(_leaf_name(path))
    return leaves, names, spec


def _owned_elsewhere(model: nn.Module | None, module: nn.Module) -> list[str]:
    """Parameters of ``module`` that modules outside it own too (tied weights)."""
    if model is None:
        return []
    inside = {id(m) for m in module.modules()}
    mine = {id(p): n for n, p in module.named_parameters()}
    shared = set()
    for m in model.modules():
        if id(m) in inside:
            continue
        for p in m._parameters.values():
            if p is not None and id(p) in mine:
                shared.add(mine[id(p)])
    return sorted(shared)


class _Recording:
    """Records the watched modules' calls during one training forward and backward.

    Args:
        modules: Qualified name -> module to record.
        model: The whole model, to detect parameters shared with modules outside a
            watched one (such a module is skipped with the reason).

    Example:
        >>> with _Recording({"attn": model.attn}, model=model) as rec:  # doctest: +SKIP
        ...     loss_fn(model, batch).backward()
        >>> rec.records["attn"].grad_inputs                              # doctest: +SKIP
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, model: nn.Module | None = None) -> None:
        self.records = {name: _Record(name, m) for name, m in modules.items()}
        self._model = model
        self._handles: list = []

    def __enter__(self) -> "_Recording":
        for record in self.records.values():
            shared = _owned_elsewhere(self._model, record.module)
            if shared:
                record.reason = (f"parameters {shared} are shared with modules outside it (tied weights): their "
                                 "gradient mixes both uses, so it is not checked locally")
                continue
            m = record.module
            self._handles.append(m.register_forward_pre_hook(self._pre(record), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post(record), with_kwargs=True))
            for pname, p in m.named_parameters():
                if p.requires_grad:
                    self._handles.append(p.register_hook(self._param(record, pname)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @staticmethod
    def _param(record: _Record, pname: str) -> Callable:
        def hook(grad: Tensor) -> None:  # a copy: .grad may become this very tensor, which the framework
            prev = record.param_grads.get(pname)  # callbacks' AMP unscale_ or clipping then change in place
            record.param_grads[pname] = grad.detach().clone() if prev is None else prev + grad.detach()

        return hook

    @staticmethod
    def _pre(record: _Record) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            record.calls += 1
            if record.calls > 1:
                return None
            record.replay = capture(module)
            leaves, names, spec = _flatten_inputs(args, kwargs)
            record.spec = spec
            new = list(leaves)
            for i, (leaf, name) in enumerate(zip(leaves, names)):
                if isinstance(leaf, Tensor):
                    record.leaves.append(leaf.detach().clone())
                    if leaf.is_floating_point() and leaf.requires_grad and torch.is_grad_enabled():
                        record.inputs[i] = name
                        new[i] = _Tap.apply(leaf, record._sink, ("in", name))
                elif _stateful(leaf):  # a cache the call mutates: replayed from a copy of its state now
                    try:
                        record.leaves.append(copy.deepcopy(leaf))
                    except Exception as err:
                        record.leaves.append(leaf)
                        record.reason = (f"its argument {name} ({type(leaf).__name__}) is mutable state the call "
                                         f"changes and cannot be copied ({type(err).__name__}), so the call cannot "
                                         "be replayed (for a transformers cache: use_cache=False in training)")
                    record.stateful.append(i)
                else:
                    record.leaves.append(leaf)
            if not record.inputs:
                return None
            a, kw = pytree.tree_unflatten(new, spec)
            return a, kw

        return hook

    @staticmethod
    def _post(record: _Record) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any):
            if record.calls > 1:
                return None
            leaves, spec = pytree.tree_flatten(output)
            new = list(leaves)
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, Tensor) and leaf.is_floating_point():
                    record.outputs[i] = leaf.detach().clone()
                    record.grad_outputs.setdefault(i, None)
                    if leaf.requires_grad:
                        new[i] = _Tap.apply(leaf, record._sink, ("out", i))
            return pytree.tree_unflatten(new, spec)

        return hook


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


_DEFAULTS = {"coordinates": 4, "directions": 1, "precision": "auto"}


def _check_record(record: _Record, *, seed: int, options: Mapping[str, Any] | None = None,
                  reference: bool = True) -> Report:
    """Check one recorded module call with the engine; tensors named ``<module>::<tensor>``.

    ``options`` are :func:`gradwatch.check` keyword arguments (not ``grads``, ``replay``,
    ``train_loss``, ``seed``). A module whose float64 evaluation raises is checked in its
    own precision, upcast to float32 when it ran in float16/bfloat16.
    """
    problem = record.problem()
    if problem is not None:
        return _skipped_record(record, seed, problem)
    opts = {**_DEFAULTS, **(options or {})}
    grads = _grads(record)
    batch = _batch(record)
    with torch.no_grad():
        train_loss = _pairing(_unflatten_outputs(record), batch[1])
    wrapper = _Local(record)
    report = check(wrapper, _local_loss, batch, grads=grads, replay=_replay(record), train_loss=train_loss,
                   seed=seed, **opts)
    if report.precision == "native" and opts["precision"] == "auto" and _low_precision(record):
        report = _upcast_check(record, grads, seed, opts, report.precision_reason)
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


def _upcast_check(record: _Record, grads: dict[str, Tensor], seed: int, opts: dict, why: str) -> Report:
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
    import copy

    from gradwatch._evaluation import _native_gradients
    from gradwatch.replay import _LossModule

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
    report = check(wrapper, _local_loss, batch, seed=seed, **{**opts, "precision": "native"})
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
    _one_of("precision", precision, PRECISIONS)
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
    options = {"precision": precision, "coordinates": coordinates, "directions": directions,
               "max_shadow_bytes": max_shadow_bytes}
    return _check_record(record, seed=seed, options=options, reference=reference)


# --------------------------------------------------------------------------- references


_REFERENCES_BY_MODULE: "weakref.WeakKeyDictionary[nn.Module, Callable]" = weakref.WeakKeyDictionary()
_REFERENCES_BY_CLASS: dict[type, Callable] = {}
_REFERENCES_BY_OP: dict[str, Callable] = {}  # "ns::name" of a custom op -> reference_fn(*args, **kwargs)


def _op_name(target: Any) -> str | None:
    """``"ns::name"`` of a custom op (``torch.library.custom_op`` result, OpOverload or
    OpOverloadPacket), else None."""
    from torch._library.custom_ops import CustomOpDef

    if isinstance(target, CustomOpDef):
        return target._qualname
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


class _OpModule(nn.Module):
    """One custom op call as a module: what the local check and the reference see."""

    def __init__(self, op: Callable, name: str) -> None:
        super().__init__()
        self._op = op
        self.op_name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._op(*args, **kwargs)


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
    from gradwatch.replay import _restore_rng

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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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


class _OpCalls(TorchFunctionMode):
    """Records one call of each custom op with a registered reference during a step, as a
    :class:`_Record` named after the op (``gwtest::attention``; its tensors
    ``gwtest::attention::input[0]``). ``turns`` (op name -> call index, kept by the adapter
    from one check step to the next) says which call: the first at the first check step,
    then the next one at each check step, cycling through the calls the op made in the last
    step, so every call site (each layer's) is checked in turn."""

    def __init__(self, turns: dict[str, int] | None = None) -> None:
        super().__init__()
        self.records: dict[str, _Record] = {}
        self.turns = turns if turns is not None else {}
        self.calls: dict[str, int] = {}  # calls of each op in this step

    def __exit__(self, *exc: Any) -> Any:
        for name, count in self.calls.items():  # the next call at the next check step
            self.turns[name] = (self.turns.get(name, 0) + 1) % count
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func) if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) else None
        if name is None or name not in _REFERENCES_BY_OP:
            return func(*args, **kwargs)
        index = self.calls[name] = self.calls.get(name, 0) + 1
        if name in self.records or index - 1 != self.turns.get(name, 0):
            return func(*args, **kwargs)
        record = self.records[name] = _Record(name, _OpModule(func, name))
        pre, post = _Recording._pre(record), _Recording._post(record)
        changed = pre(record.module, tuple(args), dict(kwargs))
        a, kw = changed if changed is not None else (args, kwargs)
        out = func(*a, **kw)
        return post(record.module, a, kw, out)


# --------------------------------------------------------------------------- suspects


class _Suspects(TorchFunctionMode):
    """Around one forward: the modules whose forward runs custom backward code.

    ``names`` maps qualified module names to why: a custom ``autograd.Function`` (found on
    the autograd graph of the module's outputs), a ``torch.library`` custom op, or a
    tensor hook registered in its forward. The innermost module is named; the model
    itself is not (the whole-model check covers it).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names: dict[str, str] = {}
        self._stack: list[str] = []
        self._visited: set[int] = set()
        self._boundary: list[set[int]] = []
        self._stack_handles: list = []

    def __enter__(self):
        for name, m in self.model.named_modules():
            self._stack_handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._stack_handles.append(m.register_forward_hook(self._post(name), with_kwargs=True, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._stack_handles:
            h.remove()
        self._stack_handles.clear()
        return super().__exit__(*exc)

    def _flag(self, why: str) -> None:
        if self._stack and self._stack[-1]:
            self.names.setdefault(self._stack[-1], why)

    def _pre(self, name: str) -> Callable:
        def hook(module, args, kwargs):
            self._stack.append(name)
            self._boundary.append({id(t.grad_fn) for t in pytree.tree_leaves((args, kwargs))
                                   if isinstance(t, Tensor) and t.grad_fn is not None})
            return None

        return hook

    def _post(self, name: str) -> Callable:
        def hook(module, args, kwargs, output):
            boundary = self._boundary.pop() if self._boundary else set()
            try:
                found = self._walk(output, boundary)
                if found and name:
                    self.names.setdefault(name, f"custom autograd.Function {found}")
            finally:
                if self._stack:
                    self._stack.pop()
            return None

        return hook

    def _walk(self, output: Any, boundary: set[int]) -> str | None:
        from torch.autograd.function import BackwardCFunction

        todo = [t.grad_fn for t in pytree.tree_leaves(output) if isinstance(t, Tensor) and t.grad_fn is not None]
        found = None
        while todo:
            node = todo.pop()
            if node is None or id(node) in self._visited or id(node) in boundary:
                continue
            self._visited.add(id(node))
            if isinstance(node, BackwardCFunction):
                cls = getattr(node, "_forward_cls", None)
                if cls is not None and cls is not _Tap and not cls.__module__.startswith("torch."):
                    found = found or cls.__name__
            todo.extend(fn for fn, _ in node.next_functions)
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            ns = func.namespace if isinstance(func, torch._ops.OpOverloadPacket) else func.namespace
            if ns not in ("aten", "prim", "prims", "_c10d_functional", "c10d"):
                self._flag(f"custom op {ns}::{getattr(func, '__name__', func)}")
        elif func is Tensor.register_hook:
            self._flag("tensor hook registered in its forward")
        return func(*args, **kwargs)



# --------------------------------------------------------------------------- adapters


def _resolve_modules(model: nn.Module, modules: Any) -> Any:
    """Validate a ``modules`` argument: ``None``, ``"suspects"`` or a list of modules of
    ``model`` (instances or ``named_modules()`` names); returns None, "suspects" or a dict
    qualified name -> module."""
    if modules is None or (isinstance(modules, str) and modules == "suspects"):
        return modules
    if isinstance(modules, (str, nn.Module)) or not isinstance(modules, (list, tuple)):
        raise ValueError(f"`modules` must be None, 'suspects' or a list of modules of `model` (or their names), "
                         f"got {modules!r}"[:300])
    by_id = {id(m): n for n, m in model.named_modules()}
    by_name = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for m in modules:
        if isinstance(m, str):
            if m not in by_name:
                raise ValueError(f"`modules` names {m!r}, which is not a submodule of `model`")
            out[m] = by_name[m]
        elif isinstance(m, nn.Module):
            if id(m) not in by_id:
                raise ValueError(f"`modules` holds a {type(m).__name__} that is not a submodule of `model`")
            out[by_id[id(m)]] = m
        else:
            raise ValueError(f"`modules` must hold nn.Module instances or names, got {type(m).__name__}")
    return out


def _discover(model: nn.Module, loss_fn: Callable, batch: Any, replay: ReplayState) -> dict[str, str]:
    """Suspects of ``model``: one replayed forward (with a graph, dropped at once) from the
    state the training forward started from; RNG, buffers and attributes end as they were."""
    from gradwatch._evaluation import _native_loss
    from gradwatch.replay import _LossModule

    suspects = _Suspects(model)
    try:
        with _isolated(model), suspects:
            _native_loss(_LossModule(model, loss_fn), batch, replay, grad=True)
    except Exception as err:  # the whole-model check reports a replay that fails; no suspects then
        import logging

        logging.getLogger("gradwatch").warning(
            "gradwatch: finding the modules with custom backward code raised %s: %s; no module-local checks",
            type(err).__name__, err)
        return {}
    return suspects.names


def _local_reports(recording: Any, seed: int, options: Mapping[str, Any]) -> list[Report]:
    """The local check of every record (skipped ones with their reason), seeds derived from ``seed``.
    ``recording``: a :class:`_Recording`, an :class:`_OpCalls`, or a list of them."""
    recordings = recording if isinstance(recording, (list, tuple)) else [recording]
    records = [r for rec in recordings for r in rec.records.values()]
    reports = []
    for i, record in enumerate(records):
        s = _derive_seed(seed, i + 1)
        try:
            reports.append(_check_record(record, seed=s, options=options))
        except Exception as err:  # a module the replay cannot run: say so, never stop the training
            reports.append(_skipped_record(record, s, f"its module-local check raised {type(err).__name__}: {err}"))
    return reports


def _float64_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * 8 for t in tensors if t.is_floating_point())
