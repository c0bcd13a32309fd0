"""TensorBoard and logging sinks, read back from the event files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from gradwatch import (
    GradWatch, KinkWarning, KinkWarnings, LoggingSink, Probe, Report, TensorBoardSink, TensorCheck, check, metrics,
)
import gradwatch
from gradwatch.report import _fmt
from zoo import BUGS, CORRECT


def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(event) -> str:
    return event.tensor_proto.string_val[0].decode()


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
        on_failure=lambda r: None, seed=0, modules=None,  # the whole-model keys (module-local: test_local)
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


def test_passing_checks_write_scalars_and_the_table_of_every_tensor(tmp_path) -> None:
    case = CORRECT["layernorm_gelu"](0)
    writer = SummaryWriter(str(tmp_path))
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, writer=writer, prefix="gw", seed=0)
    _run(case, watch, 2)
    writer.close()
    acc = _events(tmp_path)
    assert [e.value for e in acc.Scalars("gw/failures")] == [0.0, 0.0]
    texts = [_text(e) for e in acc.Tensors("gw/report/text_summary")]
    assert [e.step for e in acc.Tensors("gw/report/text_summary")] == [0, 1]
    for text, (_, report) in zip(texts, watch.reports):
        assert text == report.markdown()
        for name, t in report.tensors.items():
            assert f"| `{name}` | pass | {_fmt(t.rel_error)} | `{t.worst.where}` |" in text


def test_metrics_scheme_and_prefix() -> None:
    case = CORRECT["cnn_bn_pool"](0)
    report = check(case.model, case.loss_fn, case.batch, seed=0)
    m = report.metrics(prefix="x/y")
    assert m["x/y/failures"] == 0.0
    assert m["x/y/rel_error_max"] == max(t.rel_error for t in report.tensors.values())
    assert m["x/y/kink_fraction"] == report.kink_fraction
    assert {k.split("/")[2] for k in m if k.count("/") == 3} == {
        "rel_error", "error_bar", "precision_gap", "error_ratio", "failed", "inconclusive", "resolving_power", "kinks",
        "worst"}
    assert m["x/y/resolving_bound"] == gradwatch.RESOLVING_BOUND and m["x/y/inconclusive"] == 0.0
    assert all(m[f"x/y/resolving_power/{n}"] == t.resolving_power <= gradwatch.RESOLVING_BOUND
               for n, t in report.tensors.items())
    # worst/<k>: the error_ratio of every judged tensor, largest first, 10 at most
    ratios = sorted((t.error_ratio for t in report.tensors.values() if not math.isnan(t.error_ratio)), reverse=True)
    assert len(ratios) == 10 and [m[f"x/y/worst/{k}"] for k in range(10)] == ratios and "x/y/worst/10" not in m
    assert [t.error_ratio for t in report.worst_tensors()] == ratios and m["x/y/worst/0"] == m["x/y/error_ratio_max"]
    assert [t.error_ratio for t in report.worst_tensors(3)] == ratios[:3]
    with pytest.raises(ValueError, match="`n` must be a non-negative int, got -1"):
        report.worst_tensors(-1)
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


# ------------------------------------------------------------------ the dashboard
_LAYOUT_TAG = "custom_scalars__config__"


def _layouts(logdir) -> list:
    """Every custom-scalars layout written to ``logdir``, parsed."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    acc = _events(logdir)
    if _LAYOUT_TAG not in acc.Tags()["tensors"]:
        return []
    out = []
    for event in acc.Tensors(_LAYOUT_TAG):
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        out.append(layout)
    return out


def _charts(layout) -> dict[str, dict[str, list[str]]]:
    return {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}


@contextlib.contextmanager
def _tensorboard(logdir, timeout: float = 60.0) -> Iterator[Callable[[str], Any]]:
    """Serve ``logdir`` with a real TensorBoard on loopback; yield a JSON getter.

    ``--reload_task blocking`` loads the event files before the server answers, so
    the first answer already holds every event. Proxies are bypassed (loopback only).
    """
    cmd = [
        sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0",
        "--load_fast", "false", "--reload_interval", "0", "--reload_task", "blocking",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        deadline = time.monotonic() + timeout
        url = None
        while url is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"TensorBoard printed no URL within {timeout:.0f} s: {' '.join(cmd)}\n{''.join(seen)}")
            seen.append(line)
            match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = match.group(1) if match else None
            if proc.poll() is not None and lines.empty() and url is None:
                pytest.fail(f"TensorBoard exited with {proc.returncode}: {' '.join(cmd)}\n{''.join(seen)}")

        def get(path: str) -> Any:
            try:
                with opener.open(url + path, timeout=max(1.0, deadline - time.monotonic())) as response:
                    return json.loads(response.read())
            except (OSError, ValueError) as e:
                pytest.fail(f"TensorBoard at {url} did not answer {path}: {e!r}\n{''.join(seen)}")

        yield get
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=10)  # the pipe is at its end once the process is gone
        proc.stdout.close()


