"""The examples run end to end on CPU and do what their docstrings say."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gradwatch import GradientCheckError, cli

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_planted_bug_example_catches_the_bug_and_logs_it(tmp_path, capsys) -> None:
    example = _load("train_planted_bug")
    watch = example.main(["--steps", "60", "--every", "20", "--logdir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert out.startswith("gradwatch: FAIL in 3 of 3 checks - '0.bias'[")
    assert "tensorboard --logdir" in out
    assert [s for s, _ in watch.reports] == [0, 20, 40]
    # the whole-model check and the module-local check of the custom Function's module (GradWatch's default
    # modules="suspects") both name the bias
    assert all([t.name for t in r.failures] == ["0.bias", "0::bias"] for _, r in watch.reports)
    acc = EventAccumulator(str(tmp_path / "runs"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("gradwatch/failures")] == [2.0, 2.0, 2.0]  # 0.bias and 0::bias
    # the kink curves: one point per check (the MLP's ReLUs always have some pre-activation near 0)
    assert [e.step for e in acc.Scalars("gradwatch/kink_fraction")] == [0, 20, 40]
    assert [e.step for e in acc.Scalars("gradwatch/kink_margin_min")] == [0, 20, 40]


def test_planted_bug_example_with_the_fix_passes(tmp_path, capsys) -> None:
    example = _load("train_planted_bug")
    watch = example.main(["--steps", "41", "--every", "20", "--fixed", "--logdir", str(tmp_path / "runs")])
    assert capsys.readouterr().out.startswith("gradwatch: PASS in all 3 checks")
    assert all(r.ok for _, r in watch.reports)


def test_lightning_example_catches_the_bug_and_logs_it_to_lightning_logs(tmp_path, capsys) -> None:
    example = _load("lightning_custom_layer")
    callback = example.main(["--steps", "41", "--every", "20", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("gradwatch: FAIL in 3 of 3 checks - 'body.")
    assert f"tensorboard --logdir {tmp_path / 'lightning_logs'}" in out
    assert [s for s, _ in callback.reports] == [0, 20, 40]
    # the layer before the norm gets the wrong gradient; the norm's own weight is right; the norm's
    # module-local check (a suspect: custom autograd.Function) names its wrong input gradient
    assert callback.suspects == {"body.1": "custom autograd.Function FusedRMSNormFn"}
    wrong = {"body.0.weight", "body.0.bias", "body.1::input[0]"}
    assert all({t.name for t in r.failures} <= wrong and "body.1::input[0]" in {t.name for t in r.failures}
               for _, r in callback.reports)
    acc = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("gradwatch/failures")] == [0, 20, 40]
    assert all(e.value >= 1.0 for e in acc.Scalars("gradwatch/failures"))
    assert "train/loss" in acc.Tags()["scalars"]
    # `gradwatch report` reads Lightning's log directory and exits 1
    assert cli.main(["report", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "run lightning_logs/version_0: 3 checks, 3 failing (first at step 0)" in out
    failing = {line.split()[1] for line in out.splitlines() if line.startswith("  FAIL ")}
    assert failing and failing <= wrong


def test_lightning_example_with_the_fix_passes(tmp_path, capsys) -> None:
    example = _load("lightning_custom_layer")
    callback = example.main(["--steps", "41", "--every", "20", "--fixed", "--root", str(tmp_path)])
    assert capsys.readouterr().out.startswith("gradwatch: PASS in all 3 checks")
    assert all(r.ok for _, r in callback.reports)


@pytest.fixture(scope="module")
def custom_op_example():
    """Loaded once: importing it registers its torch.library ops, which can happen once per process."""
    return _load("custom_op_kernel")


_FUSED_WRONG = {"0.weight", "1.bias", "2.weight", "3.bias"}  # the fused layers' biases and the weights before them
_FUSED_LOCAL = {"1::input[0]", "1::bias", "3::input[0]", "3::bias"}  # module-local: the two op calls


def test_custom_op_example_catches_the_bug_in_the_unit_test_and_in_training(custom_op_example, tmp_path,
                                                                           capsys) -> None:
    unit, watch = custom_op_example.main(["--steps", "41", "--every", "20", "--logdir", str(tmp_path / "runs")])
    first, second, third = capsys.readouterr().out.splitlines()
    assert first.startswith("unit test (gradwatch.assert_gradients): FAIL - 'x'[")
    assert isinstance(unit, GradientCheckError) and isinstance(unit, AssertionError)
    assert {t.name for t in unit.report.failures} == {"x", "bias"}
    assert second.startswith("training (gradwatch.GradWatch): FAIL in 3 of 3 checks; largest error at step ")
    assert any(f": '{name}'[" in second for name in _FUSED_WRONG)
    assert third.startswith("view the logs: tensorboard --logdir")
    assert [s for s, _ in watch.reports] == [0, 20, 40]
    # the whole-model check names the fused layers' parameters; the module-local checks of the two op calls
    # (GradWatch's default modules="suspects") name the op modules themselves: their input and bias gradients
    assert all({t.name for t in r.failures} == _FUSED_WRONG | _FUSED_LOCAL for _, r in watch.reports)
    acc = EventAccumulator(str(tmp_path / "runs"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("gradwatch/failures")] == [8.0, 8.0, 8.0]  # 4 whole-model tensors, 4 module-local


def test_custom_op_example_with_the_fix_passes_both(custom_op_example, tmp_path, capsys) -> None:
    unit, watch = custom_op_example.main(["--steps", "41", "--every", "20", "--fixed", "--logdir", str(tmp_path)])
    first, second, _ = capsys.readouterr().out.splitlines()
    assert first.startswith("unit test (gradwatch.assert_gradients): PASS")
    assert second.startswith("training (gradwatch.GradWatch): PASS in all 3 checks")
    assert unit.verdict == "pass" and all(r.ok for _, r in watch.reports)


@pytest.mark.parametrize("planted_bug", [False, True])
def test_custom_op_example_is_a_real_custom_op_and_gradcheck_agrees(custom_op_example, planted_bug) -> None:
    op = torch.ops.gradwatch_examples.fused_bias_gelu
    meta = op(torch.empty(4, 3, device="meta"), torch.empty(3, device="meta"), planted_bug)  # register_fake
    assert meta.shape == (4, 3) and meta.device.type == "meta"
    g = torch.Generator().manual_seed(0)
    x, bias = 2 * torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    inputs = (x.requires_grad_(True), bias.requires_grad_(True))
    ok = torch.autograd.gradcheck(lambda a, b: op(a, b, planted_bug), inputs, raise_exception=False)
    assert ok == (not planted_bug)


_HF_DOWNSTREAM = {"transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight",
                  "transformer.ln_f.bias"}  # after the last patched activation: their gradients stay right


def test_hf_trainer_example_catches_the_patched_kernel_bug_and_logs_it(tmp_path, capsys) -> None:
    example = _load("hf_trainer")
    callback = example.main(["--steps", "21", "--every", "20", "--output", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("gradwatch: FAIL in 2 of 2 checks, 26 tensors - 'transformer."), out
    assert out[-1] == f"view the logs: tensorboard --logdir {tmp_path}/runs"
    assert [s for s, _ in callback.reports] == [0, 20]
    for _, report in callback.reports:
        failing = {t.name for t in report.failures}
        assert "transformer.h.1.mlp.c_fc.weight" in failing and not failing & _HF_DOWNSTREAM, failing
        # the patched kernel itself, by its module-local checks (suspects: custom autograd.Function)
        assert {n for n in failing if "::" in n} == {f"transformer.h.{i}.mlp.act::input[0]" for i in (0, 1)}
    (run,) = (tmp_path / "runs").iterdir()
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("gradwatch/failures")] == [(0, 26.0), (20, 26.0)]
    assert "train/loss" in acc.Tags()["scalars"]


def test_hf_trainer_example_with_the_fix_passes(tmp_path, capsys) -> None:
    example = _load("hf_trainer")
    callback = example.main(["--steps", "1", "--every", "20", "--fixed", "--output", str(tmp_path)])
    assert capsys.readouterr().out.splitlines()[-2].startswith("gradwatch: PASS in all 1 checks")
    assert all(r.ok for _, r in callback.reports)


def test_debug_a_failure_walk_through_catches_reproduces_and_proves_the_fix(tmp_path, capsys) -> None:
    example = _load("debug_a_failure")
    result = example.main(["--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    report = result["report"]
    # the check caught the planted backward bug: the layer's input gradient, in its module-local check
    assert "1::input[0]" in {t.name for t in report.failures} and "1::scale" not in {t.name for t in report.failures}
    capsule = tmp_path / "runs" / "gradwatch" / "capsules" / "step-0-1.pt"
    assert result["capsule"] == str(capsule) and capsule.exists()
    # gradwatch repro: the same failing report again (exit status 1)
    assert result["repro"] == 1 and "1::input[0]  fail" in out
    # the generated test fails on the buggy kernel and passes once the kernel is fixed
    assert result["pytest_before_fix"] != 0 and result["pytest_after_fix"] == 0
    assert "1 failed" in out and "1 passed" in out
    assert example.FIXED_LINE in (tmp_path / "my_kernels.py").read_text()
