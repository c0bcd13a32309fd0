"""Capsules (gradwatch.capsule): a failing check saved, loaded safely and rerun offline with the
same verdicts and numbers (from GradWatch, the Lightning callback and the HF Trainer callback, next to
their logs); the generated pytest file fails on the buggy code and passes on the fixed."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import gradwatch
from gradwatch._references import _REFERENCES_BY_OP
from gradwatch.capsule import load_capsule
from gradwatch.cli import main
from tests._attn_op import AttnNet, attention, reference_attention
from zoo import BUGS, assert_same_state, training_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def op_reference():
    gradwatch.register_reference(attention, lambda q, k, v: reference_attention(None, q, k, v))
    yield
    _REFERENCES_BY_OP.pop("gwtest::attention", None)


def _train(model, loss_fn, batches, *, capsules, optimizer=True, **kwargs):
    watch = gradwatch.GradWatch(model, loss_fn, every_n_steps=1, max_overhead=None, seed=0, capsules=capsules,
                                **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if optimizer else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientCheckWarning)
        for batch in batches:
            if opt is not None:
                opt.zero_grad()
            with watch.step(batch):
                loss_fn(model, batch).backward()
            if opt is not None:
                opt.step()
    return watch, opt


def _numbers(tensors):
    return [(p.autograd, p.numerical) for t in tensors.values() for p in t.probes]


def _same_part(training, replayed):
    """The replayed report equals the training report's part (verdicts, probe numbers)."""
    part = {n: training.tensors[n] for n in replayed.tensors}
    assert {n: t.verdict for n, t in replayed.tensors.items()} == {n: t.verdict for n, t in part.items()}
    assert _numbers(replayed.tensors) == _numbers(part)
    assert [(r.name, r.verdict, r.rel_diff) for r in replayed.references] == [
        (r.name, r.verdict, r.rel_diff) for r in training.references if r.name in {x.name for x in replayed.references}]


def _attn_batch(seed):
    return torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(seed))


def _attn_loss(model, x):
    return model(x).square().mean()


@pytest.mark.parametrize("name", ["wrong_sign", "bias_mean", "ignores_grad_output", "accidental_detach",
                                  "hook_rescale", "wrong_index"])
def test_zoo_bug_capsules_replay_with_the_same_verdicts_and_numbers(name, tmp_path):
    case = BUGS[name](0)
    watch, _ = _train(case.model, case.loss_fn, [case.batch], capsules=str(tmp_path), optimizer=False)
    report = watch.last_report
    assert not report.ok
    written = watch._watch.capsules.written
    assert "" in written and os.path.basename(written[""]) == "step-0-model.pt"
    for key, path in written.items():
        capsule = load_capsule(path)
        assert capsule.missing == () and capsule.step == 0
        fresh = BUGS[name](0).model
        if capsule.kind == "model":
            replayed = capsule.check(fresh, case.loss_fn)
        else:
            replayed = capsule.check(dict(fresh.named_modules())[capsule.name])
        assert not replayed.ok
        _same_part(report, replayed)


@pytest.mark.parametrize("mode", ["dq", "dk", "contiguous"])
def test_attention_op_capsules_replay_with_the_same_verdicts_and_numbers(mode, bug, op_reference, tmp_path):
    bug(mode)
    torch.manual_seed(0)
    model = AttnNet()
    watch, _ = _train(model, _attn_loss, [_attn_batch(0)], capsules=str(tmp_path), optimizer=False)
    report = watch.last_report
    assert not report.ok, str(report)
    written = watch._watch.capsules.written
    assert {"attn", "gwtest::attention"} <= set(written), written
    for key in ("attn", "gwtest::attention"):
        capsule = load_capsule(written[key])
        replayed = capsule.check()  # rebuilt from the class path / found by the op's name
        assert not replayed.ok
        _same_part(report, replayed)
    op = load_capsule(written["gwtest::attention"])
    assert op.is_op and op.target == "gwtest::attention"
    assert os.path.basename(op.path) == "step-0-gwtest_attention.pt"