def test_tensorboard_serves_the_dashboard_layout_scalars_histogram_and_table(tmp_path) -> None:
    case = BUGS["wrong_sign"](0)  # fc1.weight's gradient has the wrong sign
    watch = GradWatch(
        case.model, case.loss_fn, every_n_steps=2, max_overhead=None, logdir=str(tmp_path / "run"),
        on_failure=lambda r: None, seed=0, modules=None,  # the whole-model layout (module-local: test_local)
    )
    _run(case, watch, 5)
    watch.close()
    reports = dict(watch.reports)
    assert sorted(reports) == [0, 2, 4]
    names = list(case.model.state_dict())
    q = urllib.parse.quote
    with _tensorboard(tmp_path) as get:
        # the layout: one category of charts per concern, one of per-tensor charts
        categories = get("/data/plugin/custom_scalars/layout")["category"]
        charts = {c["title"]: {ch["title"]: ch["multiline"]["tag"] for ch in c["chart"]} for c in categories}
        assert list(charts) == ["gradwatch", "gradwatch: module fc1", "gradwatch: module fc2"]
        tags = set(get("/data/plugin/scalars/tags")["run"])
        assert tags == set(metrics_keys := metrics(reports[0]))
        expected = {
            "worst 10 tensors by rank: error/tolerance vs fail threshold (names: text worst_tensors)":
                {f"gradwatch/worst/{k}" for k in range(4)} | {"gradwatch/fail_threshold"},
            "error/tolerance: worst tensor vs fail threshold":
                {"gradwatch/error_ratio_max", "gradwatch/fail_threshold"},
            "rel_error: worst tensor": {"gradwatch/rel_error_max"},
            "failures and failed per tensor":
                {f"gradwatch/failed/{n}" for n in names} | {"gradwatch/failures"},
            "inconclusive tensors (could not resolve an error of resolving_bound)":
                {f"gradwatch/inconclusive/{n}" for n in names} | {"gradwatch/inconclusive"},
            "kink_fraction (probes that crossed a kink)": {"gradwatch/kink_fraction"},
            "kink_margin_min (below 1: crossed)": set(),  # no non-smooth op here
            "kinks per tensor (probes that crossed)": {f"gradwatch/kinks/{n}" for n in names},
        }
        for module in ("fc1", "fc2"):  # one category per module: its tensors only
            mine = [n for n in names if n.startswith(module + ".")]
            expected[f"{module}: error/tolerance vs fail threshold"] = {
                f"gradwatch/error_ratio/{n}" for n in mine} | {"gradwatch/fail_threshold"}
            expected[f"{module}: rel_error"] = {f"gradwatch/rel_error/{n}" for n in mine}
            expected[f"{module}: error_bar"] = {f"gradwatch/error_bar/{n}" for n in mine}
            expected[f"{module}: precision_gap"] = {f"gradwatch/precision_gap/{n}" for n in mine}
            expected[f"{module}: resolving_power vs bound"] = {
                f"gradwatch/resolving_power/{n}" for n in mine} | {"gradwatch/resolving_bound"}
        matched = {
            title: {t for t in tags if any(re.match(rx, t) for rx in regexes)}
            for category in charts.values() for title, regexes in category.items()
        }
        assert matched == expected
        # every logged key is on some chart (check_seconds is in the Scalars tab only)
        assert set().union(*matched.values()) == tags - {"gradwatch/check_seconds"}
        assert charts["gradwatch"]["kink_margin_min (below 1: crossed)"] == [
            "^gradwatch/kink_margin_min$"]
        # TensorBoard's own regex matching serves the chart's series
        (regex,) = charts["gradwatch: module fc1"]["fc1: rel_error"]
        served = get(f"/data/plugin/custom_scalars/scalars?run=run&tag={q(regex)}")
        assert set(served["tag_to_events"]) == {"gradwatch/rel_error/fc1.weight", "gradwatch/rel_error/fc1.bias"}
        # the worst-tensors chart: rank 0 is the wrong-sign weight at every check, named in its text
        worst = get(f"/data/plugin/scalars/scalars?run=run&tag={q('gradwatch/worst/0')}")
        assert [(p[1], p[2]) for p in worst] == [
            (s, pytest.approx(reports[s].tensors["fc1.weight"].error_ratio, rel=1e-6)) for s in (0, 2, 4)]
        named = get(f"/data/plugin/text/text?run=run&tag={q('gradwatch/worst_tensors/text_summary')}")
        assert [t["step"] for t in named] == [0, 2, 4]
        assert all("<td>0</td>\n<td><code>fc1.weight</code></td>\n<td><strong>fail</strong></td>" in t["text"]
                   for t in named), named[0]["text"]

        # every scalar at every checked step is what the Report said
        for key in metrics_keys:
            points = get(f"/data/plugin/scalars/scalars?run=run&tag={q(key)}")
            assert [p[1] for p in points] == [0, 2, 4], key
            for _, step, value in points:
                assert value == pytest.approx(metrics(reports[step])[key], rel=1e-6), (key, step)
        assert [p[2] for p in get(f"/data/plugin/scalars/scalars?run=run&tag={q('gradwatch/failed/fc1.weight')}")] \
            == [1.0, 1.0, 1.0]

        # the histogram holds every non-kinked probe; the wrong-sign ones at rel_error 1
        histograms = get(f"/data/plugin/histograms/histograms?run=run&tag={q('gradwatch/probe_rel_error')}")
        assert [h[1] for h in histograms] == [0, 2, 4]
        for _, step, buckets in histograms:
            errors = reports[step].probe_rel_errors
            assert sum(c for _, _, c in buckets) == len(errors) > 0
            wrong = sum(c for left, right, c in buckets if right > 0.5)
            assert wrong == sum(e > 0.5 for e in errors) == len(reports[step].tensors["fc1.weight"].probes)

        # the table lists every tensor at every check, the failing one first and in bold
        texts = get(f"/data/plugin/text/text?run=run&tag={q('gradwatch/report/text_summary')}")
        assert [t["step"] for t in texts] == [0, 2, 4]
        for entry in texts:
            html = entry["text"]
            rows = [html.index(f"<td><code>{n}</code></td>") for n in names]
            assert rows[0] == min(rows)  # fc1.weight first
            assert html.count("<strong>fail</strong>") == 1
            worst = reports[entry["step"]].tensors["fc1.weight"].worst
            assert f"<code>{worst.where}</code>" in html


