"""The float64 evaluation keeps float64 through casts and draws random numbers as the training forward did.

A float64 copy of the model is only useful if the forward stays in float64 and sees the
same random numbers as the training forward. Real model code breaks both:

* **casts to a lower precision**: ``logits.float()`` before a loss (Hugging Face causal
  LMs), ``x.to(torch.float32)`` inside RMSNorm/T5LayerNorm, ``softmax(..., dtype=torch.float32)``,
  ``sum(dtype=...)``, ``torch.tensor(..., dtype=torch.float32)``. Such a cast chooses a
  precision, it does not change the maths, so during the float64 evaluation every
  floating-point target dtype below float64 (float32, float16, bfloat16; complex64 and
  complex32 become complex128) is replaced by float64. Casts from integers and bools
  (``position_ids.float()``) become float64 too, so that they meet float64 operands; casts
  to integer or bool dtypes are untouched. The casts of floating tensors that were kept
  are counted, and the first few named with their module and op
  (:attr:`gradwatch.report.Report.kept_casts`).
* **random draws that depend on the dtype**: ``torch.rand(shape, dtype=x.dtype)``
  (ConvNeXt's stochastic depth, fractional max-pool's samples), ``normal_``,
  ``bernoulli`` with float64 probabilities and every other random aten op draw other
  numbers in float64 than in float32 (and on CUDA even dropout masks depend on the
  dtype). Every random op of :data:`RANDOM_OPS` therefore draws in the dtype the native
  forward used (the model's floating parameter dtype for float64 tensors and dtypes,
  an explicitly requested lower dtype as it is, the native default dtype for factories
  without a dtype; under autocast, where activations may be lower, the dtypes a native
  replay recorded with :class:`_NativeDraws`), from the same RNG state, and its floating
  outputs are cast up.
  Dropout keeps the drawn mask and computes ``input * mask * scale`` in float64.
* **fused attention dropout**: ``F.scaled_dot_product_attention(..., dropout_p>0)``
  runs, in float16/bfloat16/float32 on CUDA, flash, memory-efficient or cuDNN kernels
  with their own RNG; in float64 it runs the math path, whose dropout draws other masks.
  The first float64 pass asks PyTorch which kernel the native dtype would select
  (``torch._fused_sdp_choice``); a fused one makes the check unreliable with that reason
  (:attr:`_Float64Ops.unreplayable`), never a silent wrong verdict. The math path (CPU,
  or CUDA with fused kernels disabled) is replayed exactly.

Where a lower precision cannot be avoided (an op that returns float32 from float64
inputs, such as a custom kernel), :attr:`_Float64Ops.lowest` records the lowest floating
dtype the evaluation computed in; the loss-noise floor uses it.

All of it runs in one :class:`~torch.utils._python_dispatch.TorchDispatchMode` level: inside the
kink recorder's when it records (:class:`gradwatch.kinks._BranchRecorder` calls
:meth:`_Float64Ops.run`), else in :class:`_Float64Mode`. Module attribution and the SDPA
check run in the first pass only; a model whose first pass had nothing to rewrite runs
later passes without the mode.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from gradwatch.kinks import _ModuleStack

__all__ = ["RANDOM_OPS"]

aten = torch.ops.aten

#: Floating target dtypes below float64 and what the float64 evaluation computes in instead.
_KEEP = {
    torch.float32: torch.float64,
    torch.float16: torch.float64,
    torch.bfloat16: torch.float64,
    torch.complex64: torch.complex128,
    torch.complex32: torch.complex128,
}
#: Precision order of floating dtypes, lowest first (for :attr:`_Float64Ops.lowest`).
_EPS = {d: float(torch.finfo(d).eps) for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)}
_EPS.update({torch.complex32: _EPS[torch.float16], torch.complex64: _EPS[torch.float32],
             torch.complex128: _EPS[torch.float64]})
#: How many kept casts a report names.
_SITES = 5


def _overloads(*names: str) -> frozenset:
    found = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is not None:
            found += [getattr(packet, o) for o in packet.overloads()]
    return frozenset(found)


#: Random aten ops (every overload): in the float64 evaluation they draw in the native dtype.
RANDOM_OPS = _overloads(
    "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli", "bernoulli_",
    "native_dropout", "_fused_dropout", "normal", "normal_", "uniform_", "exponential_", "geometric_", "cauchy_",
    "log_normal_", "random_", "multinomial", "rrelu_with_noise", "rrelu_with_noise_", "poisson", "binomial",
    "_standard_gamma", "_sample_dirichlet",
)
#: Factories whose dtype defaults to the default dtype (which the float64 evaluation sets to float64).
_DEFAULT_FLOAT = _overloads("rand", "randn", "normal")
_DROPOUT = _overloads("native_dropout", "_fused_dropout")
_RRELU = _overloads("rrelu_with_noise", "rrelu_with_noise_")
#: Tensors made from Python data (``torch.tensor(..., dtype=torch.float32)``).
_LIFT = _overloads("lift_fresh", "lift_fresh_copy")
#: SDPA backends that run fused kernels (``torch.nn.attention.SDPBackend`` values), by name.
_FUSED_SDPA = {1: "flash attention", 2: "memory-efficient attention", 3: "cuDNN attention", 4: "an overrideable backend"}


def _dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``: a dtype as reports and messages name it."""
    return str(dtype).replace("torch.", "")