def test_the_correct_twin_capsule_passes_and_a_fix_makes_autograd_pass(bug, tmp_path):
    bug("dq")
    torch.manual_seed(0)
    watch, _ = _train(AttnNet(), _attn_loss, [_attn_batch(0)], capsules=str(tmp_path), optimizer=False)
    capsule = load_capsule(watch._watch.capsules.written["attn"])
    assert not capsule.check(grads="autograd").ok  # still the buggy backward
    bug(None)
    assert not capsule.check().ok  # the training's gradients stay wrong
    assert capsule.check(grads="autograd").ok  # the fixed backward on the same inputs and grad_out
    # the correct twin, written by hand (forced): passes on replay
    from gradwatch._capsules import _CapsuleWriter
    from gradwatch._recording import _Recording
    from tests._attn_op import FusedAttention

    attn = FusedAttention()
    q, k, v = (torch.randn(2, 4, 4, requires_grad=True) for _ in range(3))
    with _Recording({"attn": attn}) as rec:
        attn(q, k, v).sum().backward()
    writer = _CapsuleWriter(str(tmp_path / "twin"))
    writer._write("attn", 7, lambda budget: gradwatch.capsule._module_capsule(
        rec.records["attn"], step=7, seed=3, options=gradwatch.ProbeOptions(), max_bytes=budget))
    twin = load_capsule(writer.written["attn"])
    assert twin.check().ok and twin.check(grads="autograd").ok


def test_autograd_replay_rebuilds_a_non_contiguous_grad_out(bug, tmp_path):
    """AttnNet's op gets a non-contiguous grad_output (a slice of torch.cat's gradient): the capsule
    keeps its strides, so grads="autograd" still triggers the "contiguous" bug, and a fix passes."""
    bug("contiguous")
    torch.manual_seed(0)
    watch, _ = _train(AttnNet(), _attn_loss, [_attn_batch(0)], capsules=str(tmp_path), optimizer=False)
    capsule = load_capsule(watch._watch.capsules.written["attn"])
    strides = capsule.data["record"]["grad_output_strides"]
    assert strides and all(s != list(torch.empty(g.shape).stride())
                           for s, g in zip(strides.values(), capsule.data["record"]["grad_outputs"].values()))
    assert not capsule.check(grads="autograd").ok  # the buggy backward, on the layout training gave it
    bug(None)
    assert capsule.check(grads="autograd").ok  # fixed


def _pytest(tmp_path, source, name):
    test = tmp_path / f"test_{name}.py"
    test.write_text(source)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), str(tmp_path)]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)


def test_generated_pytest_fails_on_the_buggy_code_and_passes_on_the_fixed(bug, tmp_path, capsys):
    bug("dq")
    torch.manual_seed(0)
    watch, _ = _train(AttnNet(), _attn_loss, [_attn_batch(0)], capsules=str(tmp_path / "caps"), optimizer=False)
    bug(None)
    path = watch._watch.capsules.written["attn"]
    (tmp_path / "buggy_attn.py").write_text(textwrap.dedent("""
        from tests._attn_op import BUG, FusedAttention
        BUG["mode"] = "dq"
    """))
    for spec, passes in (("buggy_attn:FusedAttention", False), (None, True)):
        argv = ["repro", path, "--pytest"] + (["--module", spec] if spec else [])
        assert main(argv) == 0
        source = capsys.readouterr().out
        assert "gradwatch.load_capsule" in source and 'grads="autograd"' in source
        run = _pytest(tmp_path, source, "buggy" if spec else "fixed")
        assert (run.returncode == 0) == passes, run.stdout[-3000:]


def test_generated_pytest_for_a_zoo_module_with_a_factory(tmp_path, capsys):
    case = BUGS["wrong_sign"](0)
    watch, _ = _train(case.model, case.loss_fn, [case.batch], capsules=str(tmp_path / "caps"), optimizer=False)
    path = watch._watch.capsules.written["fc1"]
    (tmp_path / "layers.py").write_text(textwrap.dedent("""
        from zoo import CustomLinear
        def buggy():
            return CustomLinear(8, 16, bug="wrong_sign")
        def fixed():
            return CustomLinear(8, 16)
    """))
    results = {}
    for factory in ("buggy", "fixed"):
        assert main(["repro", path, "--pytest", "--module", f"layers:{factory}"]) == 0
        results[factory] = _pytest(tmp_path, capsys.readouterr().out, factory).returncode
    assert results["buggy"] != 0 and results["fixed"] == 0