def test_layout_is_written_once_per_writer_and_prefix(tmp_path) -> None:
    case = CORRECT["layernorm_gelu"](0)
    report = check(case.model, case.loss_fn, case.batch, seed=0)
    writer = SummaryWriter(str(tmp_path / "a"))
    first, second = TensorBoardSink(writer), TensorBoardSink(writer)
    for step in (0, 1):
        first.write(report, step)
        second.write(report, step)
    writer.flush()
    (layout,) = _layouts(tmp_path / "a")
    groups = ["0", "1", "3"]  # Sequential(Linear, LayerNorm, GELU, Linear): one category per module
    assert list(_charts(layout)) == ["gradwatch"] + [f"gradwatch: module {g}" for g in groups]
    # another prefix on the same writer: one more layout, holding both (TensorBoard reads a run's last)
    TensorBoardSink(writer, prefix="gw.2").write(report, 2)
    writer.close()
    layouts = _layouts(tmp_path / "a")
    assert len(layouts) == 2
    charts = _charts(layouts[-1])
    assert list(charts) == ["gradwatch"] + [f"gradwatch: module {g}" for g in groups] + ["gw.2"] + [
        f"gw.2: module {g}" for g in groups]
    assert charts["gw.2"]["rel_error: worst tensor"] == [r"^gw\.2/rel_error_max$"]
    assert charts["gw.2: module 0"]["0: rel_error"] == [r"^gw\.2/rel_error/(0\.weight|0\.bias)$"]
    # another writer gets its own
    other = SummaryWriter(str(tmp_path / "b"))
    TensorBoardSink(other).write(report, 0)
    other.close()
    assert len(_layouts(tmp_path / "b")) == 1


