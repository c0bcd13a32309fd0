"""TensorBoard and logging sinks, read back from the event files."""

from __future__ import annotations

import logging

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from gradwatch import GradWatch, LoggingSink, TensorBoardSink, check
from zoo import BUGS, CORRECT


def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _run(case, watch, steps: int) -> None:
    opt = torch.optim.SGD(case.model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        with watch.step(case.batch):
            case.loss_fn(case.model, case.batch).backward()
        opt.step()


def test_hook_logdir_writes_the_key_scheme_at_the_training_step(tmp_path) -> None:
    case = BUGS["wrong_sign"](0)
    watch = GradWatch(
        case.model, case.loss_fn, every_n_steps=2, max_overhead=None, logdir=str(tmp_path),
        on_failure=lambda r: None, seed=0,
    )
    _run(case, watch, 5)
    watch.close()
    acc = _events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    params = [n for n, _ in case.model.named_parameters()]
    expected = {f"gradwatch/rel_error/{n}" for n in params} | {f"gradwatch/error_bar/{n}" for n in params}
    expected |= {"gradwatch/rel_error_max", "gradwatch/kink_fraction", "gradwatch/failures", "gradwatch/check_seconds"}
    assert expected <= tags, expected - tags
    for tag in expected:
        assert [e.step for e in acc.Scalars(tag)] == [0, 2, 4]
    report = watch.last_report
    assert acc.Scalars("gradwatch/failures")[-1].value == 1.0
    assert acc.Scalars("gradwatch/rel_error/fc1.weight")[-1].value == pytest.approx(report.tensors["fc1.weight"].rel_error, rel=1e-6)
    assert acc.Scalars("gradwatch/rel_error/fc2.bias")[-1].value < 1e-5
    # the text entry names the failing tensor and its worst coordinate with both values
    text_tags = acc.Tags()["tensors"]
    assert "gradwatch/report/text_summary" in text_tags
    text = acc.Tensors("gradwatch/report/text_summary")[-1].tensor_proto.string_val[0].decode()
    worst = report.tensors["fc1.weight"].worst
    assert "fc1.weight" in text and worst.where in text
    assert f"{worst.autograd:.2g}" in text and f"{worst.numerical:.2g}" in text


def test_passing_checks_write_scalars_and_no_text(tmp_path) -> None:
    case = CORRECT["layernorm_gelu"](0)
    writer = SummaryWriter(str(tmp_path))
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, writer=writer, prefix="gw", seed=0)
    _run(case, watch, 2)
    writer.close()
    acc = _events(tmp_path)
    assert [e.value for e in acc.Scalars("gw/failures")] == [0.0, 0.0]
    assert not [t for t in acc.Tags()["tensors"] if t.startswith("gw/report")]


def test_metrics_scheme_and_prefix() -> None:
    case = CORRECT["cnn_bn_pool"](0)
    report = check(case.model, case.loss_fn, case.batch, seed=0)
    m = report.metrics(prefix="x/y")
    assert m["x/y/failures"] == 0.0
    assert m["x/y/rel_error_max"] == max(t.rel_error for t in report.tensors.values())
    assert m["x/y/kink_fraction"] == report.kink_fraction
    assert {k.split("/")[2] for k in m if k.count("/") == 3} == {
        "rel_error", "error_bar", "precision_gap", "error_ratio", "failed", "kinks"}
    assert m["x/y/fail_threshold"] == 1.0
    with pytest.raises(ValueError, match="`prefix` must be a non-empty str not ending in '/', got 'a/'"):
        report.metrics(prefix="a/")


def test_sink_rejects_a_non_writer() -> None:
    with pytest.raises(TypeError, match="`writer` must be a SummaryWriter"):
        TensorBoardSink(object())


def test_logging_sink_is_info_when_clean_and_warning_on_failure(caplog) -> None:
    ok = CORRECT["layernorm_gelu"](0)
    bad = BUGS["bias_mean"](0)
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        LoggingSink().write(check(ok.model, ok.loss_fn, ok.batch, seed=0), step=3)
        LoggingSink().write(check(bad.model, bad.loss_fn, bad.batch, seed=0), step=4)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels[0][0] == logging.INFO and "PASS" in levels[0][1]
    assert levels[1][0] == logging.WARNING and "FAIL" in levels[1][1]


def test_sinks_and_metrics_validate_their_arguments(tmp_path) -> None:
    case = CORRECT["layernorm_gelu"](0)
    report = check(case.model, case.loss_fn, case.batch, seed=0)
    with pytest.raises(TypeError, match="`report` must be a gradwatch.Report, got dict"):
        LoggingSink().write({}, step=0)
    with pytest.raises(TypeError, match="`report` must be a gradwatch.Report, got str"):
        TensorBoardSink(SummaryWriter(str(tmp_path))).write("report", step=0)
    with pytest.raises(ValueError, match="`step` must be a non-negative int, got -1"):
        LoggingSink().write(report, step=-1)
    from gradwatch.report import failure_message

    with pytest.raises(TypeError, match="`tensor` must be a gradwatch.TensorCheck"):
        failure_message(report)
    assert failure_message(report.tensors["0.weight"]) == ""


def test_close_only_closes_the_writer_the_hook_created(tmp_path) -> None:
    case = CORRECT["layernorm_gelu"](0)
    writer = SummaryWriter(str(tmp_path / "mine"))
    GradWatch(case.model, case.loss_fn, writer=writer).close()
    assert writer.file_writer is not None  # SummaryWriter.close() sets it to None
    writer.close()
    with GradWatch(case.model, case.loss_fn, logdir=str(tmp_path / "owned")) as watch:
        owned = watch.writer
        assert owned.file_writer is not None
    assert owned.file_writer is None
