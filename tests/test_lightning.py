"""The Lightning callback inside Trainer.fit: which gradient, the loss, accumulation,
mixed precision, DDP, logging, checkpoints and no side effects."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import pathlib
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import gradwatch
import gradwatch.lightning as gwl
from gradwatch import GradientCheckError, GradientCheckWarning, Report
from gradwatch.lightning import GradWatchCallback, LightningLoggerSink
from lightning_zoo import ZooModule, loader, trainer_kwargs
from zoo import BUGS, CORRECT, assert_log_lines, assert_same_state, training_state

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:lightning_fabric.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]


def _fit(module: pl.LightningModule, callback: GradWatchCallback | None, *, batches: int = 8, data_seed: int = 0,
         **overrides) -> pl.Trainer:
    callbacks = [callback] if callback is not None else []
    callbacks += overrides.pop("callbacks", [])
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(**overrides))
    trainer.fit(module, loader(module.case, batches=batches, seed=data_seed))
    return trainer


def _collect(report: Report) -> None:
    """on_failure callable that keeps quiet (the reports are in callback.reports)."""


def _failing(report: Report) -> set[str]:
    return {t.name for t in report.failures}


# ----------------------------------------------------------------------------- 1. which gradient
@pytest.mark.parametrize("bug", sorted(BUGS))
def test_planted_bugs_are_caught_in_fit(bug: str) -> None:
    module = ZooModule(BUGS[bug](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect)
    _fit(module, callback, max_steps=2)
    assert [s for s, _ in callback.reports] == [0, 1]
    for _, report in callback.reports:
        assert report.verdict == "fail" and report.reliable, str(report)
        assert _failing(report) and _failing(report) <= module.wrong, (_failing(report), module.wrong)


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_models_pass_in_fit(name: str) -> None:
    module = ZooModule(CORRECT[name](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")
    _fit(module, callback, max_steps=3)
    assert [s for s, _ in callback.reports] == [0, 1, 2]
    assert all(r.verdict == "pass" and r.grad_precision == "float32" for _, r in callback.reports), \
        [str(r) for _, r in callback.reports]
    assert callback.last_report is callback.reports[-1][1]


@pytest.mark.parametrize("name", ["mlp_relu_dropout", "cnn_bn_pool", "layernorm_gelu"])
def test_gradient_clipping_gives_no_false_alarm(name: str) -> None:
    """The callback compares the gradient before clipping: with clipping at 1e-3 every
    clipped gradient would disagree with the loss by orders of magnitude."""
    module = ZooModule(CORRECT[name](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")
    _fit(module, callback, max_steps=3, gradient_clip_val=1e-3)
    norms = [math.sqrt(sum(p.autograd**2 for p in r.probes if p.kind == "coordinate")) for _, r in callback.reports]
    assert min(norms) > 1e-2  # the gradients really were clipped
    assert all(r.verdict == "pass" for _, r in callback.reports)


def test_planted_bug_is_caught_under_gradient_clipping() -> None:
    module = ZooModule(BUGS["wrong_sign"](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect)
    _fit(module, callback, max_steps=2, gradient_clip_val=1e-3)
    assert all(_failing(r) == {"net.fc1.weight"} for _, r in callback.reports)


def test_schedule_follows_global_step_and_non_check_steps_capture_nothing(monkeypatch) -> None:
    captures = []
    real_capture = gwl.capture
    monkeypatch.setattr(gwl, "capture", lambda m: captures.append(1) or real_capture(m))
    module = ZooModule(CORRECT["layernorm_gelu"](0))
    callback = GradWatchCallback(every_n_steps=3, max_overhead=None, seed=0)
    _fit(module, callback, max_steps=7)
    assert [s for s, _ in callback.reports] == [0, 3, 6]
    assert len(captures) == 3
    assert [r.seed for _, r in callback.reports] == [gwl._derive_seed(0, s) for s in (0, 3, 6)]


def test_on_failure_raise_propagates_out_of_fit() -> None:
    module = ZooModule(BUGS["bias_mean"](0))
    with pytest.raises(GradientCheckError, match="net.fc1.bias") as info:
        _fit(module, GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise"), max_steps=2)
    assert info.value.report.step == 0


def test_on_failure_warn_warns_with_the_failure_message() -> None:
    module = ZooModule(BUGS["wrong_sign"](0))
    with pytest.warns(GradientCheckWarning, match=r"'net.fc1.weight'\["):
        _fit(module, GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0), max_steps=1)


# ----------------------------------------------------------------------------- 2. the loss
def test_user_loss_fn_is_used_with_the_module_and_batch() -> None:
    calls = []

    def loss_fn(module, batch):
        calls.append(module)
        return F.cross_entropy(module.net(batch[0]), batch[1])

    class Counting(ZooModule):
        steps = 0

        def training_step(self, batch, batch_idx):
            Counting.steps += 1
            return super().training_step(batch, batch_idx)

    module = Counting(CORRECT["mlp_relu_dropout"](0))
    callback = GradWatchCallback(every_n_steps=2, max_overhead=None, seed=0, loss_fn=loss_fn, on_failure="raise")
    _fit(module, callback, max_steps=3)
    assert [s for s, _ in callback.reports] == [0, 2]
    assert Counting.steps == 3  # only Lightning ran training_step
    assert len(calls) > 10 and all(m is module for m in calls)
    assert all(r.verdict == "pass" for _, r in callback.reports)


def test_user_loss_fn_catches_a_planted_bug() -> None:
    module = ZooModule(BUGS["missing_factor"](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, loss_fn=module.loss, on_failure=_collect)
    _fit(module, callback, max_steps=1)
    assert _failing(callback.last_report) == {"net.fc1.weight"}


@pytest.mark.parametrize("case", [CORRECT["layernorm_gelu"], BUGS["bias_mean"]])
def test_training_step_returning_a_dict(case) -> None:
    module = ZooModule(case(0), returns="dict")
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect)
    _fit(module, callback, max_steps=2)
    assert all(_failing(r) == module.wrong and r.reliable for _, r in callback.reports)


class MetricModule(ZooModule):
    """Logs through self.log / log_dict every step and a torchmetrics metric per epoch."""

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


def _metric_values(trainer: pl.Trainer) -> dict[str, dict[str, float]]:
    def plain(d):
        return {k: float(v) for k, v in d.items()}

    return {"callback": plain(trainer.callback_metrics), "logged": plain(trainer.logged_metrics),
            "progress_bar": plain(trainer.progress_bar_metrics)}


def test_rerun_training_step_changes_no_logged_metric_and_no_metric_state(tmp_path) -> None:
    results = []
    for callback in (None, GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")):
        torch.manual_seed(0)
        module = MetricModule(CORRECT["mlp_relu_dropout"](0))
        logger = CSVLogger(str(tmp_path), name="with" if callback else "without")
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


class ManualModule(ZooModule):
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


def test_manual_optimization_without_loss_fn_fails_at_setup_saying_what_to_pass() -> None:
    module = ManualModule(CORRECT["layernorm_gelu"](0))
    with pytest.raises(ValueError, match=r"manual optimization.*pass `loss_fn=lambda module, batch:"):
        _fit(module, GradWatchCallback(), max_steps=1)


@pytest.mark.parametrize("case", [CORRECT["mlp_relu_dropout"], BUGS["wrong_sign"]])
def test_manual_optimization_with_loss_fn(case) -> None:
    module = ManualModule(case(0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, loss_fn=module.loss, on_failure=_collect)
    _fit(module, callback, max_steps=2)
    assert [s for s, _ in callback.reports] == [0, 1]
    assert all(r.reliable and _failing(r) == module.wrong for _, r in callback.reports)


# ----------------------------------------------------------------------------- 3. accumulation
@pytest.mark.parametrize("case", [CORRECT["mlp_relu_dropout"], CORRECT["cnn_bn_pool"], BUGS["wrong_sign"],
                                  BUGS["bias_mean"], BUGS["hook_rescale"]])
def test_accumulation_checks_the_first_micro_batch_of_a_window(case) -> None:
    module = ZooModule(case(0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect)
    data = loader(module.case, batches=9, seed=0)
    _fit(module, callback, batches=9, max_steps=3, accumulate_grad_batches=3)
    assert [s for s, _ in callback.reports] == [0, 1, 2]
    for _, report in callback.reports:
        assert report.reliable and _failing(report) == module.wrong, str(report)
    # the compared loss is the window's first micro-batch divided by N, as Lightning backpropagates it
    first = next(iter(data))
    torch.manual_seed(0)
    fresh = ZooModule(case(0))
    expected = fresh.case.loss_fn(fresh.net, first).item() / 3
    if not any(isinstance(m, nn.Dropout) for m in fresh.modules()):
        assert callback.reports[0][1].train_loss == pytest.approx(expected, rel=1e-6)


def test_accumulation_short_last_window_of_an_epoch() -> None:
    """5 batches per epoch with N=2: windows (0,1), (2,3), (4) - the last window is one
    micro-batch, still divided by 2 by Lightning."""
    module = ZooModule(CORRECT["layernorm_gelu"](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")
    _fit(module, callback, batches=5, max_steps=-1, max_epochs=2, accumulate_grad_batches=2)
    assert [s for s, _ in callback.reports] == [0, 1, 2, 3, 4, 5]
    assert all(r.verdict == "pass" for _, r in callback.reports)


# ----------------------------------------------------------------------------- 4. mixed precision
AMP_CORRECT = ["mlp_relu_dropout", "cnn_bn_pool", "transformer", "custom_function", "clamp_abs_maximum",
               "layernorm_gelu"]  # no LSTM: oneDNN has no fp16 LSTM on CPU


def _amp(mode: str) -> dict:
    if mode == "bf16-mixed":
        return {"precision": "bf16-mixed"}
    return {"plugins": [MixedPrecision("16-mixed", "cpu")]}  # Lightning maps precision="16-mixed" on CPU to bf16


@pytest.mark.parametrize("mode", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_mixed_precision_gives_no_false_alarm(mode: str, accumulate: int) -> None:
    expected = "bfloat16" if mode == "bf16-mixed" else "float16"
    names = AMP_CORRECT if accumulate == 1 else ["mlp_relu_dropout", "cnn_bn_pool"]
    for name in names:
        module = ZooModule(CORRECT[name](0))
        callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect)
        _fit(module, callback, max_steps=2, accumulate_grad_batches=accumulate, **_amp(mode))
        for _, r in callback.reports:
            assert r.verdict == "pass" and r.grad_precision == expected, (name, str(r))
            gaps = [t.precision_gap for t in r.tensors.values()]
            assert all(t.gap_ratio < 1 for t in r.tensors.values()) and max(gaps) > 0, (name, gaps)  # measured


@pytest.mark.parametrize("mode", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_catches_planted_bugs(mode: str) -> None:
    for bug in sorted(BUGS):
        module = ZooModule(BUGS[bug](0))
        callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect)
        _fit(module, callback, max_steps=1, **_amp(mode))
        assert _failing(callback.last_report) == module.wrong, (bug, str(callback.last_report))


def test_16_mixed_compares_unscaled_gradients_and_loss() -> None:
    module = ZooModule(CORRECT["layernorm_gelu"](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")
    trainer = _fit(module, callback, max_steps=2, **_amp("16-mixed"))
    assert trainer.precision_plugin.scaler.get_scale() >= 2.0**15
    for _, r in callback.reports:
        assert r.reliable and r.train_loss == pytest.approx(r.replay_loss, rel=5e-2)
        assert r.train_loss < 10  # unscaled: the cross-entropy of 3 classes, not times 65536


def test_gradscaler_skipped_step_is_not_checked_and_reported_skipped(caplog) -> None:
    module = ZooModule(CORRECT["layernorm_gelu"](0))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, backoff_factor=2.0**-90)
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure="raise")
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="gradwatch"):
        warnings.simplefilter("error", gradwatch.UnreliableCheckWarning)
        _fit(module, callback, max_steps=3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    skipped_lines = [r for r in caplog.records if r.name == "gradwatch" and "SKIPPED" in r.getMessage()]
    assert [r.levelno for r in skipped_lines] == [logging.INFO]  # a skipped step is no warning
    verdicts = [r.verdict for _, r in callback.reports]
    assert verdicts[0] == "skipped" and "pass" in verdicts[1:], verdicts
    skipped = callback.reports[0][1]
    assert "GradScaler skips this optimizer step" in skipped.reason and skipped.ok
    assert all(t.verdict == "skipped" and not t.probes for t in skipped.tensors.values())
    assert "SKIPPED" in skipped.summary() and "GradScaler" in skipped.summary()


# ----------------------------------------------------------------------------- 6. logging
@pytest.mark.parametrize("name", ["layernorm_gelu", "bias_mean"])
def test_one_concise_log_line_per_check_and_nothing_at_warning_when_clean(name: str, caplog) -> None:
    case = (CORRECT.get(name) or BUGS[name])(0)
    verdict = "fail" if case.wrong else "pass"
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        _fit(ZooModule(case), GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect),
             max_steps=3)
    assert_log_lines(caplog.records, [0, 1, 2], verdict, {f"net.{n}" for n in case.wrong})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        _fit(ZooModule(case), GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=_collect),
             max_steps=3)
    assert len([r for r in caplog.records if r.name == "gradwatch"]) == (3 if case.wrong else 0)


def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_logger_gets_the_key_scheme_at_global_step(tmp_path) -> None:
    module = ZooModule(BUGS["wrong_sign"](0))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callback = GradWatchCallback(every_n_steps=2, max_overhead=None, seed=0, on_failure=_collect)
    _fit(module, callback, max_steps=5, logger=logger, log_every_n_steps=1)
    acc = _events(logger.log_dir)
    report = callback.last_report
    for key, value in gradwatch.metrics(report).items():
        events = acc.Scalars(key)
        assert [e.step for e in events] == [0, 2, 4], key
        if key != "gradwatch/check_seconds":
            assert events[-1].value == pytest.approx(value, rel=1e-5, abs=1e-12), key
    assert [e.value for e in acc.Scalars("gradwatch/failures")] == [1.0, 1.0, 1.0]
    text = acc.Tensors("gradwatch/report/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "net.fc1.weight" in text
    assert "train_loss" in acc.Tags()["scalars"]  # the user's own logging still arrives


def test_csv_logger_gets_the_scalars_through_log_metrics(tmp_path) -> None:
    module = ZooModule(CORRECT["layernorm_gelu"](0))
    logger = CSVLogger(str(tmp_path), name="csv", prefix="")
    callback = GradWatchCallback(every_n_steps=2, max_overhead=None, seed=0, prefix="gw", on_failure="raise")
    _fit(module, callback, max_steps=5, logger=logger)
    with open(pathlib.Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [(int(r["step"]), float(r["gw/failures"])) for r in rows if r.get("gw/failures")]
    assert logged == [(0, 0.0), (2, 0.0), (4, 0.0)]
    assert {"gw/rel_error/net.0.weight", "gw/rel_error_max", "gw/check_seconds"} <= set(rows[0])


def test_no_logger_keeps_only_the_reports(tmp_path) -> None:
    module = ZooModule(CORRECT["layernorm_gelu"](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0)
    _fit(module, callback, max_steps=2, default_root_dir=str(tmp_path))
    assert len(callback.reports) == 2 and not any(tmp_path.iterdir())


def test_lightning_logger_sink_validates() -> None:
    with pytest.raises(TypeError, match="`logger` must be a Lightning logger"):
        LightningLoggerSink(object())
    with pytest.raises(ValueError, match="`prefix`"):
        LightningLoggerSink(CSVLogger("unused"), prefix="a/")
    sink = LightningLoggerSink(SimpleNamespace(log_metrics=lambda metrics, step: None))
    with pytest.raises(TypeError, match="`report`"):
        sink.write("report", 0)
    with pytest.raises(ValueError, match="`step`"):
        sink.write(gradwatch.check(nn.Linear(2, 1), lambda m, b: m(b).sum(), torch.ones(1, 2), seed=0), -1)


class ValModule(ZooModule):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.case.loss_fn(self.net, batch))


def test_sanity_checking_is_skipped() -> None:
    module = ValModule(CORRECT["layernorm_gelu"](0))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0)
    trainer = pl.Trainer(callbacks=[callback], num_sanity_val_steps=2, **trainer_kwargs(max_steps=2))
    trainer.fit(module, loader(module.case, batches=4), loader(module.case, batches=2, seed=1))
    assert [s for s, _ in callback.reports] == [0, 1]
    stub = SimpleNamespace(sanity_checking=True, accumulate_grad_batches=1, global_step=0)
    callback.on_train_batch_start(stub, module, module.case.batch, 0)
    assert callback._pending is None


# ----------------------------------------------------------------------------- 7. checkpoint
def test_resume_samples_as_an_uninterrupted_run(tmp_path) -> None:
    def run(callback, max_steps, ckpt_path=None, checkpoint=None):
        torch.manual_seed(0)
        module = ZooModule(CORRECT["mlp_relu_dropout"](0))
        trainer = pl.Trainer(callbacks=[callback] + ([checkpoint] if checkpoint else []),
                             **trainer_kwargs(max_steps=max_steps, enable_checkpointing=checkpoint is not None,
                                              default_root_dir=str(tmp_path)))
        trainer.fit(module, loader(module.case, batches=20), ckpt_path=ckpt_path)
        return [(s, r.seed, [(t.name, p.where) for t in r.tensors.values() for p in t.probes])
                for s, r in callback.reports]

    uninterrupted = run(GradWatchCallback(every_n_steps=2, max_overhead=None, seed=123), 8)
    first = GradWatchCallback(every_n_steps=2, max_overhead=None, seed=123)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1)
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
class DropoutBNModule(pl.LightningModule):
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
                                       {"plugins": [MixedPrecision("16-mixed", "cpu")], "gradient_clip_val": 0.5}],
                         ids=["fp32", "accumulate", "bf16", "fp16-clip"])
def test_fit_with_the_callback_is_bit_identical_to_fit_without(overrides) -> None:
    states = []
    for with_callback in (False, True):
        pl.seed_everything(0, verbose=False)
        module = DropoutBNModule()
        callback = GradWatchCallback(every_n_steps=2, max_overhead=None, seed=0, on_failure="raise") if with_callback else None
        kwargs = dict(overrides)
        if "plugins" in kwargs:
            kwargs["plugins"] = [MixedPrecision("16-mixed", "cpu")]
        trainer = _fit(module, callback, max_steps=6, **kwargs)
        states.append((training_state(module, trainer.optimizers[0]), _metric_values(trainer)))
        if callback is not None:
            assert len(callback.reports) == 3 and all(r.ok and r.reliable for _, r in callback.reports), \
                [str(r) for _, r in callback.reports]
    assert_same_state(states[0][0], states[1][0])
    assert states[0][1] == states[1][1]


# ----------------------------------------------------------------------------- 5. DDP and sharding
def test_ddp_two_cpu_processes(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    env.pop("LOCAL_RANK", None)
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "lightning_ddp.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    for rank, res in results.items():
        assert res["correct"]["verdicts"] == ["pass", "pass"], (rank, res)
        assert res["bug"]["failing"] == [["net.fc1.weight"], ["net.fc1.weight"]], (rank, res)
        assert res["raise"] == "GradientCheckError", (rank, res)
    # every rank judged the same probes on the cross-rank mean: identical numbers
    assert results[0]["bug"]["numbers"] == results[1]["bug"]["numbers"]
    assert results[0]["correct"]["numbers"] == results[1]["correct"]["numbers"]
    # each rank's local batch differs, and the check verified the replay of the mean training loss
    assert results[0]["local_losses"] != results[1]["local_losses"]
    # only rank zero wrote to the logger
    assert results[0]["logged_steps"] == [0, 1] and results[1]["logged_steps"] == []
    # under a budget both ranks check the same steps (rank zero's deferrals), tensors and probes;
    # step 0 is the smallest check (the joint probe over every tensor at ±h, no probe of a single tensor)
    budgeted = [results[rank]["budgeted"] for rank in (0, 1)]
    assert budgeted[0] == budgeted[1]
    assert budgeted[0]["steps"][0] == 0 and budgeted[0]["joint"][0] == ["joint"]
    # the joint probe failed; group testing named the tensor, which a direction probe of its own confirmed
    assert budgeted[0]["checked"][0] == ["net.fc1.weight"] and budgeted[0]["kinds"][0] == ["direction"]


def test_sharded_strategy_warns_once_and_does_not_check() -> None:
    from pytorch_lightning.strategies import FSDPStrategy

    callback = GradWatchCallback(every_n_steps=1, max_overhead=None)
    module = ZooModule(CORRECT["layernorm_gelu"](0))
    trainer = SimpleNamespace(strategy=FSDPStrategy(), is_global_zero=True, sanity_checking=False,
                              accumulate_grad_batches=1, global_step=0)
    with pytest.warns(UserWarning, match="does not check gradients under FSDPStrategy"):
        callback.setup(trainer, module, "fit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.setup(trainer, module, "fit")  # once
    callback.on_train_batch_start(trainer, module, module.case.batch, 0)
    assert callback._pending is None


# ----------------------------------------------------------------------------- API
def test_import_gradwatch_does_not_import_lightning() -> None:
    code = (
        "import sys, gradwatch\n"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning', 'lightning_fabric') for m in sys.modules)\n"
        "cls = gradwatch.GradWatchCallback\n"
        "assert 'pytorch_lightning' in sys.modules and cls.__module__ == 'gradwatch.lightning'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
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
        ({"coordinates": -1}, ValueError, "`coordinates`"),
        ({"coordinates": 0, "directions": 0}, ValueError, "at least 1"),
        ({"kinks": "yes"}, ValueError, "`kinks`"),
        ({"directions": 0}, ValueError, "`directions` must be at least 1"),
        ({"precision": "fp32"}, ValueError, "`precision` must be one of 'float64', 'native', 'auto', got 'fp32'"),
        ({"kink_resamples": -1}, ValueError, "`kink_resamples`"),
        ({"near_kink_margin": 0}, ValueError, "`near_kink_margin`"),
        ({"max_overhead": 0}, ValueError, r"`max_overhead` must be None or a fraction in \(0, 1\].*got 0"),
        ({"max_overhead": 1.5}, ValueError, "`max_overhead`"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        GradWatchCallback(**kwargs)


def test_configuration_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        GradWatchCallback(10)  # type: ignore[misc]


def test_precision_and_kink_options_reach_the_engine() -> None:
    module = ZooModule(CORRECT["mlp_relu_dropout"](0))
    callback = GradWatchCallback(
        every_n_steps=1, max_overhead=None, seed=0, precision="native", kink_resamples=0, on_failure=_collect
    )
    _fit(module, callback, max_steps=2)
    for _, report in callback.reports:
        assert report.precision == "native" and report.precision_reason == "requested", str(report)
        assert report.ok and all(t.resampled == 0 for t in report.tensors.values())


def test_default_budget_checks_step_zero_then_spends_within_the_budget(monkeypatch) -> None:
    """The schedule shared with GradWatch: step 0 is checked, sized before anything is measured
    (2% of 100 steps: less than one probe, so the smallest check: the joint probe over every tensor)."""
    calls = []
    original = gwl.check
    monkeypatch.setattr(gwl, "check", lambda *a, **k: calls.append(k["names"]) or original(*a, **k))
    module = ZooModule(CORRECT["layernorm_gelu"](0))
    callback = GradWatchCallback(seed=0, on_failure="raise")
    assert callback.max_overhead == 0.02
    _fit(module, callback, max_steps=6)
    names = [n for n, _ in module.named_parameters()]
    assert [s for s, _ in callback.reports] == [0] and calls == [names]  # the next check is >= 100 steps away
    assert [p.kind for p in callback.reports[0][1].joint] == ["joint"]
    report = callback.last_report
    assert all(not t.probes and t.verdict == "pass" and "verified jointly" in t.reason
               for t in report.tensors.values())
