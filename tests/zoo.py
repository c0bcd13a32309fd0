"""Model zoo for tests and benchmarks: correct models, and models with planted bugs.

Every builder takes a seed and returns a :class:`Case`: the model (float32, train
mode), ``loss_fn(model, batch)``, a batch, and for planted bugs the set of parameter
names whose gradient is wrong.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BUGS", "CORRECT", "SPARSE_BUGS", "TRAINING_ONLY_BUGS", "Case", "ScaledGrad", "assert_log_lines",
           "classification_loss"]


@dataclass
class Case:
    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    batch: Any
    wrong: set[str] = field(default_factory=set)
    #: False for bugs below what float32 central differences resolve (native evaluation
    #: cannot see them; every float64 evaluation must)
    native: bool = True


def classification_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _data(seed: int, n: int, shape: tuple[int, ...], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


# --------------------------------------------------------------------------- custom ops
class ScaledGrad(torch.autograd.Function):
    """Identity forward whose backward multiplies the gradient by ``scale``: a float, or a tensor
    broadcast against it (ones with 1.02 on some rows confines the bug to them). The planted
    "backward off by a factor" of several tests and benchmarks: ``ScaledGrad.apply(x, 1.02)``."""

    @staticmethod
    def forward(ctx, x, scale):
        if isinstance(scale, torch.Tensor):
            ctx.save_for_backward(scale)
        else:
            ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        scale = ctx.saved_tensors[0].to(g.dtype) if ctx.saved_tensors else ctx.scale
        return g * scale, None


class LinearFn(torch.autograd.Function):
    """y = scale * x @ W.T + b with a selectable planted bug in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, bug, scale):
        ctx.save_for_backward(x, weight)
        ctx.bug, ctx.scale = bug, scale
        return scale * (x @ weight.t()) + bias

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        bug, scale = ctx.bug, ctx.scale
        grad_x = scale * grad @ weight
        grad_w = scale * grad.t() @ x
        grad_b = grad.sum(0)
        if bug == "wrong_sign":
            grad_w = -grad_w
        elif bug == "missing_factor":
            grad_w = grad.t() @ x  # forgets `scale`
        elif bug == "transposed":
            grad_w = grad_w.t()
        elif bug == "bias_mean":
            grad_b = grad.mean(0)
        elif bug == "wrong_row":
            grad_w = grad_w.clone()
            grad_w[2] = grad_w[3]
        elif bug == "wrong_column":
            grad_w = grad_w.clone()
            grad_w[:, 1] = -grad_w[:, 1]
        elif bug == "block_2pct":  # 2% too large on 1/64 of the weight
            grad_w = grad_w.clone()
            rows, cols = grad_w.shape
            grad_w[: rows // 8, : cols // 8] *= 1.02
        return grad_x, grad_w, grad_b, None, None


class CustomLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int, bug: str | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)
        self.bug, self.scale = bug, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LinearFn.apply(x, self.weight, self.bias, self.bug, self.scale)


class SigmoidNoGradOut(torch.autograd.Function):
    """Sigmoid whose backward ignores grad_output (returns σ' alone)."""

    @staticmethod
    def forward(ctx, x):
        s = torch.sigmoid(x)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return s * (1 - s)


class ShiftedEmbeddingFn(torch.autograd.Function):
    """Embedding lookup whose backward adds each row's gradient at index + 1."""

    @staticmethod
    def forward(ctx, idx, weight):
        ctx.save_for_backward(idx)
        ctx.rows = weight.shape[0]
        return weight[idx]

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        grad_w = torch.zeros(ctx.rows, grad.shape[-1], dtype=grad.dtype, device=grad.device)
        grad_w.index_add_(0, ((idx + 1) % ctx.rows).reshape(-1), grad.reshape(-1, grad.shape[-1]))
        return None, grad_w


