"""Sharded training (FSDP2, ``torch.distributed.fsdp.fully_shard``) for the adapters (private).

Under ``fully_shard`` every parameter is a ``DTensor`` holding this rank's shard (dim 0,
uneven when the rows do not divide). Inside an FSDP unit's forward (after FSDP's
forward pre-hook) the unit's own parameters are plain, full ``nn.Parameter``s, and the
gradient autograd sends to them is this rank's local gradient; FSDP's post-backward
then reduce-scatters it into ``.grad``, a sharded ``DTensor`` holding the mean over
ranks (``.grad.full_tensor()`` equals the mean of the ranks' local gradients exactly,
measured on CPU/gloo with torch 2.13). Calling an FSDP unit outside the root's forward
(``functional_call`` included) breaks FSDP's lazy initialisation, so a check must not.

What a check does here:

* :class:`_LocalGrads` hooks, in a forward pre-hook of each FSDP unit (which runs after
  FSDP's), the unsharded parameters and records the local gradient of the step
  (before reduce-scatter); :meth:`_LocalGrads.mean` averages it over ranks, which is
  what data-parallel ``.grad`` holds. It reads no ``.grad``, so a gradient accumulated
  over earlier backwards does not enter it.
* :func:`_unsharded` gathers every sharded parameter (``full_tensor()``, in
  ``named_modules`` order, the same on every rank), puts the full tensors in place of the
  shards and suspends FSDP's forward hooks, so that the engine sees a plain module with
  full parameters and its evaluations run no collective; everything is put back after.
* :func:`_share_records` makes module-local records (:mod:`gradwatch._recording`) agree across
  ranks: parameter *and input* gradients averaged over ranks (the directions are the same
  on every rank, so the mean of the ranks' local directional derivatives is what the
  averaged gradients predict), skip reasons shared, reference comparisons made per rank
  and the worst over ranks kept.
* :class:`_Guard` makes the check's collectives safe when one rank raises inside it:
  each collective is preceded by an all-reduced error flag, and a rank that raises sends
  the flag set (once) instead of its next collective; the other ranks then raise too,
  instead of waiting for a collective that never comes. Not covered: a float64 evaluation
  that raises on some ranks only under ``precision="auto"`` (the engine falls back to
  native evaluation on those ranks alone, inside the check); float64 support is a
  property of the code, so it fails on every rank alike in practice.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Collection, Iterator, Mapping

import torch
from torch import Tensor, nn

from gradwatch._references import _reference_checks
from gradwatch._seeds import _derive_seed
from gradwatch.local import _check_record, _skipped_record
from gradwatch.options import ProbeOptions

__all__: list[str] = []


def _is_dtensor(t: Any) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _fsdp_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The FSDP2 units (``fully_shard`` modules) in ``model``, with their names."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]


def _sharding(model: nn.Module) -> str | None:
    """``"fsdp2"`` for a model with ``fully_shard`` units, ``None`` for a plain model.

    Raises:
        ValueError: For sharded parameters gradwatch cannot check (FSDP1 flat parameters,
            DTensors of tensor parallelism), saying what to use instead.
    """
    params = list(model.parameters())
    if any(type(p).__name__ == "FlatParameter" for p in params):
        raise ValueError(
            "gradwatch cannot check FullyShardedDataParallel (FSDP1) flat parameters: shard the model with "
            "torch.distributed.fsdp.fully_shard (FSDP2) instead (in Lightning: ModelParallelStrategy with "
            "fully_shard in configure_model), or train with DDP"
        )
    dtensors = [p for p in params if _is_dtensor(p)]
    if not dtensors:
        return None
    managed = set()
    for _, unit in _fsdp_units(model):
        group = unit._get_fsdp_state()._fsdp_param_group
        managed.update(id(fp.sharded_param) for fp in (group.fsdp_params if group is not None else ()))
    if any(id(p) not in managed for p in dtensors):
        raise ValueError(
            "gradwatch checks sharded parameters of torch.distributed.fsdp.fully_shard (FSDP2) only; this model "
            "has DTensor parameters that no fully_shard unit manages (tensor parallelism): check it with data or "
            "fully sharded parallelism alone"
        )
    return "fsdp2"


def _is_fsdp_hook(hook: Any) -> bool:
    return getattr(hook, "__module__", "").startswith("torch.distributed.fsdp")


@contextmanager
def _unsharded(model: nn.Module) -> Iterator[None]:
    """Full parameters in place of the shards, and FSDP's forward hooks suspended.

    Gathers every sharded parameter (one all-gather each, in the same order on every
    rank): memory of one full copy of the model's parameters. Shared (tied) parameters
    stay shared. On exit the shards (the same objects) and the hooks are put back.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    full: dict[int, nn.Parameter] = {}
    suspended: list[tuple[dict, dict]] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                for name, p in list(module._parameters.items()):
                    if p is None or not _is_dtensor(p):
                        continue
                    if id(p) not in full:
                        full[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                    swapped.append((module, name, p))
                    module._parameters[name] = full[id(p)]
        for _, unit in _fsdp_units(model):
            for hooks in (unit._forward_pre_hooks, unit._forward_hooks):
                saved = dict(hooks)
                for key in [k for k, h in hooks.items() if _is_fsdp_hook(h)]:
                    del hooks[key]
                suspended.append((hooks, saved))
        yield
    finally:
        for hooks, saved in suspended:
            hooks.clear()
            hooks.update(saved)  # the same hooks in the same order
        for module, name, p in reversed(swapped):
            module._parameters[name] = p


class _LocalGrads:
    """Records, during one training step, each parameter's local (unsharded) gradient.

    A forward pre-hook on every FSDP unit (after FSDP's, which unshards the unit's
    parameters) registers a tensor hook on each of the unit's full parameters, once per
    step; parameters outside every unit (plain tensors) are hooked directly. With ``names``,
    only those parameters are recorded (the memory of their full gradients only).
    :meth:`remove` takes every hook off.
    """

    def __init__(self, model: nn.Module, names: Collection[str] | None = None) -> None:
        self.grads: dict[str, Tensor] = {}
        self._names = None if names is None else frozenset(names)  # None: every parameter
        self._hooked: set[int] = set()
        self._tensor_handles: list[Any] = []
        self._handles = [
            unit.register_forward_pre_hook(partial(self._pre_forward, prefix))
            for prefix, unit in _fsdp_units(model)
        ]
        for name, p in model.named_parameters():  # parameters outside every unit stay plain: hooked directly
            if not _is_dtensor(p) and p.requires_grad and self._wanted(name):
                self._hooked.add(id(p))
                self._tensor_handles.append(p.register_hook(partial(self._record, name)))

    def _pre_forward(self, prefix: str, unit: nn.Module, args: Any) -> None:
        for name, p in unit.named_parameters(prefix=prefix):
            if _is_dtensor(p) or not p.requires_grad or id(p) in self._hooked or not self._wanted(name):
                continue  # a nested unit's shard (its own hook records it), done, or not wanted
            self._hooked.add(id(p))
            self._tensor_handles.append(p.register_hook(partial(self._record, name)))

    def _wanted(self, name: str) -> bool:
        return self._names is None or name in self._names

    def _record(self, name: str, grad: Tensor) -> None:
        previous = self.grads.get(name)
        self.grads[name] = grad.detach() if previous is None else previous + grad.detach()

    def remove(self) -> None:
        for handle in [*self._handles, *self._tensor_handles]:
            handle.remove()
        self._handles, self._tensor_handles = [], []

    def mean(self, model: nn.Module) -> dict[str, Tensor]:
        """The mean over ranks of the recorded gradients (what data-parallel ``.grad`` holds).

        A parameter that received a gradient on some rank only counts zero on the others.
        Two collectives per parameter at most, in ``named_parameters`` order.
        """
        params = dict(model.named_parameters())
        names = list(params)
        device = _local_device(next(iter(params.values())))  # NCCL reduces device tensors only
        present = torch.tensor([float(n in self.grads) for n in names], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(present)
        world = torch.distributed.get_world_size()
        out = {}
        for name, flag in zip(names, present.tolist()):
            if flag == 0:
                continue
            p = params[name]
            g = self.grads.get(name)
            g = torch.zeros(p.shape, dtype=p.dtype, device=_local_device(p)) if g is None else g.clone()
            torch.distributed.all_reduce(g)
            out[name] = g / world
        return out


def _local_device(p: Tensor) -> torch.device:
    return p.to_local().device if _is_dtensor(p) else p.device


class _PeerSkipped(RuntimeError):
    """Raised, inside one module-local check, on the ranks whose check of that module went on
    while another rank's raised: every rank then skips that module (:meth:`_Guard.record_done`)."""


class _PeerFailed(RuntimeError):
    """Raised on every rank whose check was cut short because another rank's check raised."""


class _Guard:
    """Collectives of one check that cannot hang when a rank raises in between.

    Every :meth:`reduce` (a cross-rank mean) and :meth:`broadcast` is preceded by a
    one-element all-reduce of an error flag. A rank that raises inside the check calls
    :meth:`abort` (the flag set, once) before re-raising; every other rank then raises
    :class:`_PeerFailed` (a ``RuntimeError``) at its next collective instead of waiting for a partner.
    """

    _ABORT, _SKIP = 1.0, 1024.0  # flags: counts of aborting and of skipping ranks, in one sum

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.world = torch.distributed.get_world_size()
        self.peer_failed: str | None = None  # what the first collective after a peer's failure raised
        self.skipping = False  # a peer's module-local check raised: skip that module, no collective until done

    def _header(self, flag: float) -> None:
        if self.peer_failed:  # no collective after a peer's failure (the engine may retry natively): the same error
            raise _PeerFailed(self.peer_failed)
        if self.skipping:
            raise _PeerSkipped("gradwatch: this module's local check raised on another rank")
        header = torch.tensor([flag], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(header)
        total = int(header.item())
        failed, skipped = total % int(self._SKIP), total // int(self._SKIP)
        if failed and flag != self._ABORT:
            self.peer_failed = (f"gradwatch: the check raised on {failed} other rank(s) of {self.world}; "
                                "see that rank's error")
            raise _PeerFailed(self.peer_failed)
        if skipped and not flag:
            self.skipping = True
            raise _PeerSkipped("gradwatch: this module's local check raised on another rank")

    def record_done(self, *, failed: bool) -> None:
        """The end of one module-local check on this rank (a collective unless a peer already
        ended it by raising). Raises :class:`_PeerSkipped` when another rank's check of the
        module raised; ``failed``: this rank's did."""
        if self.skipping:  # a peer's raise already paired with one of our collectives
            self.skipping = False
            return
        self._header(self._SKIP if failed else 0.0)

    def reduce(self, values: Tensor) -> Tensor:
        self._header(0.0)
        out = values.clone()
        torch.distributed.all_reduce(out)
        return out / self.world

    def maximum(self, values: Tensor) -> Tensor:
        self._header(0.0)
        out = values.clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        self._header(0.0)
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        self._header(0.0)
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def abort(self) -> None:
        """Tell the other ranks that this rank's check raised (unless it raised because of theirs)."""
        if not self.peer_failed:
            self._header(self._ABORT)


def _share_records(records: Mapping[str, Any], local: Mapping[str, Tensor], mean: Mapping[str, Tensor],
                   guard: "_Guard") -> dict[str, tuple]:
    """Make the module-local records of one step agree across ranks, for checks with ``reduce``.

    Call it with the parameters gathered (:func:`_unsharded`). ``records`` are
    :class:`gradwatch._recording._Record`s by qualified module name (rank-local inputs, outputs
    and gradients); ``local`` and ``mean`` the parameters' local gradients and their means
    over ranks (:class:`_LocalGrads`), by model-level name. Each record's parameter
    gradients become those means (the tensor hooks of a record cannot see FSDP's unsharded
    parameters), and its input gradients are averaged over ranks too: with the same probe
    directions on every rank, the mean of the ranks' directional derivatives of
    ``<grad_out, f(x; θ)>`` is then exactly what the averaged gradients predict. A record
    that cannot be checked on some rank (its reason), or whose inputs differ in shape across
    ranks, is skipped on every rank with that reason.

    Returns:
        Per record name, its comparisons with a registered reference, made on each rank
        with its own inputs and local gradients, then agreed: the largest ``error_ratio``
        and ``rel_diff`` over ranks decide (a comparison skipped on some rank is skipped).
    """
    references: dict[str, tuple] = {}
    for name, record in records.items():
        prefix = f"{name}." if name else ""
        names = {pname: prefix + pname for pname, _ in record.module.named_parameters()}
        record.param_grads = {p: local[n] for p, n in names.items() if n in local and record.calls == 1}
        problem = record.problem()
        refs = _reference_checks(record) if problem is None else ()  # the module's own (local) gradients
        record.param_grads = {p: mean[n] for p, n in names.items() if n in mean and record.calls == 1}
        problem = problem or record.problem()
        inputs = [(n, tuple(record.grad_inputs[n].shape)) for n in record.inputs.values() if n in record.grad_inputs]
        quantities = [(r.quantity, r.verdict == "skipped") for r in refs]
        signatures = guard.all_gather((problem, inputs, quantities))
        problems = [p for p, _, _ in signatures if p is not None]
        if problems:
            record.reason = problem or problems[0]
            continue
        if any(sig[1:] != signatures[0][1:] for sig in signatures):
            record.reason = (f"its inputs differ across ranks ({[sig[1] for sig in signatures]}): the ranks' "
                             "input gradients cannot be averaged, so it is not checked locally under FSDP")
            continue
        if inputs:
            record.grad_inputs.update(
                {n: g for (n, _), g in zip(inputs, _split(guard.reduce, [record.grad_inputs[n] for n, _ in inputs]))})
        judged = [r for r in refs if r.verdict != "skipped"]
        if judged:
            worst = guard.maximum(torch.tensor([[r.error_ratio, r.rel_diff] for r in judged], dtype=torch.float64,
                                               device=guard.device).reshape(-1)).reshape(-1, 2).tolist()
            agreed = iter([dataclasses.replace(r, error_ratio=ratio, rel_diff=rel,
                                               verdict="fail" if ratio > 1 else "pass")
                           for r, (ratio, rel) in zip(judged, worst)])
            refs = tuple(next(agreed) if r.verdict != "skipped" else r for r in refs)
        references[name] = refs
    return references


def _split(reduce: Any, tensors: list[Tensor]) -> list[Tensor]:
    """``reduce`` applied to every tensor in one call."""
    flat = reduce(torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]))
    return [part.view_as(t).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _local_reports(records: Mapping[str, Any], seed: int, options: ProbeOptions, references: Mapping[str, tuple],
                   guard: _Guard, *, reduce: Callable[[Tensor], Tensor]) -> list:
    """Every record's local check (with ``reduce``, the guard's :meth:`_Guard.reduce`) and its
    agreed reference comparisons; seeds derived from ``seed`` as :func:`gradwatch.local._local_reports`
    does. A check that raises on some rank skips that module on every rank, saying so, and
    training goes on (as without FSDP)."""
    reports = []
    for i, (name, record) in enumerate(records.items()):
        s = _derive_seed(seed, i + 1)
        try:
            report = _check_record(record, seed=s, options=options, reduce=reduce, reference=False)
            guard.record_done(failed=False)
        except _PeerSkipped:
            guard.skipping = False
            report = _skipped_record(record, s, "its module-local check raised on another rank")
        except _PeerFailed:
            raise
        except Exception as err:  # a module the replay cannot run: say so, never stop the training
            guard.record_done(failed=True)
            report = _skipped_record(record, s, f"its module-local check raised {type(err).__name__}: {err}")
        if references.get(name) and record.problem() is None and report.reason is None:
            report = dataclasses.replace(report, references=references[name])
        reports.append(report)
    return reports
