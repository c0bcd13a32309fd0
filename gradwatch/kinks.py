"""Kinks and discontinuities of non-smooth ops, recorded during the perturbed forwards.

A central difference across a kink (a ReLU input changing sign between ``θ+h`` and
``θ-h``, a max-pool window changing its argmax, a clamp bound being crossed) measures
an average of two one-sided slopes, not the gradient. A
:class:`torch.utils._python_dispatch.TorchDispatchMode` sees every non-smooth aten op a
forward runs, from modules and functional calls alike. For each op call it computes a
:class:`_Branch` (plain functions of the op's inputs and outputs, in :data:`_TABLE`):

* ``code``: the branch each element took; a perturbed pass compares it elementwise
  with the unperturbed (reference) pass's code, which decides *crossed* exactly;
* ``z``: the op's switching input, zero at the kink (``x`` for a ReLU, ``a - b`` for
  ``maximum``, the gap between the winner and the runner-up of a max-pool window).

The **margin** of an op call in one perturbed pass is ``min |z₀| / |z - z₀|`` over its
elements: how far the unperturbed operating point is from the kink, in units of how
far this perturbation moved it. It is computed in the ``±2h`` passes of a probe (the
widest), so a margin below 1 means the linear estimate says a pass crossed; a margin
of exactly 0 means an element sat *at* the kink (``z₀ == 0`` and the perturbation
moved it), where the derivative autograd uses is a convention.

Memory: the reference pass keeps, per op call, its code (one byte per element for most
ops; the winner indices of selections), and with margins a float32 copy of ``z₀``; a
perturbed pass compares each op call as it runs and keeps two device scalars of it. No
host synchronisation happens.
``z`` is only computed in the passes that need it (reference and ``±2h``).

A comparison (``x > 0``) is a discontinuity unless its mask goes straight into
``torch.where``/``masked_fill`` (then it is a kink: a piecewise definition); masks
combined first (``&``, ``|``) stay discontinuities.

Example:
    >>> rec = _BranchRecorder()
    >>> with rec:
    ...     _ = torch.relu(torch.tensor([1.0, -2.0]))
    >>> rec.take_reference().names
    ['relu']
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DISCONTINUOUS_OPS", "KINK_OPS", "register_kink"]

aten = torch.ops.aten

#: dtype of the reference switching inputs kept for margins (margins need ~3 digits).
_Z_DTYPE = torch.float32


class _Branch(NamedTuple):
    """What one call of a non-smooth op did.

    Attributes:
        code: Which branch each element took; any change is a crossing.
        z: Switching input, zero at the kink and of one sign on the reference branch,
            or ``None`` when no margin can be computed for this op.
        zcode: For selections (max-pool, sort, ...): the winner each element of ``z``
            (a gap, >= 0) belongs to; ``z`` counts as negative where it changed.
        kind: ``"kink"`` or ``"discontinuity"`` when the call decides it (threshold),
            else ``None`` (the table's kind).
    """

    code: Tensor
    z: Tensor | None = None
    zcode: Tensor | None = None
    kind: str | None = None


#: ``code(args, kwargs, out, with_z) -> _Branch | None``; ``z`` only when ``with_z``
#: (the passes that compute margins), since some switching inputs cost a pass over the data.
_Code = Callable[[tuple, dict, Any, bool], "_Branch | None"]


def _is_float(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _band(x: Tensor, lo: Any, hi: Any, with_z: bool) -> _Branch:
    """Code -1 below ``lo``, +1 above ``hi``, 0 between; ``z`` > 0 strictly between."""
    code = torch.zeros_like(x, dtype=torch.int8)
    if hi is not None:
        code = code + (x > hi).to(torch.int8)
    if lo is not None:
        code = code - (x < lo).to(torch.int8)
    if not with_z:
        z = None
    elif hi is None:
        z = x - lo
    elif lo is None:
        z = hi - x
    else:
        z = torch.minimum(x - lo, hi - x)
    return _Branch(code, z)


def _sign(x: Tensor) -> Tensor:
    return (x > 0).to(torch.int8) - (x < 0).to(torch.int8)


# ----------------------------------------------------------------- elementwise kinks
# Computed from the inputs, before the op runs (in-place variants overwrite them).
def _positive(args, kwargs, out, with_z):
    x = args[0]
    return _Branch(x > 0, x) if _is_float(x) else None


def _threshold(args, kwargs, out, with_z):
    x, threshold, value = args[0], args[1], args[2]
    if not _is_float(x):
        return None
    jump = None if value == threshold else "discontinuity"  # continuous only when value == threshold
    return _Branch(x > threshold, x - threshold if with_z else None, kind=jump)


def _hardtanh(args, kwargs, out, with_z):
    x = args[0]
    if not _is_float(x):
        return None
    return _band(x, _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0), with_z)


def _clamp(args, kwargs, out, with_z):
    x = args[0]
    lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
    if not _is_float(x) or (lo is None and hi is None):
        return None
    return _band(x, lo, hi, with_z)


def _clamp_min(args, kwargs, out, with_z):
    return _band(args[0], args[1], None, with_z) if _is_float(args[0]) else None


def _clamp_max(args, kwargs, out, with_z):
    return _band(args[0], None, args[1], with_z) if _is_float(args[0]) else None


def _three(args, kwargs, out, with_z):
    x = args[0]
    return _band(x, -3.0, 3.0, with_z) if _is_float(x) else None


def _shrink(args, kwargs, out, with_z):
    x = args[0]
    if not _is_float(x):
        return None
    lam = _arg(args, kwargs, 1, "lambd", 0.5)
    return _Branch(_band(x, -lam, lam, False).code, x.abs() - lam if with_z else None)


def _signed(args, kwargs, out, with_z):
    x = args[0]
    return _Branch(_sign(x), x) if _is_float(x) else None


def _pairwise(args, kwargs, out, with_z):
    a, b = args[0], args[1]
    if not (_is_float(a) or _is_float(b)):
        return None
    z = a - b
    return _Branch(_sign(z), z)


def _periodic(fn: Callable[[Tensor], Tensor], boundary: Callable[[Tensor], Tensor]) -> _Code:
    """Rounding-like ops: ``code`` is the rounded value, ``z`` a smooth function that
    is zero exactly at the jumps (``sin(πx)`` for integers, ``cos(πx)`` for halves)."""

    def code(args, kwargs, out, with_z):
        x = args[0]
        if not _is_float(x):
            return None
        decimals = kwargs.get("decimals", 0)
        scaled = x * 10.0**decimals if decimals else x
        return _Branch(fn(scaled), boundary(scaled) if with_z else None)

    return code


def _sin_pi(x: Tensor) -> Tensor:
    return torch.sin(math.pi * x)


def _cos_pi(x: Tensor) -> Tensor:
    return torch.cos(math.pi * x)


def _quotient(mode: str) -> _Code:
    """Remainder (floor) and fmod (trunc) jump where the quotient is an integer."""

    def code(args, kwargs, out, with_z):
        a, b = args[0], args[1]
        if not _is_float(a):
            return None
        return _Branch(torch.div(a, b, rounding_mode=mode), _sin_pi(a / b) if with_z else None)

    return code


# ----------------------------------------------------------------- from the outputs
def _comparison(args, kwargs, out, with_z):
    a = args[0]
    b = args[1] if len(args) > 1 else None
    if not (_is_float(a) or _is_float(b)):
        return None
    return _Branch(out, a - b if with_z and out is not a else None)  # in place: ``a`` is overwritten


def _gap(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """Distance from the selected element (``idx``, keepdim shape) to the nearest other
    element along ``dim``: the runner-up of a max, the neighbours of a median."""
    v = x.gather(dim, idx)
    d = (x - v).abs().scatter(dim, idx, math.inf)
    return d.amin(dim, keepdim=True)


def _selected(dim_pos: int, dim_default: int | None = None) -> _Code:
    """Reductions returning ``(values, indices)`` along a dim: max/min/kthvalue/median/mode."""

    def code(args, kwargs, out, with_z):
        x = args[0]
        if not _is_float(x):
            return None
        idx = out[1]
        dim = _arg(args, kwargs, dim_pos, "dim", dim_default)
        if not with_z or x.dim() == 0 or dim is None or x.shape[dim] < 2:
            return _Branch(idx)
        keep = idx if idx.dim() == x.dim() else idx.unsqueeze(dim)
        return _Branch(idx, _gap(x, keep, dim).reshape(idx.shape), idx)

    return code


def _arg_select(args, kwargs, out, with_z):
    """argmax/argmin with or without a dim."""
    x = args[0]
    if not _is_float(x):
        return None
    dim = _arg(args, kwargs, 1, "dim")
    if dim is None:
        x, dim = x.reshape(-1), 0
    if not with_z or x.dim() == 0 or x.shape[dim] < 2:
        return _Branch(out)
    keep = out.reshape(1) if x.dim() == 1 else (out if out.dim() == x.dim() else out.unsqueeze(dim))
    return _Branch(out, _gap(x, keep, dim).reshape(out.shape), out)


def _flat_select(reduce: str) -> _Code:
    """Full max/min reductions: the index of the element picked, and its gap."""

    def code(args, kwargs, out, with_z):
        x = args[0]
        if not _is_float(x):
            return None
        flat = x.reshape(-1)
        idx = getattr(flat, reduce)()
        if not with_z or flat.numel() < 2:
            return _Branch(idx)
        return _Branch(idx, _gap(flat, idx.reshape(1), 0).reshape(()), idx)

    return code


def _adjacent(values: Tensor, indices: Tensor, dim: int) -> tuple[Tensor, Tensor] | None:
    """Gaps between neighbours of a sorted order, and which pair each gap belongs to."""
    n = values.shape[dim] if values.dim() else 1
    if n < 2:
        return None
    gaps = (values.narrow(dim, 1, n - 1) - values.narrow(dim, 0, n - 1)).abs()
    pairs = indices.narrow(dim, 0, n - 1) * (indices.shape[dim] + 1) + indices.narrow(dim, 1, n - 1)
    return gaps, pairs


def _sort(args, kwargs, out, with_z):
    x = args[0]
    if not _is_float(x):
        return None
    dim = kwargs.get("dim", args[1] if len(args) > 1 and type(args[1]) is int else -1)
    gap = _adjacent(out[0], out[1], dim) if with_z and x.dim() else None
    return _Branch(out[1], *(gap or ()))


def _topk(args, kwargs, out, with_z):
    x = args[0]
    if not _is_float(x):
        return None
    k = args[1]
    dim = _arg(args, kwargs, 2, "dim", -1)
    largest = _arg(args, kwargs, 3, "largest", True)
    if not with_z or x.dim() == 0:
        return _Branch(out[1])
    values, indices = out
    if k < x.shape[dim]:  # the runner-up outside the selection decides the set
        values, indices = torch.topk(x, k + 1, dim, largest, True)
    gap = _adjacent(values, indices, dim)
    return _Branch(out[1], *(gap or ()))


def _indices(args, kwargs, out, with_z):
    return _Branch(out[1]) if _is_float(args[0]) else None


def _output(args, kwargs, out, with_z):
    return _Branch(out) if _is_float(args[0]) else None


def _equals_output(args, kwargs, out, with_z):
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
    return _Branch(x == ref)


def _tuple(value: Any, n: int) -> list[int]:
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    return value * n if len(value) == 1 else value


def _pool_gap(x: Tensor, values: Tensor, nd: int, kernel: Any, stride: Any, padding: Any, dilation: Any) -> Tensor:
    """Winner minus runner-up of every ``nd``-d max-pool window (inf for one-element windows),
    from unfolded windows (exact for overlapping windows too)."""
    k = _tuple(kernel, nd)
    s = _tuple(stride, nd) if stride not in (None, [], ()) else k
    p, d = _tuple(padding, nd), _tuple(dilation, nd)
    out_sizes = values.shape[-nd:]
    pads: list[int] = []
    for i in reversed(range(nd)):  # F.pad takes the last dim first
        span = (out_sizes[i] - 1) * s[i] + (k[i] - 1) * d[i] + 1
        pads += [p[i], max(0, span - x.shape[x.dim() - nd + i] - p[i])]
    w = F.pad(x, pads, value=-math.inf)
    for i in range(nd):
        dim = x.dim() - nd + i
        w = w.unfold(dim, (k[i] - 1) * d[i] + 1, s[i]).narrow(dim, 0, out_sizes[i])
    w = w[(Ellipsis, *(slice(None, None, di) for di in d))].reshape(*values.shape, -1)
    if w.shape[-1] < 2:
        return torch.full_like(values, math.inf)
    top = w.topk(2, -1).values
    return top[..., 0] - top[..., 1]


def _runner_up_gap(x: Tensor, values: Tensor, indices: Tensor, nd: int, pool: Callable[[Tensor], Tensor]) -> Tensor:
    """Winner minus runner-up by pooling again with every winner set to -inf: exact when no
    element lies in two windows (it could be a window's runner-up and another's winner)."""
    lead = x.shape[:-nd]
    masked = x.reshape(*lead, -1).clone()
    masked.scatter_(-1, indices.reshape(*lead, -1), -math.inf)
    return values - pool(masked.view_as(x))


def _overlapping(nd: int, kernel: Any, stride: Any, dilation: Any) -> bool:
    k, d = _tuple(kernel, nd), _tuple(dilation, nd)
    s = _tuple(stride, nd) if stride not in (None, [], ()) else k
    return any((ki - 1) * di + 1 > si for ki, si, di in zip(k, s, d))


def _max_pool(nd: int, with_indices: Any) -> _Code:
    """max_pool{nd}d (recomputed ``with_indices`` when the call had none)."""

    def code(args, kwargs, out, with_z):
        x = args[0]
        if not _is_float(x):
            return None
        if not isinstance(out, (tuple, list)):  # max_pool{nd}d reached dispatch without indices
            out = with_indices(*args, **kwargs)
        if not with_z:
            return _Branch(out[1])
        kernel = _arg(args, kwargs, 1, "kernel_size")
        stride = _arg(args, kwargs, 2, "stride", None)
        dilation = _arg(args, kwargs, 4, "dilation", 1)
        if _overlapping(nd, kernel, stride, dilation):
            gap = _pool_gap(x, out[0], nd, kernel, stride, _arg(args, kwargs, 3, "padding", 0), dilation)
        else:
            gap = _runner_up_gap(x, out[0], out[1], nd, lambda m: with_indices(m, *args[1:], **kwargs)[0])
        return _Branch(out[1], gap, out[1])

    return code


def _adaptive_max_pool(nd: int, op: Any) -> _Code:
    """adaptive_max_pool{nd}d; where windows of uneven sizes overlap, the margin can come
    out too large (see :func:`_runner_up_gap`); crossings are still exact."""

    def code(args, kwargs, out, with_z):
        x = args[0]
        if not _is_float(x):
            return None
        values, indices = out
        if not with_z:
            return _Branch(indices)
        gap = _runner_up_gap(x, values, indices, nd, lambda m: op(m, *args[1:], **kwargs)[0])
        return _Branch(indices, gap, indices)

    return code


# (aten names, code function, computed before the op runs?, "kink" or "discontinuity")
_TABLE: tuple[tuple[tuple[str, ...], _Code, bool, str], ...] = (
    (("relu", "relu_", "leaky_relu", "leaky_relu_", "elu", "elu_", "celu", "celu_", "selu", "selu_",
      "_prelu_kernel", "prelu", "rrelu_with_noise"), _positive, True, "kink"),
    (("threshold", "threshold_"), _threshold, True, "kink"),
    (("hardtanh", "hardtanh_"), _hardtanh, True, "kink"),
    (("clamp", "clamp_", "clip", "clip_"), _clamp, True, "kink"),
    (("clamp_min", "clamp_min_"), _clamp_min, True, "kink"),
    (("clamp_max", "clamp_max_"), _clamp_max, True, "kink"),
    (("hardsigmoid", "hardsigmoid_", "hardswish", "hardswish_"), _three, True, "kink"),
    (("softshrink",), _shrink, True, "kink"),
    (("abs", "abs_"), _signed, True, "kink"),
    (("maximum", "minimum", "fmax", "fmin"), _pairwise, True, "kink"),
    (("max_pool1d_with_indices", "max_pool1d"), _max_pool(1, aten.max_pool1d_with_indices), False, "kink"),
    (("max_pool2d_with_indices", "max_pool2d"), _max_pool(2, aten.max_pool2d_with_indices), False, "kink"),
    (("max_pool3d_with_indices", "max_pool3d"), _max_pool(3, aten.max_pool3d_with_indices), False, "kink"),
    (("adaptive_max_pool1d",), _adaptive_max_pool(1, aten.adaptive_max_pool1d), False, "kink"),
    (("adaptive_max_pool2d",), _adaptive_max_pool(2, aten.adaptive_max_pool2d), False, "kink"),
    (("adaptive_max_pool3d",), _adaptive_max_pool(3, aten.adaptive_max_pool3d), False, "kink"),
    (("sort",), _sort, False, "kink"),
    (("topk",), _topk, False, "kink"),
    (("kthvalue",), _selected(2, -1), False, "kink"),
    (("mode", "cummax", "cummin", "fractional_max_pool2d", "fractional_max_pool3d"), _indices, False, "kink"),
    (("argmax", "argmin"), _arg_select, False, "kink"),
    (("argsort",), _output, False, "kink"),
    (("amax", "amin"), _equals_output, False, "kink"),
    # Comparisons are discontinuities unless their mask selects between branches
    # (``torch.where``/``masked_fill``), which the recorder notices; see _SELECTS.
    (("gt", "gt_", "lt", "lt_", "ge", "ge_", "le", "le_", "eq", "eq_", "ne", "ne_",
      "greater", "less", "greater_equal", "less_equal", "not_equal"), _comparison, False, "discontinuity"),
    (("heaviside", "sign", "sign_", "sgn", "sgn_"), _signed, True, "discontinuity"),
    (("hardshrink",), _shrink, True, "discontinuity"),
    (("round", "round_"), _periodic(torch.round, _cos_pi), True, "discontinuity"),
    (("floor", "floor_"), _periodic(torch.floor, _sin_pi), True, "discontinuity"),
    (("ceil", "ceil_"), _periodic(torch.ceil, _sin_pi), True, "discontinuity"),
    (("trunc", "trunc_", "frac", "frac_"), _periodic(torch.trunc, _sin_pi), True, "discontinuity"),
    (("remainder", "remainder_"), _quotient("floor"), True, "discontinuity"),
    (("fmod", "fmod_"), _quotient("trunc"), True, "discontinuity"),
    (("bucketize", "searchsorted"), _output, False, "discontinuity"),
)

_Rule = tuple[_Code, bool, str]
_RULES: dict[Any, _Rule] = {}
for _names, _fn, _before, _kind in _TABLE:
    for _name in _names:
        _packet = getattr(aten, _name, None)
        if _packet is not None:
            _RULES[_packet] = (_fn, _before, _kind)

# Packets whose overloads differ in kind: max/min/median with and without dim.
_OVERLOAD: dict[Any, _Rule] = {
    aten.max.default: (_flat_select("argmax"), False, "kink"),
    aten.min.default: (_flat_select("argmin"), False, "kink"),
    aten.max.dim: (_selected(1), False, "kink"),
    aten.min.dim: (_selected(1), False, "kink"),
    aten.median.default: (_equals_output, False, "kink"),
    aten.nanmedian.default: (_equals_output, False, "kink"),
    aten.median.dim: (_selected(1), False, "kink"),
    aten.nanmedian.dim: (_selected(1), False, "kink"),
}
#: Ops whose argument at the given position selects between two branches by a mask.
_SELECTS: dict[Any, int] = {aten.where: 0, aten.masked_fill: 1, aten.masked_fill_: 1}

#: aten ops recorded as kinks (the derivative jumps).
KINK_OPS = frozenset(n for names, _, _, kind in _TABLE if kind == "kink" for n in names) | {
    "max", "min", "median", "nanmedian"
}
#: aten ops recorded as discontinuities (the value jumps); comparisons whose mask feeds
#: ``torch.where``/``masked_fill`` count as kinks, threshold with value != threshold as a jump.
DISCONTINUOUS_OPS = frozenset(n for names, _, _, kind in _TABLE if kind == "discontinuity" for n in names)


_RULE_CACHE: dict[Any, "_Rule | None"] = {}


#: max_pool{1,2,3}d without indices -> the same op with indices: the recorder runs the latter
#: once (its values are the former's output) instead of pooling twice.
_POOL_INDICES: dict[Any, Any] = {
    getattr(aten, f"max_pool{nd}d").default: getattr(aten, f"max_pool{nd}d_with_indices").default
    for nd in (1, 2, 3)
    if hasattr(aten, f"max_pool{nd}d")
}


def _rule(func: Any) -> _Rule | None:
    try:
        return _RULE_CACHE[func]
    except KeyError:
        rule = _RULE_CACHE[func] = _OVERLOAD.get(func) or _RULES.get(func.overloadpacket)
        return rule


def register_kink(op: Any, switching_input: Callable[..., Tensor], *, kind: str = "kink") -> None:
    """Tell gradwatch where an opaque op is non-smooth.

    The kink recorder sees a ``torch.library`` custom op (a CUDA/Triton kernel wrapper)
    as one call, not the ``relu``/``clamp`` inside its kernel, so a probe that crosses
    such a kink would be judged and could fail on a correct backward. Registering the
    op's *switching input* ``z`` (zero at the kink, of one sign on each branch) makes
    every call of the op a recorded kink: an element whose sign of ``z`` changes between
    a probe's passes is a crossing (the probe is excluded and a coordinate redrawn), and
    ``|z|`` gives the margin, as for the built-in ops.

    Args:
        op: The op: what ``@torch.library.custom_op`` returned, ``torch.ops.<ns>.<name>``
            or one of its overloads (``.default``).
        switching_input: Called with the op's arguments, as the op receives them
            (``switching_input(*args, **kwargs)``), inside the recorder and without
            autograd; returns a floating tensor ``z`` (any shape).
        kind: ``"kink"`` (the derivative jumps where ``z`` changes sign) or
            ``"discontinuity"`` (the value jumps).

    Raises:
        TypeError: ``op`` is not an op, or ``switching_input`` is not callable.
        ValueError: ``kind`` is neither "kink" nor "discontinuity".

    Example:
        >>> @torch.library.custom_op("mylib::bias_relu", mutates_args=())  # doctest: +SKIP
        ... def bias_relu(x: Tensor, bias: Tensor) -> Tensor: ...
        >>> gradwatch.register_kink(bias_relu, lambda x, bias: x + bias)  # doctest: +SKIP
    """
    if not callable(switching_input):
        raise TypeError(f"`switching_input` must be callable, got {type(switching_input).__name__}")
    if kind not in ("kink", "discontinuity"):
        raise ValueError(f"`kind` must be 'kink' or 'discontinuity', got {kind!r}")
    target = getattr(op, "_opoverload", op)  # a CustomOpDef wraps its OpOverload
    if isinstance(target, torch._ops.OpOverload):
        table: dict[Any, _Rule] = _OVERLOAD
    elif isinstance(target, torch._ops.OpOverloadPacket):
        table = _RULES
    else:
        raise TypeError(
            "`op` must be a torch.library custom op, torch.ops.<namespace>.<name> or one of its overloads, "
            f"got {type(op).__name__} {op!r}"
        )
    name = str(target)

    def code(args: tuple, kwargs: dict, out: Any, with_z: bool) -> _Branch:
        z = switching_input(*args, **kwargs)
        if not isinstance(z, Tensor) or not z.is_floating_point():
            raise TypeError(
                f"the switching input registered for {name} must return a floating tensor, "
                f"got {type(z).__name__} {getattr(z, 'dtype', '')}".rstrip()
            )
        z = z.detach()
        return _Branch(z > 0, z if with_z else None)

    table[target] = (code, True, kind)
    _RULE_CACHE.clear()


def _branch(
    func: Any, args: tuple, kwargs: dict, out: Any = None, *, before: bool, with_z: bool = True
) -> tuple[_Branch, str] | None:
    """The branch of one op call (``before``: from its inputs, else from ``out``), and its kind.

    A plain function of the call, so a batched (vmap) evaluation can reuse it.
    """
    rule = _rule(func)
    if rule is None or rule[1] != before:
        return None
    branch = rule[0](args, kwargs, out, with_z)
    if branch is None:
        return None
    return branch, branch.kind or rule[2]


def _margin(z0: Tensor, zcode0: Tensor | None, branch: _Branch) -> Tensor:
    """``min |z₀| / |z - z₀|`` over the elements this pass moved (inf when none moved).

    Both sides are compared in :data:`_Z_DTYPE`, so elements whose move is below its
    resolution count as unmoved (their margin would exceed ~1e7 anyway). A selection's
    gap counts as negative where its winner changed. Exactly 0 means ``z₀ == 0`` for a
    moved element: at the kink.
    """
    z = branch.z.detach()
    if zcode0 is not None:
        z = torch.where(branch.zcode == zcode0, z, -z)
    moved = (z.to(_Z_DTYPE) - z0).abs()
    if moved.numel() == 0:
        return torch.full((), math.inf, dtype=torch.float64, device=z0.device)
    ratio = torch.where(moved > 0, z0.abs() / moved, math.inf)
    return ratio.amin().to(torch.float64)


@dataclass
class _Reference:
    """The unperturbed pass: per non-smooth op call, in call order."""

    names: list[str] = field(default_factory=list)
    modules: list[str | None] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    codes: list[Tensor] = field(default_factory=list)
    z: list[Tensor | None] = field(default_factory=list)
    zcode: list[Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def nbytes(self) -> int:
        """Bytes the reference keeps alive (codes, switching inputs, winner indices)."""
        kept = {id(t): t for t in (*self.z, *self.zcode, *self.codes) if t is not None}
        return sum(t.numel() * t.element_size() for t in kept.values())


class _ProbeKinks:
    """Per reference op call, over the passes of one probe: crossed (device bools) and
    the smallest margin (device float64), plus where the op sequence changed, if it did."""

    def __init__(self, reference: _Reference, device: torch.device) -> None:
        n = len(reference)
        self.reference = reference
        self.crossed = torch.zeros(n, dtype=torch.bool, device=device)
        self.margin = torch.full((n,), math.inf, dtype=torch.float64, device=device)
        self.diverged: int | None = None  # first op call that differs from the reference
        self.diverged_op: str | None = None  # the op a pass ran there instead (None: it ran none)
        self.with_margins = False

    def next_pass(self, *, margins: bool) -> "_ProbeKinks":
        """Prepare for one more perturbed pass; ``margins`` also computes margins in it."""
        self.with_margins = margins
        return self

    def any_crossed(self) -> Tensor:
        """Device bool: some pass of this probe took another branch somewhere."""
        if self.diverged is not None:
            return torch.ones((), dtype=torch.bool, device=self.crossed.device)
        return self.crossed.any()

    def _diverge(self, k: int, op: str | None) -> None:
        """A pass ran ``op`` (None: no op) where the reference ran its ``k``-th call."""
        if self.diverged is None or k < self.diverged:
            self.diverged, self.diverged_op = k, op

    def _fold(self, crossed: list[Tensor], margins: list[Tensor] | None, count: int) -> None:
        if count < len(self.reference):  # the pass ended early
            self._diverge(count, None)
        if crossed:
            device = self.crossed.device
            now = torch.stack([c.to(device) for c in crossed])
            self.crossed[: len(crossed)] |= now
            if margins:
                self.margin[: len(margins)] = torch.minimum(
                    self.margin[: len(margins)], torch.stack([m.to(device) for m in margins])
                )


class _ModuleStack:
    """The innermost listed module running now, tracked with global forward hooks.

    Args:
        names: ``id(module) -> qualified name`` (from ``named_modules()``); modules not
            listed are passed through (their ops belong to the enclosing listed module).
    """

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self._stack: list[str | None] = []
        self._hooks: list[Any] = []

    def install(self) -> None:
        """Start tracking (global hooks until :meth:`remove`)."""
        self._stack = []
        self._hooks = [
            register_module_forward_pre_hook(self._push),
            register_module_forward_hook(self._pop, always_call=True),
        ]

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._stack = []

    def current(self) -> str | None:
        """The innermost listed module running now (``None``: outside every listed module)."""
        for name in reversed(self._stack):
            if name is not None:
                return name
        return None

    def _push(self, module: nn.Module, args: Any) -> None:
        self._stack.append(self.names.get(id(module)))

    def _pop(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._stack:
            self._stack.pop()


class _BranchRecorder(TorchDispatchMode):
    """Records (reference pass) or compares (perturbed pass) every non-smooth op call.

    Args:
        module_names: ``id(module) -> qualified name`` for attribution (from
            ``named_modules()``); ops called while no listed module runs get ``None``.
        margins: Keep switching inputs and compute margins; False records crossings
            (codes) only, for the cheapest checks.
    """

    def __init__(self, module_names: dict[int, str] | None = None, *, margins: bool = True) -> None:
        super().__init__()
        self.module_names = module_names or {}
        self.margins = margins  # False: crossings only (no switching inputs kept or compared)
        self._target: _ProbeKinks | None = None
        self._ref = _Reference()
        self._modules = _ModuleStack(self.module_names)
        self.float64: Any = None  # a gradwatch._float64._Float64Ops run inside this mode (one dispatch level)
        self._masks: dict[int, tuple[weakref.ref, int]] = {}
        self._crossed: list[Tensor] = []
        self._margins: list[Tensor] = []
        self._count = 0
        self._inf: Tensor | None = None

    def compare_into(self, target: _ProbeKinks | None) -> "_BranchRecorder":
        """Compare the next pass with ``target.reference`` (``None``: record a reference)."""
        self._target = target
        return self

    def take_reference(self) -> _Reference:
        """The reference recorded by the last pass run in recording mode."""
        ref, self._ref = self._ref, _Reference()
        return ref

    # -- module attribution: global hooks, installed only while recording a reference
    def __enter__(self):
        self._reset_pass()
        if self._target is None and self.module_names:
            self._modules.install()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._modules.remove()
            self._finish()

    def _module(self) -> str | None:
        return self._modules.current()

    def _reset_pass(self) -> None:
        self._masks, self._crossed, self._margins, self._count = {}, [], [], 0
        if self._target is None:
            self._ref = _Reference()

    def _finish(self) -> None:
        if self._target is not None:
            self._target._fold(self._crossed, self._margins if self._target.with_margins else None, self._count)
        self._crossed, self._margins, self._masks = [], [], {}

    # -- the dispatch hook
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.float64 is not None:  # casts kept in float64, random draws in the native dtype
            return self.float64.run(func, args, kwargs or {}, self._dispatch)
        return self._dispatch(func, args, kwargs)

    def _dispatch(self, func, args, kwargs):
        kwargs = kwargs or {}
        rule = _rule(func)
        if rule is None:
            out = func(*args, **kwargs)
            if self._masks:
                self._note_selection(func, args)
            return out
        with_z = self.margins and (self._target is None or self._target.with_margins)
        if rule[1]:
            found = _branch(func, args, kwargs, before=True, with_z=with_z)
            if found is not None:
                self._on_branch(func, *found, None)
            return func(*args, **kwargs)
        with_indices = _POOL_INDICES.get(func)
        if with_indices is not None:  # pool once, with indices, instead of again in the rule
            full = with_indices(*args, **kwargs)
            found = _branch(func, args, kwargs, full, before=False, with_z=with_z)
            out = full[0]
        else:
            out = func(*args, **kwargs)
            found = _branch(func, args, kwargs, out, before=False, with_z=with_z)
        if found is not None:
            self._on_branch(func, *found, out)
        return out

    def _on_branch(self, func: Any, branch: _Branch, kind: str, out: Any) -> None:
        name = func.overloadpacket.__name__
        k = self._count
        self._count += 1
        if self._target is None:
            self._record(name, branch, kind, out)
        else:
            self._compare(k, name, branch)

    def _record(self, name: str, branch: _Branch, kind: str, out: Any) -> None:
        ref = self._ref
        ref.names.append(name)
        ref.modules.append(self._module())
        ref.kinds.append(kind)
        code = branch.code
        if _is_output(code, out):  # the caller holds it and may change it in place
            code = code.clone()
        ref.codes.append(code)
        z = branch.z if self.margins else None  # some rules give z even when not asked
        ref.z.append(None if z is None else z.detach().to(_Z_DTYPE, copy=True))
        if branch.zcode is None or z is None:
            ref.zcode.append(None)
        else:  # the winner indices: often the code itself
            ref.zcode.append(code if branch.zcode is branch.code else branch.zcode.clone())
        if kind == "discontinuity" and isinstance(out, Tensor) and out.dtype == torch.bool:
            self._masks[id(out)] = (weakref.ref(out), len(ref) - 1)

    def _note_selection(self, func: Any, args: tuple) -> None:
        """A comparison mask that selects between branches makes the comparison a kink."""
        pos = _SELECTS.get(func.overloadpacket)
        if pos is None or len(args) <= pos:
            return
        entry = self._masks.get(id(args[pos]))
        if entry is not None and entry[0]() is args[pos]:
            self._ref.kinds[entry[1]] = "kink"

    def _compare(self, k: int, name: str, branch: _Branch) -> None:
        ref = self._target.reference
        if len(self._crossed) < k:  # this pass already left the reference's op sequence
            return
        if k >= len(ref) or ref.names[k] != name:
            self._target._diverge(k, name)
            return
        self._crossed.append(_changed(branch.code, ref.codes[k]))
        if self._target.with_margins:
            z0 = ref.z[k]
            if z0 is None or branch.z is None or branch.z.shape != z0.shape:
                if self._inf is None:
                    self._inf = torch.full((), math.inf, dtype=torch.float64, device=ref.codes[k].device)
                self._margins.append(self._inf)
            else:
                self._margins.append(_margin(z0, ref.zcode[k], branch))



def _is_output(code: Tensor, out: Any) -> bool:
    """Whether ``code`` is (a part of) the op's output."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return any(isinstance(o, Tensor) and o is code for o in outs)


def _changed(code: Tensor, reference: Tensor) -> Tensor:
    """Device bool: some element took another branch than in the reference pass."""
    if code.shape != reference.shape or code.device != reference.device:
        return torch.ones((), dtype=torch.bool, device=reference.device)
    return torch.ne(code, reference).any()
