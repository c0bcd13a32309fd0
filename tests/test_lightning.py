"""The Lightning callback inside Trainer.fit: which gradient, the loss, accumulation,
mixed precision, DDP, logging, checkpoints and no side effects, under both Lightning
namespaces (``pytorch_lightning`` and ``lightning.pytorch``, the ``lit`` fixture).

Tests over the whole zoo alternate the namespace case by case (each namespace sees half
of the cases); the others run under both."""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import pathlib
import pickle
import subprocess
import sys
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import gradwatch
import gradwatch._seeds
import gradwatch._watch
import gradwatch.lightning as gwl
from gradwatch import GradientCheckError, GradientCheckWarning, Report
from gradwatch.lightning import GradWatchCallback, LightningLoggerSink
from lightning_zoo import NAMESPACES, api, attention_case, loader, trainer_kwargs
from zoo import BUGS, CORRECT, TRAINING_ONLY_BUGS, assert_log_lines, assert_same_state, training_state

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning_fabric.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]


@pytest.fixture(params=NAMESPACES)
def lit(request) -> Any:
    """The test under each Lightning namespace (see ``lightning_zoo.api``)."""
    return api(request.param)


def _alternating(names) -> list:
    """``(name, lit)`` pairs, the namespace alternating over the sorted names."""
    return [pytest.param(name, NAMESPACES[i % 2], id=f"{name}-{NAMESPACES[i % 2]}")
            for i, name in enumerate(sorted(names))]


def _fit(module: Any, callback: GradWatchCallback | None, *, batches: int = 8, data_seed: int = 0,
         **overrides) -> Any:
    """Fit ``module`` with a Trainer of its own namespace."""
    callbacks = [callback] if callback is not None else []
    callbacks += overrides.pop("callbacks", [])
    trainer = _lit(module).Trainer(callbacks=callbacks, **trainer_kwargs(**overrides))
    trainer.fit(module, loader(module.case, batches=batches, seed=data_seed))
    return trainer


def _lit(module: Any) -> Any:
    return api(next(ns for ns in NAMESPACES if isinstance(module, api(ns).pl.LightningModule)))


def _collect(report: Report) -> None:
    """on_failure callable that keeps quiet (the reports are in callback.reports)."""


def _failing(report: Report) -> set[str]:
    """The whole-model tensors that failed; a module-local one (``<module>::<tensor>``, checked at the
    default ``modules="suspects"``) may fail only in a module holding one of them."""
    whole = {t.name for t in report.failures if "::" not in t.name}
    local = {t.name.partition("::")[0] for t in report.failures if "::" in t.name}
    assert all(any(w.startswith(m + ".") for w in whole) for m in local), str(report)
    return whole


