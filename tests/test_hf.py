"""The Hugging Face Trainer callback inside ``Trainer.train``: which gradient (before
clipping, the first micro-batch of an accumulation window), the loss the Trainer
backpropagated, bf16, dropout replay, TensorBoard, and no side effects.

Tiny random-init models built from configs (no download). The planted-bug tests use a
``loss_fn`` that computes the causal-LM cross-entropy in the dtype of the logits: the
models' own loss (``ForCausalLMLoss``) casts the logits to float32, which the engine
reports as an unreliable float64 check today (``test_default_loss_is_the_models_own``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import Dataset

import gradwatch
import gradwatch._seeds
from gradwatch import GradientCheckError, GradientCheckWarning, UnreliableCheckWarning
from gradwatch.hf import GradWatchTrainerCallback
from zoo import assert_same_state

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCAB, SEQ = 64, 16
BUGGY = "transformer.h.1.mlp.c_fc.weight"  # a deep layer's weight, 1/8 of its rows 2% off
BUGGY_LOCAL = "transformer.h.1.mlp.c_fc::weight"  # the same, by its module's local check (a suspect)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*loss_type=None.*"),
    pytest.mark.filterwarnings("ignore::gradwatch.KinkWarning"),
]


class TokenData(Dataset):
    """Random token sequences; the labels are the inputs (causal LM)."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def causal_lm_loss(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The loss the Trainer backpropagates for GPT-2, in the logits' dtype: summed token
    cross-entropy over the Trainer's label count for the window (``num_items_in_batch``)."""
    logits = model(input_ids=inputs["input_ids"]).logits
    labels = inputs["labels"][:, 1:]
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return total / inputs["num_items_in_batch"]


class _RowsOff(torch.autograd.Function):
    """Identity forward; backward scales every 8th row of the gradient by 1.02."""

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[::8] *= 1.02
        return grad


def gpt2(seed: int = 0, *, bug: bool = False) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))  # dropout 0.1 everywhere
    if bug:
        layer = model.transformer.h[1].mlp.c_fc  # transformers' Conv1D: x @ weight + bias

        def forward(x):
            out = torch.addmm(layer.bias, x.view(-1, x.size(-1)), _RowsOff.apply(layer.weight))
            return out.view(*x.shape[:-1], layer.nf)

        layer.forward = forward
    return model


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=None))  # no padding_idx row


def _collect(report) -> None:
    """on_failure callable that keeps quiet (the reports are in callback.reports)."""


def train(model, callback=None, tmp_path=None, *, steps: int = 2, **overrides) -> Trainer:
    kwargs = dict(output_dir=str(tmp_path or "unused"), max_steps=steps, report_to="none", use_cpu=True,
                  save_strategy="no", logging_strategy="no", disable_tqdm=True, per_device_train_batch_size=4,
                  seed=0, data_seed=0)
    kwargs.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=TokenData(),
                      callbacks=[callback] if callback is not None else None)
    trainer.train()
    return trainer


def watch(**kwargs) -> GradWatchTrainerCallback:
    """Every step, all tensors, one coordinate and one direction each (kinks off: GPT-2 has none)."""
    options = dict(every_n_steps=1, max_overhead=None, seed=0,
                   options=gradwatch.ProbeOptions(coordinates=1, directions=1, kinks=False),
                   loss_fn=causal_lm_loss, on_failure=_collect)
    options.update(kwargs)
    return GradWatchTrainerCallback(**options)


# ----------------------------------------------------------------------------- which gradient
@pytest.mark.parametrize("overrides", [{}, {"gradient_accumulation_steps": 2, "max_grad_norm": 1e-3},
                                       {"bf16": True}], ids=["plain", "accumulate-clip", "bf16"])
def test_planted_backward_bug_in_one_layer_is_caught_and_named(overrides, tmp_path) -> None:
    callback = watch()
    train(gpt2(bug=True), callback, tmp_path, steps=1, **overrides)
    assert [s for s, _ in callback.reports] == [0]
    for _, report in callback.reports:
        assert report.reliable and report.verdict == "fail", str(report)
        assert sorted(t.name for t in report.failures) == [BUGGY, BUGGY_LOCAL], str(report)
    assert callback.suspects == {"transformer.h.1.mlp.c_fc": "custom autograd.Function _RowsOff"}