def test_repro_command_prints_the_report_and_exits_1(bug, tmp_path, capsys):
    bug("dk")
    torch.manual_seed(0)
    watch, _ = _train(AttnNet(), _attn_loss, [_attn_batch(0)], capsules=str(tmp_path), optimizer=False)
    path = watch._watch.capsules.written["attn"]
    assert main(["repro", path, "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "attn::input[1]" in out
    bug(None)
    assert main(["repro", path]) == 1  # the recorded gradients are the training's: still failing
    capsys.readouterr()
    assert main(["repro", str(tmp_path / "nope.pt")]) == 2
    assert main(["repro", watch._watch.capsules.written[""]]) == 2  # whole model: Python only
    assert "check(model, loss_fn)" in capsys.readouterr().err


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


class _Custom:
    pass


def test_a_tampered_capsule_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "gradwatch-capsule", "version": 1, "x": _Evil()}, evil)
    with pytest.raises(ValueError, match="not a gradwatch capsule.*unsafe"):
        load_capsule(evil)
    assert not (tmp_path / "pwned").exists()
    custom = tmp_path / "custom.pt"
    torch.save({"format": "gradwatch-capsule", "obj": _Custom()}, custom)
    with pytest.raises(ValueError, match=str(custom)):
        load_capsule(custom)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(ValueError, match="not a gradwatch capsule"):
        load_capsule(raw)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.ones(2)}, plain)
    with pytest.raises(ValueError, match="no 'gradwatch-capsule' format key"):
        load_capsule(plain)
    assert not (tmp_path / "pwned").exists()


def _two_steps(directory):
    case = BUGS["wrong_sign"](0)
    batches = [case.batch, BUGS["wrong_sign"](1).batch]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watch, opt = _train(case.model, case.loss_fn, batches, capsules=directory)
    mine = [w for w in caught if "could not write a capsule" in str(w.message)]
    return watch, training_state(case.model, opt), mine


def test_training_is_bit_identical_with_capsules_and_unwritable_directories_warn_once(tmp_path):
    off, state_off, warned = _two_steps(False)
    assert warned == [] and off._watch.capsules.written == {}
    on, state_on, warned = _two_steps(str(tmp_path / "caps"))
    assert warned == [] and set(on._watch.capsules.written) == {"", "fc1"}  # the first failure of each only
    assert sorted(os.listdir(tmp_path / "caps")) == ["step-0-fc1.pt", "step-0-model.pt"]
    assert_same_state(state_off, state_on)
    assert [(s, r.verdict, _numbers(r.tensors)) for s, r in on.reports] == [
        (s, r.verdict, _numbers(r.tensors)) for s, r in off.reports]
    (tmp_path / "file").write_text("")
    _, state_bad, warned = _two_steps(str(tmp_path / "file" / "caps"))  # a path under a regular file
    assert len(warned) == 1 and issubclass(warned[0].category, UserWarning)
    assert_same_state(state_off, state_bad)


def test_a_read_only_directory_warns_once_and_training_goes_on(tmp_path):
    _, state_off, _ = _two_steps(False)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    os.chmod(readonly, 0o500)
    try:
        if os.access(readonly, os.W_OK):
            pytest.skip("running as root: a read-only directory is writable")
        _, state_ro, warned = _two_steps(str(readonly))
        assert len(warned) == 1
        assert_same_state(state_off, state_ro)
    finally:
        os.chmod(readonly, 0o700)


