"""Evaluation: runs ``loss_fn`` on replayed state, in float64 or the model's own precision.

One room of the engine (see :mod:`gradwatch.engine`): :class:`_Evaluation` evaluates the
loss at given parameter values from the captured RNG state and buffers (sequentially, or
batched with ``torch.func.vmap``), and :class:`_HostValues` gathers the device scalars a
check produces so they reach the host in one transfer.
"""

from __future__ import annotations

import re

import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

# _dtype_name is re-exported: engine, _judging and local import it from here
from gradwatch import _sizes
from gradwatch._float64 import _EPS, _dtype_name, _Float64Ops, _NativeDraws
from gradwatch.kinks import _BranchRecorder, _ProbeKinks, _Reference
from gradwatch.replay import (
    ReplayState,
    _autocast,
    _cast_floats,
    _DefaultDtype,
    _LossModule,
    _restore_attrs,
    _restore_rng,
)

__all__: list[str] = []

#: Base step for float64 central differences, ``≈ eps64^(1/3)``; scaled by ``max(1, |θ|)``.
#: Native evaluation uses ``eps^(1/3)`` of the parameter's dtype.
DEFAULT_STEP = 6e-6
#: Batched and sequential unperturbed losses must agree to this relative tolerance.
_BATCH_RTOL = 64 * torch.finfo(torch.float64).eps
#: The points of one probe, in evaluation order: θ + h·v, θ - h·v, θ + 2h·v, θ - 2h·v.
_SIGNS = (1.0, -1.0, 2.0, -2.0)
#: A float64 copy of more than this fraction of all copied elements (and more than
#: :data:`_ALONE_ELEMENTS`) gets its reference gradient in a backward of its own, without its
#: copy (:meth:`_Evaluation._widened_pass`): a module-local check of one large Linear would
#: otherwise hold its copy and its reference gradient together, 2x the copy.
_ALONE = 0.25
_ALONE_ELEMENTS = 1 << 18


