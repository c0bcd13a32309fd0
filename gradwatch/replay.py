"""Capture and restore what a training forward started from, and replay it.

A check re-runs the loss on the batch just trained on. To see the same dropout masks
and the same buffers as the training forward, an adapter calls :func:`capture` just
before that forward; the engine replays every evaluation from the captured state and
leaves the model, its buffers and the RNG stream exactly as it found them.

Example:
    >>> state = gradwatch.capture(model)            # doctest: +SKIP
    >>> loss = loss_fn(model, batch); loss.backward()  # doctest: +SKIP
    >>> gradwatch.check(model, loss_fn, batch, grads="existing", replay=state,
    ...                 train_loss=loss)            # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import operator
import random
import sys
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from gradwatch._validate import _module

__all__ = ["ReplayState", "capture"]

_DEVICE_TYPES = ("cpu", "cuda")
_MISSING = object()


@dataclass(frozen=True)
class _RNGState:
    torch_cpu: Tensor
    cuda: tuple[Tensor, ...] | None
    numpy: Any
    python: Any


@dataclass(frozen=True)
class ReplayState:
    """What a training forward started from.

    Attributes:
        rng: Torch CPU and CUDA, NumPy and Python RNG states.
        buffers: Clones of the model's buffers, by ``named_buffers()`` name.
        attrs: Per module, the attribute bindings of its ``__dict__`` (so that Python
            state a forward rebinds, such as counters or caches, can be put back).
        autocast: Per device type, ``(enabled, dtype)`` of autocast.
    """

    rng: _RNGState
    buffers: Mapping[str, Tensor]
    attrs: tuple[tuple[nn.Module, dict[str, Any]], ...]
    autocast: Mapping[str, tuple[bool, torch.dtype]]


def capture(model: nn.Module) -> ReplayState:
    """Snapshot the state a training forward of ``model`` starts from.

    Call it right before the forward whose gradient will be checked. It copies the
    buffers (BatchNorm statistics are small) and the RNG states; it does not copy
    parameters and does not synchronise the device.

    Args:
        model: The module about to run its training forward.

    Returns:
        A :class:`ReplayState` to pass to :func:`gradwatch.check` as ``replay``.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``.

    Example:
        >>> state = capture(model)  # doctest: +SKIP
    """
    _module("model", model)
    with torch.no_grad():
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return ReplayState(
        rng=_capture_rng(),
        buffers=buffers,
        attrs=_capture_attrs(model),
        autocast=_capture_autocast(),
    )


def _capture_rng() -> _RNGState:
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = tuple(torch.cuda.get_rng_state_all())
    return _RNGState(
        torch_cpu=torch.get_rng_state(),
        cuda=cuda,
        numpy=_capture_numpy(),
        python=random.getstate(),
    )


_numpy_last: list[Any] = [None]  # the last state _capture_numpy returned


def _mt_bytes() -> bytes | None:
    """NumPy's global MT19937 key and position as raw bytes (~1 us), or None."""
    try:
        return ctypes.string_at(np.random.mtrand._rand._bit_generator.ctypes.state_address, 624 * 4 + 4)
    except Exception:  # noqa: BLE001 (another NumPy layout)
        return None


def _saved_bytes(saved: Any) -> bytes:
    return saved[1].tobytes() + int(saved[2]).to_bytes(4, sys.byteorder, signed=True)


def _capture_numpy() -> Any:
    """``np.random.get_state()`` (~35 us: it copies 624 words one at a time), or the last
    state returned when the global state provably still is that one (see :func:`_restore_numpy`)."""
    last = _numpy_last[0]
    if last is not None and last[0] == "MT19937" and last[3] == 0 and _mt_bytes() == _saved_bytes(last):
        return last
    _numpy_last[0] = state = np.random.get_state()
    return state


