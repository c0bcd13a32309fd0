"""Branch signatures of non-smooth ops, recorded during the perturbed forwards.

A central difference across a kink (a ReLU input changing sign between ``θ+h`` and
``θ-h``, a max-pool window changing its argmax, a clamp bound being crossed) measures
an average of two one-sided slopes, not the gradient. gradwatch records, for every
non-smooth aten op a forward runs, a checksum of the branch each element took, and
compares the checksums of the perturbed passes with those of the unperturbed pass.
A :class:`torch.utils._python_dispatch.TorchDispatchMode` sees these ops whether they
come from modules or from functional calls.

Only one device scalar per op call is kept, never the activations themselves, and
nothing is synchronised with the host.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KINK_OPS", "DISCONTINUOUS_OPS"]

aten = torch.ops.aten

_Code = Callable[[tuple, dict, Any], "Tensor | None"]


def _is_float(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _band(x: Tensor, lo: Any, hi: Any) -> Tensor:
    """-1 below ``lo``, +1 above ``hi``, 0 between (either bound may be None)."""
    code = torch.zeros_like(x, dtype=torch.int8)
    if hi is not None:
        code = code + (x > hi).to(torch.int8)
    if lo is not None:
        code = code - (x < lo).to(torch.int8)
    return code


def _sign(x: Tensor) -> Tensor:
    return (x > 0).to(torch.int8) - (x < 0).to(torch.int8)


# Codes computed from the inputs, before the op runs (in-place variants overwrite them).
def _positive(args, kwargs, out):
    x = args[0]
    return (x > 0) if _is_float(x) else None


def _threshold(args, kwargs, out):
    x = args[0]
    return (x > args[1]) if _is_float(x) else None


def _hardtanh(args, kwargs, out):
    x = args[0]
    if not _is_float(x):
        return None
    return _band(x, _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0))


def _clamp(args, kwargs, out):
    x = args[0]
    if not _is_float(x):
        return None
    return _band(x, _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max"))


def _clamp_min(args, kwargs, out):
    return _band(args[0], args[1], None) if _is_float(args[0]) else None


def _clamp_max(args, kwargs, out):
    return _band(args[0], None, args[1]) if _is_float(args[0]) else None


def _three(args, kwargs, out):
    x = args[0]
    return _band(x, -3.0, 3.0) if _is_float(x) else None


def _shrink(args, kwargs, out):
    x = args[0]
    if not _is_float(x):
        return None
    lam = _arg(args, kwargs, 1, "lambd", 0.5)
    return _band(x, -lam, lam)


def _signed(args, kwargs, out):
    x = args[0]
    return _sign(x) if _is_float(x) else None


def _pairwise(args, kwargs, out):
    a, b = args[0], args[1]
    if not (_is_float(a) or _is_float(b)):
        return None
    return _sign(a - b)


# Codes computed from the outputs.
def _indices(args, kwargs, out):
    return out[1] if _is_float(args[0]) else None


def _output(args, kwargs, out):
    return out if _is_float(args[0]) else None


def _comparison(args, kwargs, out):
    if _is_float(args[0]) or (len(args) > 1 and _is_float(args[1])):
        return out
    return None


def _flat_index(reduce: str) -> _Code:
    """Index of the element a full max/min reduction picked."""

    def code(args, kwargs, out):
        x = args[0]
        return getattr(x.reshape(-1), reduce)() if _is_float(x) else None

    return code


def _equals_output(args, kwargs, out):
    x = args[0]
    if not _is_float(x):
        return None
    dims = _arg(args, kwargs, 1, "dim", None)
    keepdim = _arg(args, kwargs, 2, "keepdim", False)
    ref = out
    if dims not in (None, [], ()) and not keepdim:
        dims = [dims] if isinstance(dims, int) else list(dims)
        for d in sorted(d % x.dim() for d in dims):
            ref = ref.unsqueeze(d)
    return x == ref


def _pool_indices(with_indices: Any) -> _Code:
    def code(args, kwargs, out):
        if not _is_float(args[0]):
            return None
        return with_indices(*args, **kwargs)[1]

    return code


def _quotient(mode: str) -> _Code:
    """Integer quotient that remainder (floor) and fmod (trunc) jump with."""

    def code(args, kwargs, out):
        a, b = args[0], args[1]
        return torch.div(a, b, rounding_mode=mode) if _is_float(a) else None

    return code


def _trunc_input(args, kwargs, out):
    x = args[0]
    return torch.trunc(x) if _is_float(x) else None


# (aten names, code function, computed before the op runs?, discontinuity?)
_TABLE: tuple[tuple[tuple[str, ...], _Code, bool, bool], ...] = (
    (("relu", "relu_", "leaky_relu", "leaky_relu_", "elu", "elu_", "celu", "celu_", "selu", "selu_",
      "_prelu_kernel", "prelu", "rrelu_with_noise", "heaviside"), _positive, True, False),
    (("threshold", "threshold_"), _threshold, True, False),
    (("hardtanh", "hardtanh_"), _hardtanh, True, False),
    (("clamp", "clamp_", "clip", "clip_"), _clamp, True, False),
    (("clamp_min", "clamp_min_"), _clamp_min, True, False),
    (("clamp_max", "clamp_max_"), _clamp_max, True, False),
    (("hardsigmoid", "hardsigmoid_", "hardswish", "hardswish_"), _three, True, False),
    (("softshrink", "hardshrink"), _shrink, True, False),
    (("abs", "abs_", "sign", "sign_", "sgn", "sgn_"), _signed, True, False),
    (("maximum", "minimum", "fmax", "fmin"), _pairwise, True, False),
    (("sort", "topk", "kthvalue", "mode", "cummax", "cummin", "max_pool1d_with_indices",
      "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d",
      "adaptive_max_pool3d", "fractional_max_pool2d", "fractional_max_pool3d"), _indices, False, False),
    (("argmax", "argmin", "argsort", "bucketize", "searchsorted"), _output, False, False),
    (("gt", "gt_", "lt", "lt_", "ge", "ge_", "le", "le_", "eq", "eq_", "ne", "ne_",
      "greater", "less", "greater_equal", "less_equal", "not_equal"), _comparison, False, False),
    (("amax", "amin"), _equals_output, False, False),
    (("round", "round_", "floor", "floor_", "ceil", "ceil_", "trunc", "trunc_"), _output, False, True),
    (("frac", "frac_"), _trunc_input, True, True),
    (("remainder", "remainder_"), _quotient("floor"), True, True),
    (("fmod", "fmod_"), _quotient("trunc"), True, True),
)

_PRE: dict[Any, _Code] = {}
_POST: dict[Any, _Code] = {}
for _names, _code, _before, _ in _TABLE:
    for _name in _names:
        _packet = getattr(aten, _name, None)
        if _packet is not None:
            (_PRE if _before else _POST)[_packet] = _code
for _name in ("max_pool1d", "max_pool2d", "max_pool3d"):  # when they reach dispatch without indices
    _POST[getattr(aten, _name)] = _pool_indices(getattr(aten, f"{_name}_with_indices"))

# Packets whose overloads differ in kind: max/min/median with and without dim.
_OVERLOAD: dict[Any, _Code] = {
    aten.max.default: _flat_index("argmax"),
    aten.min.default: _flat_index("argmin"),
    aten.max.dim: _indices,
    aten.min.dim: _indices,
    aten.median.default: _equals_output,
    aten.nanmedian.default: _equals_output,
    aten.median.dim: _indices,
    aten.nanmedian.dim: _indices,
}

#: aten ops recorded as kinks (the derivative jumps).
KINK_OPS = frozenset(
    n for names, _, _, jump in _TABLE if not jump for n in names
) | {"max", "min", "median", "nanmedian", "max_pool1d", "max_pool2d", "max_pool3d"}
#: aten ops recorded as discontinuities (the value jumps).
DISCONTINUOUS_OPS = frozenset(n for names, _, _, jump in _TABLE if jump for n in names)


def _checksum(code: Tensor) -> Tensor:
    """A device scalar that changes whenever any element of ``code`` changes."""
    flat = code.reshape(-1)
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64)
    weights = (weights * 2654435761) % 2147483629 + 1
    if flat.is_floating_point():
        return (flat.to(torch.float64) * weights.to(torch.float64)).sum()
    return (flat.to(torch.int64) * weights).sum()


class _BranchRecorder(TorchDispatchMode):
    """Records one checksum per non-smooth op call, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.sums: list[Tensor] = []

    def reset(self) -> tuple[list[str], list[Tensor]]:
        names, sums = self.names, self.sums
        self.names, self.sums = [], []
        return names, sums

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        pre = _PRE.get(packet)
        code = pre(args, kwargs, None) if pre is not None else None
        out = func(*args, **kwargs)
        post = _OVERLOAD.get(func) or _POST.get(packet)
        if post is not None and code is None:
            code = post(args, kwargs, out)
        if code is not None:
            self.names.append(packet.__name__)
            self.sums.append(_checksum(code))
        return out


def _crossed(reference: tuple[list[str], list[Tensor]], other: tuple[list[str], list[Tensor]]) -> Tensor | bool:
    """True (or a device bool) when ``other`` took a different branch anywhere."""
    ref_names, ref_sums = reference
    names, sums = other
    if names != ref_names:
        return True
    if not sums:
        return False
    return torch.stack([a != b for a, b in zip(ref_sums, sums)]).any()
