"""Recording a module's call during training (private): what a module-local check replays.

This module owns the *recording* of calls, nothing about checking them:

* :class:`_Recording` (module hooks) records, for each watched module, its inputs, the RNG
  state and buffers its forward started from, the gradient that flowed into its outputs
  (``grad_out``), the module's own contribution to the gradient of each input
  (``grad_input``) and its parameters' gradients, as a :class:`_Record`;
* :class:`_OpCalls` (a ``TorchFunctionMode``) records one call of each of the given
  ``torch.library`` custom ops the same way, as a :class:`_Record` named ``ns::op`` of an
  :class:`_OpModule` (the call as a module);
* the helpers they share: :class:`_Tap` (the gradient taps), input flattening and naming
  (``input[0]``, ``input[0][1]``, ``input[key]``), :func:`_owned_elsewhere` (tied weights),
  :func:`_op_name` (a custom op's ``ns::name``).

:mod:`gradwatch.local` checks the records, :mod:`gradwatch._references` compares them with
registered references.

Example:
    >>> lin = torch.nn.Linear(3, 2)
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> with _Recording({"lin": lin}) as rec:
    ...     lin(x).sum().backward()
    >>> record = rec.records["lin"]
    >>> record.problem(), record.inputs, sorted(record.param_grads)
    (None, {0: 'input[0]'}, ['bias', 'weight'])
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from typing import Any, Callable, Container, Mapping

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from gradwatch.replay import ReplayState, capture

__all__ = ["_Record", "_Recording", "_OpCalls", "_OpModule", "_Tap", "_op_name", "_owned_elsewhere"]


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
        grad_outputs: Gradient that flowed into each of those outputs (None: none did), contiguous.
        grad_output_strides: The strides that gradient arrived with (a capsule's autograd replay
            rebuilds that memory layout: a backward may mishandle a non-contiguous one).
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
    grad_output_strides: dict = dataclasses.field(default_factory=dict)
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
        if kind == "out":
            self.grad_output_strides[k] = tuple(grad.stride())
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


class _OpCalls(TorchFunctionMode):
    """Records one call of each custom op in ``ops`` during a step, as a :class:`_Record` named
    after the op (``gwtest::attention``; its tensors ``gwtest::attention::input[0]``). ``ops``:
    the ``ns::name`` of the ops to record, consulted at each call (the adapters pass the live
    registry of ops with a reference, :data:`gradwatch._references._REFERENCES_BY_OP`).
    ``turns`` (op name -> call index, kept by the adapter from one check step to the next)
    says which call: the first at the first check step, then the next one at each check step,
    cycling through the calls the op made in the last step, so every call site (each layer's)
    is checked in turn."""

    def __init__(self, ops: Container[str], turns: dict[str, int] | None = None) -> None:
        super().__init__()
        self.ops = ops
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
        if name is None or name not in self.ops:
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
