"""Which modules a module-local check watches (private): suspects and the ``modules`` option.

This module owns:

* :class:`_Suspects` and :func:`_discover`: around one forward, the modules whose forward
  runs custom backward code (a custom ``autograd.Function``, a ``torch.library`` custom op,
  a tensor hook registered in the forward), found on a replayed forward that leaves RNG,
  buffers and attributes as they were;
* the one validator of a ``modules`` argument (:func:`_modules_option`: ``None``,
  ``"suspects"`` or a list of modules or their names) and its resolution against a model
  (:func:`_resolve_modules`: ``None`` / ``"suspects"`` / qualified name -> module), which
  :class:`gradwatch.GradWatch` and the Lightning and Hugging Face callbacks share.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
    >>> _resolve_modules(model, ["0"])
    {'0': Linear(in_features=2, out_features=2, bias=True)}
    >>> _modules_option("all")
    Traceback (most recent call last):
        ...
    ValueError: `modules` must be None, 'suspects' or a list of modules of the model (or their names), got 'all'
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from gradwatch._evaluation import _native_loss
from gradwatch._recording import _Tap
from gradwatch.replay import ReplayState, _isolated, _LossModule

__all__ = ["_Suspects", "_discover", "_modules_option", "_resolve_modules"]


class _Suspects(TorchFunctionMode):
    """Around one forward: the modules whose forward runs custom backward code.

    ``names`` (set on exit, in forward order) maps qualified module names to why: a custom
    ``autograd.Function`` (found on the autograd graph of the modules' outputs), a
    ``torch.library`` custom op, or a tensor hook registered in its forward; a module's
    first one in forward order is its reason. The innermost module whose forward ran it is
    named; the model itself is not (the whole-model check covers it).

    A Function's call is not seen by a ``TorchFunctionMode``; its node on the graph is,
    and autograd numbers the nodes of a thread in the order they are made. So each module
    call keeps the node numbers its forward spanned, the graph of every module's outputs is
    walked once in all (down to the nodes made before the forward), and each Function node
    found goes to the innermost call whose span holds its number: also a Function between
    two child modules, whose walks share no node with it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names: dict[str, str] = {}
        self._stack: list[tuple[str, int]] = []  # open forwards: (name, first node number)
        self._calls: list[tuple[int, int, int, str]] = []  # finished forwards: (first, end, depth, name)
        self._found: list[tuple[int, str | None, str]] = []  # (node number, module or None: to attribute, why)
        self._visited: set = set()  # nodes walked (held, so that no other node takes their id)
        self._start: int | None = None  # the first node number of the first forward
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
        self._visited.clear()  # the graph goes with the forward's outputs
        try:
            self._name()
        finally:
            out = super().__exit__(*exc)
        return out

    def _flag(self, why: str) -> None:
        if self._stack:
            self._found.append((_next_node_number(), self._stack[-1][0], why))

    def _pre(self, name: str) -> Callable:
        def hook(module, args, kwargs):
            first = _next_node_number()
            self._start = first if self._start is None else self._start
            self._stack.append((name, first))
            return None

        return hook

    def _post(self, name: str) -> Callable:
        def hook(module, args, kwargs, output):
            try:
                self._walk(output)
            finally:
                if self._stack:
                    _, first = self._stack.pop()
                    self._calls.append((first, _next_node_number(), len(self._stack), name))
            return None

        return hook

    def _walk(self, output: Any) -> None:
        """Note the custom Function nodes on the graph of ``output`` not walked yet."""
        from torch.autograd.function import BackwardCFunction

        todo = [t.grad_fn for t in pytree.tree_leaves(output) if isinstance(t, Tensor) and t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or node in self._visited:
                continue
            number = node._sequence_nr()
            if number < self._start:  # made before the forward, as is all it reads
                continue
            self._visited.add(node)
            if isinstance(node, BackwardCFunction):
                cls = getattr(node, "_forward_cls", None)
                if cls is not None and cls is not _Tap and not cls.__module__.startswith("torch."):
                    self._found.append((number, None, f"custom autograd.Function {cls.__name__}"))
            todo.extend(fn for fn, _ in node.next_functions)

    def _name(self) -> None:
        """``names`` from what was found: each Function node to the innermost call that made it
        (calls nest: one sweep over both in node order), then the first reason of each module."""
        calls = sorted(self._calls, key=lambda c: (c[0], -c[1], c[2]))  # by first node, outer before inner
        found = sorted(self._found, key=lambda f: f[0])  # stable: a flag before the node it precedes
        open_: list[tuple[int, int, int, str]] = []
        i = 0
        for number, name, why in found:
            if name is None:
                while i < len(calls) and calls[i][0] <= number:
                    while open_ and open_[-1][1] <= calls[i][0]:
                        open_.pop()
                    open_.append(calls[i])
                    i += 1
                while open_ and open_[-1][1] <= number:
                    open_.pop()
                name = open_[-1][3] if open_ else ""
            if name:
                self.names.setdefault(name, why)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            ns = func.namespace if isinstance(func, torch._ops.OpOverloadPacket) else func.namespace
            if ns not in ("aten", "prim", "prims", "_c10d_functional", "c10d"):
                self._flag(f"custom op {ns}::{getattr(func, '__name__', func)}")
        elif func is Tensor.register_hook:
            self._flag("tensor hook registered in its forward")
        return func(*args, **kwargs)


def _next_node_number() -> int:
    """The sequence number autograd gives the next graph node made in this thread."""
    return torch._C._autograd._get_sequence_nr()


def _modules_option(modules: Any) -> Any:
    """Validate a ``modules`` argument (the one validator of gradwatch's ``modules``): ``None``,
    ``"suspects"`` or a list (or tuple) of modules or ``named_modules()`` names; returns it.
    Whether they are modules of the model is checked against it by :func:`_resolve_modules`."""
    if not (modules is None or (isinstance(modules, str) and modules == "suspects") or (
            isinstance(modules, (list, tuple)) and all(isinstance(m, (str, nn.Module)) for m in modules))):
        raise ValueError(f"`modules` must be None, 'suspects' or a list of modules of the model (or their names), "
                         f"got {modules!r}"[:300])
    return modules


def _resolve_modules(model: nn.Module, modules: Any) -> Any:
    """Validate a ``modules`` argument (:func:`_modules_option`) and resolve it against
    ``model``: returns None, "suspects" or a dict qualified name -> module."""
    _modules_option(modules)
    if modules is None or isinstance(modules, str):  # None or "suspects"
        return modules
    by_id = {id(m): n for n, m in model.named_modules()}
    by_name = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for m in modules:
        if isinstance(m, str):
            if m not in by_name:
                raise ValueError(f"`modules` names {m!r}, which is not a submodule of `model`")
            out[m] = by_name[m]
        else:
            if id(m) not in by_id:
                raise ValueError(f"`modules` holds a {type(m).__name__} that is not a submodule of `model`")
            out[by_id[id(m)]] = m
    return out


def _discover(model: nn.Module, loss_fn: Callable, batch: Any, replay: ReplayState) -> dict[str, str]:
    """Suspects of ``model``: one replayed forward (with a graph, dropped at once) from the
    state the training forward started from; RNG, buffers and attributes end as they were."""
    suspects = _Suspects(model)
    try:
        with _isolated(model), suspects:
            _native_loss(_LossModule(model, loss_fn), batch, replay, grad=True)
    except Exception as err:  # the whole-model check reports a replay that fails; no suspects then
        logging.getLogger("gradwatch").warning(
            "gradwatch: finding the modules with custom backward code raised %s: %s; no module-local checks",
            type(err).__name__, err)
        return {}
    return suspects.names