# ----------------------------------------------------------------------------- 1. which gradient
@pytest.mark.parametrize("bug, namespace", _alternating(BUGS))
def test_planted_bugs_are_caught_in_fit(bug: str, namespace: str) -> None:
    module = api(namespace).ZooModule(BUGS[bug](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect)
    _fit(module, callback, max_steps=2)
    assert [s for s, _ in callback.reports] == [0, 1]
    for _, report in callback.reports:
        assert report.verdict == "fail" and report.reliable, str(report)
        assert _failing(report) and _failing(report) <= module.wrong, (_failing(report), module.wrong)


@pytest.mark.parametrize("name, namespace", _alternating(CORRECT))
def test_correct_models_pass_in_fit(name: str, namespace: str) -> None:
    module = api(namespace).ZooModule(CORRECT[name](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")
    _fit(module, callback, max_steps=3)
    assert [s for s, _ in callback.reports] == [0, 1, 2]
    assert all(r.verdict == "pass" and r.grad_precision == "float32" for _, r in callback.reports), \
        [str(r) for _, r in callback.reports]
    assert callback.last_report is callback.reports[-1][1]


@pytest.mark.parametrize("name, namespace", _alternating(["mlp_relu_dropout", "cnn_bn_pool", "layernorm_gelu"]) + [
    pytest.param("cnn_bn_pool", NAMESPACES[1], id=f"cnn_bn_pool-{NAMESPACES[1]}")])
def test_gradient_clipping_gives_no_false_alarm(name: str, namespace: str) -> None:
    lit = api(namespace)
    """The callback compares the gradient before clipping: with clipping at 1e-3 every
    clipped gradient would disagree with the loss by orders of magnitude."""
    module = lit.ZooModule(CORRECT[name](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")
    _fit(module, callback, max_steps=3, gradient_clip_val=1e-3)
    norms = [math.sqrt(sum(p.autograd**2 for p in r.probes if p.kind == "coordinate")) for _, r in callback.reports]
    assert min(norms) > 1e-2  # the gradients really were clipped
    assert all(r.verdict == "pass" for _, r in callback.reports)


def test_planted_bug_is_caught_under_gradient_clipping(lit) -> None:
    module = lit.ZooModule(BUGS["wrong_sign"](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect)
    _fit(module, callback, max_steps=2, gradient_clip_val=1e-3)
    assert all(_failing(r) == {"net.fc1.weight"} for _, r in callback.reports)


def test_schedule_follows_global_step_and_non_check_steps_capture_nothing(monkeypatch, lit) -> None:
    captures = []
    real_capture = gwl.capture
    monkeypatch.setattr(gwl, "capture", lambda m: captures.append(1) or real_capture(m))
    module = lit.ZooModule(CORRECT["layernorm_gelu"](0))
    callback = GradWatchCallback(every_n_steps=3, max_overhead=None, seed=0)
    _fit(module, callback, max_steps=7)
    assert [s for s, _ in callback.reports] == [0, 3, 6]
    assert len(captures) == 3
    assert [r.seed for _, r in callback.reports] == [gradwatch._seeds._derive_seed(0, s) for s in (0, 3, 6)]


def test_on_failure_raise_propagates_out_of_fit(lit) -> None:
    module = lit.ZooModule(BUGS["bias_mean"](0))
    with pytest.raises(GradientCheckError, match="net.fc1.bias") as info:
        _fit(module, GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise"), max_steps=2)
    assert info.value.report.step == 0


def test_on_failure_warn_warns_with_the_failure_message(lit) -> None:
    module = lit.ZooModule(BUGS["wrong_sign"](0))
    with pytest.warns(GradientCheckWarning, match=r"'net.fc1.weight'\["):
        _fit(module, GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0), max_steps=1)


# ----------------------------------------------------------------------------- 2. the loss
def test_user_loss_fn_is_used_with_the_module_and_batch(lit) -> None:
    calls = []

    def loss_fn(module, batch):
        calls.append(module)
        return F.cross_entropy(module.net(batch[0]), batch[1])

    class Counting:
        steps = 0

        def training_step(self, batch, batch_idx):
            Counting.steps += 1
            return super().training_step(batch, batch_idx)

    module = lit.mixin(Counting)(CORRECT["mlp_relu_dropout"](0))
    callback = GradWatchCallback(every_n_steps=2, max_overhead=None, seed=0, loss_fn=loss_fn, on_failure="raise")
    _fit(module, callback, max_steps=3)
    assert [s for s, _ in callback.reports] == [0, 2]
    assert Counting.steps == 3  # only Lightning ran training_step
    assert len(calls) > 10 and all(m is module for m in calls)
    assert all(r.verdict == "pass" for _, r in callback.reports)


def test_user_loss_fn_catches_a_planted_bug(lit) -> None:
    module = lit.ZooModule(BUGS["missing_factor"](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, loss_fn=module.loss, on_failure=_collect)
    _fit(module, callback, max_steps=1)
    assert _failing(callback.last_report) == {"net.fc1.weight"}


@pytest.mark.parametrize("case", [CORRECT["layernorm_gelu"], BUGS["bias_mean"]])
def test_training_step_returning_a_dict(case, lit) -> None:
    module = lit.ZooModule(case(0), returns="dict")
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect)
    _fit(module, callback, max_steps=2)
    assert all(_failing(r) == module.wrong and r.reliable for _, r in callback.reports)


class MetricModule:
    """(Mixed into ZooModule.) Logs through self.log / log_dict every step and a torchmetrics metric per epoch."""

    def __init__(self, case) -> None:
        super().__init__(case)
        from torchmetrics import MeanMetric
        from torchmetrics.classification import MulticlassAccuracy

        self.acc = MulticlassAccuracy(num_classes=4, average="micro")
        self.mean_loss = MeanMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.acc(logits, y)
        self.mean_loss.update(loss)
        self.log("acc", self.acc, on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict({"loss_step": loss, "scale": float(batch_idx)}, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("mean_loss", self.mean_loss.compute())
        self.mean_loss.reset()


def _metric_values(trainer: Any) -> dict[str, dict[str, float]]:
    def plain(d):
        return {k: float(v) for k, v in d.items()}

    return {"callback": plain(trainer.callback_metrics), "logged": plain(trainer.logged_metrics),
            "progress_bar": plain(trainer.progress_bar_metrics)}


def test_rerun_training_step_changes_no_logged_metric_and_no_metric_state(tmp_path, lit) -> None:
    results = []
    for callback in (None, GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")):
        torch.manual_seed(0)
        module = lit.mixin(MetricModule)(CORRECT["mlp_relu_dropout"](0))
        logger = lit.loggers.CSVLogger(str(tmp_path), name="with" if callback else "without")
        trainer = _fit(module, callback, max_epochs=2, max_steps=-1, batches=3, logger=logger)
        with open(pathlib.Path(logger.log_dir) / "metrics.csv") as f:
            rows = [{k: v for k, v in row.items() if not k.startswith("gradwatch/")} for row in csv.DictReader(f)]
        rows = [row for row in rows if any(v for k, v in row.items() if k != "step")]  # drop gradwatch-only rows
        results.append((_metric_values(trainer), rows, module.acc.tp.clone(), callback))
    (plain, plain_rows, plain_tp, _), (watched, watched_rows, watched_tp, callback) = results
    assert len(callback.reports) == 6 and all(r.reliable and r.ok for _, r in callback.reports)
    assert plain == watched
    assert plain_rows == watched_rows
    assert torch.equal(plain_tp, watched_tp)


class ManualModule:
    """(Mixed into ZooModule.)"""

    def __init__(self, case) -> None:
        super().__init__(case)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.case.loss_fn(self.net, batch)
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_without_loss_fn_fails_at_setup_saying_what_to_pass(lit) -> None:
    module = lit.mixin(ManualModule)(CORRECT["layernorm_gelu"](0))
    with pytest.raises(ValueError, match=r"manual optimization.*pass `loss_fn=lambda module, batch:"):
        _fit(module, GradWatchCallback(), max_steps=1)


@pytest.mark.parametrize("case", [CORRECT["mlp_relu_dropout"], BUGS["wrong_sign"]])
def test_manual_optimization_with_loss_fn(case, lit) -> None:
    module = lit.mixin(ManualModule)(case(0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, loss_fn=module.loss, on_failure=_collect)
    _fit(module, callback, max_steps=2)
    assert [s for s, _ in callback.reports] == [0, 1]
    assert all(r.reliable and _failing(r) == module.wrong for _, r in callback.reports)


# ----------------------------------------------------------------------------- 3. accumulation
@pytest.mark.parametrize("case", [CORRECT["mlp_relu_dropout"], CORRECT["cnn_bn_pool"], BUGS["wrong_sign"],
                                  BUGS["bias_mean"], BUGS["hook_rescale"]])
def test_accumulation_checks_the_first_micro_batch_of_a_window(case, lit) -> None:
    module = lit.ZooModule(case(0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect)
    data = loader(module.case, batches=9, seed=0)
    _fit(module, callback, batches=9, max_steps=3, accumulate_grad_batches=3)
    assert [s for s, _ in callback.reports] == [0, 1, 2]
    for _, report in callback.reports:
        assert report.reliable and _failing(report) == module.wrong, str(report)
    # the compared loss is the window's first micro-batch divided by N, as Lightning backpropagates it
    first = next(iter(data))
    torch.manual_seed(0)
    fresh = lit.ZooModule(case(0))
    expected = fresh.case.loss_fn(fresh.net, first).item() / 3
    if not any(isinstance(m, nn.Dropout) for m in fresh.modules()):
        assert callback.reports[0][1].train_loss == pytest.approx(expected, rel=1e-6)


def test_accumulation_short_last_window_of_an_epoch(lit) -> None:
    """5 batches per epoch with N=2: windows (0,1), (2,3), (4) - the last window is one
    micro-batch, still divided by 2 by Lightning."""
    module = lit.ZooModule(CORRECT["layernorm_gelu"](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")
    _fit(module, callback, batches=5, max_steps=-1, max_epochs=2, accumulate_grad_batches=2)
    assert [s for s, _ in callback.reports] == [0, 1, 2, 3, 4, 5]
    assert all(r.verdict == "pass" for _, r in callback.reports)


# ----------------------------------------------------------------------------- 4. mixed precision
AMP_CORRECT = ["mlp_relu_dropout", "cnn_bn_pool", "transformer", "custom_function", "clamp_abs_maximum",
               "layernorm_gelu"]  # no LSTM: oneDNN has no fp16 LSTM on CPU


def _amp(lit: Any, mode: str) -> dict:
    if mode == "bf16-mixed":
        return {"precision": "bf16-mixed"}
    return {"plugins": [lit.plugins.MixedPrecision("16-mixed", "cpu")]}  # Lightning maps precision="16-mixed" on CPU to bf16


@pytest.mark.parametrize("mode, accumulate, namespace", [("bf16-mixed", 1, NAMESPACES[0]), ("bf16-mixed", 2, NAMESPACES[1]),
                                                       ("16-mixed", 1, NAMESPACES[1]), ("16-mixed", 2, NAMESPACES[0])])
def test_mixed_precision_gives_no_false_alarm(mode: str, accumulate: int, namespace: str) -> None:
    """Each namespace runs bf16-mixed and 16-mixed once, one with accumulation."""
    lit = api(namespace)
    expected = "bfloat16" if mode == "bf16-mixed" else "float16"
    names = AMP_CORRECT if accumulate == 1 else ["mlp_relu_dropout", "cnn_bn_pool"]
    for name in names:
        module = lit.ZooModule(CORRECT[name](0))
        callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect)
        _fit(module, callback, max_steps=2, accumulate_grad_batches=accumulate, **_amp(lit, mode))
        for _, r in callback.reports:
            assert r.verdict == "pass" and r.grad_precision == expected, (name, str(r))
            whole = [t for n, t in r.tensors.items() if "::" not in n]  # module-local ones: no precision gap
            gaps = [t.precision_gap for t in whole]
            assert all(t.gap_ratio < 1 for t in whole) and max(gaps) > 0, (name, gaps)  # measured


@pytest.mark.parametrize("mode, namespace", [("bf16-mixed", NAMESPACES[1]), ("16-mixed", NAMESPACES[0])])
def test_mixed_precision_catches_planted_bugs(mode: str, namespace: str) -> None:
    lit = api(namespace)
    for bug in sorted(BUGS):
        module = lit.ZooModule(BUGS[bug](0))
        callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect)
        _fit(module, callback, max_steps=1, **_amp(lit, mode))
        assert _failing(callback.last_report) == module.wrong, (bug, str(callback.last_report))


def test_16_mixed_compares_unscaled_gradients_and_loss(lit) -> None:
    module = lit.ZooModule(CORRECT["layernorm_gelu"](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")
    trainer = _fit(module, callback, max_steps=2, **_amp(lit, "16-mixed"))
    assert trainer.precision_plugin.scaler.get_scale() >= 2.0**15
    for _, r in callback.reports:
        assert r.reliable and r.train_loss == pytest.approx(r.replay_loss, rel=5e-2)
        assert r.train_loss < 10  # unscaled: the cross-entropy of 3 classes, not times 65536


def test_gradscaler_skipped_step_is_not_checked_and_reported_skipped(caplog, lit) -> None:
    module = lit.ZooModule(CORRECT["layernorm_gelu"](0))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, backoff_factor=2.0**-90)
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="gradwatch"):
        warnings.simplefilter("error", gradwatch.UnreliableCheckWarning)
        _fit(module, callback, max_steps=3, plugins=[lit.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    skipped_lines = [r for r in caplog.records if r.name == "gradwatch" and "SKIPPED" in r.getMessage()]
    assert [r.levelno for r in skipped_lines] == [logging.INFO]  # a skipped step is no warning
    verdicts = [r.verdict for _, r in callback.reports]
    assert verdicts[0] == "skipped" and "pass" in verdicts[1:], verdicts
    skipped = callback.reports[0][1]
    assert "GradScaler skips this optimizer step" in skipped.reason and skipped.ok
    assert all(t.verdict == "skipped" and not t.probes for t in skipped.tensors.values())
    assert "SKIPPED" in skipped.summary() and "GradScaler" in skipped.summary()



class _EditsGrad:
    """Code that edits ``.grad`` after backward (the planted bug): the first layer's weight times 1.5."""

    def on_after_backward(self) -> None:
        self.net[0].weight.grad.mul_(1.5)


@pytest.mark.parametrize("mode, namespace", [("fp32", NAMESPACES[0]), ("bf16-mixed", NAMESPACES[1]),
                                             ("16-mixed", NAMESPACES[0])])
@pytest.mark.parametrize("bug", [*sorted(TRAINING_ONLY_BUGS), "edited_grad"])
def test_training_only_bugs_are_caught_in_every_precision(bug: str, mode: str, namespace: str) -> None:
    """What the float64 reference cannot have (a tensor hook rescaling a gradient by 1.5, a
    kernel wrong only below float64, code that edits .grad) is caught in fp32, bf16-mixed and
    16-mixed (fp16 autocast and a real GradScaler on CPU)."""
    lit = api(namespace)
    expected = {"fp32": "float32", "bf16-mixed": "bfloat16", "16-mixed": "float16"}[mode]
    for seed in range(2):
        if bug == "edited_grad":
            module = lit.mixin(_EditsGrad)(CORRECT["layernorm_gelu"](seed))
            module.wrong = {"net.0.weight"}
        else:
            module = lit.ZooModule(TRAINING_ONLY_BUGS[bug](seed))
        callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=seed, on_failure=_collect)
        _fit(module, callback, max_steps=1, data_seed=seed, **({} if mode == "fp32" else _amp(lit, mode)))
        report = callback.last_report
        assert report.reliable and report.grad_precision == expected, report.reason
        assert _failing(report) == module.wrong, (seed, str(report))


# ----------------------------------------------------------------------------- 6. logging
@pytest.mark.parametrize("name", ["layernorm_gelu", "bias_mean"])
def test_one_concise_log_line_per_check_and_nothing_at_warning_when_clean(name: str, caplog, lit) -> None:
    case = (CORRECT.get(name) or BUGS[name])(0)
    verdict = "fail" if case.wrong else "pass"
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        _fit(lit.ZooModule(case), GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect),
             max_steps=3)
    assert_log_lines(caplog.records, [0, 1, 2], verdict, {f"net.{n}" for n in case.wrong})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        _fit(lit.ZooModule(case), GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect),
             max_steps=3)
    assert len([r for r in caplog.records if r.name == "gradwatch"]) == (3 if case.wrong else 0)


def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_logger_gets_the_key_scheme_at_global_step(tmp_path, lit) -> None:
    module = lit.ZooModule(BUGS["wrong_sign"](0))
    logger = lit.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    callback = GradWatchCallback(every_n_steps=2, max_overhead=None, seed=0, on_failure=_collect)
    _fit(module, callback, max_steps=5, logger=logger, log_every_n_steps=1)
    acc = _events(logger.log_dir)
    report = callback.last_report
    for key, value in gradwatch.metrics(report).items():
        events = acc.Scalars(key)
        assert [e.step for e in events] == [0, 2, 4], key
        if key != "gradwatch/check_seconds":
            assert events[-1].value == pytest.approx(value, rel=1e-5, abs=1e-12), key
    # the wrong tensor, and the same weight in its module's local check (a suspect: custom autograd.Function)
    assert [e.value for e in acc.Scalars("gradwatch/failures")] == [2.0, 2.0, 2.0]
    text = acc.Tensors("gradwatch/report/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "net.fc1.weight" in text and "net.fc1::weight" in text
    assert "train_loss" in acc.Tags()["scalars"]  # the user's own logging still arrives


def test_csv_logger_gets_the_scalars_through_log_metrics(tmp_path, lit) -> None:
    module = lit.ZooModule(CORRECT["layernorm_gelu"](0))
    logger = lit.loggers.CSVLogger(str(tmp_path), name="csv", prefix="")
    callback = GradWatchCallback(every_n_steps=2, max_overhead=None, seed=0, prefix="gw", on_failure="raise")
    _fit(module, callback, max_steps=5, logger=logger)
    with open(pathlib.Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [(int(r["step"]), float(r["gw/failures"])) for r in rows if r.get("gw/failures")]
    assert logged == [(0, 0.0), (2, 0.0), (4, 0.0)]
    assert {"gw/rel_error/net.0.weight", "gw/rel_error_max", "gw/check_seconds"} <= set(rows[0])


def test_no_logger_keeps_only_the_reports(tmp_path, lit) -> None:
    module = lit.ZooModule(CORRECT["layernorm_gelu"](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0)
    _fit(module, callback, max_steps=2, default_root_dir=str(tmp_path))
    assert len(callback.reports) == 2 and not any(tmp_path.iterdir())


def test_lightning_logger_sink_validates() -> None:
    with pytest.raises(TypeError, match="`logger` must be a Lightning logger"):
        LightningLoggerSink(object())
    with pytest.raises(ValueError, match="`prefix`"):
        LightningLoggerSink(SimpleNamespace(log_metrics=lambda metrics, step: None), prefix="a/")
    sink = LightningLoggerSink(SimpleNamespace(log_metrics=lambda metrics, step: None))
    with pytest.raises(TypeError, match="`report`"):
        sink.write("report", 0)
    with pytest.raises(ValueError, match="`step`"):
        sink.write(gradwatch.check(nn.Linear(2, 1), lambda m, b: m(b).sum(), torch.ones(1, 2), seed=0), -1)


class ValModule:
    """(Mixed into ZooModule.)"""

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.case.loss_fn(self.net, batch))


def test_sanity_checking_is_skipped(lit) -> None:
    module = lit.mixin(ValModule)(CORRECT["layernorm_gelu"](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0)
    trainer = lit.Trainer(callbacks=[callback], num_sanity_val_steps=2, **trainer_kwargs(max_steps=2))
    trainer.fit(module, loader(module.case, batches=4), loader(module.case, batches=2, seed=1))
    assert [s for s, _ in callback.reports] == [0, 1]
    stub = SimpleNamespace(sanity_checking=True, accumulate_grad_batches=1, global_step=0)
    callback.on_train_batch_start(stub, module, module.case.batch, 0)
    assert callback._pending is None


# ----------------------------------------------------------------------------- 7. checkpoint
def test_resume_samples_as_an_uninterrupted_run(tmp_path, lit) -> None:
    def run(callback, max_steps, ckpt_path=None, checkpoint=None):
        torch.manual_seed(0)
        module = lit.ZooModule(CORRECT["mlp_relu_dropout"](0))
        trainer = lit.Trainer(callbacks=[callback] + ([checkpoint] if checkpoint else []),
                             **trainer_kwargs(max_steps=max_steps, enable_checkpointing=checkpoint is not None,
                                              default_root_dir=str(tmp_path)))
        trainer.fit(module, loader(module.case, batches=20), ckpt_path=ckpt_path)
        return [(s, r.seed, [(t.name, p.where) for t in r.tensors.values() for p in t.probes])
                for s, r in callback.reports]

    uninterrupted = run(GradWatchCallback(every_n_steps=2, max_overhead=None, seed=123), 8)
    first = GradWatchCallback(every_n_steps=2, max_overhead=None, seed=123)
    checkpoint = lit.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1)
    before = run(first, 4, checkpoint=checkpoint)
    resumed_cb = GradWatchCallback(every_n_steps=2, max_overhead=None)  # a fresh random seed, replaced by the checkpoint's
    assert resumed_cb.seed != 123
    after = run(resumed_cb, 8, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert resumed_cb.seed == 123 and resumed_cb.state_dict() == {"seed": 123, "checks": 4}
    assert before + after == uninterrupted
    assert [s for s, *_ in uninterrupted] == [0, 2, 4, 6]


def test_state_dict_round_trip_and_validation() -> None:
    callback = GradWatchCallback(seed=5)
    callback.load_state_dict({"seed": 7, "checks": 3})
    assert callback.state_dict() == {"seed": 7, "checks": 3}
    with pytest.raises(ValueError, match="seed"):
        callback.load_state_dict({"seed": -1, "checks": 3})
    assert GradWatchCallback(prefix="a").state_key != GradWatchCallback(prefix="b").state_key


# ----------------------------------------------------------------------------- 8. no side effects
class DropoutBNModule:
    """(Mixed into LightningModule.)"""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        self.case = SimpleNamespace(batch=(torch.zeros(16, 6), torch.tensor([0, 1, 2] * 5 + [0])))

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("overrides", [{}, {"accumulate_grad_batches": 2}, {"precision": "bf16-mixed"},
                                       {"plugins": ["16-mixed"], "gradient_clip_val": 0.5}],
                         ids=["fp32", "accumulate", "bf16", "fp16-clip"])
def test_fit_with_the_callback_is_bit_identical_to_fit_without(overrides, lit) -> None:
    states = []
    for with_callback in (False, True):
        lit.pl.seed_everything(0, verbose=False)
        module = lit.mixin(DropoutBNModule, lit.pl.LightningModule)()
        callback = GradWatchCallback(every_n_steps=2, max_overhead=None, seed=0, on_failure="raise") if with_callback else None
        kwargs = dict(overrides)
        if "plugins" in kwargs:
            kwargs["plugins"] = [lit.plugins.MixedPrecision("16-mixed", "cpu")]
        trainer = _fit(module, callback, max_steps=6, **kwargs)
        states.append((training_state(module, trainer.optimizers[0]), _metric_values(trainer)))
        if callback is not None:
            assert len(callback.reports) == 3 and all(r.ok and r.reliable for _, r in callback.reports), \
                [str(r) for _, r in callback.reports]
    assert_same_state(states[0][0], states[1][0])
    assert states[0][1] == states[1][1]


# ----------------------------------------------------------------------------- 4b. module-local checks
@pytest.mark.parametrize("mode, wrong", [(None, set()), ("dk", {"net.attn::input[1]"})])
def test_module_local_check_names_a_planted_attention_bug_at_defaults(bug, mode, wrong, lit) -> None:
    """GradWatchCallback() at its defaults finds the custom op (a suspect) and checks it alone: a bug in
    its backward is named as ``<module>::input[k]``; the correct op stays quiet. No hook stays behind."""
    bug(mode)
    module = lit.ZooModule(attention_case(0))
    callback = GradWatchCallback(seed=0, on_failure=_collect)
    _fit(module, callback, max_steps=1)
    (_, report), = callback.reports
    assert callback.suspects == {"net.attn": "custom op gwtest::attention.default"}
    local = {n: t for n, t in report.tensors.items() if "::" in n}
    assert set(local) == {"net.attn::input[0]", "net.attn::input[1]", "net.attn::input[2]"}, str(report)
    assert {n for n, t in local.items() if t.verdict == "fail"} == wrong, str(report)
    assert all(t.verdict == "pass" for n, t in local.items() if n not in wrong), str(report)
    assert report.ok == (mode is None), str(report)
    assert not module.net.attn._forward_hooks and not module.net.attn._forward_pre_hooks


def test_module_local_checks_follow_modules_and_record_only_the_checked_backward(bug, lit) -> None:
    bug("dq")
    module = lit.ZooModule(attention_case(1))
    off = GradWatchCallback(seed=0, every_n_steps=1, max_overhead=None, on_failure=_collect, modules=None)
    _fit(module, off, max_steps=1)
    assert all("::" not in n for n in off.last_report.tensors) and off.suspects == {}
    # named explicitly, under accumulation: the window's first micro-batch only (one call: checked)
    module = lit.ZooModule(attention_case(1))
    named = GradWatchCallback(seed=0, every_n_steps=1, max_overhead=None, on_failure=_collect,
                              modules=["net.attn"])
    _fit(module, named, max_steps=1, accumulate_grad_batches=2)
    assert {t.name for t in named.last_report.failures if "::" in t.name} == {"net.attn::input[0]"}, \
        str(named.last_report)
    assert named.suspects == {}


def test_auto_checks_the_modules_alone_in_float64_when_the_whole_model_does_not_fit(monkeypatch, lit) -> None:
    module = lit.ZooModule(BUGS["wrong_sign"](0))
    whole = sum(t.numel() * 8 for t in [*module.parameters(), *module.buffers()])
    callback = GradWatchCallback(seed=0, on_failure=_collect,  # the whole model does not fit; its modules do
                                 options=gradwatch.ProbeOptions(max_shadow_bytes=whole - 1))
    _fit(module, callback, max_steps=1)
    report = callback.last_report
    assert {t.name for t in report.failures} == {"net.fc1::weight"}, str(report)
    assert all(t.verdict == "skipped" and "max_shadow_bytes" in t.reason
               for n, t in report.tensors.items() if "::" not in n), str(report)
    assert [(m.module, m.precision) for m in report.modules] == [("net.fc1", "float64")]


@pytest.mark.parametrize("modules, match", [
    ("attn", "`modules` must be None, 'suspects' or a list"),
    ([3], "`modules` must be None, 'suspects' or a list"),
    (nn.Linear(2, 2), "`modules` must be None"),
])
def test_bad_modules_raise_naming_the_argument(modules, match) -> None:
    with pytest.raises(ValueError, match=match):
        GradWatchCallback(modules=modules)


def test_modules_not_in_the_lightning_module_raise_at_the_first_check(lit) -> None:
    module = lit.ZooModule(attention_case(0))
    with pytest.raises(ValueError, match="`modules` names 'nope', which is not a submodule"):
        _fit(module, GradWatchCallback(modules=["nope"]), max_steps=1)
    assert not module.net.attn._forward_hooks  # nothing left registered by the failed step


# ----------------------------------------------------------------------------- 5. DDP and sharding
def _two_ranks(script: str, out, namespace: str, timeout: int) -> dict[int, dict]:
    """Run ``tests/<script>`` (it starts its second rank through Lightning's launcher) and read
    what each rank wrote (``tests/_ranks.finish``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / script), str(out), namespace],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_ddp_two_cpu_processes(tmp_path, namespace: str) -> None:
    results = _two_ranks("lightning_ddp.py", tmp_path / "ddp", namespace, timeout=300)
    for rank, res in results.items():
        assert res["correct"]["verdicts"] == ["pass", "pass"], (rank, res)
        assert res["bug"]["failing"] == [["net.fc1.weight"], ["net.fc1.weight"]], (rank, res)
        assert res["raise"] == "GradientCheckError", (rank, res)
    # every rank judged the same probes on the cross-rank mean: identical numbers
    assert results[0]["bug"]["numbers"] == results[1]["bug"]["numbers"]
    _replay_rank_zero_capsules(results, tmp_path / "ddp" / "caps", namespace)
    assert results[0]["correct"]["numbers"] == results[1]["correct"]["numbers"]
    # accumulation: the first micro-batch's local gradients are averaged over ranks as DDP does at the
    # window's end (compared unaveraged, every tensor of this correct model failed)
    assert results[0]["accumulated"]["verdicts"] == ["pass", "pass"], results[0]["accumulated"]
    assert results[0]["accumulated"] == results[1]["accumulated"]
    # module-local checks at the defaults: the suspect found, the bug named, the same verdicts and numbers
    for rank, res in results.items():
        assert res["attn"]["suspects"] == {"net.attn": "custom op gwtest::attention.default"}, (rank, res["attn"])
        assert res["attn"]["local"] == [{"net.attn::input[0]": "pass", "net.attn::input[1]": "fail",
                                         "net.attn::input[2]": "pass"}], (rank, res["attn"])
    assert results[0]["attn"] == results[1]["attn"]
    # the local check raising on rank 1 alone: the module skipped on both ranks, and training went on
    skipped = {f"net.attn::input[{i}]": "skipped" for i in range(3)}
    assert all(res["attn_raise"]["local"] == [skipped] for res in results.values()), results
    assert results[0]["attn_raise"] == results[1]["attn_raise"]
    # the whole-model check raising on rank 1 alone: rank 0 raised too, at the check's next collective
    assert results[1]["check_raise"] == "planted: this rank's check raised", results[1]
    assert "raised on 1 other rank(s) of 2" in results[0]["check_raise"], results[0]
    # each rank's local batch differs, and the check verified the replay of the mean training loss
    assert results[0]["local_losses"] != results[1]["local_losses"]
    # only rank zero wrote to the logger
    assert results[0]["logged_steps"] == [0, 1] and results[1]["logged_steps"] == []
    # under a budget both ranks check the same steps (rank zero's deferrals), tensors and probes;
    # step 0 is the smallest check (the joint probe over every tensor at ±h, no probe of a single tensor)
    budgeted = [results[rank]["budgeted"] for rank in (0, 1)]
    assert budgeted[0] == budgeted[1]
    assert budgeted[0]["steps"][0] == 0 and budgeted[0]["joint"][0] == ["joint"]
    # the module-local check of the suspect net.fc1 failed net.fc1.weight: the smallest check leaves it out of
    # its joint probe, which verifies the others, and fails it on that check's evidence (no probe of its own)
    assert budgeted[0]["failing"][0] == ["net.fc1.weight"] and budgeted[0]["local_failing"][0] == ["net.fc1::weight"]
    assert len(budgeted[0]["checked"][0]) == 4 and budgeted[0]["kinds"][0] == []
    # the script ran in its namespace (the other one is imported by nothing but lightning_zoo's default),
    # and the callback was a Callback of it
    assert all(namespace in res["namespaces"] and res["is_callback"] for res in results.values()), results


def _replay_rank_zero_capsules(results, directory, namespace: str) -> None:
    """The capsules of the first failing check under DDP or fully_shard: written by rank 0 alone (the whole model
    and the suspect net.fc1), replayed in this process with the training's verdicts; the gradients
    they hold are rank 0's own (its backward on its batch gives the same probe values), not the mean."""
    from gradwatch.capsule import load_capsule

    assert results[1]["bug"]["written"] == {}
    written = results[0]["bug"]["written"]
    assert set(written) == {"", "net.fc1"} and sorted(os.listdir(directory)) == ["step-0-model.pt", "step-0-net.fc1.pt"]
    training = results[0]["bug"]["tensors"][0]
    lit = api(namespace)
    for path in written.values():
        capsule = load_capsule(path)
        assert capsule.missing == () and (capsule.processes["rank"], capsule.processes["world_size"]) == (0, 2)
        fresh = lit.ZooModule(BUGS["wrong_sign"](0))
        target = fresh if capsule.kind == "model" else dict(fresh.named_modules())[capsule.name]
        args = (fresh.loss,) if capsule.kind == "model" else ()
        with pytest.warns(UserWarning, match="written by process 0 of 2"):
            replayed = capsule.check(target, *args)
        assert not replayed.ok and replayed.reliable, str(replayed)
        assert {n: t.verdict for n, t in replayed.tensors.items()} == {n: training[n] for n in replayed.tensors}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            own = capsule.check(target, *args, grads="autograd")
        recorded, mine = _probe_values(replayed), _probe_values(own)
        common = sorted(set(recorded) & set(mine), key=str)
        # (the seed is drawn per run: which probes both reruns share varies, at least one here)
        assert len(common) >= 1 and all(math.isclose(recorded[k], mine[k], rel_tol=1e-4, abs_tol=1e-7)
                                        for k in common), [(k, recorded[k], mine[k]) for k in common]


def _probe_values(report) -> dict:
    return {(n, p.kind, p.index, p.direction_seed): p.autograd for n, t in report.tensors.items() for p in t.probes}


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_model_parallel_fsdp2_two_cpu_processes(tmp_path, namespace: str) -> None:
    """ModelParallelStrategy with fully_shard in configure_model: checked like DDP."""
    results = _two_ranks("lightning_fsdp.py", tmp_path / "fsdp", namespace, timeout=240)
    _replay_rank_zero_capsules(results, tmp_path / "fsdp" / "caps", namespace)
    for rank, res in results.items():
        assert res["correct"]["verdicts"] == ["pass", "pass"] and all(res["correct"]["reliable"]), (rank, res)
        assert res["bug"]["failing"] == [["net.fc1.weight"], ["net.fc1.weight"]], (rank, res["bug"]["reports"])
        # accumulation: the first micro-batch's local gradients, averaged over ranks
        assert res["accumulated"]["verdicts"] == ["pass", "pass"], (rank, res["accumulated"]["reports"])
        assert res["raise"] == "GradientCheckError", (rank, res)
        assert res["identical"] is True  # asserted in the script: local shards, Adam state, RNG
        # too large a model to gather: skipped, saying what to use
        assert res["too_big"]["verdicts"] == ["skipped"] and "modules=[...]" in res["too_big"]["reports"][0], res
        # ... unless modules are named: the bug is caught by their local check alone
        named = res["too_big_named"]
        assert named["failing"] == [[]] and named["local_failing"] == [["net.fc1::weight"]], named["reports"]
    # every rank judged the same probes on the cross-rank means
    assert results[0]["bug"]["numbers"] == results[1]["bug"]["numbers"]
    assert results[0]["correct"]["numbers"] == results[1]["correct"]["numbers"]


def test_sharded_strategy_warns_once_and_does_not_check(lit) -> None:
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None)
    module = lit.ZooModule(CORRECT["layernorm_gelu"](0))
    trainer = SimpleNamespace(strategy=lit.strategies.FSDPStrategy(), is_global_zero=True, sanity_checking=False,
                              accumulate_grad_batches=1, global_step=0)
    with pytest.warns(UserWarning, match="does not check gradients under FSDPStrategy.*use ModelParallelStrategy "
                                         "with torch.distributed.fsdp.fully_shard"):
        callback.setup(trainer, module, "fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.setup(trainer, module, "fit")  # once
    callback.on_train_batch_start(trainer, module, module.case.batch, 0)
    assert callback._pending is None


# ----------------------------------------------------------------------------- API
_ONE_NAMESPACE = """
import sys, warnings
warnings.simplefilter("ignore")

def loaded():
    return sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'lightning_fabric'})

import gradwatch
assert loaded() == [], loaded()
from gradwatch import GradWatchCallback   # the README's import line
early = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")
assert loaded() == [] and GradWatchCallback.__module__ == 'gradwatch.lightning', loaded()

import importlib, torch
from torch.utils.data import DataLoader, TensorDataset
L = importlib.import_module(NAMESPACE)
late = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")
assert isinstance(late, L.Callback) and not isinstance(early, L.Callback)

class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = DataLoader(TensorDataset(torch.randn(16, 3), torch.randn(16, 1)), batch_size=4)
kwargs = dict(max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, accelerator="cpu")
L.Trainer(callbacks=late, **kwargs).fit(Module(), data)  # a single callback: Lightning checks isinstance
L.Trainer(callbacks=[early], **kwargs).fit(Module(), data)
assert isinstance(early, L.Callback)  # a Callback of its Trainer's namespace from setup on
assert [r.verdict for _, r in late.reports] == ["pass", "pass"] == [r.verdict for _, r in early.reports]
other = {'lightning.pytorch': 'pytorch_lightning', 'pytorch_lightning': 'lightning'}[NAMESPACE]
assert other not in loaded(), loaded()
print("ok")
"""


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_import_gradwatch_imports_no_lightning_namespace_and_the_callback_serves_each(namespace: str) -> None:
    """``import gradwatch`` and the README's ``from gradwatch import GradWatchCallback`` import no
    namespace; the callback is a Callback of the one in use, and the other is never imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = f"NAMESPACE = {namespace!r}\n" + _ONE_NAMESPACE
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_callback_class_is_a_callback_of_each_loaded_namespace_and_survives_pickle_and_copy() -> None:
    lits = [api(namespace) for namespace in NAMESPACES]  # both imported in this process
    callback = GradWatchCallback(every_n_steps=3, seed=5)
    for lit in lits:
        assert isinstance(callback, lit.Callback) and isinstance(callback, GradWatchCallback)
    assert callback.state_key == "GradWatchCallback{'prefix': 'gradwatch'}"  # as before, in both namespaces
    for twin in (copy.deepcopy(callback), pickle.loads(pickle.dumps(callback))):
        assert type(twin) is type(callback) and twin.seed == 5 and twin.every_n_steps == 3
    assert type(GradWatchCallback(seed=1)) is type(callback)  # built once per set of namespaces
    assert gradwatch.GradWatchCallback is GradWatchCallback and "GradWatchCallback" in dir(gradwatch)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        gradwatch.Nope  # noqa: B018


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"every_n_steps": 0}, ValueError, "`every_n_steps` must be a positive int, got 0"),
        ({"every_n_steps": 2.0}, ValueError, "`every_n_steps`"),
        ({"loss_fn": 3}, TypeError, "`loss_fn` must be callable"),
        ({"on_failure": "ignore"}, ValueError, "`on_failure`"),
        ({"seed": -1}, ValueError, "`seed`"),
        ({"prefix": ""}, ValueError, "`prefix`"),
        ({"options": {"coordinates": -1}}, ValueError, "`coordinates`"),
        ({"options": {"coordinates": 0, "directions": 0}}, ValueError, "at least 1"),
        ({"options": {"kinks": "yes"}}, ValueError, "`kinks`"),
        ({"options": {"directions": 0}}, ValueError, "`directions` must be at least 1"),
        ({"options": {"precision": "fp32"}}, ValueError,
         "`precision` must be one of 'float64', 'native', 'auto', got 'fp32'"),
        ({"options": {"kink_resamples": -1}}, ValueError, "`kink_resamples`"),
        ({"sinks": "tb"}, TypeError, "`sinks` must be None or a list of sinks"),
        ({"options": {"near_kink_margin": 0}}, ValueError, "`near_kink_margin`"),
        ({"max_overhead": 0}, ValueError, r"`max_overhead` must be None or a fraction in \(0, 1\].*got 0"),
        ({"max_overhead": 1.5}, ValueError, "`max_overhead`"),
        ({"capsules": 3}, ValueError, "`capsules` must be None, a bool or a directory path, got 3"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):  # the probe options are one object, validated when made
        GradWatchCallback(**{k: gradwatch.ProbeOptions(**v) if k == "options" else v for k, v in kwargs.items()})


def test_configuration_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        GradWatchCallback(10)  # type: ignore[misc]


def test_precision_and_kink_options_reach_the_engine(lit) -> None:
    module = lit.ZooModule(CORRECT["mlp_relu_dropout"](0))
    callback = GradWatchCallback(
        every_n_steps=1, max_overhead=None, seed=0, options=gradwatch.ProbeOptions(precision="native", kink_resamples=0),
        on_failure=_collect
    )
    with pytest.warns(gradwatch.KinkWarning, match="kinks kept"):  # no redraws: most of a ReLU layer's probes cross
        _fit(module, callback, max_steps=2)
    for _, report in callback.reports:
        assert report.precision == "native" and report.precision_reason == "requested", str(report)
        assert report.ok and all(t.resampled == 0 for t in report.tensors.values())


def test_default_budget_checks_step_zero_then_spends_within_the_budget(monkeypatch, lit) -> None:
    """The schedule shared with GradWatch: step 0 is checked, sized before anything is measured
    (2% of 100 steps: less than one probe, so the smallest check: the joint probe over every tensor)."""
    calls = []
    original = gradwatch._watch._check_with
    monkeypatch.setattr(gradwatch._watch, "_check_with", lambda *a, **k: calls.append(k["names"]) or original(*a, **k))
    module = lit.ZooModule(CORRECT["layernorm_gelu"](0))
    callback = GradWatchCallback(seed=0, on_failure="raise")
    assert callback.max_overhead == 0.02
    _fit(module, callback, max_steps=6)
    names = [n for n, _ in module.named_parameters()]
    assert [s for s, _ in callback.reports] == [0] and calls == [names]  # the next check is >= 100 steps away
    assert [p.kind for p in callback.reports[0][1].joint] == ["joint"]
    report = callback.last_report
    assert all(not t.probes and t.verdict == "pass" and "verified jointly" in t.reason
               for t in report.tensors.values())