def test_capsules_sit_next_to_the_logs_and_respect_the_caps(tmp_path):
    case = BUGS["wrong_sign"](0)
    watch, _ = _train(case.model, case.loss_fn, [case.batch], capsules=None, optimizer=False,
                      logdir=str(tmp_path / "runs"))
    watch.close()
    assert sorted(os.listdir(tmp_path / "runs" / "gradwatch" / "capsules")) == ["step-0-fc1.pt", "step-0-model.pt"]
    case = BUGS["wrong_sign"](0)
    watch, _ = _train(case.model, case.loss_fn, [], capsules=str(tmp_path / "one"), optimizer=False)
    watch._watch.capsules.max_count = 1
    _train_into(watch, case)
    assert len(os.listdir(tmp_path / "one")) == 1
    case = BUGS["wrong_sign"](0)
    watch, _ = _train(case.model, case.loss_fn, [], capsules=str(tmp_path / "small"), optimizer=False)
    watch._watch.capsules.max_bytes = 1000
    _train_into(watch, case)
    writer = watch._watch.capsules
    assert writer.total_bytes == sum(os.path.getsize(p) for p in writer.written.values())
    model_capsule = load_capsule(writer.written[""])
    assert any(line.startswith(("batch", "grads", "state", "replay")) for line in model_capsule.missing)
    assert all(os.path.getsize(p) < 1000 + 20_000 for p in writer.written.values())  # tensors capped; header only
    with pytest.raises(ValueError, match="lacks"):
        load_capsule(writer.written["fc1"]).check(BUGS["wrong_sign"](0).model.fc1)
    case = BUGS["wrong_sign"](0)
    watch, _ = _train(case.model, case.loss_fn, [], capsules=str(tmp_path / "total"), optimizer=False)
    watch._watch.capsules.max_total_bytes = 1
    _train_into(watch, case)
    assert len(watch._watch.capsules.written) <= 1