@pytest.mark.parametrize("overrides", [{}, {"gradient_accumulation_steps": 2, "max_grad_norm": 1e-3},
                                       {"bf16": True, "gradient_accumulation_steps": 2}],
                         ids=["plain", "accumulate-clip", "bf16-accumulate"])
def test_correct_model_with_dropout_stays_quiet(overrides, tmp_path) -> None:
    callback = watch(on_failure="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientCheckWarning)
        warnings.simplefilter("error", UnreliableCheckWarning)
        train(gpt2(), callback, tmp_path, **overrides)
    expected = "bfloat16" if overrides.get("bf16") else "float32"
    for _, report in callback.reports:
        assert report.verdict == "pass" and report.grad_precision == expected, str(report)
        # dropout (p=0.1) is on, and the captured RNG replays its masks: the replayed loss is the trained one
        assert report.replay_loss == pytest.approx(report.train_loss, rel=1e-5 if expected == "float32" else 5e-2)


def test_dropout_masks_are_replayed_from_the_state_captured_right_before_the_forward(tmp_path) -> None:
    """With learning_rate=0 the weights stay as they were: the trained micro-batch's loss under other
    dropout masks differs by more than the 1e-5 the replay matched it to (typically by ~1e-3)."""
    seen = []

    def recording_loss(model, inputs):
        seen.append(inputs)
        return causal_lm_loss(model, inputs)

    callback = watch(loss_fn=recording_loss, on_failure="raise")
    model = gpt2()
    train(model, callback, tmp_path, steps=1, learning_rate=0.0)
    report = callback.last_report
    assert report.reliable and report.replay_loss == pytest.approx(report.train_loss, rel=1e-5)
    model.train()
    with torch.no_grad():
        others = [causal_lm_loss(model, seen[0]).item() for _ in range(16)]  # fresh dropout masks
    gaps = sorted(abs(loss - report.train_loss) / report.train_loss for loss in others)
    assert gaps[0] > 1e-5 and gaps[len(gaps) // 2] > 1e-3, gaps  # no other mask replays it


def test_clipped_gradients_are_compared_before_clipping(tmp_path) -> None:
    """max_grad_norm=1e-3 scales the gradient the optimizer uses by ~1e-3: compared after clipping,
    every tensor would fail by orders of magnitude."""
    callback = watch(on_failure="raise")
    train(gpt2(), callback, tmp_path, max_grad_norm=1e-3)
    norms = [math.sqrt(sum(p.autograd**2 for p in r.probes if p.kind == "coordinate")) for _, r in callback.reports]
    assert min(norms) > 1e-2  # the compared gradients are the unclipped ones
    assert all(r.verdict == "pass" for _, r in callback.reports)


def test_accumulation_replays_the_first_micro_batch_as_it_was_backpropagated(tmp_path) -> None:
    """gradient_accumulation_steps=3: the Trainer normalises GPT-2's summed token loss by the
    label count of the whole window, so the first micro-batch's loss is a third of its mean."""
    callback = watch(on_failure="raise")
    train(gpt2(), callback, tmp_path, gradient_accumulation_steps=3)
    for _, report in callback.reports:
        assert report.reliable and report.ok
        assert report.train_loss == pytest.approx(report.replay_loss, rel=1e-5)
        assert report.train_loss == pytest.approx(math.log(VOCAB) / 3, rel=0.1)  # ~ln(64)/3 for random init


def test_default_loss_is_the_models_own(tmp_path) -> None:
    """No loss_fn: the Trainer's compute_loss on the same inputs, i.e. the model's own outputs.loss,
    replays the trained loss for GPT-2 and Llama, and the check is reliable and clean: their loss
    casts the logits to float32, a cast the float64 evaluation keeps in float64 (report.kept_casts)."""
    for model in (gpt2(), llama()):
        callback = watch(loss_fn=None, on_failure="raise")
        train(model, callback, tmp_path, gradient_accumulation_steps=2)
        for _, report in callback.reports:
            assert report.train_loss == pytest.approx(report.replay_loss, rel=1e-5), str(report)
            assert report.reliable and report.ok and report.kept_casts > 0, str(report)


def test_on_failure_raise_propagates_out_of_train(tmp_path) -> None:
    with pytest.raises(GradientCheckError, match=BUGGY.replace(".", r"\.")) as info:
        train(gpt2(bug=True), watch(on_failure="raise"), tmp_path)
    assert info.value.report.step == 0


def test_schedule_follows_global_step(tmp_path) -> None:
    callback = watch(every_n_steps=2)
    train(gpt2(), callback, tmp_path, steps=5, gradient_accumulation_steps=2)
    assert [s for s, _ in callback.reports] == [0, 2, 4]
    assert callback.last_report is callback.reports[-1][1]
    assert [r.seed for _, r in callback.reports] == [gradwatch._seeds._derive_seed(0, s) for s in (0, 2, 4)]


# ----------------------------------------------------------------------------- no side effects
def test_training_with_the_callback_is_bit_identical_to_training_without(tmp_path) -> None:
    states = []
    for callback in (None, watch(on_failure="raise")):
        trainer = train(gpt2(), callback, tmp_path, steps=3, gradient_accumulation_steps=2, max_grad_norm=0.5)
        state = {f"param/{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
        state["rng"] = torch.get_rng_state()
        states.append(state)
        if callback is not None:
            assert len(callback.reports) == 3 and all(r.ok and r.reliable for _, r in callback.reports)
            assert "compute_loss" not in vars(trainer)  # the one-shot wrapper is gone
    assert_same_state(states[0], states[1])


# ----------------------------------------------------------------------------- logging
def test_logs_to_the_trainers_tensorboard_at_global_step(tmp_path) -> None:
    callback = watch(every_n_steps=2)
    train(gpt2(bug=True), callback, tmp_path, steps=5, report_to="tensorboard", logging_strategy="steps",
          logging_steps=1)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and len(list(runs[0].glob("events.out.tfevents.*"))) == 1  # the Trainer's own writer
    acc = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0})
    acc.Reload()
    report = callback.last_report
    for key, value in gradwatch.metrics(report).items():
        events = acc.Scalars(key)
        assert [e.step for e in events] == [0, 2, 4], key
        if key != "gradwatch/check_seconds":
            assert events[-1].value == pytest.approx(value, rel=1e-5, abs=1e-12), key
    assert [e.value for e in acc.Scalars("gradwatch/failures")] == [2.0, 2.0, 2.0]  # whole-model and local
    assert "train/loss" in acc.Tags()["scalars"]  # the Trainer's own logging, same run


# ----------------------------------------------------------------------------- module-local checks
def test_modules_none_disables_and_named_modules_are_checked_alone(tmp_path) -> None:
    off = watch(modules=None)
    train(gpt2(bug=True), off, tmp_path, steps=1)
    assert [t.name for t in off.last_report.failures] == [BUGGY] and off.suspects == {}
    # named (no suspect search), under accumulation: recorded in the checked micro-batch only (one call)
    named = watch(modules=["transformer.h.1.mlp.c_fc"])
    model = gpt2(bug=True)
    train(model, named, tmp_path, steps=1, gradient_accumulation_steps=2)
    assert sorted(t.name for t in named.last_report.failures) == [BUGGY, BUGGY_LOCAL], str(named.last_report)
    assert named.suspects == {} and not model.transformer.h[1].mlp.c_fc._forward_hooks  # no hook left behind
    with pytest.raises(ValueError, match="`modules` names 'nope', which is not a submodule"):
        train(gpt2(), watch(modules=["nope"]), tmp_path, steps=1)


def test_auto_checks_the_modules_alone_when_the_whole_model_does_not_fit(monkeypatch, tmp_path) -> None:
    import gradwatch.hf

    model = gpt2(bug=True)
    whole = sum(t.numel() * 8 for t in [*model.parameters(), *model.buffers()])
    callback = watch(options=gradwatch.ProbeOptions(coordinates=1, directions=1, kinks=False,
                                                    max_shadow_bytes=whole - 1))  # the whole model does not fit
    train(model, callback, tmp_path, steps=1)
    report = callback.last_report
    assert [t.name for t in report.failures] == [BUGGY_LOCAL], str(report)
    assert all(t.verdict == "skipped" for n, t in report.tensors.items() if "::" not in n)
    assert [(m.module, m.precision) for m in report.modules] == [("transformer.h.1.mlp.c_fc", "float64")]


# ----------------------------------------------------------------------------- several processes
def test_two_processes_agree_and_only_the_main_one_logs(tmp_path) -> None:
    """torchrun, 2 CPU processes (gloo), accumulation 2 and clipping: each process replays its own
    micro-batch, the gradients and probe results are averaged, and both judge alike."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "hf_ddp.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for res in results:
        assert res["world"] == 2
        assert res["correct"]["verdicts"] == ["pass", "pass"] and all(res["correct"]["reliable"]), res
        assert res["bug"]["failing"] == [[BUGGY, BUGGY_LOCAL]] * 2, res  # the local check agreed too
        assert res["raise"] == "GradientCheckError", res
    # the whole-model check raising on rank 1 alone: rank 0 raised too, at the check's next collective
    assert results[1]["check_raise"] == "planted: this process's check raised", results[1]
    assert "raised on 1 other rank(s) of 2" in results[0]["check_raise"], results[0]
    # the same probes on the cross-process means: identical numbers, and rank zero's seed
    for key in ("correct", "bug"):
        assert results[0][key] == results[1][key]
    # capsules: rank 0 alone wrote them (its own micro-batch and gradients, the Trainer's factor), and
    # they replay in this process with the training's verdicts, from the plain loss
    assert results[1]["capsules"]["written"] == {}
    written = results[0]["capsules"]["written"]
    assert set(written) == {"", BUGGY_LOCAL.split("::")[0]}, written
    training = results[0]["capsules"]["tensors"][0]
    for path in written.values():
        capsule = gradwatch.load_capsule(path)
        assert capsule.missing == () and (capsule.processes["rank"], capsule.processes["world_size"]) == (0, 2)
        fresh = gpt2(bug=True)
        with pytest.warns(UserWarning, match="written by process 0 of 2"):
            replayed = (capsule.check(fresh, causal_lm_loss) if capsule.kind == "model"
                        else capsule.check(dict(fresh.named_modules())[capsule.name]))
        assert not replayed.ok and replayed.reliable, str(replayed)
        assert {n: t.verdict for n, t in replayed.tensors.items()} == {n: training[n] for n in replayed.tensors}
    assert len(results[0]["lines"]) == 3 and results[1]["lines"] == []  # 2 bug checks + the raise, rank zero only


# ----------------------------------------------------------------------------- FSDP2
_ACTS = {f"transformer.h.{i}.mlp.act::input[0]" for i in (0, 1)}  # the example's patched kernels, checked locally
_DOWNSTREAM = {"transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight",
               "transformer.ln_f.bias"}  # after the last patched activation: their gradients stay right


def test_fsdp2_accelerate_loop_and_trainer_two_processes(tmp_path) -> None:
    """accelerate's FSDP2 (fully_shard) on 2 CPU processes (gloo), the model of examples/hf_trainer.py:
    (a) an Accelerator loop watched by GradWatch, (b) the Trainer (accumulation 2, clipping) watched by
    the callback. On CPU accelerate drops the FSDP plugin (tests/hf_fsdp.py says where); the script
    keeps it, as on a GPU."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "hf_fsdp.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    names = {n for n, _ in gpt2().named_parameters()}  # the example's model has the same tensors
    wrong = sorted(names - _DOWNSTREAM | _ACTS)  # every tensor upstream of a patched GELU, and the kernels
    for res in results:
        assert res["world"] == 2 and res["loop_sharded"] == res["trainer_sharded"] == ["DTensor"], res
        # the planted bug, on both ranks: the whole-model check and the kernels' local checks
        assert res["loop_bug"]["failing"] == [wrong] and res["trainer_bug"]["failing"] == [wrong, wrong], res
        assert all(res["loop_bug"]["reliable"] + res["trainer_bug"]["reliable"]), res
        for key in ("loop_fixed", "trainer_fixed"):  # the fixed kernel: quiet
            assert set(res[key]["verdicts"]) == {"pass"} and all(res[key]["reliable"]), (key, res[key])
        assert res["identical"] is True  # the Trainer's shards after a step, with and without the callback
        assert res["trainer_raise"] == "GradientCheckError"  # on_failure="raise" leaves train() on both ranks
        # too large to gather (max_shadow_bytes=1): the named kernel alone is gathered and checked, and fails
        too_big = res["too_big"]
        assert too_big["failing"] == [["transformer.h.1.mlp.act::input[0]"]] and too_big["whole"] == ["skipped"], res
        assert "max_shadow_bytes" in too_big["reason"], too_big
        # the check raising on rank 1 alone: rank 0 raised too, at the check's next collective
    for key in ("loop_check_raise", "trainer_check_raise"):
        assert results[1][key] == "planted: this process's check raised", results[1]
        assert "raised on 1 other rank(s) of 2" in results[0][key], results[0]
    # the same probes judged on the cross-rank means: the same numbers on both ranks
    for key in ("loop_bug", "loop_fixed", "trainer_bug", "trainer_fixed", "too_big"):
        assert results[0][key] == results[1][key], key


def _trainer_stub(**attributes):
    """A ``Trainer`` (not initialised) with ``attributes``, for the refusals alone."""
    trainer = object.__new__(Trainer)
    trainer.__dict__.update(callback_handler=SimpleNamespace(callbacks=[]), model=gpt2(), **attributes)
    return trainer


@pytest.mark.parametrize("attributes, found", [
    (dict(is_fsdp_enabled=True, accelerator=SimpleNamespace(state=SimpleNamespace(
        fsdp_plugin=SimpleNamespace(fsdp_version=1)), distributed_type="DistributedType.FSDP")),
     r"under FSDP1 \(fsdp_version=1, FullyShardedDataParallel\): .*FlatParameter"),
    (dict(is_deepspeed_enabled=True, accelerator=SimpleNamespace(distributed_type="DistributedType.DEEPSPEED")),
     r"under DeepSpeed: ZeRO partitions"),
], ids=["fsdp1", "deepspeed"])
def test_fsdp1_and_deepspeed_are_refused_naming_what_was_found_and_the_alternative(attributes, found) -> None:
    callback = GradWatchTrainerCallback()
    trainer = _trainer_stub(**attributes)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    args = SimpleNamespace(logging_dir=None)

    def train(self):  # noqa: ANN001  (on_train_begin finds the Trainer as `self` up the stack)
        callback.on_train_begin(args, state, None)

    with pytest.warns(UserWarning, match=found + r".*Training continues unchecked") as caught:
        train(trainer)
    assert "fsdp_config={'fsdp_version': 2}" in str(caught[0].message) and "DDP" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(trainer)  # once
    callback.on_step_begin(args, state, None)
    assert callback._pending is None and "compute_loss" not in trainer.__dict__  # nothing armed


# ----------------------------------------------------------------------------- API
def test_import_gradwatch_hf_does_not_import_transformers() -> None:
    code = (
        "import sys, gradwatch, gradwatch.hf\n"
        "assert gradwatch.GradWatchTrainerCallback is gradwatch.hf.GradWatchTrainerCallback\n"
        "assert 'transformers' not in sys.modules\n"
        "from gradwatch.hf import GradWatchTrainerCallback\n"
        "callback = GradWatchTrainerCallback()\n"
        "from transformers import TrainerCallback\n"
        "assert isinstance(callback, TrainerCallback) and isinstance(callback, GradWatchTrainerCallback)\n"
        "import copy, pickle\n"
        "assert all(type(c) is type(callback) for c in (copy.deepcopy(callback), pickle.loads(pickle.dumps(callback))))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"every_n_steps": 0}, ValueError, "`every_n_steps` must be a positive int, got 0"),
        ({"loss_fn": 3}, TypeError, "`loss_fn` must be callable"),
        ({"on_failure": "ignore"}, ValueError, "`on_failure`"),
        ({"max_overhead": 1.5}, ValueError, "`max_overhead`"),
        ({"options": {"precision": "fp32"}}, ValueError, "`precision`"),
        ({"sinks": [3]}, TypeError, "`sinks` must be None or a list of sinks"),
        ({"modules": "attn"}, ValueError, "`modules` must be None, 'suspects' or a list"),
        ({"modules": [1]}, ValueError, "`modules` must be None, 'suspects' or a list"),
        ({"capsules": 3}, ValueError, "`capsules` must be None, a bool or a directory path, got 3"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):  # the probe options are one object, validated when made
        GradWatchTrainerCallback(**{k: gradwatch.ProbeOptions(**v) if k == "options" else v for k, v in kwargs.items()})
    with pytest.raises(TypeError):
        GradWatchTrainerCallback(10)  # type: ignore[misc]  # keyword-only


def test_callback_outside_a_trainer_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"callbacks=\[GradWatchTrainerCallback\(\)\]"):
        GradWatchTrainerCallback().on_train_begin(None, None, None)
