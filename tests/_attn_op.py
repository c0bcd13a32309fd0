"""A fused-attention "kernel" for the module-local tests: a ``torch.library.custom_op``
with a hand-written backward, no float64 (its forward raises on float64 inputs), and
switchable planted bugs (``BUG["mode"]``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["BUG", "AttnNet", "FusedAttention", "attention", "reference_attention"]

#: Planted bug of the backward: None, "dq" (dq forgets the softmax scale), "dk" (dk uses
#: dS instead of dSᵀ), "contiguous" (reads grad_output's memory as if it were contiguous).
BUG: dict = {"mode": None}


@torch.library.custom_op("gwtest::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if q.dtype == torch.float64:
        raise NotImplementedError("gwtest::attention: no float64 kernel")
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return p @ v


@attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


def _setup(ctx, inputs, output):
    q, k, v = inputs
    ctx.save_for_backward(q, k, v)


def _backward(ctx, g):
    q, k, v = ctx.saved_tensors
    if BUG["mode"] == "contiguous" and not g.is_contiguous():  # the kernel indexes raw memory
        strides, acc = [], 1
        for n in reversed(g.shape):
            strides.insert(0, acc)
            acc *= n
        g = torch.as_strided(g, g.shape, strides, g.storage_offset())
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    dv = p.transpose(-1, -2) @ g
    dp = g @ v.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = ds @ k * (1.0 if BUG["mode"] == "dq" else scale)
    dk = (ds if BUG["mode"] == "dk" else ds.transpose(-1, -2)) @ q * scale
    return dq, dk, dv


attention.register_autograd(_backward, setup_context=_setup)


class FusedAttention(nn.Module):
    """``attention(q, k, v)`` as a module (what gradwatch watches)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(q, k, v)


def reference_attention(module: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain PyTorch attention, any precision."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


class AttnNet(nn.Module):
    """Projections, the fused attention op, and a consumer that concatenates its output (so the
    gradient flowing into the op's output is a non-contiguous slice of torch.cat's gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.attn = FusedAttention()
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.inp(x).chunk(3, -1)
        return self.head(torch.cat([self.attn(q, k, v), v], -1)).sum(1)