def _tree_map(fn: Callable[[Any], Any], obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_map(fn, o) for o in obj)
    return fn(obj)


class _Float64Ops:
    """What the float64 evaluation changes, op by op, and what it saw.

    Args:
        native_dtype: The floating dtype the native forward computed in (the model's
            floating parameter dtype): random ops on float64 tensors draw in it.
        native_default: The default dtype outside the float64 evaluation: random
            factories without a dtype draw in it.
        module_names: ``id(module) -> qualified name`` for attribution.
        autocast: The autocast state of the training forward (``ReplayState.autocast``):
            the dtype attention ran in natively.

    Attributes:
        kept: Casts of floating tensors to a lower precision kept in float64, in the first pass.
        sites: ``"module: op float64->float32"`` of the first few of them.
        draws: Random op calls drawn in a dtype below float64, in the first pass.
        lowest: The lowest floating dtype an op of the first pass returned.
        unreplayable: Why the float64 evaluation cannot reproduce the native forward's
            random draws, else ``None``.
        needed: False after a first pass with nothing to change (later passes skip the mode).
    """

    def __init__(
        self, native_dtype: torch.dtype, native_default: torch.dtype, module_names: dict[int, str] | None = None,
        autocast: Mapping[str, tuple[bool, torch.dtype]] | None = None,
    ) -> None:
        self.native_dtype = native_dtype
        self.native_default = native_default
        self.autocast = dict(autocast or {})
        self._modules = _ModuleStack(module_names or {})
        self.kept = 0
        self.sites: list[str] = []
        self.draws = 0
        self.lowest = torch.float64
        self.unreplayable: str | None = None
        self.needed = True
        self.passes = 0
        # the dtype of every random op call of the native forward, in call order, when recorded
        # (under autocast, where an activation's native dtype is not the parameter dtype)
        self.native_draws: list[torch.dtype | None] | None = None
        self._k = 0
        self._counting = False
        self._changed = False

    # -- one pass
    @contextmanager
    def active(self, recorder: Any = None) -> Iterator[None]:
        """Run one float64 pass under these rules: inside ``recorder`` (a kink recorder
        entered around the pass) when given, else in a :class:`_Float64Mode`."""
        first = self.passes == 0
        self.passes += 1
        self._k = 0
        if not first and not self.needed:
            yield
            return
        self._counting = first
        with ExitStack() as stack:
            if first:
                self._modules.install()
                stack.callback(self._modules.remove)
                stack.enter_context(_SdpaWatch(self))
            if recorder is not None:
                recorder.float64 = self
                stack.callback(setattr, recorder, "float64", None)
            else:
                stack.enter_context(_Float64Mode(self))
            yield
        if first:
            self._counting = False
            self.needed = self._changed or self.lowest != torch.float64

    # -- the dispatch hook
    def run(self, func: Any, args: tuple, kwargs: dict, call: Callable[[Any, tuple, dict], Any]) -> Any:
        """Run ``func`` under the float64 rules; ``call(func, args, kwargs)`` runs it
        (the kink recorder's own dispatch, or the op itself)."""
        if func in RANDOM_OPS:
            out = self._random(func, args, kwargs, call)
        else:
            dtype = kwargs.get("dtype")
            if dtype in _KEEP:
                kwargs = {**kwargs, "dtype": _KEEP[dtype]}
                self._keep(func, args, dtype)
                out = call(func, args, kwargs)
            else:
                try:
                    out = call(func, args, kwargs)
                except RuntimeError as err:  # a lower-precision tensor from outside met float64 ones
                    if not any(isinstance(a, Tensor) and a.dtype in _KEEP for a in args):
                        raise
                    try:
                        out = call(func, _tree_map(self._up, args), kwargs)
                    except Exception:
                        raise err from None
                if func in _LIFT and isinstance(out, Tensor) and out.dtype in _KEEP:
                    self._keep(func, args, out.dtype)
                    out = out.to(_KEEP[out.dtype])
        if self._counting:  # an op that computes below float64 does so in every pass
            self._note(out)
        return out

    def _up(self, t: Any) -> Any:
        if isinstance(t, Tensor) and t.dtype in _KEEP:
            self._changed = True
            return t.to(_KEEP[t.dtype])
        return t

    def _keep(self, func: Any, args: tuple, dtype: torch.dtype) -> None:
        self._changed = True
        if not self._counting:
            return
        src = args[0] if args and isinstance(args[0], Tensor) else None
        if src is not None and not (src.is_floating_point() or src.is_complex()):
            return  # int/bool -> float: no precision is chosen
        self.kept += 1
        if len(self.sites) < _SITES:
            module = self._modules.current()
            where = "(outside modules)" if module is None else (module or "(model)")
            op = func.overloadpacket.__name__
            if src is not None and src.dtype == dtype:  # a lower-precision tensor made inside (torch.tensor, from_numpy)
                self.sites.append(f"{where}: {op} of a {_dtype_name(dtype)} tensor->float64")
            else:
                src_name = _dtype_name(src.dtype) if src is not None else "new"
                self.sites.append(f"{where}: {op} {src_name}->{_dtype_name(dtype)}")

    def _note(self, out: Any) -> None:
        if isinstance(out, Tensor):
            if out.dtype in _KEEP and _EPS[out.dtype] > _EPS[self.lowest]:
                self.lowest = out.dtype
        elif isinstance(out, (tuple, list)):
            for o in out:
                self._note(o)

    # -- random ops
    def _draw_dtype(self, func: Any, args: tuple, kwargs: dict) -> torch.dtype | None:
        """The dtype the native forward drew in, when it is not float64 (else None)."""
        native = self.native_dtype
        dtype = kwargs.get("dtype")
        if dtype is not None:
            if dtype == torch.float64:
                return native if native != torch.float64 else None
            return dtype if dtype in _KEEP else None  # requested explicitly: drawn so natively too
        if func in _DEFAULT_FLOAT and not any(isinstance(a, Tensor) for a in args):
            return self.native_default if self.native_default != torch.float64 else None
        if native != torch.float64 and any(isinstance(a, Tensor) and a.dtype == torch.float64 for a in args):
            return native
        return None

    def _random(self, func: Any, args: tuple, kwargs: dict, call: Callable) -> Any:
        k, self._k = self._k, self._k + 1
        if self.native_draws is not None and k < len(self.native_draws):  # as recorded natively
            dtype = self.native_draws[k]
            dtype = dtype if dtype in _KEEP else None
        else:
            dtype = self._draw_dtype(func, args, kwargs)
        if dtype is None:
            return call(func, args, kwargs)
        self._changed = True
        if self._counting:
            self.draws += 1

        def down(t: Any) -> Any:
            return t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float64 else t

        def up(t: Any) -> Any:
            return t.to(torch.float64) if isinstance(t, Tensor) and t.dtype == dtype else t

        if func in _DROPOUT:  # the mask only: the values are scaled in float64
            x = args[0]
            if func.overloadpacket is aten.native_dropout and (args[2] if len(args) > 2 else kwargs.get("train")) is False:
                return call(func, args, kwargs)  # eval mode: no draw
            _, mask = call(func, (torch.empty_like(x, dtype=dtype), *args[1:]), kwargs)
            p = float(args[1])
            scale = 1.0 / p if func.overloadpacket is aten._fused_dropout else (0.0 if p == 1 else 1.0 / (1.0 - p))
            return x * mask * scale, mask
        if func in _RRELU:  # the noise buffer (arg 1) is written in place: out = x * noise
            x, noise = args[0], args[1]
            training = args[4] if len(args) > 4 else kwargs.get("training", False)
            if not training:
                return call(func, args, kwargs)
            small = noise.to(dtype)
            call(func, (x.to(dtype), small, *args[2:]), kwargs)
            noise.copy_(small)
            out = x * noise
            if func.overloadpacket is aten.rrelu_with_noise_:
                return x.copy_(out)
            return out
        new_kwargs = {k: down(v) for k, v in kwargs.items()}
        if "dtype" in kwargs or func in _DEFAULT_FLOAT and not any(isinstance(a, Tensor) for a in args):
            new_kwargs["dtype"] = dtype
        if func.overloadpacket.__name__.endswith("_") and args and isinstance(args[0], Tensor):  # in place
            target = args[0]
            if target.dtype != torch.float64:
                return call(func, args, kwargs)
            small = torch.empty_like(target, dtype=dtype)  # in-place random ops overwrite every element
            call(func, (small, *_tree_map(down, args[1:])), new_kwargs)
            return target.copy_(small)
        return _tree_map(up, call(func, _tree_map(down, args), new_kwargs))