def _train_into(watch, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with watch.step(case.batch):
            case.loss_fn(case.model, case.batch).backward()


def test_capsules_option_is_validated(tmp_path):
    case = BUGS["wrong_sign"](0)
    for bad in (3, "", ["x"]):
        with pytest.raises(ValueError, match="`capsules`"):
            gradwatch.GradWatch(case.model, case.loss_fn, capsules=bad)
    assert gradwatch.GradWatch(case.model, case.loss_fn)._watch.capsules.directory is None  # no logs: none


# ----------------------------------------------------------------------------- the callbacks
def _fit_lightning(tmp_path, **kwargs):
    """The zoo's wrong_sign bug trained one step by Lightning under the callback (``kwargs``: the
    callback's ``capsules`` and the Trainer's ``logger``)."""
    from lightning_zoo import api
    from test_lightning import _fit

    lit = api("lightning.pytorch")
    module = lit.ZooModule(BUGS["wrong_sign"](0))
    callback = gradwatch.GradWatchCallback(every_n_steps=1, max_overhead=None, seed=0, on_failure=lambda r: None,
                                           capsules=kwargs.pop("capsules", None))
    logger = kwargs.pop("logger")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice (workers, logging interval)
        _fit(module, callback, max_steps=1, logger=logger(lit) if callable(logger) else logger,
             default_root_dir=str(tmp_path), **kwargs)
    assert not callback.last_report.ok
    return lit, module, callback


@pytest.mark.parametrize("logger", ["tensorboard", "csv"])
def test_lightning_capsules_sit_next_to_the_loggers_logs_and_replay(logger, tmp_path):
    make = {"tensorboard": lambda lit: lit.loggers.TensorBoardLogger(str(tmp_path), name="tb"),
            "csv": lambda lit: lit.loggers.CSVLogger(str(tmp_path), name="csv")}[logger]
    lit, module, callback = _fit_lightning(tmp_path, logger=make)
    log_dir = module.trainer.loggers[0].log_dir
    directory = os.path.join(log_dir, "gradwatch", "capsules")
    assert callback._watch.capsules.directory == directory
    assert sorted(os.listdir(directory)) == ["step-0-model.pt", "step-0-net.fc1.pt"]
    report = callback.last_report
    for name in os.listdir(directory):
        capsule = load_capsule(os.path.join(directory, name))
        assert capsule.missing == () and capsule.step == 0
        fresh = lit.ZooModule(BUGS["wrong_sign"](0))
        if capsule.kind == "model":
            replayed = capsule.check(fresh, fresh.loss)  # the loss training_step returns
        else:
            replayed = capsule.check(dict(fresh.named_modules())[capsule.name])
        assert not replayed.ok
        _same_part(report, replayed)


def test_lightning_accumulation_capsule_replays_with_the_plain_loss(tmp_path):
    """Under accumulate_grad_batches=2 the check's loss is training_step's / 2: the capsule holds
    that factor, so the plain loss replays the same verdicts and numbers."""
    lit, module, callback = _fit_lightning(tmp_path, capsules=str(tmp_path / "caps"), logger=False,
                                           accumulate_grad_batches=2)
    capsule = load_capsule(tmp_path / "caps" / "step-0-model.pt")
    assert capsule.data["loss_factor"] == ["div", 2]
    fresh = lit.ZooModule(BUGS["wrong_sign"](0))
    replayed = capsule.check(fresh, fresh.loss)
    assert not replayed.ok
    _same_part(callback.last_report, replayed)


def test_lightning_capsules_false_none_without_a_logger_and_a_directory(tmp_path):
    _, module, callback = _fit_lightning(
        tmp_path, capsules=False, logger=lambda lit: lit.loggers.TensorBoardLogger(str(tmp_path), name="tb"))
    assert callback._watch.capsules.directory is None
    assert os.path.isdir(module.trainer.loggers[0].log_dir)
    _, _, callback = _fit_lightning(tmp_path / "nolog", logger=False)  # no logs: no capsule, no failure
    assert callback._watch.capsules.directory is None and callback._watch.capsules.written == {}
    assert list(tmp_path.rglob("capsules")) == []
    _fit_lightning(tmp_path, capsules=str(tmp_path / "mine"), logger=False)  # a directory: there
    assert sorted(os.listdir(tmp_path / "mine")) == ["step-0-model.pt", "step-0-net.fc1.pt"]


def _hf_logs(tmp_path, monkeypatch):
    """Trainer arguments logging to ``tmp_path/logs``: ``args.logging_dir`` (transformers 4) or
    ``TENSORBOARD_LOGGING_DIR`` (transformers 5, where TrainingArguments has no logging_dir)."""
    import dataclasses

    from transformers import TrainingArguments

    logs = tmp_path / "logs"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logs))
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    return logs, {"report_to": "tensorboard", **({"logging_dir": str(logs)} if "logging_dir" in fields else {})}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore:.*loss_type=None.*")
@pytest.mark.filterwarnings("ignore::gradwatch.KinkWarning")
def test_hf_capsules_sit_next_to_the_trainers_logs_and_replay(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from test_hf import BUGGY, BUGGY_LOCAL, causal_lm_loss, gpt2, train, watch

    logs, overrides = _hf_logs(tmp_path, monkeypatch)
    callback = watch()
    train(gpt2(bug=True), callback, tmp_path / "out", steps=1, **overrides)
    report = callback.last_report
    assert sorted(t.name for t in report.failures) == [BUGGY, BUGGY_LOCAL], str(report)
    directory = logs / "gradwatch" / "capsules"
    assert sorted(os.listdir(directory)) == ["step-0-model.pt", "step-0-transformer.h.1.mlp.c_fc.pt"]
    for name in os.listdir(directory):
        capsule = load_capsule(directory / name)
        assert capsule.missing == () and capsule.step == 0
        fresh = gpt2(bug=True)
        if capsule.kind == "model":
            replayed = capsule.check(fresh, causal_lm_loss)  # the loss_fn the callback was given
        else:
            replayed = capsule.check(dict(fresh.named_modules())[capsule.name])
        assert not replayed.ok
        _same_part(report, replayed)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore:.*loss_type=None.*")
@pytest.mark.filterwarnings("ignore::gradwatch.KinkWarning")
def test_hf_capsules_false_writes_none(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from test_hf import gpt2, train, watch

    logs, overrides = _hf_logs(tmp_path, monkeypatch)
    callback = watch(capsules=False)
    train(gpt2(bug=True), callback, tmp_path / "out", steps=1, **overrides)
    assert not callback.last_report.ok and os.path.isdir(logs)
    assert callback._watch.capsules.directory is None and list(tmp_path.rglob("capsules")) == []


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore:.*loss_type=None.*")
@pytest.mark.filterwarnings("ignore::gradwatch.KinkWarning")
def test_hf_accumulation_capsule_replays_with_the_plain_loss(tmp_path):
    """gradient_accumulation_steps=2 with a model the Trainer does not pass the token count to: the
    Trainer divides each micro-batch's loss by 2 before backward. The capsule holds that factor, so the
    model's plain loss replays the training's verdicts and numbers."""
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from test_hf import BUGGY, TokenData, gpt2, watch

    callback = watch(loss_fn=None, capsules=str(tmp_path / "caps"))  # the model's own outputs.loss
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, gradient_accumulation_steps=2,
                             report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, per_device_train_batch_size=4, seed=0, data_seed=0)
    trainer = Trainer(model=gpt2(bug=True), args=args, train_dataset=TokenData(), callbacks=[callback])
    trainer.model_accepts_loss_kwargs = False  # no num_items_in_batch: the Trainer divides by the 2 micro-batches
    trainer.train()
    report = callback.last_report
    assert BUGGY in {t.name for t in report.failures}, str(report)
    capsule = load_capsule(tmp_path / "caps" / "step-0-model.pt")
    how, factor = capsule.data["loss_factor"]
    assert how == "mul" and float(factor) == 0.5
    replayed = capsule.check(gpt2(bug=True), lambda model, inputs: model(**inputs).loss)  # the plain loss
    assert not replayed.ok and replayed.reliable
    _same_part(report, replayed)


@pytest.mark.parametrize("adapter", ["lightning", "hf"])
def test_callbacks_validate_capsules(adapter):
    if adapter == "hf":
        pytest.importorskip("transformers")
        from gradwatch.hf import GradWatchTrainerCallback as Callback
    else:
        from gradwatch.lightning import GradWatchCallback as Callback
    for bad in (3, "", ["x"]):
        with pytest.raises(ValueError, match="`capsules`"):
            Callback(capsules=bad)
    assert Callback()._watch.capsules.directory is None  # known when training starts


@pytest.mark.parametrize("path", [3, None, ["step-0-model.pt"]])
def test_load_capsule_names_a_path_of_the_wrong_type(path):
    with pytest.raises(TypeError, match=r"`path` must be a str or os.PathLike, got "):
        load_capsule(path)


# ----------------------------------------------------------------------------- cross-device
def test_a_capsule_written_on_cuda_replays_on_cpu_saying_what_differs(bug, tmp_path, capsys):
    """A capsule whose recorded device is "cuda:0" (its metadata edited: no GPU here), TF32 allowed
    and float16 autocast on CUDA: it replays on CPU with the same verdicts and numbers, and the replay
    says what differs (Python: one UserWarning; the CLI: notes on stderr)."""
    from gradwatch.capsule import _save

    bug("dk")
    torch.manual_seed(0)
    watch, _ = _train(AttnNet(), _attn_loss, [_attn_batch(0)], capsules=str(tmp_path), optimizer=False)
    path = watch._watch.capsules.written["attn"]
    here = load_capsule(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # written and replayed on the CPU: nothing to say
        assert here.replay_notes() == () and not here.check().ok
    data = torch.load(path, weights_only=True)
    data["device"] = "cuda:0"
    data["precision"] = {**data["precision"], "cuda_matmul_allow_tf32": True, "cudnn_allow_tf32": True}
    data["record"]["replay"]["autocast"]["cuda"] = [True, "float16"]
    gpu = str(tmp_path / "gpu.pt")
    _save(data, gpu)
    capsule = load_capsule(gpu)
    with pytest.warns(UserWarning, match="gradwatch capsule replay") as caught:
        replayed = capsule.check()
    message = str(caught[0].message)
    assert "written on cuda:0, replayed on cpu" in message and "TF32" in message, message
    assert "cuda autocast (float16)" in message, message
    assert not replayed.ok
    _same_part(watch.last_report, replayed)
    assert main(["repro", gpu]) == 1
    err = capsys.readouterr().err
    assert "note: capsule written on cuda:0, replayed on cpu" in err and "UserWarning" not in err, err
    # a module of another dtype: the captured float32 parameters are cast into it, and the replay says so
    fc1 = BUGS["wrong_sign"](0)
    watch, _ = _train(fc1.model, fc1.loss_fn, [fc1.batch], capsules=str(tmp_path / "zoo"), optimizer=False)
    zoo = load_capsule(watch._watch.capsules.written["fc1"])
    assert any("float32 -> float64" in note for note in zoo.replay_notes(BUGS["wrong_sign"](0).model.fc1.double()))
    assert zoo.replay_notes(BUGS["wrong_sign"](0).model.fc1) == ()


# ----------------------------------------------------------------------------- naming capsules
def test_reports_the_dashboard_and_gradwatch_report_name_each_failing_tensors_capsule(tmp_path, capsys):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradwatch import cli

    case = BUGS["wrong_sign"](0)
    runs = tmp_path / "runs"
    watch, _ = _train(case.model, case.loss_fn, [case.batch, BUGS["wrong_sign"](1).batch], capsules=None,
                      logdir=str(runs))
    watch.close()
    directory = runs / "gradwatch" / "capsules"
    model, fc1 = str(directory / "step-0-model.pt"), str(directory / "step-0-fc1.pt")
    for step, report in watch.reports:  # step 1 names the capsules of step 0 (the first failure is kept)
        assert {t.name for t in report.failures} == {"fc1.weight", "fc1::weight"}, str(report)
        assert dict(report.capsules) == {"fc1.weight": model, "fc1::weight": fc1}, (step, report.capsules)
        assert f"| `fc1::weight` | `{fc1}` |" in report.capsule_markdown()
        assert f"capsule of 'fc1::weight': {fc1} (rerun: gradwatch repro {fc1})" in str(report)
    with pytest.raises(gradwatch.GradientCheckError, match="capsule of 'fc1.weight'"):
        gradwatch.report._handle(watch.last_report, "raise")
    # the dashboard: a text per check, under the key the CLI reads
    acc = EventAccumulator(str(runs), size_guidance={"tensors": 0})
    acc.Reload()
    tag = f"gradwatch/{cli._CAPSULES}/text_summary"
    assert [e.step for e in acc.Tensors(tag)] == [0, 1]
    # gradwatch report: a line per failing tensor naming its capsule, and "capsule" in --json
    assert main(["report", str(runs)]) == 1
    out = capsys.readouterr().out
    assert f"capsule of 'fc1.weight': {model}\n" in out and f"capsule of 'fc1::weight': {fc1}\n" in out, out
    assert main(["report", str(runs), "--json"]) == 1
    tensors = {t["tensor"]: t["capsule"] for t in json.loads(capsys.readouterr().out)["runs"][0]["tensors"]}
    assert tensors["fc1.weight"] == model and tensors["fc1::weight"] == fc1 and tensors["fc1.bias"] is None
    # a passing check names none, and writes no capsules text
    ok = gradwatch.check(BUGS["wrong_sign"](0).model.fc2, lambda m, x: m(x).sum(), torch.randn(3, 16), seed=0)
    assert ok.ok and ok.capsules == {} and ok.capsule_markdown() == "" and "capsule" not in str(ok)


def test_a_failing_reference_comparison_names_its_modules_capsule(tmp_path):
    from gradwatch._capsules import _CapsuleWriter
    from gradwatch.report import ReferenceCheck, Report

    report = Report(tensors={}, seed=0, step=3,
                    references=(ReferenceCheck("attn", "input[0]", "fail", rel_diff=0.5, tolerance=1e-3,
                                               error_ratio=500.0),))
    writer = _CapsuleWriter(str(tmp_path))
    writer.written = {"attn": str(tmp_path / "step-3-attn.pt")}
    named = writer.named(report)
    assert dict(named.capsules) == {"attn::input[0] (reference)": str(tmp_path / "step-3-attn.pt")}