def _reduced(tensors: dict[str, Tensor], reduce: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """Apply ``reduce`` to every tensor of ``tensors`` in one call (one collective)."""
    flat = _apply_reduce(reduce, torch.cat([t.reshape(-1) for t in tensors.values()]))
    parts = flat.split([t.numel() for t in tensors.values()])
    return {n: part.view_as(t) for (n, t), part in zip(tensors.items(), parts)}


def _apply_reduce(reduce: Callable[[Tensor], Tensor], stacked: Tensor) -> Tensor:
    reduced = reduce(stacked)
    if not isinstance(reduced, Tensor) or reduced.shape != stacked.shape:
        raise TypeError(
            f"`reduce` must return a tensor of shape {tuple(stacked.shape)}, got {type(reduced).__name__} "
            f"{tuple(getattr(reduced, 'shape', ()))}"
        )
    return reduced


def _choose_precision(precision: str, model: nn.Module, replay: ReplayState, budget: int) -> tuple[str, str]:
    """The evaluation precision and why."""
    if precision == "float64":
        return "float64", "requested"
    if precision == "native":
        return "native", "requested"
    tensors = [p for p in model.parameters()] + list(replay.buffers.values())
    size = sum(t.numel() * 8 for t in tensors if t.is_floating_point())
    if size > budget:
        return "native", f"the float64 copy would take {size / 2**20:.0f} MiB > max_shadow_bytes {budget / 2**20:.0f} MiB"
    return "float64", f"the float64 copy takes {size / 2**20:.2f} MiB <= max_shadow_bytes {budget / 2**20:.0f} MiB"


class _HostValues:
    """Collects device scalars and brings them to the host in one transfer per device.

    With ``reduce`` (a cross-process mean of a 1-D float64 tensor), all values are
    stacked on one device, reduced in one call, then transferred once.

    A scalar is kept as it was added (a one-element tensor, or a host number) and
    converted by :meth:`fetch` (CPU values are read one by one there: nothing to transfer):
    on a tiny op, reshaping and casting each of the ~40 scalars of a check as it comes took
    ~0.15 ms of a ~4 ms check. Rows added with :meth:`extend` are copied to float64 at once
    (their tensor may be updated later, as kink flags are).
    """

    def __init__(self, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self._values: list[Tensor | float] = []
        self._starts: list[int] = []
        self._counts: list[int] = []
        self._size = 0
        self.reduce = reduce

    def add(self, value: Tensor | float | bool) -> int:
        """Add one value (a one-element tensor or a number); returns its index."""
        if isinstance(value, Tensor):
            if value.numel() != 1:
                return self.extend(value)[0]
        else:
            value = float(value)
        return self._append(value, 1)[0]

    def extend(self, values: Tensor) -> range:
        """Add every element of ``values``; returns their indices."""
        values = values.detach().reshape(-1)
        if values.dtype != torch.float64:
            values = values.to(torch.float64)
        return self._append(values, values.numel())

    def _append(self, value: Tensor | float, n: int) -> range:
        self._values.append(value)
        self._starts.append(self._size)
        self._counts.append(n)
        self._size += n
        return range(self._size - n, self._size)

    def fetch(self) -> list[float]:
        values = self._values
        if self.reduce is None and all(not isinstance(v, Tensor) or v.device.type == "cpu" for v in values):
            # on the host already (nothing to transfer): each value is read where it is, in order
            out: list[float] = []
            for v, n in zip(values, self._counts):
                if not isinstance(v, Tensor):
                    out.append(v)
                elif n == 1:
                    out.append(float(v.item()))
                else:
                    out.extend(v.tolist())
            return out
        out = [0.0] * self._size
        if self.reduce is not None:
            device = next((v.device for v in values if isinstance(v, Tensor) and v.device.type != "cpu"),
                          torch.device("cpu"))
            stacked = torch.cat([_row(v, device) for v in values])
            reduced = _apply_reduce(self.reduce, stacked)
            return reduced.to(torch.float64).cpu().tolist()
        by_device: dict[torch.device, list[int]] = {}
        for i, v in enumerate(values):
            if isinstance(v, Tensor):
                by_device.setdefault(v.device, []).append(i)
            else:
                out[self._starts[i]] = v
        for idx in by_device.values():
            host = torch.cat([_row(values[i]) for i in idx]).cpu().tolist()
            pos = 0
            for i in idx:
                n = self._counts[i]
                out[self._starts[i] : self._starts[i] + n] = host[pos : pos + n]
                pos += n
        return out


def _row(value: Tensor | float, device: torch.device | None = None) -> Tensor:
    """A value of :class:`_HostValues` as a 1-D float64 tensor (on ``device`` when given)."""
    if not isinstance(value, Tensor):
        return torch.tensor([value], dtype=torch.float64, device=device)
    return value.detach().reshape(-1).to(device=device if device is not None else value.device, dtype=torch.float64)


class _Evaluation:
    """Runs ``loss_fn`` on replayed state, in float64 or in the model's own precision."""

    def __init__(
        self, model: nn.Module, loss_fn: Callable, batch: Any, replay: ReplayState, kinks: bool, mode: str,
        how: str = "sequential", reduced: bool = False, richardson: bool = True, *,
        share: "_Evaluation | None" = None,
    ) -> None:
        self.wrapper = _LossModule(model, loss_fn)
        # another evaluation of the same model and precision whose float64 copy this one uses
        self._owner = share if share is not None and share.float64 == (mode == "float64") else None
        self.signs = _SIGNS if richardson else _SIGNS[:2]  # the points of every probe
        # batched: None until the first batched call succeeds (True) or fails (False)
        self.batched: bool | None = False
        if how == "sequential":
            self.batch_reason: str | None = "requested (evaluation='sequential')"
        elif kinks:
            self.batch_reason = "kink recording needs one forward pass per evaluation (kinks=True)"
        elif reduced:
            self.batch_reason = "data-parallel check (reduce): every process runs the same sequential forwards"
        elif mode != "float64":
            self.batch_reason = "native precision evaluates sequentially"
        else:
            self.batched, self.batch_reason = None, None
        self.loss0: Tensor | None = None  # the sequential unperturbed loss, set after the unperturbed pass
        # the backward code that is not torch's own on the reference pass's graph (custom
        # autograd.Functions, custom ops: they may compute below float64), by name; None: not looked
        # at (evaluations with the ±2h passes always measure their precision)
        self.kernels: tuple[str, ...] | None = None
        self.own_reference = False  # no unperturbed pass: each probe's +h pass is its kink reference
        self.batch = batch
        self.replay = replay
        self.mode = mode
        # without Richardson passes (the smallest budgeted check) crossings are recorded, margins are not
        names = {id(m): n for n, m in model.named_modules()}
        self.recorder = _BranchRecorder(names, margins=richardson) if kinks else None
        self.float64 = mode == "float64"
        self.loss_dtype: torch.dtype | None = None
        # float64: casts to a lower precision keep float64, random ops draw in the native dtype
        floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
        self.ops = (
            _Float64Ops(floating[0] if floating else torch.get_default_dtype(), torch.get_default_dtype(), names,
                        replay.autocast)
            if self.float64 else None
        )
        if self.ops is not None and any(enabled for enabled, _ in replay.autocast.values()):
            # under autocast the native dtype of an activation is not the parameter dtype: one
            # native replay records the dtype of every random draw (the replay restores all state)
            recorder = _NativeDraws()
            with recorder:
                _native_loss(self.wrapper, batch, replay, grad=False)
            self.ops.native_draws = recorder.dtypes
        self._params = {f"model.{n}": p for n, p in model.named_parameters()}
        self._shadow: dict[str, Tensor] | None = None
        with torch.no_grad():
            if self.float64 and self._owner is not None:
                self._own = self._owner._own
            elif self.float64:
                self._shadow = self._float64_copy()
                # a tensor of the shadow that is a copy (not the float64 parameter itself) is
                # perturbed in place and restored by copying the parameter back (exact)
                self._own = {k: v.data_ptr() != self._params[k].data_ptr() or v.numel() == 0
                             for k, v in self._shadow.items() if v.is_floating_point()}
            if self.float64:
                self.buffers = {
                    f"model.{n}": b.to(torch.float64) if b.is_floating_point() else b
                    for n, b in replay.buffers.items()
                }
                self.inputs = _cast_floats(batch, torch.float64)
            else:  # the parameters themselves: perturbed points are always new tensors
                self._owner = None
                self._shadow = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
                self._own = {}
                self.buffers = {f"model.{n}": b for n, b in replay.buffers.items()}
                self.inputs = batch

    def _float64_copy(self) -> dict[str, Tensor]:
        return {
            k: p.detach().to(torch.float64).contiguous() if p.is_floating_point() else p.detach()
            for k, p in self._params.items()
        }

    @property
    def shadow(self) -> dict[str, Tensor]:
        """The float64 copy of the parameters (the parameters themselves natively), made
        again from the parameters (exactly) after :meth:`release`."""
        if self._owner is not None:
            return self._owner.shadow
        if self._shadow is None:
            with torch.no_grad():
                self._shadow = self._float64_copy()
        return self._shadow

    def release(self) -> None:
        """Free the float64 copy while the check runs native replays; :attr:`shadow` makes it again."""
        if self.float64:
            self._shadow = None

    def in_place(self, key: str) -> bool:
        """Whether tensor ``key`` of the shadow is a float64 copy that may be perturbed in place."""
        return self._own.get(key, False)

    @contextmanager
    def moved(self, steps: Iterator[tuple[str, Callable[[Tensor], None]]]) -> Iterator[dict[str, Tensor]]:
        """The shadow with ``move(theta)`` applied in place to tensor ``key`` for each
        ``(key, move)`` of ``steps`` (taken one at a time, so only one tensor's temporaries
        live at once); every moved tensor is restored on exit by copying the parameter back,
        exactly. Only for tensors :meth:`in_place` allows."""
        shadow = self.shadow
        touched = []
        try:
            with torch.no_grad():
                for key, move in steps:
                    touched.append(key)
                    move(shadow[key])
            yield shadow
        finally:
            with torch.no_grad():
                for key in touched:
                    shadow[key].copy_(self._params[key].detach())

    @contextmanager
    def moved_along(self, keys: list[str], steps: list[Tensor], alpha: float) -> Iterator[dict[str, Tensor]]:
        """:meth:`moved` with tensor ``keys[i]`` moved by ``alpha·steps[i]``, all at once (one
        ``torch._foreach`` call each way instead of two ops per tensor: on a tiny op every
        launch costs as much as the arithmetic), restored by copying the parameters back. For
        small tensors, whose ``steps`` may all be held."""
        shadow = self.shadow
        if not keys:  # nothing to move
            yield shadow
            return
        thetas = [shadow[key] for key in keys]
        try:
            with torch.no_grad():
                torch._foreach_add_(thetas, steps, alpha=alpha)
            yield shadow
        finally:
            with torch.no_grad():
                torch._foreach_copy_(thetas, [self._params[key].detach() for key in keys])

    @property
    def lossy(self) -> bool:
        """True when the float64 evaluation returned a loss below float64."""
        return self.float64 and self.loss_dtype not in (None, torch.float64)

    @property
    def lowest_dtype(self) -> torch.dtype | None:
        """The lowest floating precision the evaluation computed in: the loss dtype natively;
        in float64, the lowest dtype an op returned (an op that returns float32 from float64
        inputs even so, such as a custom kernel), which sets the loss's rounding floor."""
        if self.ops is None or self.loss_dtype is None:
            return self.loss_dtype
        low = self.ops.lowest
        return self.loss_dtype if _EPS.get(self.loss_dtype, 0.0) > _EPS[low] else low

    @property
    def usable(self) -> bool:
        """False when probing would measure nothing: the float64 evaluation returned a loss
        below float64 (:attr:`lossy`) or cannot draw the training forward's random numbers
        (:attr:`unreplayable`); the check is then unreliable."""
        return not (self.lossy or self.unreplayable)

    @property
    def unreplayable(self) -> str | None:
        """Why the float64 evaluation cannot draw the training forward's random numbers, else None."""
        return self.ops.unreplayable if self.ops is not None else None

    @property
    def kept_casts(self) -> tuple[int, tuple[str, ...]]:
        """Casts to a lower precision kept in float64 per evaluation, and the first few sites."""
        return (self.ops.kept, tuple(self.ops.sites)) if self.ops is not None else (0, ())

    def step(self, dtype: torch.dtype) -> float:
        """Default base step: 6e-6 in float64; natively ``eps^(1/4)`` of ``dtype`` with the
        ``±2h`` passes (the probe is Richardson's extrapolation, ``O(h⁴)``: a larger step
        divides the rounding less) and ``eps^(1/3)`` without or in a 16-bit dtype. Scaled by the tensor's
        magnitude (:func:`gradwatch._probing._magnitude`)."""
        if self.float64:
            return DEFAULT_STEP
        eps = float(torch.finfo(dtype).eps)
        # (16-bit dtypes keep eps^(1/3), ~0.2 of the magnitude already: a larger move is no derivative)
        return eps ** (1 / 4) if len(self.signs) == 4 and dtype.itemsize >= 4 else eps ** (1 / 3)

    def native(self) -> Tensor:
        """The unperturbed loss in the model's own dtype, replayed (no graph)."""
        return _native_loss(self.wrapper, self.batch, self.replay, grad=False).detach()

    def _context(self):
        if self.float64:
            return _DefaultDtype(torch.float64), _autocast(None)
        return nullcontext(), _autocast(self.replay.autocast)

    def __call__(
        self, params: Mapping[str, Tensor], *, kinks: _ProbeKinks | None = None, grad: bool = False,
        record: bool = True,
    ) -> tuple[Tensor, _Reference | None]:
        """The loss at ``params``. Without ``kinks`` it also records the reference
        branches (None when kinks are off or ``record`` is False); with ``kinks`` the
        branches are compared with its reference and folded into it."""
        _restore_attrs(self.replay.attrs)
        _restore_rng(self.replay.rng)
        state = dict(params)
        state.update({k: v.clone() for k, v in self.buffers.items()})
        dtype_ctx, autocast_ctx = self._context()
        recording = self.recorder is not None and (record or kinks is not None)
        recorder = self.recorder.compare_into(kinks) if recording else nullcontext()
        rules = self.ops.active(self.recorder if recording else None) if self.ops is not None else nullcontext()
        try:
            with torch.set_grad_enabled(grad), dtype_ctx, autocast_ctx, recorder, rules:
                out = _call(self.wrapper, state, (self.inputs,))
        except Exception as err:
            where = "on the float64 copy of the model" if self.float64 else "in the model's own precision"
            err.add_note(
                f"gradwatch: raised while evaluating `loss_fn` {where}; "
                "the model, its buffers, .grad and the RNG stream were restored."
            )
            raise
        signature = self.recorder.take_reference() if recording and kinks is None else None
        loss = _loss_tensor(out)
        self.loss_dtype = loss.dtype
        return loss, signature

    def base(
        self, grad_map: Mapping[str, Tensor], reference: bool = True,
        stats: Callable[[str, Tensor], Any] | None = None,
    ) -> tuple[Tensor, Any, dict[str, Any] | None]:
        """Unperturbed loss, its signature, and in float64 (with ``reference``) the
        reference gradient: per tensor the gradient itself, or with ``stats`` the value of
        ``stats(name, g_ref)``, computed as the backward produces ``g_ref``, which is
        then dropped (the reference gradient is never held whole)."""
        if self.own_reference:
            return None, None, None
        if not (self.float64 and reference):
            loss, signature = self(self.shadow)
            return loss.detach().to(torch.float64), signature, None
        return self._reference(list(grad_map), list(grad_map), stats, record=True)

    def reference(self, grad_map: Mapping[str, Tensor], names: list[str],
                  stats: Callable[[str, Tensor], Any]) -> dict[str, Any] | None:
        """``stats(name, g_ref)`` of the float64 reference gradient of each tensor of
        ``names``, from a float64 forward and backward run again (the reference is not
        kept between uses); None when its backward does not run in float64."""
        return self._reference(list(grad_map), names, stats, record=False)[2]

    def _reference(self, every: list[str], names: list[str], stats: Callable[[str, Tensor], Any] | None,
                   record: bool) -> tuple[Tensor, Any, dict[str, Any] | None]:
        # one float64 forward and backward for all tensors, and one more for each tensor whose
        # float64 copy is large next to the whole copy (see _ALONE); the first pass records
        alone = self._alone(names) if stats is not None else []
        rest = [n for n in names if n not in alone]
        results: dict[str, Any] = {}
        loss, signature, complete = None, None, True
        for i, group in enumerate(([rest] if rest or not alone else []) + [[n] for n in alone]):
            widen = group[0] in alone
            out, sig, grads = (self._widened_pass if widen else self._reference_pass)(
                group, stats, results, record and i == 0)
            if i == 0:
                loss, signature = out, sig
            complete = complete and grads is not None
            if grads is not None and stats is None:
                results.update(grads)
            del grads
        reference = None
        if complete and stats is None:
            reference = {n: results[n] for n in names}
        elif complete:  # unused tensors: a zero gradient, never produced by the backward
            reference = {n: results[n] if n in results else stats(n, self._zero(n)) for n in names}
        return loss, signature, reference

    def _alone(self, names: list[str]) -> list[str]:
        """The tensors of ``names`` whose reference gradient is taken in a backward of its
        own (:meth:`_widened_pass`): float64 copies (not float64 parameters) of more than
        :data:`_ALONE_ELEMENTS` elements and :data:`_ALONE` of every copied element."""
        if not self.float64 or self._owner is not None:
            return []
        total = sum(t.numel() for k, t in self.shadow.items() if self._own.get(k))
        return [n for n in names if self._own.get(f"model.{n}") and
                (size := self.shadow[f"model.{n}"].numel()) > _ALONE_ELEMENTS and size > _ALONE * total]

    def _zero(self, name: str) -> Tensor:
        p = self._params[f"model.{name}"]
        return torch.zeros(p.shape, dtype=torch.float64, device=p.device)

    def _reference_pass(self, names: list[str], stats: Callable[[str, Tensor], Any] | None,
                        results: dict[str, Any], record: bool) -> tuple[Tensor, Any, dict[str, Tensor] | None]:
        """A float64 forward and backward of the shadow with ``names`` as leaves: the loss, its
        signature, and the gradients (None when the backward is not float64); with ``stats``,
        each tensor's ``stats(name, g_ref)`` goes to ``results`` as the backward produces it."""
        leaves = {f"model.{n}": self.shadow[f"model.{n}"].detach().requires_grad_(True) for n in names}
        handles = [] if stats is None else [
            leaf.register_hook(_streamed(key[len("model."):], stats, results)) for key, leaf in leaves.items()
        ]
        try:
            loss, signature = self({**self.shadow, **leaves}, grad=True, record=record)
            if record and len(self.signs) < len(_SIGNS):  # only the smallest check reads it (engine._measured)
                self.kernels = _kernels(loss.grad_fn)
            grads = _float64_backward(loss, list(leaves.values()))
            if grads is not None:
                grads = {n: torch.zeros_like(leaves[f"model.{n}"]) if g is None else g.detach()
                         for n, g in zip(names, grads)}
        finally:
            for handle in handles:
                handle.remove()
        return loss.detach().to(torch.float64), signature, grads

    def _widened_pass(self, names: list[str], stats: Callable[[str, Tensor], Any],
                      results: dict[str, Any], record: bool) -> tuple[Tensor, Any, dict | None]:
        """:meth:`_reference_pass` for one large tensor without its float64 copy: the forward
        widens the parameter to float64 where it is used (:class:`_Widened`), the backward
        streams the float64 gradient to ``stats`` and the copy is made again afterwards. So
        the copy and the tensor's reference gradient are never held together (2x the copy
        for a module that is one large tensor); the only other tensors of its size are the
        ones the forward saves, as in any pass."""
        (name,) = names
        key = f"model.{name}"
        param = self._params[key]
        leaf = param.detach().requires_grad_(True)  # the parameter's storage: no copy
        shadow = self.shadow
        del shadow[key]
        try:
            loss, signature = self({**shadow, key: _Widened.apply(leaf, _streamed(name, stats, results))},
                                   grad=True, record=record)
            grads = _float64_backward(loss, [leaf])
        finally:
            with torch.no_grad():
                shadow[key] = param.detach().to(torch.float64).contiguous()
        return loss.detach().to(torch.float64), signature, grads

    def losses_batched(self, key: str, points: list[Tensor]) -> Tensor | None:
        """The losses at ``points`` (values of ``self.shadow[key]``) from one vmapped call,
        or None when batched evaluation is off or this model cannot be vmapped: the
        first call decides, and its error or mismatch becomes :attr:`batch_reason`."""
        if self.batched is False:
            return None
        theta = self.shadow[key]
        verify = self.batched is None  # the first call also evaluates θ, to compare with loss0
        stacked = torch.stack([*points, theta] if verify else points)
        try:
            out = self._vmapped(key, stacked)
        except Exception as err:
            if self.batched:  # it worked before: a real error of loss_fn
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            return self._fall_back(f"vmap failed: {type(err).__name__}: {first[:160]}")
        del stacked
        if verify:
            out, unperturbed = out[:-1], out[-1]
            gap = float((unperturbed - self.loss0).abs())  # one host transfer per check
            if not gap <= _BATCH_RTOL * float(self.loss0.abs()):
                return self._fall_back(
                    f"the vmapped loss at the unperturbed parameters differs from the sequential one by {gap:.3g} "
                    "(randomness or state that vmap does not replay)"
                )
            self.batched = True
        return out

    def _fall_back(self, reason: str) -> None:
        self.batched = False
        self.batch_reason = reason + "; evaluated sequentially"
        return None

    def _vmapped(self, key: str, stacked: Tensor) -> Tensor:
        _restore_attrs(self.replay.attrs)
        _restore_rng(self.replay.rng)
        base = dict(self.shadow)
        base.update({k: v.clone() for k, v in self.buffers.items()})

        def one(theta: Tensor) -> Tensor:
            state = dict(base)
            state[key] = theta
            return _loss_tensor(_call(self.wrapper, state, (self.inputs,))).to(torch.float64)

        dtype_ctx, autocast_ctx = self._context()
        rules = self.ops.active() if self.ops is not None else nullcontext()
        with torch.no_grad(), dtype_ctx, autocast_ctx, warnings.catch_warnings(), _quiet_vmap_fallback(), rules:
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
            return torch.func.vmap(one, randomness="same")(stacked)


def _float64_backward(loss: Tensor, leaves: list[Tensor]) -> tuple | None:
    """``torch.autograd.grad`` of a float64 loss; None when the loss is not float64 or needs
    no grad, or the backward raises (no float64 support: judged against the gradient itself)."""
    if not (loss.requires_grad and loss.dtype == torch.float64):
        return None
    try:
        return torch.autograd.grad(loss, leaves, allow_unused=True)
    except RuntimeError:
        return None


#: Names of torch's own backward nodes: ``AddmmBackward0``, ``AccumulateGrad``, ``CopySlices``.
_TORCH_NODE = re.compile(r"\w+Backward\d+|(torch::autograd::)?(AccumulateGrad|CopySlices|GraphRoot|Error)")


def _kernels(root: Any) -> tuple[str, ...]:
    """The nodes of the autograd graph below ``root`` that are not torch's own derivative of an
    aten op, by name (sorted): custom ``autograd.Function``s (``module.QualName``) and
    ``torch.library`` ops (gradwatch's own aside), and C++ nodes of other names. Their forward may
    compute below float64 however it is called (a Triton or CUDA kernel, numpy); torch's own ops
    on float64 tensors compute in float64."""
    seen, stack, found = set(), [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            cls = getattr(node, "_forward_cls", type(node))
            if not cls.__module__.startswith("gradwatch."):
                found.add(f"{cls.__module__}.{cls.__qualname__}")
        elif not _TORCH_NODE.fullmatch(node.name()):
            found.add(node.name())
        stack.extend(n for n, _ in node.next_functions)
    return tuple(sorted(found))


class _Widened(torch.autograd.Function):
    """``p.to(float64)`` whose backward hands the float64 gradient to ``sink`` (a
    :func:`_streamed` hook) and returns a zero of no memory: the float64 value is not
    kept by this node, so once the forward is done only what other ops saved of it lives."""

    @staticmethod
    def forward(ctx, p: Tensor, sink: Callable) -> Tensor:  # type: ignore[override]
        ctx.sink, ctx.shape, ctx.dtype = sink, p.shape, p.dtype
        return p.to(torch.float64, memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        ctx.sink(grad)
        return torch.zeros((), dtype=ctx.dtype, device=grad.device).expand(ctx.shape), None


def _streamed(name: str, stats: Callable[[str, Tensor], Any], results: dict[str, Any]) -> Callable:
    """A tensor hook that hands the gradient of ``name`` to ``stats`` and passes a zero of no
    memory on (the returned gradient is not used): the backward frees each gradient at once."""

    def hook(grad: Tensor | None) -> Tensor | None:
        if grad is None:  # a backward that gives this tensor no gradient: a zero gradient, as unused
            return None
        results[name] = stats(name, grad.detach())
        if grad.device.type == "cpu":  # its temporaries back to the system (see _sizes.release)
            _sizes.released(grad.numel() * grad.element_size())
        return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)

    return hook


@contextmanager
def _quiet_vmap_fallback() -> Iterator[None]:
    """Silence vmap's fallback warning for ops without a batching rule (such as
    ``torch.library.custom_op`` ops, which vmap evaluates one sample at a time): called
    from inside a custom op's dispatch it is printed by C++ to stderr on every call, where
    the ``warnings`` filter cannot catch it. Re-enabled afterwards (torch's default)."""
    toggle = getattr(torch._C._functorch, "_set_vmap_fallback_warning_enabled", None)
    if toggle is None:
        yield
        return
    toggle(False)
    try:
        yield
    finally:
        toggle(True)


def _call(wrapper: _LossModule, state: dict[str, Tensor], args: tuple) -> Any:
    """``functional_call(wrapper, state, args, strict=False)``. Its search for tied tensors
    (two names of one parameter or buffer) walks every parameter and buffer at every call,
    as long as a tiny op's whole pass: it is done once per wrapper, and skipped when the
    model ties none (``tie_weights=False`` is then the same call). With nothing to put in
    place (the native replay of a model without buffers) it is the module's own call."""
    if not state:
        return wrapper(*args)
    tied = wrapper.__dict__.get("_tied")
    if tied is None:
        seen: set[int] = set()
        named = [*wrapper.named_parameters(remove_duplicate=False), *wrapper.named_buffers(remove_duplicate=False)]
        tied = any(id(t) in seen or seen.add(id(t)) for _, t in named)
        wrapper.__dict__["_tied"] = tied
    return functional_call(wrapper, state, args, strict=False, tie_weights=tied)


def _native_loss(wrapper: _LossModule, batch: Any, replay: ReplayState, *, grad: bool) -> Tensor:
    """Replay ``loss_fn`` with the model's own parameters, on clones of the captured buffers."""
    _restore_attrs(replay.attrs)
    _restore_rng(replay.rng)
    buffers = {f"model.{n}": b.clone() for n, b in replay.buffers.items()}
    with torch.set_grad_enabled(grad), _autocast(replay.autocast):
        return _loss_tensor(_call(wrapper, buffers, (batch,)))


def _native_gradients(
    wrapper: _LossModule, batch: Any, replay: ReplayState, params: Mapping[str, Tensor], names: list[str],
    recorder: Any = None, stats: Callable[[str, Tensor], Any] | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Replay ``loss_fn`` in the model's own precision at ``params`` (name -> value; the
    others keep the model's) and take autograd's gradient of ``names``.

    The values are fresh leaves, so tensor hooks on the parameters and code that edits
    ``.grad`` play no part: this is the training computation itself, as its kernels
    round it. ``recorder``: a kink recorder context active during the forward. With
    ``stats``, each gradient is handed to ``stats(name, g)`` as the backward produces it
    and dropped; the values are returned instead of the gradients.
    """
    _restore_attrs(replay.attrs)
    _restore_rng(replay.rng)
    leaves = {n: params[n].detach().requires_grad_(True) for n in names}
    results: dict[str, Any] = {}
    handles = [] if stats is None else [leaf.register_hook(_streamed(n, stats, results)) for n, leaf in leaves.items()]
    try:
        return _native_pass(wrapper, batch, replay, params, leaves, recorder, stats, results)
    finally:
        for handle in handles:
            handle.remove()


def _native_pass(
    wrapper: _LossModule, batch: Any, replay: ReplayState, params: Mapping[str, Tensor], leaves: dict[str, Tensor],
    recorder: Any, stats: Callable[[str, Tensor], Any] | None, results: dict[str, Any],
) -> tuple[Tensor, dict[str, Any]]:
    state = {f"model.{n}": v for n, v in params.items()}
    state.update({f"model.{n}": v for n, v in leaves.items()})
    state.update({f"model.{n}": b.clone() for n, b in replay.buffers.items()})
    with torch.enable_grad(), _autocast(replay.autocast), recorder if recorder is not None else nullcontext():
        loss = _loss_tensor(_call(wrapper, state, (batch,)))
    if not loss.requires_grad:
        return loss.detach(), {}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    if stats is not None:
        return loss.detach(), {n: results[n] for n, g in zip(leaves, grads) if g is not None}
    return loss.detach(), {n: g.detach() for n, g in zip(leaves, grads) if g is not None}


def _loss_tensor(out: Any, name: str = "loss_fn") -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"`{name}` must return a scalar loss Tensor, got {type(out).__name__} {_short(out)}")
    if out.numel() != 1:
        raise ValueError(f"`{name}` must return a scalar loss, got a tensor of shape {tuple(out.shape)}")
    if not out.is_floating_point():
        raise ValueError(f"`{name}` must return a floating-point loss, got dtype {out.dtype}")
    return out.reshape(())


def _loss_value(name: str, value: Any) -> Tensor | float:
    if isinstance(value, Tensor):
        return _loss_tensor(value, name).detach()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"`{name}` must be a scalar Tensor or a float, got {type(value).__name__} {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