def _restore_rng(state: _RNGState) -> None:
    torch.set_rng_state(state.torch_cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state_all(list(state.cuda))
    _restore_numpy(state.numpy)
    random.setstate(state.python)


def _restore_numpy(saved: Any) -> None:
    """``np.random.set_state(saved)``, skipped when the global state provably still is
    ``saved``: ``set_state`` copies the 624 MT19937 words one at a time (about 50 us,
    most of an evaluation of a tiny op). Without a cached Gaussian (``saved[3] == 0``) a
    draw always advances the key or position, so equal ones mean nothing was drawn."""
    if saved[0] == "MT19937" and saved[3] == 0 and saved[1].nbytes == 624 * 4:
        now = _mt_bytes()
        if now is not None and now == _saved_bytes(saved):
            return
    np.random.set_state(saved)


def _capture_attrs(model: nn.Module) -> tuple[tuple[nn.Module, dict[str, Any]], ...]:
    return tuple((m, dict(m.__dict__)) for m in model.modules())


def _restore_attrs(attrs: tuple[tuple[nn.Module, dict[str, Any]], ...]) -> None:
    """Put back every attribute binding; objects mutated in place are not undone."""
    for module, saved in attrs:
        current = module.__dict__
        # nothing rebound (the same names, in the same order, bound to the same objects): the
        # usual case, tested at C speed (a check restores before every evaluation)
        if len(current) == len(saved) and list(current) == list(saved) and all(
                map(operator.is_, current.values(), saved.values())):
            continue
        for key in [k for k in current if k not in saved]:
            del current[key]
        for key, value in saved.items():
            if current.get(key, _MISSING) is not value:
                current[key] = value



def _capture_autocast() -> dict[str, tuple[bool, torch.dtype]]:
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _DEVICE_TYPES}


def _autocast(state: Mapping[str, tuple[bool, torch.dtype]] | None) -> AbstractContextManager[None]:
    """A context running under the given autocast state; ``None`` disables autocast everywhere."""
    if not any(enabled for enabled, _ in (state or {}).values()) and not _autocast_enabled():
        return nullcontext()  # already off everywhere: nothing to enter (an evaluation of a tiny op is ~50 us)
    return _autocast_entered(state)


@contextmanager
def _autocast_entered(state: Mapping[str, tuple[bool, torch.dtype]] | None) -> Iterator[None]:
    with ExitStack() as stack:
        for device_type in _DEVICE_TYPES:
            enabled, dtype = state[device_type] if state else (False, None)
            if device_type == "cuda" and not torch.cuda.is_available():
                continue
            kwargs = {"dtype": dtype} if enabled else {}
            stack.enter_context(torch.autocast(device_type, enabled=enabled, **kwargs))
        yield


def _autocast_enabled() -> bool:
    """Whether autocast is on for some device type now."""
    return any(torch.is_autocast_enabled(d) for d in _DEVICE_TYPES if d != "cuda" or torch.cuda.is_available())


@contextmanager
def _isolated(model: nn.Module) -> Iterator[None]:
    """Restore RNG states and module attribute bindings on exit, even on error."""
    rng = _capture_rng()
    attrs = _capture_attrs(model)
    try:
        yield
    finally:
        _restore_attrs(attrs)
        _restore_rng(rng)


class _DefaultDtype:
    """Run with ``dtype`` as torch's default dtype, the old one put back on exit (a class:
    a generator context costs several times as much, once per evaluation)."""

    __slots__ = ("dtype", "old")

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __enter__(self) -> None:
        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: Any) -> None:
        torch.set_default_dtype(self.old)


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """Cast every floating tensor inside tuples, lists, dicts and namedtuples."""
    if isinstance(obj, Tensor):
        return obj.detach().to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_cast_floats(x, dtype) for x in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floats(x, dtype) for x in obj)
    if isinstance(obj, dict):
        cast = {k: _cast_floats(v, dtype) for k, v in obj.items()}
        try:
            return type(obj)(cast)
        except TypeError:
            return cast
    return obj


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` so ``torch.func.functional_call`` can run it."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self._loss_fn(self.model, batch)

