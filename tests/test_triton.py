"""gradwatch on real Triton kernels of our own (``tests/_triton_kernels.py``), run on CPU by
Triton's interpreter: every planted backward bug is caught, no correct kernel raises a false
alarm, a kernel without float64 is checked in its own precision.

Each kernel sits in a small model (``Linear -> kernel -> Linear``) checked three ways:
``gradwatch.check`` (whole model, 20 seeds), ``gradwatch.check_module`` (the kernel alone, 10
seeds) and ``gradwatch.GradWatch`` training (5 seeds). 16 of these assertions failed before
gradwatch measured the precision its evaluations really have (issue 22: verdicts in float64
tolerances on kernels that compute in float32 inside, a broken float64 path blamed on the
training gradient); they pass now. The one still marked ``xfail(strict=True)`` is a limit of
native-precision checks (see :data:`_XFAIL`); ``strict`` makes pytest say when it passes.
"""

from __future__ import annotations

import os
import warnings

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it where there is no GPU
    pytest.skip("the Triton kernel tests run under Triton's interpreter: TRITON_INTERPRET=1 (set before "
                "triton is imported)", allow_module_level=True)
pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gradwatch  # noqa: E402
from _triton_kernels import KERNELS  # noqa: E402

#: Seeds per assertion: 20 for the whole-model check, fewer for the module-local check and for
#: GradWatch (whose step-0 check is both), to keep this file near 100 s of CPU time: every
#: perturbed loss is a kernel launch in the interpreter (1-6 ms).
SEEDS = {"check": range(20), "module": range(10), "watch": range(5)}


# --------------------------------------------------------------------------- the kernels themselves


def _rms_ref(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _swiglu_ref(x):
    a, b = x.chunk(2, -1)
    return F.silu(a) * b


def _conv_ref(x, w):
    c, k = w.shape
    return F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), w.unsqueeze(1), groups=c)


_REFERENCES = {
    "rmsnorm": _rms_ref,
    "rmsnorm_1e-3": _rms_ref,
    "cross_entropy": lambda logits, target: F.cross_entropy(logits, target, reduction="none"),
    "swiglu": _swiglu_ref,
    "causal_conv": _conv_ref,
    "gelu_no_fp64": lambda x: F.gelu(x, approximate="tanh"),
    "layernorm_bad_fp64": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
}


def _kernel_vs_reference(case, bug: bool, dtype: torch.dtype):
    """Relative errors of the kernel's output and gradients against float64 torch on the same
    inputs, in ``dtype``; the gradient of the output is drawn contiguous in the output's
    shape (for the conv, a non-contiguous ``dy`` for the kernel)."""
    module, inputs = case.module(bug=bug, seed=0)
    module = module.to(dtype)
    ins = [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = module(*ins)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [t for t in ins if t.requires_grad] + list(module.parameters())
    got = torch.autograd.grad(out, leaves, g.to(dtype))
    ref_ins = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    ref_params = [p.detach().double().requires_grad_() for p in module.parameters()]
    ref = _REFERENCES[case.name](*ref_ins, *ref_params)
    want = torch.autograd.grad(ref, [t for t in ref_ins if t.requires_grad] + ref_params, g)
    rel = [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, want)]
    return float((out.detach().double() - ref.detach()).norm() / ref.detach().norm()), rel


@pytest.mark.parametrize("name", list(_REFERENCES))
def test_correct_kernels_match_torch_and_planted_bugs_do_not(name) -> None:
    case = KERNELS[name]
    out_err, grad_errs = _kernel_vs_reference(case, False, torch.float32)
    assert out_err < 1e-5 and max(grad_errs) < 1e-5, (out_err, grad_errs)
    out_err, grad_errs = _kernel_vs_reference(case, True, torch.float32)
    assert out_err < 1e-5 and max(grad_errs) > 1e-2, (out_err, grad_errs)  # the bug is in the backward only


def test_kernels_compute_in_float32_inside_on_float64_inputs() -> None:
    """What gradwatch faces: float64 in, float64 out, float32 accuracy; one kernel raises, one
    is wrong in float64 only."""
    case = KERNELS["swiglu"]
    out_err, grad_errs = _kernel_vs_reference(case, False, torch.float64)
    assert 1e-9 < out_err < 1e-5 and max(grad_errs) < 1e-5, (out_err, grad_errs)
    with pytest.raises(TypeError, match="float64"):
        _kernel_vs_reference(KERNELS["gelu_no_fp64"], False, torch.float64)
    out_err, grad_errs = _kernel_vs_reference(KERNELS["layernorm_bad_fp64"], False, torch.float64)
    assert out_err < 1e-5 and min(grad_errs) > 0.1, (out_err, grad_errs)


