"""Real Triton kernels for the gradient-check tests and ``benchmarks/triton_kernels.py``.

Each kernel is a ``torch.autograd.Function`` whose forward and backward are ``@triton.jit``
kernels, wrapped in an ``nn.Module``; each exists in a correct version and, with ``bug=True``,
with a planted backward bug of the kind real kernels shipped with. Like most released Triton
kernels they accept any floating dtype and compute in float32 inside (load, ``.to(tl.float32)``,
compute, store in the output's dtype); one raises on float64 (an explicit dtype check), one is
correct in float32 and wrong in float64.

The kernels run on a GPU as they are and on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, set before ``triton`` is imported). They avoid what the interpreter
does not support: Python floats arrive as Python floats (only used in arithmetic here, never
``.to(...)``), ``libdevice`` math returns None (``sigmoid``/``tanh``/``rsqrt`` are written
with ``tl.exp``/``tl.sqrt``), and the autotuner fails with "0 active drivers" (one pinned
config per kernel, no ``@triton.autotune``).

``KERNELS`` maps a kernel name to a :class:`KernelCase`: how to build its small model (the
kernel between torch layers), a batch, the loss, and the kernel module with inputs for
``gradwatch.check_module``.

Example:
    >>> case = KERNELS["swiglu"]                                    # doctest: +SKIP
    >>> model, batch = case.model(bug=True, seed=0), case.batch(0)  # doctest: +SKIP
    >>> gradwatch.check(model, case.loss_fn, batch, seed=0).ok      # doctest: +SKIP
    False
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

__all__ = [
    "KERNELS",
    "CausalConv1d",
    "FusedCrossEntropy",
    "GeluTanh",
    "KernelCase",
    "LayerNorm",
    "RMSNorm",
    "SwiGLU",
]

_BLOCK_M = 16  # rows per program: few programs keep the interpreter fast


def _rows(x: Tensor) -> Tensor:
    """``x`` as a contiguous ``(rows, last)`` matrix."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _grid(m: int) -> tuple[int]:
    return (triton.cdiv(m, _BLOCK_M),)


# --------------------------------------------------------------------------- RMSNorm

@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, M, N, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW, M, N, BUG: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    xhat = x * rstd[:, None]
    wdy = dy * w[None, :]
    if BUG:  # the mean over the padded block instead of over the N real columns
        c = tl.sum(xhat * wdy, axis=1) / BLOCK_N
    else:
        c = tl.sum(xhat * wdy, axis=1) / N
    dx = (wdy - xhat * c[:, None]) * rstd[:, None]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * N + cols, tl.sum(dy * xhat, axis=0), mask=cmask)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, bug: bool) -> Tensor:
        x2 = _rows(x)
        m, n = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block_n = triton.next_power_of_2(n)
        _rmsnorm_fwd[_grid(m)](x2, weight, y, rstd, m, n, eps, BLOCK_M=_BLOCK_M, BLOCK_N=block_n)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.bug, ctx.shape = bug, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        dx = torch.empty_like(x2)
        grid = _grid(m)
        dw = torch.empty(grid[0], n, dtype=torch.float32, device=x2.device)
        _rmsnorm_bwd[grid](_rows(dy), x2, weight, rstd, dx, dw, m, n, BUG=ctx.bug, BLOCK_M=_BLOCK_M,
                           BLOCK_N=triton.next_power_of_2(n))
        return dx.view(ctx.shape), dw.sum(0).to(weight.dtype), None, None


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: ``x / sqrt(mean(x²) + eps) * weight``.

    Planted bug: the backward averages the correction term over the padded block
    (``BLOCK_N``, the next power of two) instead of the ``N`` real columns, so the
    input gradient is wrong whenever ``N`` is not a power of two.

    Example:
        >>> RMSNorm(48)(torch.randn(4, 48)).shape
        torch.Size([4, 48])
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, bug: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))
        self.eps, self.bug = eps, bug

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps, self.bug)


# --------------------------------------------------------------------------- fused cross-entropy

