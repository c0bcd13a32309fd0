"""The ``gradwatch`` command on real event files: ``report`` (table, JSON, plot, exit status) and ``demo``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from gradwatch import TensorBoardSink, check, cli, metrics
from gradwatch.report import _fmt
from zoo import BUGS, CORRECT


@pytest.fixture(scope="module")
def reports():
    """A passing and a failing check of the same model (the zoo's bias mean-vs-sum bug,
    switched off for the first), and a check of a correct model."""
    case = BUGS["bias_mean"](0)
    case.model.fc1.bug = None
    passing = check(case.model, case.loss_fn, case.batch, seed=0)
    case.model.fc1.bug = "bias_mean"
    failing = check(case.model, case.loss_fn, case.batch, seed=0)
    clean = CORRECT["layernorm_gelu"](0)
    assert passing.ok and [t.name for t in failing.failures] == ["fc1.bias"]
    return {"pass": passing, "fail": failing, "clean": check(clean.model, clean.loss_fn, clean.batch, seed=0)}


def _write(logdir: Path, checks, *, prefix: str = "gradwatch") -> Path:
    with SummaryWriter(str(logdir)) as writer:
        sink = TensorBoardSink(writer, prefix=prefix)
        for step, report in checks:
            sink.write(report, step)
    return logdir


@pytest.fixture()
def logs(tmp_path, reports) -> Path:
    """Two runs under one directory: ``bug`` passes at step 0 and fails at 10 and 20; ``clean`` passes."""
    _write(tmp_path / "runs" / "bug", [(0, reports["pass"]), (10, reports["fail"]), (20, reports["fail"])])
    _write(tmp_path / "runs" / "clean", [(0, reports["clean"]), (10, reports["clean"])])
    return tmp_path / "runs"


def _rows(out: str) -> dict[str, list[str]]:
    """Table rows by tensor name (the second cell), per run header."""
    rows: dict[str, list[str]] = {}
    run = None
    for line in out.splitlines():
        if line.startswith("run "):
            run = line.split(":")[0][4:]
        elif line.startswith("  ") and run is not None and line.split()[0] in ("ok", "FAIL", "INCONCLUSIVE"):
            cells = line.split()
            rows[f"{run}/{cells[1]}"] = cells
    return rows


def test_report_flags_the_failing_tensor_at_its_first_failing_step_and_exits_1(logs, reports, capsys) -> None:
    assert cli.main(["report", str(logs)]) == 1
    out = capsys.readouterr().out
    assert "run bug: 3 checks, 2 failing (first at step 10)" in out
    assert "run clean: 2 checks, 0 failing\n" in out
    assert out.rstrip().endswith("FAIL: 2 of 5 checks failed (1 of 2 runs)")
    rows = _rows(out)
    assert [name for name, cells in rows.items() if cells[0] == "FAIL"] == ["bug/fc1.bias"]
    # status, tensor, checks, failing, first failing step, worst rel_error, at step, worst error/tol, at step, kinks
    bias = reports["fail"].tensors["fc1.bias"]
    assert rows["bug/fc1.bias"][2:5] == ["3", "2", "10"]
    assert rows["bug/fc1.bias"][5:9] == [_fmt(bias.rel_error), "10", _fmt(bias.error_ratio), "10"]
    assert rows["bug/fc1.weight"][2:5] == ["3", "0", "-"]
    kinks = sum(r.tensors["fc1.weight"].kink_count for r in (reports["pass"], reports["fail"], reports["fail"]))
    assert rows["bug/fc1.weight"][9] == str(kinks)
    assert {name.split("/")[1] for name in rows if name.startswith("clean/")} == {
        n for n, t in reports["clean"].tensors.items() if t.verdict != "skipped"}


def test_report_names_the_worst_tensors_of_the_last_check_and_top_keeps_the_table_short(logs, reports, capsys) -> None:
    assert cli.main(["report", str(logs)]) == 1
    out = capsys.readouterr().out
    ranked = reports["fail"].worst_tensors()  # the bug run's last check (step 20)
    shown = ", ".join(f"{t.name!r} {_fmt(t.error_ratio)}" for t in ranked)
    assert f"run bug: 3 checks, 2 failing (first at step 10)\n  worst error/tol at the last check (step 20): {shown}\n" \
        in out
    assert cli.main(["report", str(logs), "--json"]) == 1
    bug = json.loads(capsys.readouterr().out)["runs"][0]
    assert bug["worst_step"] == 20
    assert [w["tensor"] for w in bug["worst"]] == [t.name for t in ranked]
    assert [w["error_ratio"] for w in bug["worst"]] == pytest.approx([t.error_ratio for t in ranked], rel=1e-6)
    # --top 1: the clean run's one worst tensor; the bug run's failing tensor (also its worst)
    assert cli.main(["report", str(logs), "--top", "1"]) == 1
    rows = _rows(capsys.readouterr().out)
    clean = max(((n, t.error_ratio) for n, t in reports["clean"].tensors.items() if t.verdict != "skipped"),
                key=lambda kv: kv[1])[0]
    assert sorted(rows) == sorted(["bug/fc1.bias", f"clean/{clean}"])


def test_report_shows_inconclusive_tensors_and_their_resolving_power(tmp_path, reports, capsys) -> None:
    import dataclasses

    clean = reports["clean"]
    name = next(n for n, t in clean.tensors.items() if t.verdict == "pass")
    coarse = dataclasses.replace(clean.tensors[name], verdict="inconclusive", resolving_power=0.3)
    unresolved = dataclasses.replace(clean, tensors={**clean.tensors, name: coarse})
    assert metrics(unresolved)[f"gradwatch/inconclusive/{name}"] == 1.0 and metrics(unresolved)["gradwatch/inconclusive"] == 1
    _write(tmp_path, [(0, clean), (5, unresolved)])
    assert cli.main(["report", str(tmp_path)]) == 0  # not a failure
    rows = _rows(capsys.readouterr().out)
    row = rows[f"{tmp_path}/{name}"]
    assert row[0] == "INCONCLUSIVE" and row[10:12] == ["1", _fmt(0.3)]
    assert all(r[0] == "ok" and r[10] == "0" for n, r in rows.items() if not n.endswith("/" + name))
    assert cli.main(["report", str(tmp_path), "--json"]) == 0
    tensors = {t["tensor"]: t for t in json.loads(capsys.readouterr().out)["runs"][0]["tensors"]}
    assert tensors[name]["inconclusive_checks"] == 1 and tensors[name]["worst_resolving_power"] == pytest.approx(0.3)


def test_report_of_a_clean_log_exits_0(tmp_path, reports, capsys) -> None:
    _write(tmp_path, [(0, reports["clean"]), (5, reports["pass"])])
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {tmp_path}: 2 checks, 0 failing\n")
    assert out.rstrip().endswith("PASS: no failing check (2 checks in 1 run)")
    assert "FAIL" not in out


def test_report_json_parses_and_matches_the_logs(logs, reports, capsys) -> None:
    assert cli.main(["report", str(logs), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert (data["failed"], data["checks"], data["failing_checks"], data["prefix"]) == (True, 5, 2, "gradwatch")
    bug, clean = data["runs"]
    assert (bug["run"], bug["steps"], bug["failing_checks"], bug["first_failing_step"]) == ("bug", [0, 10, 20], 2, 10)
    assert (clean["run"], clean["checks"], clean["failing_checks"], clean["first_failing_step"]) == ("clean", 2, 0, None)
    assert bug["fail_threshold"] == 1.0 and bug["duplicate_steps"] == 0
    tensors = {t["tensor"]: t for t in bug["tensors"]}
    assert list(tensors) == list(reports["fail"].tensors)  # the model's parameter order
    bias = reports["fail"].tensors["fc1.bias"]
    assert tensors["fc1.bias"]["failing_checks"] == 2 and tensors["fc1.bias"]["first_failing_step"] == 10
    assert tensors["fc1.bias"]["worst_error_ratio"] == pytest.approx(bias.error_ratio, rel=1e-6)
    assert tensors["fc1.bias"]["worst_rel_error"] == pytest.approx(bias.rel_error, rel=1e-6)
    assert tensors["fc1.bias"]["worst_error_ratio"] > 1.0
    assert all(t["failing_checks"] == 0 and t["first_failing_step"] is None
               for name, t in tensors.items() if name != "fc1.bias")


def test_summarize_groups_runs_and_keeps_every_point(tmp_path, reports) -> None:
    # more points than the EventAccumulator keeps by default for tensors (10): none is dropped
    _write(tmp_path / "a" / "deep", [(s, reports["pass"]) for s in range(0, 300, 20)] + [(300, reports["fail"])])
    runs = cli.summarize(tmp_path)
    assert [r.run for r in runs] == [str(Path("a") / "deep")]
    assert len(runs[0].steps) == 16 and runs[0].failing_steps == (300,)
    assert [t.name for t in runs[0].tensors if t.failing_steps] == ["fc1.bias"]
    assert len(runs[0].tensors[0].rel_error) == 16


@pytest.mark.parametrize("writers_before", [0, 9])
def test_report_notes_steps_logged_twice_and_keeps_the_last(tmp_path, reports, capsys, writers_before) -> None:
    for i in range(writers_before):  # event file names count writers: the 10th sorts before the 9th
        SummaryWriter(str(tmp_path / "other" / str(i))).close()
    _write(tmp_path, [(0, reports["fail"]), (10, reports["fail"])])
    _write(tmp_path, [(0, reports["pass"]), (10, reports["pass"])])  # a second training into the same directory
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note: 2 steps were logged more than once" in out
    assert f"run {tmp_path}: 2 checks, 0 failing" in out, out


def test_report_prefix_option_and_its_hint(tmp_path, reports, capsys) -> None:
    _write(tmp_path, [(0, reports["fail"])], prefix="train/gw")
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no gradwatch scalars ('gradwatch/failures') under {str(tmp_path)!r}" in err
    assert "try --prefix train/gw" in err
    assert cli.main(["report", str(tmp_path), "--prefix", "train/gw"]) == 1
    assert "FAIL  fc1.bias" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["missing", "empty", "file", "other scalars"])
def test_report_without_gradwatch_data_exits_2_naming_the_path(tmp_path, capsys, what) -> None:
    path = tmp_path / "logs"
    if what == "empty":
        path.mkdir()
    elif what == "file":
        path.write_text("")
    elif what == "other scalars":
        with SummaryWriter(str(path)) as writer:
            writer.add_scalar("train/loss", 1.0, 0)
    assert cli.main(["report", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("gradwatch report: error: ") and repr(str(path)) in captured.err
    expected = {"missing": "does not exist", "empty": "no event files", "file": "is not a directory",
                "other scalars": "1 directory with event files"}[what]
    assert expected in captured.err


def test_summarize_validates_its_arguments(tmp_path) -> None:
    with pytest.raises(TypeError, match="`logdir` must be a str or os.PathLike, got int 3"):
        cli.summarize(3)
    with pytest.raises(ValueError, match="`logdir` must be a non-empty path, got ''"):
        cli.summarize("")
    with pytest.raises(ValueError, match="`prefix` must be a non-empty str not ending in '/', got ''"):
        cli.summarize(tmp_path, prefix="")


def test_usage_errors_exit_2_naming_the_argument(capsys) -> None:
    for argv, message in [
        (["report", "runs", "--prefix", "gw/"], "`prefix` must be a non-empty str not ending in '/', got 'gw/'"),
        (["demo", "--steps", "0"], "`steps` must be a positive int, got 0"),
        (["report", "runs", "--top", "0"], "`top` must be a positive int, got 0"),
        (["demo", "--every", "x"], "`every` must be a positive int, got 'x'"),
        (["report"], "LOGDIR"),
        ([], "COMMAND"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, names", [
    ([], ["report", "demo", "--version", "examples:", "gradwatch report runs --json"]),
    (["report"], ["LOGDIR", "--prefix", "--json", "--top", "--plot", "exit status", "examples:"]),
    (["demo"], ["--steps", "--every", "--logdir", "--fixed", "--seed", "exit status", "examples:"]),
])
def test_help_at_every_level_exits_0_and_names_the_options(capsys, argv, names) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: gradwatch {' '.join(argv)}".rstrip())
    assert all(name in out for name in names), [n for n in names if n not in out]


def test_plot_writes_a_png(logs, tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "gradwatch.png"
    assert cli.main(["report", str(logs), "--plot", str(png)]) == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"wrote {png}" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install_it(logs, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert cli.main(["report", str(logs), "--plot", str(tmp_path / "g.png")]) == 2
    captured = capsys.readouterr()
    assert "`--plot` needs matplotlib: pip install 'gradwatch[plot]'" in captured.err
    assert captured.out == "" and not (tmp_path / "g.png").exists()


def test_key_scheme_holds_every_key_the_report_reads(reports) -> None:
    keys = metrics(reports["fail"], prefix="p")
    assert {f"p/{cli._FAILURES}", f"p/{cli._FAIL_THRESHOLD}"} <= keys.keys()
    for kind in (cli._FAILED, cli._REL_ERROR, cli._ERROR_RATIO, cli._KINKS):
        assert f"p/{kind}/fc1.bias" in keys
    ranked = reports["fail"].worst_tensors()
    assert [keys[f"p/{cli._WORST}/{k}"] for k in range(len(ranked))] == [t.error_ratio for t in ranked]


def test_demo_catches_the_planted_bug_and_says_how_to_look(tmp_path, capsys) -> None:
    logdir = str(tmp_path / "bug")
    assert cli.main(["demo", "--steps", "21", "--every", "10", "--logdir", logdir]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gradwatch: FAIL in 3 of 3 checks - '0.bias'[")
    assert f"tensorboard --logdir {logdir}\n" in out and f"gradwatch report {logdir}\n" in out
    assert cli.main(["report", logdir]) == 1
    rows = _rows(capsys.readouterr().out)
    # the whole-model tensor and the module-local check of its custom Function's module (modules="suspects")
    assert [name for name, cells in rows.items() if cells[0] == "FAIL"] == [f"{logdir}/0.bias", f"{logdir}/0::bias"]
    assert rows[f"{logdir}/0.bias"][2:5] == ["3", "3", "0"]


def test_demo_fixed_passes_and_its_log_reports_clean(tmp_path, capsys) -> None:
    logdir = str(tmp_path / "fixed")
    assert cli.main(["demo", "--steps", "11", "--every", "10", "--fixed", "--logdir", logdir]) == 0
    assert capsys.readouterr().out.startswith("gradwatch: PASS in all 2 checks")
    assert cli.main(["report", logdir]) == 0


def test_python_dash_m_gradwatch_runs_the_command(logs) -> None:
    done = subprocess.run([sys.executable, "-m", "gradwatch", "report", str(logs), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["failing_checks"] == 2
    done = subprocess.run([sys.executable, "-m", "gradwatch", "report", str(logs / "missing")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_installed_console_script(logs) -> None:
    script = Path(sys.executable).parent / "gradwatch"
    if not script.exists():
        pytest.skip(f"no console script at {script}: `pip install -e .` installs it")
    done = subprocess.run([str(script), "report", str(logs / "clean")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "PASS: no failing check (2 checks in 1 run)" in done.stdout
