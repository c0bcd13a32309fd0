"""Module-local checks (gradwatch.local): check_module, register_reference, the recorder and
GradWatch(modules=...)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch._recording import _Recording
from gradwatch._references import _REFERENCES_BY_CLASS
from gradwatch.local import _check_record
from tests._attn_op import FusedAttention, reference_attention
from tests._attn_op import AttnNet as _AttnNet
from zoo import ScaledGrad


@pytest.fixture
def reference():
    gradwatch.register_reference(FusedAttention, reference_attention)
    yield
    _REFERENCES_BY_CLASS.pop(FusedAttention, None)


def _qkv(seed, shape=(2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).requires_grad_(True) for _ in range(3))


def test_check_module_names_the_input_of_a_planted_backward_bug(bug):
    for mode, wrong in [("dq", "attn::input[0]"), ("dk", "attn::input[1]")]:
        bug(mode)
        report = gradwatch.check_module(FusedAttention(), _qkv(0), name="attn", seed=0)
        assert [t.name for t in report.failures] == [wrong], (mode, str(report))
        assert f"'{wrong}'[" in report.failures[0].message  # names the element
        # the op has no float64 kernel: checked in its own precision, and says so
        assert report.precision == "native" and "NotImplementedError" in report.precision_reason


def test_reference_comparison_names_module_and_quantity(bug, reference):
    bug("dk")
    report = gradwatch.check_module(FusedAttention(), _qkv(1), name="attn", seed=0)
    failed = [r.name for r in report.reference_failures]
    assert failed == ["attn::input[1]"]
    assert not report.ok and report.verdict == "fail"
    keys = gradwatch.metrics(report)
    assert keys["gradwatch/reference_error_ratio/attn::input[1]"] > 1
    assert keys["gradwatch/reference_error_ratio/attn::output[0]"] < 1  # the forward is right
    assert "attn::input[1]" in str(report) and "reference" in str(report)
    table = report.markdown().split("| reference |")[1].splitlines()
    assert table[2].startswith("| `attn::input[1]` | **fail** | 0.") and len(table) == 6  # failing first, 4 rows
    # the reference ran in float64 although the op has no float64 kernel
    assert all(r.precision == "float32 vs reference float64" for r in report.references)


# ---------------------------------------------------------------- in training: GradWatch(modules=...)
def _xent(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _attn_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 6, generator=g), torch.randint(0, 3, (3,), generator=g)


def _one_check(model, batch, **kwargs):
    watch = gradwatch.GradWatch(model, _xent, every_n_steps=1, max_overhead=None, seed=0,
                                on_failure=lambda r: None, **kwargs)
    with watch.step(batch):
        _xent(model, batch).backward()
    return watch


def _local_failures(report, module):
    return {t.name for t in report.failures if t.name.startswith(module + "::")}


@pytest.mark.parametrize("mode, wrong", [
    ("dq", {"attn::input[0]"}),
    ("dk", {"attn::input[1]"}),
    ("contiguous", {"attn::input[0]", "attn::input[1]", "attn::input[2]"}),  # dO read wrong: dq, dk, dv
])
def test_watch_names_each_planted_attention_bug_by_local_check_and_reference(bug, reference, mode, wrong):
    bug(mode)
    torch.manual_seed(0)
    watch = _one_check(_AttnNet(), _attn_batch(0))
    report = watch.last_report
    assert watch.suspects == {"attn": "custom op gwtest::attention.default"}
    assert _local_failures(report, "attn") == wrong, str(report)
    assert {r.name for r in report.reference_failures} == wrong, str(report)
    assert [(m.module, m.precision) for m in report.modules] == [("attn", "native")]  # no float64 kernel
    assert "this module's own backward" in report.tensors[sorted(wrong)[0]].message
    if mode == "contiguous":  # the bug needs a non-contiguous grad_output: with a contiguous one it is right
        direct = gradwatch.check_module(FusedAttention(), _qkv(0), torch.randn(2, 4, 4), seed=0)
        assert direct.ok, str(direct)


def test_correct_attention_op_is_quiet_over_20_seeds(reference):
    worst = 0.0
    for seed in range(20):
        torch.manual_seed(seed)
        report = _one_check(_AttnNet(), _attn_batch(seed)).last_report
        local = [t for n, t in report.tensors.items() if n.startswith("attn::")]
        assert len(local) == 3 and all(t.verdict == "pass" for t in local), (seed, str(report))
        assert report.ok and len(report.references) == 4, (seed, str(report))
        worst = max(worst, *(r.error_ratio for r in report.references), *(t.error_ratio for t in local))
    assert worst < 0.5  # far from the fail threshold, not just under it


def test_module_local_check_agrees_with_gradcheck_in_float64():
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, wrong):
            ctx.save_for_backward(x, w)
            ctx.wrong = wrong
            return torch.tanh(x @ w)

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            d = g * (1 - torch.tanh(x @ w) ** 2)
            dw = x.transpose(0, 1) @ d
            return d @ w.transpose(0, 1), dw * (1.5 if ctx.wrong else 1.0), None

    class Layer(nn.Module):
        def __init__(self, wrong):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
            self.wrong = wrong

        def forward(self, x):
            return Scale.apply(x, self.w, self.wrong)

    for wrong in (False, True):
        torch.manual_seed(0)
        layer = Layer(wrong)
        x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
        ours_ok = gradwatch.check_module(layer, (x,), seed=0).ok
        theirs = torch.autograd.gradcheck(lambda x, w: Scale.apply(x, w, wrong), (x, layer.w), raise_exception=False)
        assert ours_ok == theirs == (not wrong)
    report = gradwatch.check_module(Layer(True), (x,), seed=0)
    assert report.precision == "float64" and report.reference
    assert [t.name for t in report.failures] == ["w"] and report.tensors["input[0]"].verdict == "pass"


def test_planted_param_bug_in_one_submodule_is_caught_by_its_local_check():
    class Doubled(torch.autograd.Function):  # y = x W^T, with W's gradient doubled
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x @ w.t()

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g @ w, 2 * g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])

    class Buggy(nn.Linear):
        def forward(self, x):
            return Doubled.apply(x, self.weight) + self.bias

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), Buggy(8, 8), nn.Tanh(), nn.Linear(8, 3))
    batch = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    report = _one_check(model, batch, modules=[model[0], "2", model[4]]).last_report
    local = {n: t.verdict for n, t in report.tensors.items() if "::" in n}
    assert local == {"0::weight": "pass", "0::bias": "pass", "2::input[0]": "pass", "2::weight": "fail",
                     "2::bias": "pass", "4::input[0]": "pass", "4::weight": "pass", "4::bias": "pass"}, str(report)
    assert [m.precision for m in report.modules] == ["float64"] * 3
    assert gradwatch.metrics(report)["gradwatch/failed/2::weight"] == 1.0


def test_module_called_twice_or_with_tied_weights_is_skipped_with_the_reason():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)
            self.enc = nn.Linear(4, 6)
            self.dec = nn.Linear(6, 4)
            self.dec.weight = nn.Parameter(torch.randn(4, 6))
            self.tied = nn.Linear(6, 4)
            self.tied.weight = self.dec.weight

        def forward(self, x):
            h = self.enc(self.shared(torch.tanh(self.shared(x))))
            return self.dec(h) + self.tied(h)

    torch.manual_seed(0)
    model = Twice()
    batch = (torch.randn(8, 4), torch.randn(8, 4))
    watch = gradwatch.GradWatch(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), every_n_steps=1,
                                max_overhead=None, seed=0, modules=["shared", "dec", "enc"])
    with watch.step(batch):
        ((model(batch[0]) - batch[1]) ** 2).mean().backward()
    report = watch.last_report
    reasons = {m.module: m.reason for m in report.modules}
    assert "called 2 times in one step" in reasons["shared"]
    assert "shared with modules outside it" in reasons["dec"] and "['weight']" in reasons["dec"]
    assert reasons["enc"] is None and report.ok
    assert report.tensors["shared::weight"].verdict == "skipped"
    assert "called 2 times" in report.tensors["shared::weight"].reason
    assert {report.tensors[f"enc::{n}"].verdict for n in ("input[0]", "weight", "bias")} == {"pass"}
    assert "shared skipped (called 2 times" in str(report)


class _Noisy(nn.Module):
    """Dropout, BatchNorm and the attention op: RNG draws, buffers and a custom kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.norm = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.2)
        self.attn = FusedAttention()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        q, k, v = self.drop(self.norm(self.inp(x))).chunk(3, -1)
        return self.head(torch.cat([self.attn(q, k, v), v], -1)).sum(1)