@triton.jit
def _ce_fwd(LOGITS, TARGET, LOSS, M, V, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_V).to(tl.int64)
    rmask = rows < M
    mask = rmask[:, None] & (cols < V)[None, :]
    x = tl.load(LOGITS + rows[:, None] * V + cols[None, :], mask=mask, other=-1e30).to(tl.float32)
    t = tl.load(TARGET + rows, mask=rmask, other=0)
    mx = tl.max(x, axis=1)
    lse = mx + tl.log(tl.sum(tl.exp(x - mx[:, None]), axis=1))
    xt = tl.sum(tl.where(cols[None, :] == t[:, None], x, 0.0), axis=1)
    tl.store(LOSS + rows, (lse - xt).to(LOSS.dtype.element_ty), mask=rmask)


@triton.jit
def _ce_bwd(DLOSS, stride_dl, LOGITS, TARGET, DLOGITS, M, V, BUG: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_V).to(tl.int64)
    rmask = rows < M
    if BUG:  # off by one: the softmax denominator of the backward misses the last class
        cmask = cols < V - 1
    else:
        cmask = cols < V
    offs = rows[:, None] * V + cols[None, :]
    mask = rmask[:, None] & (cols < V)[None, :]
    x = tl.load(LOGITS + offs, mask=mask, other=-1e30).to(tl.float32)
    t = tl.load(TARGET + rows, mask=rmask, other=0)
    dl = tl.load(DLOSS + rows * stride_dl, mask=rmask, other=0.0).to(tl.float32)
    mx = tl.max(x, axis=1)
    e = tl.exp(x - mx[:, None])
    s = tl.sum(tl.where(cmask[None, :], e, 0.0), axis=1)
    p = e / s[:, None]
    grad = (p - tl.where(cols[None, :] == t[:, None], 1.0, 0.0)) * dl[:, None]
    tl.store(DLOGITS + offs, grad.to(DLOGITS.dtype.element_ty), mask=mask)


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, bug: bool) -> Tensor:
        x2 = _rows(logits)
        t = target.reshape(-1).contiguous()
        m, v = x2.shape
        loss = torch.empty(m, dtype=logits.dtype, device=logits.device)
        _ce_fwd[_grid(m)](x2, t, loss, m, v, BLOCK_M=_BLOCK_M, BLOCK_V=triton.next_power_of_2(v))
        ctx.save_for_backward(x2, t)
        ctx.bug, ctx.shape = bug, logits.shape
        return loss.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, dloss: Tensor):
        x2, t = ctx.saved_tensors
        m, v = x2.shape
        dl = dloss.reshape(-1)  # the gradient of .mean() arrives expanded: stride 0
        dx = torch.empty_like(x2)
        _ce_bwd[_grid(m)](dl, dl.stride(0), x2, t, dx, m, v, BUG=ctx.bug, BLOCK_M=_BLOCK_M,
                          BLOCK_V=triton.next_power_of_2(v))
        return dx.view(ctx.shape), None, None


class FusedCrossEntropy(nn.Module):
    """Per-row cross-entropy of ``logits`` against integer ``target``, softmax in the kernel.

    Planted bug: an off-by-one mask in the backward's softmax denominator (the last class
    is left out of the sum), so every logit gradient is a few percent off.

    Example:
        >>> FusedCrossEntropy()(torch.randn(4, 16), torch.tensor([0, 3, 1, 15])).shape
        torch.Size([4])
    """

    def __init__(self, *, bug: bool = False) -> None:
        super().__init__()
        self.bug = bug

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return _CrossEntropyFn.apply(logits, target, self.bug)


# --------------------------------------------------------------------------- SwiGLU