class Mlp(nn.Module):
    """fc1 -> act -> fc2, the carrier of most planted bugs."""

    def __init__(self, fc1: nn.Module, act: Callable, n_hidden: int, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = fc1
        self.act = act
        self.fc2 = nn.Linear(n_hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------- planted bugs
def _custom_linear_bug(bug: str, wrong: set[str], n_in: int = 8, n_hidden: int = 16, scale: float = 1.0):
    def build(seed: int) -> Case:
        torch.manual_seed(seed)
        model = Mlp(CustomLinear(n_in, n_hidden, bug=bug, scale=scale), torch.tanh, n_hidden)
        return Case(bug, model, classification_loss, _data(seed, 32, (n_in,), 3), set(wrong))

    return build


def _ignores_grad_output(seed: int) -> Case:
    torch.manual_seed(seed)
    model = Mlp(nn.Linear(8, 16), SigmoidNoGradOut.apply, 16)
    return Case("ignores_grad_output", model, classification_loss, _data(seed, 32, (8,), 3), {"fc1.weight", "fc1.bias"})


class _EmbeddingBag(nn.Module):
    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.randn(rows, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(ShiftedEmbeddingFn.apply(idx, self.emb).mean(1))


def _wrong_index(seed: int) -> Case:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randint(0, 20, (32, 5), generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    return Case("wrong_index", _EmbeddingBag(20, 8), classification_loss, (idx, y), {"emb"})


class _DetachedGateSiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x).detach()  # the planted bug: silu with a detached gate


def _accidental_detach(seed: int) -> Case:
    torch.manual_seed(seed)
    model = Mlp(nn.Linear(8, 16), _DetachedGateSiLU(), 16)
    return Case("accidental_detach", model, classification_loss, _data(seed, 32, (8,), 3), {"fc1.weight", "fc1.bias"})


def _hook_rescale(seed: int) -> Case:
    torch.manual_seed(seed)
    model = Mlp(nn.Linear(8, 16), torch.tanh, 16)
    model.fc1.weight.register_hook(lambda g: g * 1.5)  # the planted bug
    return Case("hook_rescale", model, classification_loss, _data(seed, 32, (8,), 3), {"fc1.weight"})


class FastPathLinearFn(torch.autograd.Function):
    """y = x @ W.T + b whose backward takes a "fast path" below float64 that sums the
    weight gradient over the first tile of samples only (a tiling bug that loses the
    second half of the batch): wrong in float32, bf16 and fp16, right in the float64
    reference."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return x @ weight.t() + bias

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        x = x.to(weight.dtype)
        if grad.dtype == torch.float64:
            grad_w = grad.t() @ x
        else:
            tile = grad.shape[0] // 2
            grad_w = grad[:tile].t() @ x[:tile]  # the planted bug: the low-precision path loses the last tile
        return grad @ weight, grad_w, grad.sum(0)


class _FastPathLinear(CustomLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FastPathLinearFn.apply(x, self.weight, self.bias)


def _low_precision_kernel(seed: int) -> Case:
    torch.manual_seed(seed)
    model = Mlp(_FastPathLinear(8, 16), torch.tanh, 16)
    return Case("low_precision_kernel", model, classification_loss, _data(seed, 32, (8,), 3), {"fc1.weight"})


class _SmallBranch(nn.Module):
    """A main head plus a branch scaled by 1e-6: the branch's gradients are 1e-6 of the model's."""

    def __init__(self, bug: str | None) -> None:
        super().__init__()
        self.main = nn.Linear(8, 3)
        self.small = CustomLinear(8, 3, bug=bug)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + 1e-6 * self.small(x)


def _small_gradient_bug(seed: int) -> Case:
    torch.manual_seed(seed)
    return Case("small_gradient", _SmallBranch("bias_mean"), classification_loss, _data(seed, 32, (8,), 3),
                {"small.bias"}, native=False)


BUGS: dict[str, Callable[[int], Case]] = {
    "wrong_sign": _custom_linear_bug("wrong_sign", {"fc1.weight"}),
    "missing_factor": _custom_linear_bug("missing_factor", {"fc1.weight"}, scale=2.0),
    "transposed": _custom_linear_bug("transposed", {"fc1.weight"}, n_in=16),
    "bias_mean": _custom_linear_bug("bias_mean", {"fc1.bias"}),
    "ignores_grad_output": _ignores_grad_output,
    "wrong_index": _wrong_index,
    "accidental_detach": _accidental_detach,
    "hook_rescale": _hook_rescale,
    "small_gradient": _small_gradient_bug,
}

#: Bugs only the training gradient has, not the float64 reference run of the same code:
#: the precision test's cases (with code that edits ``.grad``, which is no model).
TRAINING_ONLY_BUGS: dict[str, Callable[[int], Case]] = {
    "hook_rescale": _hook_rescale,
    "low_precision_kernel": _low_precision_kernel,
}

#: Bugs confined to a small part of a tensor: coordinates rarely see them, only the
#: random direction does (design notes §3).
SPARSE_BUGS: dict[str, Callable[[int], Case]] = {
    "wrong_row": _custom_linear_bug("wrong_row", {"fc1.weight"}),
    "wrong_column": _custom_linear_bug("wrong_column", {"fc1.weight"}, n_in=32, n_hidden=64),
    "block_2pct": _custom_linear_bug("block_2pct", {"fc1.weight"}, n_in=64, n_hidden=64),
}


# --------------------------------------------------------------------------- correct models
def _mlp_relu_dropout(seed: int) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(32, 32), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(32, 4),
    )
    return Case("mlp_relu_dropout", model, classification_loss, _data(seed, 64, (10,), 4))


def _cnn_bn_pool(seed: int) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=True), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    return Case("cnn_bn_pool", model, classification_loss, _data(seed, 16, (3, 12, 12), 5))


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


def _transformer(seed: int) -> Case:
    torch.manual_seed(seed)
    return Case("transformer", _Transformer(), classification_loss, _data(seed, 8, (6, 16), 3))


class _Lstm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _lstm(seed: int) -> Case:
    torch.manual_seed(seed)
    return Case("lstm", _Lstm(), classification_loss, _data(seed, 16, (7, 6), 3))


def _custom_function(seed: int) -> Case:
    torch.manual_seed(seed)
    model = Mlp(CustomLinear(8, 16, scale=2.0), torch.tanh, 16)
    return Case("custom_function", model, classification_loss, _data(seed, 32, (8,), 3))


class _NonSmooth(nn.Module):
    """clamp, abs and maximum in the forward, functional calls only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = torch.clamp(self.a(x), -0.5, 0.5)
        h2 = self.b(x).abs()
        return self.head(torch.maximum(h1, h2 - 0.3))


def _clamp_abs_maximum(seed: int) -> Case:
    torch.manual_seed(seed)
    return Case("clamp_abs_maximum", _NonSmooth(), classification_loss, _data(seed, 32, (8,), 3))


def _layernorm_gelu(seed: int) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3))
    return Case("layernorm_gelu", model, classification_loss, _data(seed, 32, (8,), 3))


class _PaddedEmbedding(nn.Module):
    """Token ids padded with 0 and no attention mask (as a padded BERT batch): the
    padding row gets no gradient by design (``padding_idx``) but moves the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.head = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(idx)).mean(1))


def _embedding_padding(seed: int) -> Case:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randint(1, 20, (16, 7), generator=g)
    lengths = torch.randint(2, 8, (16,), generator=g)
    idx[torch.arange(7) >= lengths[:, None]] = 0  # right padding
    idx[0, 5:] = 0  # at least one padded sequence
    y = torch.randint(0, 3, (16,), generator=g)
    return Case("embedding_padding", _PaddedEmbedding(), classification_loss, (idx, y))


class _EmptyBranch(nn.Module):
    """A branch configured with 0 units: its weight (0×8) and bias (0,) are empty."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.extra = nn.Linear(8, 0)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(torch.cat([self.a(x), self.extra(x)], 1)))


def _empty_parameter(seed: int) -> Case:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        model = _EmptyBranch()
    return Case("empty_parameter", model, classification_loss, _data(seed, 32, (8,), 3))


class _LayerScale(nn.Module):
    """A ConvNeXt-style residual block whose branch is scaled by a layer-scale parameter initialised at 1e-6."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma * self.fc(F.gelu(self.norm(x)))
        return self.head(x.mean(1))


def _layer_scale(seed: int) -> Case:
    torch.manual_seed(seed)
    return Case("layer_scale", _LayerScale(), classification_loss, _data(seed, 8, (12, 16), 3))


class _ZeroGradient(nn.Module):
    """Its only parameter has gradient 0: ``softmax(θ).sum()`` is 1 whatever θ."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.randn(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits, 0).sum() * x.pow(2).mean()


def _first_input_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(batch[0])


def _zero_gradient(seed: int) -> Case:
    torch.manual_seed(seed)
    return Case("zero_gradient", _ZeroGradient(), _first_input_loss, _data(seed, 4, (3,), 2))


class _FloatLoss(nn.Module):
    """Logits cast with ``.float()`` before the loss, as Hugging Face causal LMs do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).float()


def _float_loss(seed: int) -> Case:
    torch.manual_seed(seed)
    return Case("float_loss", _FloatLoss(), classification_loss, _data(seed, 32, (8,), 3))


class RMSNorm(nn.Module):
    """LlamaRMSNorm/T5LayerNorm: the statistics are computed in float32 whatever the input dtype."""

    def __init__(self, n: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _rmsnorm_float32(seed: int) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), RMSNorm(16), nn.SiLU(), nn.Linear(16, 3))
    return Case("rmsnorm_float32", model, classification_loss, _data(seed, 32, (8,), 3))


class StochasticDepth(nn.Module):
    """ConvNeXt/timm drop path: a per-sample keep mask drawn with ``torch.rand(..., dtype=x.dtype)``."""

    def __init__(self, body: nn.Module, p: float = 0.3) -> None:
        super().__init__()
        self.body, self.p = body, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.training and self.p > 0:
            keep = 1.0 - self.p
            mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)).floor()
            out = out.div(keep) * mask
        return x + out


def _stochastic_depth(seed: int) -> Case:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, 16),
        StochasticDepth(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU())),
        StochasticDepth(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU())),
        nn.Linear(16, 3),
    )
    return Case("stochastic_depth", model, classification_loss, _data(seed, 32, (8,), 3))


CORRECT: dict[str, Callable[[int], Case]] = {
    "mlp_relu_dropout": _mlp_relu_dropout,
    "cnn_bn_pool": _cnn_bn_pool,
    "transformer": _transformer,
    "lstm": _lstm,
    "custom_function": _custom_function,
    "clamp_abs_maximum": _clamp_abs_maximum,
    "layernorm_gelu": _layernorm_gelu,
    "embedding_padding": _embedding_padding,
    "empty_parameter": _empty_parameter,
    "layer_scale": _layer_scale,
    "zero_gradient": _zero_gradient,
    "float_loss": _float_loss,
    "rmsnorm_float32": _rmsnorm_float32,
    "stochastic_depth": _stochastic_depth,
}


# ------------------------------------------------------------------ state comparison helpers
def training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Everything a check must leave as it was: parameters, .grad, buffers, optimizer
    state and every RNG stream, copied."""
    import random

    import numpy as np

    state: dict[str, Any] = {}
    for name, p in model.named_parameters():
        state[f"param/{name}"] = p.detach().clone()
        state[f"grad/{name}"] = None if p.grad is None else p.grad.detach().clone()
    for name, b in model.named_buffers():
        state[f"buffer/{name}"] = b.detach().clone()
    if optimizer is not None:
        for i, (k, v) in enumerate(optimizer.state_dict()["state"].items()):
            for key, value in v.items():
                state[f"optim/{k}/{key}"] = value.clone() if isinstance(value, torch.Tensor) else value
    state["rng/torch"] = torch.get_rng_state()
    state["rng/numpy"] = np.random.get_state()[1].copy()
    state["rng/python"] = random.getstate()
    state["default_dtype"] = torch.get_default_dtype()
    state["training"] = [m.training for m in model.modules()]
    return state


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-identical comparison of two :func:`training_state` results."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, key
            assert torch.equal(x, y), f"{key} differs: max |diff| {(x.double() - y.double()).abs().max()}"
        elif hasattr(x, "shape"):
            assert (x == y).all(), key
        else:
            assert x == y, key


_LOG_LINE = re.compile(
    r"gradwatch step (?P<step>\d+): (?P<verdict>[A-Z]+) \((?:\d+ [a-z]+, )*\d+ [a-z]+; "
    r"worst '(?P<worst>[^']+)' rel_error \S+, err/tol \S+; \d+\.\d\ds\)"
)


def assert_log_lines(records: list, steps: list[int], verdict: str, wrong: set[str]) -> None:
    """The ``gradwatch`` logger's records are exactly one concise line per check step:
    step, verdict, the worst tensor (one of ``wrong`` on failure) with its rel_error and
    err/tol, and seconds; INFO for a pass, WARNING for a failure."""
    import logging

    records = [r for r in records if r.name == "gradwatch"]
    lines = [r.getMessage() for r in records]
    matches = [_LOG_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert [int(m["step"]) for m in matches] == steps, lines
    assert all(m["verdict"] == verdict.upper() and len(line) < 200 for m, line in zip(matches, lines)), lines
    # a module-local tensor ('fc1::bias' of GradWatch(modules="suspects")) of a module holding a wrong one counts
    assert all(m["worst"] in wrong or any(w.startswith(m["worst"].partition("::")[0] + ".") for w in wrong)
               for m in matches) if wrong else True, lines
    level = logging.INFO if verdict == "pass" else logging.WARNING
    assert [r.levelno for r in records] == [level] * len(steps)