def test_nothing_lost_model_optimizer_buffers_rng_bit_identical(reference):
    def train(watch_it):
        torch.manual_seed(0)
        model = _Noisy()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        watch = gradwatch.GradWatch(model, _xent, every_n_steps=1, max_overhead=None, seed=0,
                                    modules=["attn", "norm"]) if watch_it else None
        for step in range(4):
            batch = _attn_batch(step)
            opt.zero_grad()
            with watch.step(batch) if watch else contextlib.nullcontext():
                _xent(model, batch).backward()
            opt.step()
        return model, opt, watch, torch.get_rng_state()

    plain, plain_opt, _, plain_rng = train(False)
    watched, watched_opt, watch, watched_rng = train(True)
    assert len(watch.reports) == 4 and all(r.ok for _, r in watch.reports)
    assert all({m.module for m in r.modules} == {"attn", "norm"} for _, r in watch.reports)
    assert all(r.tensors["norm::weight"].verdict == "pass" for _, r in watch.reports)  # BatchNorm replayed
    for (n, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), n
    for sa, sb in zip(plain_opt.state.values(), watched_opt.state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(plain_rng, watched_rng)


def test_suspects_are_the_modules_with_custom_backward_code():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    class WithFunction(nn.Linear):
        def forward(self, x):
            return Square.apply(super().forward(x)) + 1.0  # the Function is not the last op

    class WithHook(nn.Linear):
        def forward(self, x):
            y = super().forward(x)
            if y.requires_grad:
                y.register_hook(lambda g: g)
            return y

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fn = WithFunction(4, 4)
            self.plain = nn.Linear(4, 4)

        def forward(self, x):
            return self.plain(self.fn(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.hooked = WithHook(4, 4)
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
            self.attn = FusedAttention()
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            h = self.hooked(self.block(x))
            return self.out(self.attn(self.q(h), self.k(h), h)).sum()

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 4)
    watch = gradwatch.GradWatch(model, lambda m, b: m(b), every_n_steps=1, max_overhead=None, seed=0)
    assert watch.suspects == {}
    rng = torch.get_rng_state()
    with watch.step(x):
        model(x).backward()
    assert watch.suspects == {"block.fn": "custom autograd.Function Square",
                              "hooked": "tensor hook registered in its forward",
                              "attn": "custom op gwtest::attention.default"}
    assert torch.equal(torch.get_rng_state(), rng)  # the discovery forward left the RNG as it was
    report = watch.last_report
    assert report.ok and {m.module for m in report.modules} == set(watch.suspects), str(report)
    assert report.tensors["block.fn::weight"].verdict == "pass"
    none = gradwatch.GradWatch(model, lambda m, b: m(b), every_n_steps=1, max_overhead=None, seed=0, modules=None)
    with none.step(x):
        model(x).backward()
    assert not any("::" in n for n in none.last_report.tensors) and none.last_report.modules == ()


_SILU_SCALE = {"scale": 1.0}  # != 1: the planted bug of _SiLU's backward


class _SiLU(torch.autograd.Function):
    """x * sigmoid(x) with a hand-written backward, scaled by ``_SILU_SCALE`` (1: right)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * s * (1 + x * (1 - s)) * _SILU_SCALE["scale"]


class _Rope(torch.autograd.Function):
    """A RoPE-like rotation of the last dimension's pairs by fixed angles (its backward rotates back)."""

    @staticmethod
    def forward(ctx, x):
        cos, sin = _rope_angles(x)
        ctx.save_for_backward(cos, sin)
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        g1, g2 = g.chunk(2, -1)
        return torch.cat([g1 * cos + g2 * sin, -g1 * sin + g2 * cos], -1)


def _rope_angles(x):
    pos = torch.arange(x.shape[-2], dtype=x.dtype)[:, None]
    freq = torch.arange(1, x.shape[-1] // 2 + 1, dtype=x.dtype)[None, :]
    return torch.cos(pos * freq), torch.sin(pos * freq)


class _Between(nn.Module):  # the repro: the Function between two child modules
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.b(_SiLU.apply(self.a(x)))


class _SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x):
        return self.down(_SiLU.apply(self.gate(x)) * self.up(x))


class _RopeAttention(nn.Module):  # RoPE as a custom Function on q and k, then SDPA, then the output projection
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(6, 6) for _ in range(4))

    def forward(self, x):
        q, k = _Rope.apply(self.q(x)), _Rope.apply(self.k(x))
        return self.o(nn.functional.scaled_dot_product_attention(q, k, self.v(x), is_causal=True))


class _RopeEagerAttention(_RopeAttention):  # the same with the attention written out
    def forward(self, x):
        q, k = _Rope.apply(self.q(x)), _Rope.apply(self.k(x))
        mask = torch.ones(x.shape[-2], x.shape[-2], dtype=torch.bool).triu(1)
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(mask, float("-inf")).softmax(-1)
        return self.o(weights @ self.v(x))


class _Plain(nn.Module):  # the same shapes, torch ops only
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.b(nn.functional.silu(self.a(x)))


class _Stack(nn.Module):
    """``block`` in a model; ``top=True`` applies the Function in the model's own forward (not a suspect)."""

    def __init__(self, block, top=False):
        super().__init__()
        self.block, self.top, self.head = block, top, nn.Linear(6, 3)

    def forward(self, x):
        h = self.block(x)
        return self.head(_SiLU.apply(h) if self.top else h).mean(1)


@pytest.mark.parametrize("block, top, expected", [
    (_Between, False, {"block": "custom autograd.Function _SiLU"}),
    (_SwiGLU, False, {"block": "custom autograd.Function _SiLU"}),
    (_RopeAttention, False, {"block": "custom autograd.Function _Rope"}),
    (_RopeEagerAttention, False, {"block": "custom autograd.Function _Rope"}),
    (lambda: nn.Sequential(_SwiGLU()), False, {"block.0": "custom autograd.Function _SiLU"}),  # innermost
    (_Plain, False, {}),
    (_Plain, True, {}),  # the model itself is never a suspect
])
def test_suspects_include_a_function_between_child_modules_and_before_sdpa(block, top, expected):
    """Issue 22 item 6: a custom Function anywhere in a module's forward names that module, also
    between two child modules (whose graph walks used to hide it) and before SDPA."""
    torch.manual_seed(0)
    watch = _one_check(_Stack(block(), top), _attn_batch(0))
    assert watch.suspects == expected
    assert {m.module for m in watch.last_report.modules} == set(expected)


def test_a_function_between_child_modules_is_checked_locally_and_its_planted_bug_named():
    torch.manual_seed(0)
    model = _Stack(_SwiGLU())
    _SILU_SCALE["scale"] = 1.05  # the SiLU backward 5% too large: only what flows back through the gate is wrong
    try:
        report = _one_check(model, _attn_batch(0)).last_report
    finally:
        _SILU_SCALE["scale"] = 1.0
    assert [(m.module, m.precision) for m in report.modules] == [("block", "float64")]
    local = {n: t.verdict for n, t in report.tensors.items() if "::" in n}  # no input[0]: the batch needs no gradient
    assert local == {"block::gate.weight": "fail", "block::gate.bias": "fail",
                     "block::up.weight": "pass", "block::up.bias": "pass",
                     "block::down.weight": "pass", "block::down.bias": "pass"}, str(report)
    assert "this module's own backward" in report.tensors["block::gate.weight"].message
    torch.manual_seed(0)
    assert _one_check(_Stack(_SwiGLU()), _attn_batch(0)).last_report.ok


def test_auto_prefers_module_local_float64_checks_when_the_whole_model_does_not_fit(bug):
    bug("dk")
    torch.manual_seed(0)
    model = _AttnNet()
    model.big = nn.Linear(64, 64)  # unused by the forward, but part of the float64 copy
    whole = sum(p.numel() * 8 for p in model.parameters())
    watch = _one_check(model, _attn_batch(0), modules=["attn", "inp"],
                       options=gradwatch.ProbeOptions(max_shadow_bytes=whole // 2))
    report = watch.last_report
    assert all(report.tensors[n].verdict == "skipped" and "module-local float64 checks instead"
               in report.tensors[n].reason for n, _ in model.named_parameters())
    assert {m.module: m.precision for m in report.modules} == {"attn": "native", "inp": "float64"}
    assert _local_failures(report, "attn") == {"attn::input[1]"} and report.verdict == "fail"
    # the module that caused the gradient error upstream is checked in float64 and is right
    assert {report.tensors[f"inp::{n}"].verdict for n in ("weight", "bias")} == {"pass"}


def test_bf16_kernel_without_float64_is_checked_in_float32(bug):
    def qkv(seed):
        return tuple(t.detach().bfloat16().requires_grad_(True) for t in _qkv(seed))

    for seed in range(5):
        report = gradwatch.check_module(FusedAttention(), qkv(seed), name="attn", seed=seed)
        assert report.ok and report.precision == "float32", str(report)
        assert report.grad_precision == "bfloat16" and "upcast" in report.precision_reason
    bug("dq")  # a wrong formula: its float32 backward fails the float32 numerical check
    report = gradwatch.check_module(FusedAttention(), qkv(0), name="attn", seed=0)
    assert [t.name for t in report.failures] == ["attn::input[0]"], str(report)
    assert report.failures[0].error_ratio > 10
    # a bug only for the training's memory layout (its float32 replay gets a contiguous grad_output): the bf16
    # gradients of training differ from the module's float32 backward at the same point
    bug("contiguous")
    torch.manual_seed(0)
    model = _AttnNet()
    batch = _attn_batch(0)
    watch = gradwatch.GradWatch(model, _xent, every_n_steps=1, max_overhead=None, seed=0, on_failure=lambda r: None)
    with watch.step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _xent(model, batch)
        loss.backward()
    report = watch.last_report
    assert _local_failures(report, "attn") == {"attn::input[0]", "attn::input[1]", "attn::input[2]"}, str(report)
    assert all(report.tensors[f"attn::input[{i}]"].gap_ratio > 1 for i in range(3))
    message = report.tensors["attn::input[0]"].message
    assert message.startswith("'attn::input[0]'[") and "non-contiguous grad_output" in message
    assert [(m.module, m.precision) for m in report.modules] == [("attn", "float32")]
    bug(None)


def test_check_module_and_register_reference_validate_their_arguments():
    q = _qkv(0)
    with pytest.raises(TypeError, match="`module` must be a torch.nn.Module, got function"):
        gradwatch.check_module(lambda x: x, q)
    with pytest.raises(ValueError, match="`precision` must be one of 'float64', 'native', 'auto', got 'half'"):
        gradwatch.check_module(FusedAttention(), q, precision="half")
    with pytest.raises(ValueError, match="`grads` names 'input\\[7\\]', which is neither"):
        gradwatch.check_module(FusedAttention(), q, grads={"input[7]": torch.zeros(1)})
    with pytest.raises(ValueError, match="`grad_outputs` must match the module's 1 output leaves, got 2"):
        gradwatch.check_module(FusedAttention(), q, (torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)))
    with pytest.raises(TypeError, match="`target` must be an nn.Module instance or subclass, or a torch.library custom op, got 3"):
        gradwatch.register_reference(3, reference_attention)
    with pytest.raises(TypeError, match="`reference_fn` must be callable"):
        gradwatch.register_reference(FusedAttention, None)
    model = _AttnNet()
    with pytest.raises(ValueError, match="`modules` names 'nope', which is not a submodule of `model`"):
        gradwatch.GradWatch(model, _xent, modules=["nope"])
    with pytest.raises(ValueError, match="`modules` holds a Linear that is not a submodule of `model`"):
        gradwatch.GradWatch(model, _xent, modules=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="`modules` must be None, 'suspects' or a list"):
        gradwatch.GradWatch(model, _xent, modules="all")
    with pytest.raises(ValueError, match="`max_shadow_bytes` must be a positive int, got 0"):
        gradwatch.GradWatch(model, _xent, options=gradwatch.ProbeOptions(max_shadow_bytes=0))


class _Writer:
    """Records what a TensorBoardSink writes (scalars by key, the last layout)."""

    def __init__(self):
        self.scalars, self.layout = {}, None

    def add_scalar(self, key, value, step):
        self.scalars[key] = value

    def add_text(self, *args):
        pass

    def add_histogram(self, *args):
        pass

    def add_custom_scalars(self, layout):
        self.layout = layout


def test_dashboard_and_cli_show_module_local_tensors_and_reference_comparisons(bug, reference, tmp_path, capsys):
    import re

    from gradwatch import cli

    bug("dk")
    torch.manual_seed(0)
    model = _AttnNet()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    watch = gradwatch.GradWatch(model, _xent, every_n_steps=2, max_overhead=None, seed=0, on_failure=lambda r: None,
                                logdir=str(tmp_path / "run"))
    for step in range(3):
        batch = _attn_batch(step)
        opt.zero_grad()
        with watch.step(batch):
            _xent(model, batch).backward()
        opt.step()
    watch.close()
    report = watch.last_report
    keys = gradwatch.metrics(report)
    # the keys the CLI reads are the ones metrics() writes
    for kind in (cli._REF_FAILED, cli._REF_REL_DIFF, cli._REF_ERROR_RATIO):
        assert {k for k in keys if k.startswith(f"gradwatch/{kind}/")} == {
            f"gradwatch/{kind}/attn::{q}" for q in ("output[0]", "input[0]", "input[1]", "input[2]")}
    assert keys[f"gradwatch/{cli._REF_FAILURES}"] == 1.0 and keys["gradwatch/reference_failed/attn::input[1]"] == 1.0
    assert keys["gradwatch/failed/attn::input[1]"] == 1.0
    # the dashboard: a references category whose charts draw those keys; the local tensors in their module's group
    writer = _Writer()
    gradwatch.TensorBoardSink(writer).write(report, 2)
    refs = writer.layout["gradwatch: references"]
    for _, regexes in refs.values():
        assert all(any(re.fullmatch(r, k) for k in writer.scalars) for r in regexes), regexes
    attn = writer.layout["gradwatch: module attn"]["attn: rel_error"][1][0]
    assert {k for k in writer.scalars if re.fullmatch(attn, k)} == {
        f"gradwatch/rel_error/attn::input[{i}]" for i in range(3)}
    # the command line: a failing run, a row per module-local tensor and per reference comparison
    assert cli.main(["report", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    fails = {" ".join(line.split()[1:3]) for line in out.splitlines() if line.startswith("  FAIL")}
    assert {"attn::input[1] 2", "attn::input[1] (reference)"} <= fails, out
    assert "run run: 2 checks, 2 failing" in out


def test_forward_only_bug_is_caught_by_the_reference_as_an_output():
    class Gate(nn.Module):  # returns (gated, aux); its "kernel" forgets the bias in the gate (a forward bug)
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x, *, scale):
            return torch.sigmoid(x @ self.proj.weight.t()) * x * scale, x.sum()

    def reference(module, x, *, scale):
        return torch.sigmoid(module.proj(x)) * x * scale, x.sum()

    torch.manual_seed(0)
    gate = Gate()
    x = torch.randn(5, 4, requires_grad=True)
    report = gradwatch.check_module(gate, (x,), kwargs={"scale": torch.tensor(2.0)}, name="gate", seed=0)
    # its backward is the derivative of its (wrong) forward: the local check passes ...
    assert report.ok and set(report.tensors) == {"gate::input[0]", "gate::proj.weight", "gate::proj.bias"}
    assert report.tensors["gate::proj.bias"].verdict == "skipped"  # the bug: the bias gets no gradient
    gradwatch.register_reference(gate, reference)  # this instance only
    report = gradwatch.check_module(gate, (x,), kwargs={"scale": torch.tensor(2.0)}, name="gate", seed=0)
    # ... the reference names the wrong output (output[1], the sum, is right) and the gradients it changes,
    # the bias's included (the module gave it none)
    assert {r.name: r.verdict for r in report.references} == {
        "gate::output[0]": "fail", "gate::output[1]": "pass", "gate::input[0]": "fail", "gate::proj.weight": "fail",
        "gate::proj.bias": "fail"}
    assert "forward output differs from the registered reference" in report.reference_failures[0].message
    assert gradwatch.check_module(Gate(), (x,), kwargs={"scale": torch.tensor(2.0)}, seed=0).references == ()


class _Inline(nn.Module):
    """Calls the custom attention op twice in its own forward (no submodule to watch): the
    first call's output feeds the second (a contiguous grad_output), the second's goes
    through torch.cat (its grad_output a strided slice)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        from tests._attn_op import attention

        q, k, v = self.inp(x).chunk(3, -1)
        a = attention(q, k, v)
        return self.head(torch.cat([attention(a, k, v), v], -1)).sum(1)


def test_a_custom_op_with_a_registered_reference_is_checked_call_by_itself(bug):
    from gradwatch._references import _REFERENCES_BY_OP
    from tests._attn_op import attention

    gradwatch.register_reference(attention, lambda q, k, v: reference_attention(None, q, k, v))
    try:
        bug("dk")
        torch.manual_seed(0)
        watch = _one_check(_Inline(), _attn_batch(0))
        report = watch.last_report
        assert watch.suspects == {}  # the model itself is not a suspect
        assert _local_failures(report, "gwtest::attention") == {"gwtest::attention::input[1]"}, str(report)
        assert {r.name for r in report.reference_failures} == {"gwtest::attention::input[1]"}
        assert [(m.module, m.precision) for m in report.modules] == [("gwtest::attention", "native")]
        direct = gradwatch.check_module(torch.ops.gwtest.attention.default, _qkv(0), seed=0)
        assert [t.name for t in direct.failures] == ["input[1]"] and direct.reference_failures
        bug(None)
        torch.manual_seed(0)
        report = _one_check(_Inline(), _attn_batch(0)).last_report
        assert report.ok and len(report.references) == 4, str(report)
        # no reference registered for the op: nothing recorded
        _REFERENCES_BY_OP.clear()
        report = _one_check(_Inline(), _attn_batch(0)).last_report
        assert report.modules == () and not any("::" in n for n in report.tensors)
    finally:
        _REFERENCES_BY_OP.clear()


def test_a_custom_op_called_twice_a_step_has_each_call_checked_in_turn(bug):
    # each check step records the next call of the op: the contiguity bug shows in the second
    # call only (its output goes through torch.cat, so its grad_output is a strided slice)
    from tests._attn_op import attention

    gradwatch.register_reference(attention, lambda q, k, v: reference_attention(None, q, k, v))
    try:
        bug("contiguous")
        torch.manual_seed(0)
        model, batch = _Inline(), _attn_batch(0)
        watch = gradwatch.GradWatch(model, _xent, every_n_steps=1, max_overhead=None, seed=0,
                                    on_failure=lambda r: None)
        for _ in range(4):
            with watch.step(batch):
                _xent(model, batch).backward()
        local = [bool(_local_failures(r, "gwtest::attention")) for _, r in watch.reports]
        references = [bool(r.reference_failures) for _, r in watch.reports]
        assert local == references == [False, True, False, True], [str(r) for _, r in watch.reports]
        assert watch._watch.op_turns == {"gwtest::attention": 0}
    finally:
        from gradwatch._references import _REFERENCES_BY_OP
        _REFERENCES_BY_OP.clear()


def test_internal_recording_api_records_what_the_step_computed():
    """The internal API the adapters (and the sharded path) build on: _Recording + _check_record."""
    torch.manual_seed(0)
    model = _AttnNet()
    batch = _attn_batch(0)
    with _Recording({"attn": model.attn, "head": model.head}, model=model) as rec:
        _xent(model, batch).backward()
    attn, head = rec.records["attn"], rec.records["head"]
    assert attn.calls == head.calls == 1 and attn.problem() is None
    assert set(attn.grad_inputs) == {"input[0]", "input[1]", "input[2]"} and attn.param_grads == {}
    assert set(head.param_grads) == {"weight", "bias"}
    assert torch.equal(head.param_grads["weight"], model.head.weight.grad)  # the module's own parameter gradient
    # head's grad_out is the loss's gradient wrt the logits; attn's output is the first 4 columns of head's input
    assert torch.equal(attn.grad_outputs[0], head.grad_inputs["input[0]"][..., :4])
    report = _check_record(attn, seed=0)
    assert report.ok and list(report.tensors) == ["attn::input[0]", "attn::input[1]", "attn::input[2]"]
    assert report.modules[0].module == "attn" and report.seed == 0


def _float64_storages(shape: torch.Size) -> int:
    """Distinct float64 storages of tensors of ``shape`` alive in Python now."""
    import gc
    import warnings

    with warnings.catch_warnings():  # isinstance on some deprecated module attributes warns
        warnings.simplefilter("ignore")
        return len({t.untyped_storage().data_ptr() for t in gc.get_objects()
                    if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.shape == shape})


@pytest.mark.parametrize("wrong", [False, True], ids=["correct", "planted"])
def test_local_check_of_one_large_linear_never_holds_its_float64_copy_with_another_of_its_size(wrong, monkeypatch):
    # memory (issue 14): a module that is one large tensor. Its float64 copy is never alive
    # together with its float64 reference gradient (a backward of its own widens the
    # parameter inside the forward) nor with a whole direction (drawn a chunk at a time at
    # each use): before, both doubled the copy (2.8x its size at the peak, measured)
    import gradwatch._gradients

    class Linear(nn.Linear):  # with ``wrong``: the weight's gradient x1.02 on 1/8 of the rows
        def forward(self, x):
            rows = torch.ones(self.weight.shape[0], 1)
            rows[::8] = 1.02 if wrong else 1.0
            return nn.functional.linear(x, ScaledGrad.apply(self.weight, rows), self.bias)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 640), nn.Tanh(), Linear(640, 640), nn.Tanh(), nn.Linear(640, 3))
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with _Recording({"2": model[2]}, model=model) as rec:
        nn.functional.cross_entropy(model(x), y).backward()
    shape = model[2].weight.shape
    assert shape.numel() > 1 << 18  # a tensor the check takes a chunk at a time
    at_forward, at_reference = [], []

    def pre(module, args):
        if module.weight.dtype == torch.float64:
            at_forward.append(_float64_storages(shape))

    stats = gradwatch._gradients._ReferenceStats.__call__

    def counted(self, name, g_ref):
        if name == "module.weight":
            at_reference.append(_float64_storages(shape))
        return stats(self, name, g_ref)

    monkeypatch.setattr(gradwatch._gradients._ReferenceStats, "__call__", counted)
    model[2].register_forward_pre_hook(pre)
    report = _check_record(rec.records["2"], seed=0, options=gradwatch.ProbeOptions(precision="float64"))
    assert report.precision == "float64" and report.reference
    assert [t.name for t in report.failures] == (["2::weight"] if wrong else []), str(report)
    if wrong:
        assert report.tensors["2::weight"].located.index[0] % 8 == 0
    assert len(at_forward) >= 6 and max(at_forward) == 1, at_forward  # the copy, or the widened value
    assert at_reference and max(at_reference) == 1, at_reference  # the reference gradient alone


def test_a_module_whose_local_check_raises_is_skipped_and_training_goes_on(monkeypatch):
    import gradwatch.local as local

    def broken(*args, **kwargs):  # a module the local replay cannot run
        raise RuntimeError("needs its training context")

    monkeypatch.setattr(local, "_check_with", broken)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    watch = gradwatch.GradWatch(model, lambda m, b: m(b).pow(2).mean(), every_n_steps=1, max_overhead=None,
                                seed=0, modules=["2"])
    batch = torch.randn(3, 4)
    with watch.step(batch):
        model(batch).pow(2).mean().backward()
    report = watch.last_report
    (module,) = report.modules
    assert module.module == "2" and "module-local check raised RuntimeError: needs its training context" in module.reason
    assert report.ok and report.tensors["2::weight"].verdict == "skipped"  # the whole-model check still ran
    assert report.tensors["2.weight"].verdict == "pass"


class _Cache:
    """A mutable argument the call updates, like a transformers ``DynamicCache``."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []

    def update(self, k: torch.Tensor) -> torch.Tensor:
        self.keys.append(k)
        return torch.cat(self.keys, dim=0)


class _CachedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        return torch.tanh(cache.update(self.proj(x)))


def test_a_call_that_mutates_a_cache_argument_is_replayed_from_the_cache_state_it_had():
    torch.manual_seed(0)
    layer = _CachedLayer()
    x = torch.randn(3, 4, requires_grad=True)
    recording = _Recording({"layer": layer})
    with recording:
        cache = _Cache()
        cache.update(torch.randn(2, 4))  # earlier entries, as a cache holds for other layers
        layer(x, cache).pow(2).sum().backward()
    assert len(cache.keys) == 2  # the training call's own update
    report = _check_record(recording.records["layer"], seed=0, options=gradwatch.ProbeOptions(precision="float64"))
    # every replayed evaluation starts from the 1-entry cache of the recorded call: without the
    # copy, each replay would append again and the output would change shape (or value)
    assert report.ok, str(report)
    assert {"layer::input[0]", "layer::proj.weight"} <= set(report.tensors)
    assert len(cache.keys) == 2  # the training's cache is not touched by the check


def test_tiny_llama_attention_with_its_cache_is_checked_locally_and_a_planted_mlp_bug_is_named():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg)  # use_cache=True: its attention modules get a DynamicCache
    ids = torch.randint(0, 64, (2, 12))

    def loss_fn(m, b):
        return m(input_ids=b, labels=b).loss

    modules = ["model.layers.0.self_attn", "model.layers.1.mlp"]
    for planted in (False, True):
        mlp = model.model.layers[1].mlp
        forward = type(mlp).forward.__get__(mlp)
        mlp.forward = (lambda x: ScaledGrad.apply(forward(x), 1.02)) if planted else forward  # a backward 2% too large
        watch = gradwatch.GradWatch(model, loss_fn, max_overhead=None, modules=modules, on_failure=lambda r: None)
        with watch.step(ids):
            loss_fn(model, ids).backward()
        model.zero_grad()
        report = watch.reports[-1][1]
        attn = {n: t for n, t in report.tensors.items() if n.startswith("model.layers.0.self_attn::")}
        assert "model.layers.0.self_attn::input[hidden_states]" in attn
        assert all(t.verdict == "pass" for t in attn.values()), str(report)  # checked, not skipped
        local_mlp = {n: t.verdict for n, t in report.tensors.items() if n.startswith("model.layers.1.mlp::")}
        if planted:
            assert set(local_mlp.values()) == {"fail"}, str(report)
        else:
            assert report.ok, str(report)


@pytest.mark.parametrize("bug", [None, "wrong_row"])
def test_a_module_before_batchnorm_is_judged_locally_though_its_pairing_cancels(bug, monkeypatch) -> None:
    """A module-local check's loss is ``<g_out, module(x)>``; before BatchNorm (in training mode)
    the output gradient is orthogonal to the output, so the pairing is 0 up to rounding. Its
    float64 and float32 values were compared relative to the pairing itself: every such check
    was 'unreliable' and skipped (a ResNet's planted conv bug went to the whole model alone).
    Now relative to the pairing's terms, ``‖g_out∘y‖₂``; so is its measured noise (relative to the
    cancelled pairing it read as '~float32': the smallest local check was redone in full and the
    whole model measured its precision again)."""
    from zoo import CustomLinear

    measured = []
    check_record = gradwatch.local._check_record

    def recorded(record, **kwargs):
        report = check_record(record, **kwargs)
        measured.append(report.measured_precision)
        return report

    monkeypatch.setattr(gradwatch.local, "_check_record", recorded)

    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(CustomLinear(8, 16, bug=bug), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4))
        batch = (torch.randn(32, 8), torch.randint(0, 4, (32,)))
        measured.clear()
        report = _one_check(model, batch).last_report
        assert measured == ["float64"], measured  # one local check, measured in float64
        local = {n: t for n, t in report.tensors.items() if n.startswith("0::")}
        assert set(local) == {"0::weight", "0::bias"}, str(report)
        assert all(t.verdict != "skipped" for t in local.values()), str(report)
        if bug is None:
            assert report.ok and all(t.verdict == "pass" for t in local.values()), str(report)
        else:
            assert local["0::weight"].verdict == "fail" and local["0::weight"].worst.index[0] == 2, str(report)