@triton.jit
def _swiglu_fwd(X, Y, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    xo = rows[:, None] * (2 * N) + cols[None, :]  # gate in the first N columns, up in the last N
    a = tl.load(X + xo, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X + xo + N, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-a))
    tl.store(Y + rows[:, None] * N + cols[None, :], (a * sig * b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DY, X, DX, M, N, BUG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    xo = rows[:, None] * (2 * N) + cols[None, :]
    a = tl.load(X + xo, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(X + xo + N, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-a))
    if BUG:  # silu'(a) with sig where (1 - sig) belongs
        dsilu = sig * (1.0 + a * sig)
    else:
        dsilu = sig * (1.0 + a * (1.0 - sig))
    tl.store(DX + xo, (dy * b * dsilu).to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + xo + N, (dy * a * sig).to(DX.dtype.element_ty), mask=mask)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bug: bool) -> Tensor:
        x2 = _rows(x)
        m, n = x2.shape[0], x2.shape[1] // 2
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        _swiglu_fwd[_grid(m)](x2, y, m, n, BLOCK_M=_BLOCK_M, BLOCK_N=triton.next_power_of_2(n))
        ctx.save_for_backward(x2)
        ctx.bug, ctx.shape = bug, x.shape
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (x2,) = ctx.saved_tensors
        m, n = x2.shape[0], x2.shape[1] // 2
        dx = torch.empty_like(x2)
        _swiglu_bwd[_grid(m)](_rows(dy), x2, dx, m, n, BUG=ctx.bug, BLOCK_M=_BLOCK_M,
                              BLOCK_N=triton.next_power_of_2(n))
        return dx.view(ctx.shape), None


class SwiGLU(nn.Module):
    """``silu(a) * b`` of a fused gate/up projection ``x = [a, b]`` (last dimension ``2N``).

    Planted bug: ``silu'(a)`` written as ``σ(a)(1 + a·σ(a))`` instead of ``σ(a)(1 + a(1 − σ(a)))``.

    Example:
        >>> SwiGLU()(torch.randn(4, 64)).shape
        torch.Size([4, 32])
    """

    def __init__(self, *, bug: bool = False) -> None:
        super().__init__()
        self.bug = bug

    def forward(self, x: Tensor) -> Tensor:
        return _SwiGLUFn.apply(x, self.bug)


# --------------------------------------------------------------------------- causal depthwise conv1d

@triton.jit
def _conv_fwd(X, W, Y, R, T, C, K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program over all B*T rows of the (B, T, C) input: row r is time r % T of sequence r // T
    rs = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    ts = rs % T
    cs = tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cs < C
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        shift = K - 1 - k
        m = ((ts >= shift) & (rs < R))[:, None] & cmask[None, :]
        x = tl.load(X + (rs - shift)[:, None] * C + cs[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(W + cs * K + k, mask=cmask, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    out = (rs < R)[:, None] & cmask[None, :]
    tl.store(Y + rs[:, None] * C + cs[None, :], acc.to(Y.dtype.element_ty), mask=out)


@triton.jit
def _conv_bwd(DY, sdb, sdt, sdc, X, W, DX, DW, R, T, C, K: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rs = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    bs = rs // T
    ts = rs % T
    cs = tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cs < C
    rmask = (rs < R)[:, None] & cmask[None, :]
    dy = tl.load(DY + bs[:, None] * sdb + ts[:, None] * sdt + cs[None, :] * sdc, mask=rmask,
                 other=0.0).to(tl.float32)
    dx = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for k in tl.static_range(K):
        # y[t] += w[k] x[t - s] with s = K-1-k:  dx[t] += w[k] dy[t + s],  dw[k] += sum_t dy[t] x[t - s]
        shift = K - 1 - k
        m = ((ts + shift < T) & (rs < R))[:, None] & cmask[None, :]
        dys = tl.load(DY + bs[:, None] * sdb + (ts + shift)[:, None] * sdt + cs[None, :] * sdc, mask=m,
                      other=0.0).to(tl.float32)
        w = tl.load(W + cs * K + k, mask=cmask, other=0.0).to(tl.float32)
        dx += dys * w[None, :]
        ms = ((ts >= shift) & (rs < R))[:, None] & cmask[None, :]
        x = tl.load(X + (rs - shift)[:, None] * C + cs[None, :], mask=ms, other=0.0).to(tl.float32)
        tl.store(DW + pid * C * K + cs * K + k, tl.sum(dy * x, axis=0), mask=cmask)
    tl.store(DX + rs[:, None] * C + cs[None, :], dx.to(DX.dtype.element_ty), mask=rmask)


_CONV_BLOCK_R = 64


class _CausalConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bug: bool) -> Tensor:
        x = x.contiguous()
        bsz, t, c = x.shape
        k = weight.shape[1]
        y = torch.empty_like(x)
        _conv_fwd[(triton.cdiv(bsz * t, _CONV_BLOCK_R),)](x, weight.contiguous(), y, bsz * t, t, c, K=k,
                                                          BLOCK_R=_CONV_BLOCK_R, BLOCK_C=triton.next_power_of_2(c))
        ctx.save_for_backward(x, weight)
        ctx.bug = bug
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        bsz, t, c = x.shape
        k = weight.shape[1]
        # planted bug: the strides of a contiguous (B, T, C) tensor, whatever dy's layout
        strides = (t * c, c, 1) if ctx.bug else dy.stride()
        dx = torch.empty_like(x)
        grid = (triton.cdiv(bsz * t, _CONV_BLOCK_R),)
        dw = torch.empty(grid[0], c, k, dtype=torch.float32, device=x.device)
        _conv_bwd[grid](dy, *strides, x, weight.contiguous(), dx, dw, bsz * t, t, c, K=k,
                        BLOCK_R=_CONV_BLOCK_R, BLOCK_C=triton.next_power_of_2(c))
        return dx, dw.sum(0).to(weight.dtype), None


class CausalConv1d(nn.Module):
    """Causal depthwise conv1d over time: ``(B, T, C)`` in, channels-first ``(B, C, T)`` out.

    The output is the transpose of the kernel's ``(B, T, C)`` result, so the gradient the
    backward receives is non-contiguous whenever the next layer works channels-first.
    Planted bug: the backward indexes ``dy`` with the strides of a contiguous tensor.

    Example:
        >>> CausalConv1d(8, 4)(torch.randn(2, 16, 8)).shape
        torch.Size([2, 8, 16])
    """

    def __init__(self, channels: int, kernel_size: int, *, bug: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels, kernel_size) / math.sqrt(kernel_size))
        self.bug = bug

    def forward(self, x: Tensor) -> Tensor:
        return _CausalConvFn.apply(x, self.weight, self.bug).transpose(1, 2)


# --------------------------------------------------------------------------- GELU (no float64)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@triton.jit
def _tanh(u):
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)


@triton.jit
def _gelu_fwd(X, Y, numel, c, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(c * (x + 0.044715 * x * x * x))
    tl.store(Y + offs, (0.5 * x * (1.0 + t)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd(DY, X, DX, numel, c, BUG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(c * (x + 0.044715 * x * x * x))
    if BUG:  # d/dx of x³ written as x²
        du = c * (1.0 + 0.044715 * x * x)
    else:
        du = c * (1.0 + 3.0 * 0.044715 * x * x)
    d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    tl.store(DX + offs, (dy * d).to(DX.dtype.element_ty), mask=mask)


_GELU_BLOCK = 1024


class _GeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bug: bool) -> Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"gelu_tanh kernel: float16, bfloat16 or float32 expected, got {x.dtype}")
        x = x.contiguous()
        y = torch.empty_like(x)
        _gelu_fwd[(triton.cdiv(x.numel(), _GELU_BLOCK),)](x, y, x.numel(), _SQRT_2_OVER_PI, BLOCK=_GELU_BLOCK)
        ctx.save_for_backward(x)
        ctx.bug = bug
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        _gelu_bwd[(triton.cdiv(x.numel(), _GELU_BLOCK),)](dy.contiguous(), x, dx, x.numel(), _SQRT_2_OVER_PI,
                                                          BUG=ctx.bug, BLOCK=_GELU_BLOCK)
        return dx, None


class GeluTanh(nn.Module):
    """GELU, tanh approximation; raises ``TypeError`` on float64 (no float64 kernel).

    Planted bug: the derivative of ``0.044715·x³`` written as ``0.044715·x²``.

    Example:
        >>> GeluTanh()(torch.randn(4, 8)).shape
        torch.Size([4, 8])
    """

    def __init__(self, *, bug: bool = False) -> None:
        super().__init__()
        self.bug = bug

    def forward(self, x: Tensor) -> Tensor:
        return _GeluFn.apply(x, self.bug)


# --------------------------------------------------------------------------- LayerNorm (float64 broken)

@triton.jit
def _layernorm_fwd(X, W, B, Y, MEAN, RSTD, M, N, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _layernorm_bwd(DY, X, W, MEAN, RSTD, DX, DW, DB, M, N, BUG: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    # one block of BLOCK_N columns per row: the launcher must make BLOCK_N >= N
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    wdy = dy * w[None, :]
    c1 = tl.sum(xhat * wdy, axis=1) / N
    c2 = tl.sum(wdy, axis=1) / N
    dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if BUG:  # off by one: the last row of the batch is left out of dw and db
        keep = rows < M - 1
        dy = tl.where(keep[:, None], dy, 0.0)
    tl.store(DW + pid * N + cols, tl.sum(dy * xhat, axis=0), mask=cmask)
    tl.store(DB + pid * N + cols, tl.sum(dy, axis=0), mask=cmask)


_LN_BWD_BYTES = 256  # the backward's row block, in bytes: 64 float32 columns, only 32 float64 ones


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, bug: bool) -> Tensor:
        x2 = _rows(x)
        m, n = x2.shape
        y = torch.empty_like(x2)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        _layernorm_fwd[_grid(m)](x2, weight, bias, y, mean, rstd, m, n, eps, BLOCK_M=_BLOCK_M,
                                 BLOCK_N=triton.next_power_of_2(n))
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.bug, ctx.shape = bug, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        grid = _grid(m)
        # the float64 bug: the block is sized in bytes for <= 4-byte dtypes, so a float64 row
        # is only half covered; the rest of dx/dw/db stays zero and the row sums are partial
        block_n = min(triton.next_power_of_2(n), _LN_BWD_BYTES // x2.element_size())
        dx = torch.zeros_like(x2)
        dw = torch.zeros(grid[0], n, dtype=torch.float32, device=x2.device)
        db = torch.zeros(grid[0], n, dtype=torch.float32, device=x2.device)
        _layernorm_bwd[grid](_rows(dy), x2, weight, mean, rstd, dx, dw, db, m, n, BUG=ctx.bug,
                             BLOCK_M=_BLOCK_M, BLOCK_N=block_n)
        return dx.view(ctx.shape), dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype), None, None


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension; correct in float32, wrong in float64 backward
    whenever the row has more than 32 columns (the backward's block is sized in bytes).

    Planted bug (float32 too): the last row of the batch is left out of ``dw`` and ``db``.

    Example:
        >>> LayerNorm(64)(torch.randn(4, 64)).shape
        torch.Size([4, 64])
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, bug: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))
        self.bias = nn.Parameter(0.1 * torch.randn(dim))
        self.eps, self.bug = eps, bug

    def forward(self, x: Tensor) -> Tensor:
        return _LayerNormFn.apply(x, self.weight, self.bias, self.eps, self.bug)


# --------------------------------------------------------------------------- small models around them

_FEATURES, _CLASSES, _BATCH = 8, 4, 16


class _Sandwich(nn.Module):
    """``Linear -> [× scale] -> kernel -> [Tanh] -> Linear``: the kernel between torch layers.

    The last Linear is frozen: its gradient does not go through the kernel's backward, and
    every checked tensor costs the interpreter some 20 kernel launches per check."""

    def __init__(self, kernel: nn.Module, width: int, out_width: int, *, scale: float = 1.0,
                 tanh: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(_FEATURES, width, bias=False)
        self.kernel = kernel
        self.out = nn.Linear(out_width, _CLASSES, bias=False).requires_grad_(False)  # a frozen head
        self.scale, self.tanh = scale, tanh

    def forward(self, x: Tensor) -> Tensor:
        h = self.kernel(self.inp(x) * self.scale if self.scale != 1.0 else self.inp(x))
        return self.out(torch.tanh(h) if self.tanh else h)


class _CrossEntropyNet(nn.Module):
    """``Linear -> Tanh -> Linear -> fused cross-entropy``; ``forward(x, y)`` is the mean loss."""

    def __init__(self, bug: bool, vocab: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(_FEATURES, 32, bias=False)
        self.head = nn.Linear(32, vocab, bias=False)
        self.kernel = FusedCrossEntropy(bug=bug)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.kernel(self.head(torch.tanh(self.inp(x))), y).mean()


class _ConvNet(nn.Module):
    """``Linear -> causal conv (channels-first out) -> Tanh -> pointwise Conv1d to the classes
    (frozen) -> mean over time``: the pointwise conv hands the kernel a non-contiguous ``dy``."""

    def __init__(self, bug: bool, channels: int = 8, kernel_size: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(_FEATURES, channels, bias=False)
        self.kernel = CausalConv1d(channels, kernel_size, bug=bug)
        self.head = nn.Conv1d(channels, _CLASSES, 1, bias=False).requires_grad_(False)  # a frozen head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.kernel(self.inp(x)))).mean(-1)


def _classification_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _model_loss(model: nn.Module, batch: Any) -> Tensor:
    return model(*batch)


def _flat_batch(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(_BATCH, _FEATURES, generator=g), torch.randint(0, _CLASSES, (_BATCH,), generator=g)


def _vocab_batch(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(_BATCH, _FEATURES, generator=g), torch.randint(0, 16, (_BATCH,), generator=g)


def _seq_batch(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(4, 16, _FEATURES, generator=g), torch.randint(0, _CLASSES, (4,), generator=g)


def _randn(seed: int, *shape: int, scale: float = 1.0) -> Tensor:
    g = torch.Generator().manual_seed(20_000 + seed)
    return (torch.randn(*shape, generator=g) * scale).requires_grad_()


@dataclass(frozen=True)
class KernelCase:
    """One kernel of the suite: its model, batch, loss, and module-local call.

    Attributes:
        name: Short name (``"rmsnorm"``, ...).
        model: ``model(bug=..., seed=...)`` builds the small model around the kernel.
        batch: ``batch(seed)`` returns a training batch for it.
        loss_fn: ``loss_fn(model, batch)``, the scalar loss.
        module: ``module(bug=..., seed=...)`` returns ``(kernel module, inputs)`` for
            ``gradwatch.check_module``.
        note: What the kernel does about float64 and what its planted bug is.
    """

    name: str
    model: Callable[..., nn.Module]
    batch: Callable[[int], Any]
    loss_fn: Callable[[nn.Module, Any], Tensor]
    module: Callable[..., tuple[nn.Module, tuple[Tensor, ...]]]
    note: str


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build()


def _case(name: str, build: Callable[[bool], nn.Module], batch: Callable[[int], Any], loss_fn: Callable,
          kernel: Callable[[bool], nn.Module], inputs: Callable[[int], tuple[Tensor, ...]], note: str) -> KernelCase:
    def model(*, bug: bool = False, seed: int = 0) -> nn.Module:
        return _seeded(lambda: build(bug), seed)

    def module(*, bug: bool = False, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, ...]]:
        return _seeded(lambda: kernel(bug), seed), inputs(seed)

    return KernelCase(name, model, batch, loss_fn, module, note)


KERNELS: dict[str, KernelCase] = {
    case.name: case
    for case in (
        _case("rmsnorm", lambda bug: _Sandwich(RMSNorm(48, bug=bug), 48, 48, tanh=True), _flat_batch,
              _classification_loss, lambda bug: RMSNorm(48, bug=bug), lambda s: (_randn(s, 16, 48),),
              "float32 inside; bug: correction term averaged over the padded block"),
        _case("rmsnorm_1e-3", lambda bug: _Sandwich(RMSNorm(48, bug=bug), 48, 48, scale=1e-3, tanh=True),
              _flat_batch, _classification_loss, lambda bug: RMSNorm(48, bug=bug),
              lambda s: (_randn(s, 16, 48, scale=1e-3),),
              "RMSNorm fed inputs of scale 1e-3"),
        _case("cross_entropy", lambda bug: _CrossEntropyNet(bug), _vocab_batch, _model_loss,
              lambda bug: FusedCrossEntropy(bug=bug),
              lambda s: (_randn(s, 16, 16), torch.randint(0, 16, (16,), generator=torch.Generator().manual_seed(s))),
              "float32 inside; bug: off-by-one mask in the backward's softmax sum"),
        _case("swiglu", lambda bug: _Sandwich(SwiGLU(bug=bug), 64, 32), _flat_batch, _classification_loss,
              lambda bug: SwiGLU(bug=bug), lambda s: (_randn(s, 16, 64),),
              "float32 inside; bug: silu' with sigma for (1 - sigma)"),
        _case("causal_conv", lambda bug: _ConvNet(bug), _seq_batch, _classification_loss,
              lambda bug: CausalConv1d(8, 4, bug=bug), lambda s: (_randn(s, 4, 16, 8),),
              "float32 inside, non-contiguous dy; bug: dy read with contiguous strides"),
        _case("gelu_no_fp64", lambda bug: _Sandwich(GeluTanh(bug=bug), 32, 32), _flat_batch, _classification_loss,
              lambda bug: GeluTanh(bug=bug), lambda s: (_randn(s, 16, 32, scale=2.0),),
              "raises on float64; bug: d(x^3) written as x^2"),
        _case("layernorm_bad_fp64", lambda bug: _Sandwich(LayerNorm(64, bug=bug), 64, 64, tanh=True), _flat_batch,
              _classification_loss, lambda bug: LayerNorm(64, bug=bug), lambda s: (_randn(s, 16, 64),),
              "float32 correct, float64 backward wrong; bug: last row left out of dw/db"),
    )
}