# --------------------------------------------------------------------------- gradwatch on them

_NATIVE_MISSED = ("the kernel has no float64: its 2.4% bug in the cubic term moves the gradient by less than "
                  "the native-precision check resolves in 3 of 20 seeds (they pass at resolving power ~5e-3)")
#: (kernel, version, mode) assertions that fail on the engine of issue 22. Before the measured
#: precision (main at 0.2.0) there were 16: false alarms on correct float32-inside kernels
#: (rmsnorm watch/module, rmsnorm_1e-3 module, swiglu module, causal_conv watch/module), planted
#: bugs hidden by float32 noise (rmsnorm check/module, rmsnorm_1e-3 check, cross_entropy
#: check/watch/module), the broken float64 path blamed on the training gradient (layernorm_bad_fp64
#: check/watch/module) and the native miss below. One is left: the GELU kernel without float64 is
#: checked natively, and its bug (2.4% of the cubic term's derivative) moves the gradient by less
#: than that check resolves in 3 of 20 seeds (they pass at resolving power ~5e-3, err/tol 0.3-0.8).
_XFAIL: dict[tuple[str, str, str], str] = {
    ("gelu_no_fp64", "bug", "check"): _NATIVE_MISSED,  # seeds 2, 7, 16 of 20
}


def _reports(case, bug: bool, mode: str, seed: int) -> list:
    if mode == "module":
        module, inputs = case.module(bug=bug, seed=seed)
        return [gradwatch.check_module(module, inputs, seed=seed)]
    model = case.model(bug=bug, seed=seed)
    if mode == "check":
        return [gradwatch.check(model, case.loss_fn, case.batch(seed), seed=seed)]
    # one full check at step 0 (the plain schedule, not the time budget: the same probes on any machine)
    watch = gradwatch.GradWatch(model, case.loss_fn, every_n_steps=2, max_overhead=None, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientCheckWarning)
        for step in range(2):
            batch = case.batch(1000 * seed + step)
            opt.zero_grad()
            with watch.step(batch):
                case.loss_fn(model, batch).backward()
            opt.step()
    assert [s for s, _ in watch.reports] == [0]
    return [r for _, r in watch.reports]


def _cases():
    names = ("rmsnorm", "rmsnorm_1e-3", "cross_entropy", "swiglu", "causal_conv", "gelu_no_fp64",
             "layernorm_bad_fp64")
    for name in names:
        for version in ("correct", "bug"):
            for mode in ("check", "watch", "module"):
                reason = _XFAIL.get((name, version, mode))
                marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
                yield pytest.param(name, version, mode, marks=marks, id=f"{name}-{version}-{mode}")


@pytest.mark.parametrize(("name", "version", "mode"), list(_cases()))
def test_planted_bugs_are_caught_and_correct_kernels_pass(name, version, mode) -> None:
    case = KERNELS[name]
    for seed in SEEDS[mode]:  # stops at the first wrong seed: benchmarks/triton_kernels.py counts them all
        reports = _reports(case, version == "bug", mode, seed)
        failed = [t for r in reports for t in r.tensors.values() if t.verdict == "fail"]
        if version == "bug":
            assert failed, (seed, "missed", {k: t.verdict for r in reports for k, t in r.tensors.items()})
        else:
            assert not failed and all(r.ok for r in reports), (seed, "false alarm", [t.message for t in failed][:2])


def test_kernel_without_float64_is_checked_in_its_own_precision() -> None:
    """The kernel raises on float64: gradwatch falls back to the model's precision, judges the
    tensors (not all skipped) and does not crash, whole-model and module-local."""
    case = KERNELS["gelu_no_fp64"]
    for seed in range(3):
        report = gradwatch.check(case.model(seed=seed), case.loss_fn, case.batch(seed), seed=seed)
        assert report.precision == "native" and report.reliable, report
        assert report.tensors["inp.weight"].verdict == "pass", report  # the one trained tensor (the head is frozen)
        module, inputs = case.module(seed=seed)
        local = gradwatch.check_module(module, inputs, seed=seed)
        assert local.precision == "native" and local.ok and local.tensors["input[0]"].verdict == "pass", local