class _NativeDraws(TorchDispatchMode):
    """Records the dtype every random op call of a native forward draws in (None: no floating draw)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype | None] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RANDOM_OPS:
            dtype = kwargs.get("dtype")
            if dtype is None and func in _DEFAULT_FLOAT and not any(isinstance(a, Tensor) for a in args):
                dtype = torch.get_default_dtype()
            if dtype is None:
                dtype = next((a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point()), None)
            self.dtypes.append(dtype)
        return func(*args, **kwargs)


class _Float64Mode(TorchDispatchMode):
    """Applies :class:`_Float64Ops` when no kink recorder runs the pass."""

    def __init__(self, ops: _Float64Ops) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.ops.run(func, args, kwargs or {}, _call)


def _call(func: Any, args: tuple, kwargs: dict) -> Any:
    return func(*args, **kwargs)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _SdpaWatch(TorchFunctionMode):
    """First float64 pass only: does an attention call with dropout run a fused kernel natively?"""

    def __init__(self, ops: _Float64Ops) -> None:
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.ops.unreplayable is None:
            given = dict(zip(_SDPA_ARGS, args), **kwargs)
            p = given.get("dropout_p", 0.0)
            if p and p > 0:
                q = given["query"]
                native = self.ops.native_dtype
                enabled, cast = self.ops.autocast.get(q.device.type, (False, None))
                if enabled and cast is not None:
                    native = cast
                backend = _sdpa_backend(given, native)
                if backend in _FUSED_SDPA:
                    self.ops.unreplayable = (
                        f"F.scaled_dot_product_attention with dropout_p={p:g} runs {_FUSED_SDPA[backend]} in "
                        f"{_dtype_name(native)} on {q.device.type} in the training forward, whose dropout masks come "
                        "from the kernel's own RNG; the float64 replay runs the math path and cannot draw the same "
                        "masks, so no tensor is judged (set dropout to 0 for checked steps, or select the math "
                        "backend with torch.nn.attention.sdpa_kernel(SDPBackend.MATH))"
                    )
        return func(*args, **kwargs)


def _sdpa_backend(given: dict, dtype: torch.dtype) -> int:
    """The SDPA backend (``SDPBackend`` value) PyTorch selects for these arguments in ``dtype``.

    Shapes, strides and dtypes decide, not values, so empty tensors of the native dtype stand in.
    """
    def like(t: Any) -> Any:
        return torch.empty_like(t, dtype=dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

    try:
        with _disable_current_modes():  # the float64 rules must not see the stand-ins
            return _choice(given, like)
    except Exception:  # no way to ask: a CUDA/XPU device runs fused kernels unless told otherwise
        return 0 if given["query"].device.type == "cpu" else 2


def _choice(given: dict, like: Callable[[Any], Any]) -> int:
    return int(torch._fused_sdp_choice(
        like(given["query"]), like(given["key"]), like(given["value"]), like(given.get("attn_mask")),
        float(given.get("dropout_p", 0.0)), bool(given.get("is_causal", False)), scale=given.get("scale"),
        enable_gqa=bool(given.get("enable_gqa", False)),
    ))