class _Layers(torch.nn.Module):
    """A 12-layer stack (Linear + LayerNorm per layer: 48 tensors) and a head; ``late``
    adds a module after the first check, as a model that grows during training does."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Tanh()) for _ in range(12))
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        out = self.head(x)
        return out + self.late(x) if hasattr(self, "late") else out


def test_dashboard_of_a_deep_model_groups_by_layer_ranks_the_worst_and_charts_late_tensors(tmp_path) -> None:
    torch.manual_seed(0)
    model, batch = _Layers(), torch.randn(16, 4)

    def loss_fn(m, x):
        return m(x).pow(2).mean()

    def report(step):
        return dataclasses.replace(
            check(model, loss_fn, batch, seed=step, coordinates=1, directions=1, kinks=False), step=step)

    writer = SummaryWriter(str(tmp_path / "run"))
    sink = TensorBoardSink(writer)
    first = report(0)
    sink.write(first, 0)
    model.late = torch.nn.Linear(4, 1)  # two tensors that were not there at the first check
    later = report(10)
    sink.write(later, 10)
    sink.write(later, 20)  # nothing new: no third layout
    writer.close()
    assert len(first.tensors) == 50 and len(later.tensors) == 52
    assert len(_layouts(tmp_path / "run")) == 2
    q = urllib.parse.quote
    with _tensorboard(tmp_path) as get:
        categories = get("/data/plugin/custom_scalars/layout")["category"]  # the last layout written
        charts = {c["title"]: {ch["title"]: ch["multiline"]["tag"] for ch in c["chart"]} for c in categories}
        assert list(charts) == ["gradwatch"] + [f"gradwatch: module layers.{i}" for i in range(12)] + [
            "gradwatch: module head", "gradwatch: module late"]
        assert sum(map(len, charts.values())) == 8 + 14 * 5  # not one chart per tensor

        def served(regex: str) -> dict[str, list]:
            return get(f"/data/plugin/custom_scalars/scalars?run=run&tag={q(regex)}")["tag_to_events"]

        (regex,) = charts["gradwatch: module layers.1"]["layers.1: rel_error"]
        assert set(served(regex)) == {f"gradwatch/rel_error/layers.1.{n}" for n in
                                      ("0.weight", "0.bias", "1.weight", "1.bias")}  # not layers.10, layers.11
        (regex,) = charts["gradwatch: module late"]["late: error/tolerance vs fail threshold"]
        late = served(regex)
        assert set(late) == {"gradwatch/error_ratio/late.weight", "gradwatch/error_ratio/late.bias",
                             "gradwatch/fail_threshold"}
        assert [e[1] for e in late["gradwatch/error_ratio/late.weight"]] == [10, 20]
        # the worst-tensors chart: 10 series, the 10 largest error/tolerance of each check, named in the text
        (regex,) = charts["gradwatch"]["worst 10 tensors by rank: error/tolerance vs fail threshold (names: text "
                                       "worst_tensors)"]
        worst = served(regex)
        assert set(worst) == {f"gradwatch/worst/{k}" for k in range(10)} | {"gradwatch/fail_threshold"}
        for k in range(10):
            expected = [first.worst_tensors()[k].error_ratio, later.worst_tensors()[k].error_ratio]
            assert [e[2] for e in worst[f"gradwatch/worst/{k}"]][:2] == pytest.approx(expected, rel=1e-6)
        for i in range(3):  # at every check, rank k is at least rank k + 1
            ranks = [worst[f"gradwatch/worst/{k}"][i][2] for k in range(10)]
            assert ranks == sorted(ranks, reverse=True)
        texts = get(f"/data/plugin/text/text?run=run&tag={q('gradwatch/worst_tensors/text_summary')}")
        html = texts[0]["text"]
        names = [t.name for t in first.worst_tensors()]
        assert [html.index(f"<td><code>{n}</code></td>") for n in names] == sorted(
            html.index(f"<td><code>{n}</code></td>") for n in names)


@pytest.mark.parametrize("rank", [0, 1])
def test_layout_only_on_rank_zero_under_torch_distributed(tmp_path, monkeypatch, rank) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
    case = CORRECT["layernorm_gelu"](0)
    report = check(case.model, case.loss_fn, case.batch, seed=0)
    writer = SummaryWriter(str(tmp_path))
    TensorBoardSink(writer).write(report, 0)
    writer.close()
    assert len(_layouts(tmp_path)) == (1 if rank == 0 else 0)
    assert _events(tmp_path).Scalars("gradwatch/failures")[0].value == 0.0  # scalars on every rank


def _probe(numerical: float, autograd: float, *, kink: bool = False) -> Probe:
    return Probe("coordinate", (0,), None, autograd, numerical, abs(numerical - autograd), 0.0, 1e-9, 1e-6, kink)


def test_probe_rel_errors_are_per_probe_e_rel_of_judged_non_kinked_probes() -> None:
    tensors = {
        "a": TensorCheck("a", (3,), "fail", probes=(_probe(1.0, 3.0), _probe(2.0, 2.0), _probe(0.0, 0.0),
                                                     _probe(5.0, -5.0, kink=True))),
        "b": TensorCheck("b", (2,), "pass", rel_error=0.2, probes=(_probe(-1.0, -1.5),)),
        "c": TensorCheck("c", (2,), "nonfinite", probes=(_probe(math.nan, 1.0),), reason="non-finite gradient"),
        "d": TensorCheck("d", (2,), "kink", probes=(_probe(1.0, 2.0, kink=True),), reason="every probe crossed"),
        "e": TensorCheck("e", (2,), "skipped", reason="frozen"),
    }
    report = Report(tensors, seed=0)
    assert report.probe_rel_errors == [0.5, 0.0, 0.0, 0.2]
    # a one-probe tensor: the same number as the tensor's rel_error (seed-article E_rel)
    case = CORRECT["layernorm_gelu"](0)
    single = check(case.model, case.loss_fn, case.batch, seed=0, coordinates=1, directions=0, kinks=False)
    assert single.probe_rel_errors == pytest.approx([t.rel_error for t in single.tensors.values()], rel=1e-12)
    # the table: every tensor, failing first in bold, reasons where nothing was judged
    table = report.markdown().splitlines()[2:]
    assert table[2].startswith("| `a` | **fail** |") and table[3].startswith("| `c` | **nonfinite** |")
    assert table[4].startswith("| `b` | pass | 0.2 | `[0]` | -1.5 | -1 |")
    assert table[5] == "| `d` | kink | - | every probe crossed | - | - |"
    assert table[6] == "| `e` | skipped | - | frozen | - | - |"


# ------------------------------------------------------------------ quiet by default
_ROOT = Path(__file__).resolve().parent.parent
# Lightning's own deprecation under torch 2.13 (pytorch_lightning/utilities/_pytree.py), not gradwatch's
_LIGHTNING_PYTREE = r"ignore:`isinstance(treespec, LeafSpec)` is deprecated:FutureWarning"


@pytest.mark.parametrize("argv", [
    ["-m", "gradwatch", "demo", "--fixed", "--logdir", "{tmp}/runs"],
    ["-W", _LIGHTNING_PYTREE, str(_ROOT / "examples" / "lightning_custom_layer.py"), "--fixed", "--root", "{tmp}"],
], ids=["demo", "lightning_example"])
def test_correct_models_at_default_settings_warn_nothing(tmp_path, argv) -> None:
    """`python -W error`: any warning (a KinkWarning about probes near a ReLU included) ends the run."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-W", "error", *argv], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PASS in all" in done.stdout and "Warning" not in done.stderr, done.stderr[-3000:]


def test_near_kinks_on_correct_zoo_models_log_info_and_warn_nothing(caplog) -> None:
    near = 0
    for name in ("mlp_relu_dropout", "cnn_bn_pool", "clamp_abs_maximum"):
        for seed in (0, 1):
            case = CORRECT[name](seed)
            watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, seed=seed)
            with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="gradwatch"):
                warnings.simplefilter("error")
                _run(case, watch, 2)
            near += sum(bool(r.kink_sites(near_only=True)) for _, r in watch.reports)
    lines = [r for r in caplog.records if "came near" in r.getMessage()]
    assert near and lines and {r.levelno for r in lines} == {logging.INFO}


def test_a_tensor_kinks_keep_from_being_verified_is_warned_once_with_what_to_do(caplog) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with torch.no_grad():  # every pre-activation of the first layer sits at the ReLU kink
        model[0].weight.zero_()
        model[0].bias.zero_()
    batch = torch.randn(8, 3)

    def loss_fn(m, x):
        return m(x).pow(2).mean()

    watch = GradWatch(model, loss_fn, every_n_steps=1, max_overhead=None, seed=0)
    with pytest.warns(KinkWarning) as caught:
        for _ in range(3):
            model.zero_grad()
            with watch.step(batch):
                loss_fn(model, batch).backward()
    assert {r.tensors["0.weight"].verdict for _, r in watch.reports} == {"kink"}
    messages = [str(w.message) for w in caught if issubclass(w.category, KinkWarning)]
    assert len(messages) == 1, messages  # one warning for the check; not repeated at steps 1 and 2
    first = messages[0]
    assert first.startswith("gradwatch step 0: kinks kept 2 tensors from being verified so far: '0.weight' (0 of 5 "
                            "probes judged), '0.bias' (0 of 5 probes judged). "), first
    for what in ("relu in module '1' (", "`step=`", "`coordinates=`", "`kink_resamples=`", "gradwatch.register_kink"):
        assert what in first, (what, first)
    assert "'2.weight'" not in " ".join(messages)  # the layer after the ReLU is verified


def test_the_log_line_is_cut_to_159_characters_and_the_report_keeps_the_reason(caplog) -> None:
    name = "model.layers.11.self_attn.a_very_long_projection_name_that_goes_on_and_on_and_on.weight"
    reason = "the replayed loss differs from the training loss by more than its precision allows; " * 3
    tensors = {name: TensorCheck(name, (2,), "pass", rel_error=1e-8, error_ratio=0.03)}
    for report in (Report(tensors, seed=0, step=123456), Report(tensors, seed=0, step=123456, reason=reason)):
        with caplog.at_level(logging.INFO, logger="gradwatch"):
            LoggingSink().write(report, step=123456)
        line = caplog.records[-1].getMessage()
        assert len(line) <= 159 < len(report.summary()), line
        assert line.startswith("gradwatch step 123456: PASS (1 pass; worst 'model.layers.11.")
        assert "weight' rel_error 1.0e-08, err/tol 0.03; 0.00s)" in line
    assert line.endswith("...") and " - the replayed loss" in line and report.reason == reason
    assert report.summary().endswith(reason)
    with pytest.raises(ValueError, match="`max_chars` must be an int of at least 40 or None, got 10"):
        report.summary(max_chars=10)


def test_kink_warning_counts_the_probes_meant_over_the_run_redraws_not_meant() -> None:
    """'a' judges 1 of the 4 probes it was meant to get at each check (a coordinate redrawn
    once, crossing again): warned at the second check, when 8 were meant and 2 judged; 'b'
    judges 2 of 4 (half: not "most" lost) and is never warned; a "kink" verdict with fewer
    than 4 meant probes (the budget's one-coordinate check) is not warned at once."""

    def tensor(name: str, judged: int, kinked: int, resampled: int, verdict: str = "pass") -> TensorCheck:
        probes = tuple(_probe(1.0, 1.0) for _ in range(judged)) + tuple(_probe(1.0, 1.0, kink=True)
                                                                      for _ in range(kinked))
        return TensorCheck(name, (9,), verdict, rel_error=0.0, error_ratio=0.0, probes=probes, resampled=resampled)

    def report(step: int) -> Report:
        return Report({"a": tensor("a", 1, 4, 1), "b": tensor("b", 2, 2, 0),
                       "c": tensor("c", 0, 1, 0, verdict="kink")}, seed=0, step=step)

    sink = KinkWarnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink.write(report(0), 0)
        assert not caught
        sink.write(report(1), 1)
        for step in (2, 3, 4, 5, 6, 7):
            sink.write(report(step), step)
    messages = [str(w.message) for w in caught]
    assert messages[0].startswith("gradwatch step 1: kinks kept 1 tensor from being verified so far: 'a' (2 of 8 "
                                  "probes judged). ")
    # 'c' lost its one probe at every check: 8 meant, none judged, warned then; 'b' never
    assert len(messages) == 2 and messages[1].startswith("gradwatch step 7: kinks kept 1 tensor from being verified "
                                                         "so far: 'c' (0 of 8 probes judged). ")
    assert sink.warned == {"a", "c"}
