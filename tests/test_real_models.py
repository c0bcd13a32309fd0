"""Real third-party model code: Hugging Face ``transformers`` models from tiny random-init
configs (no download), trained with their own loss or a plain one.

They cast to lower precisions inside the forward (``logits.float()`` before the loss,
LlamaRMSNorm/T5LayerNorm in float32, ``position_ids.float()`` in the rotary embedding) and
draw dropout masks: gradwatch must verify every tensor of a correct model, and catch and
name a planted backward bug in one deep linear layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 48


def _gpt2(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).train()  # dropout 0.1 in embeddings, attention and residuals


def _llama(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).train()


def _t5(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(config).train()  # dropout 0.1


def _tokens(seed: int, shape: tuple[int, int] = (2, 7)) -> torch.Tensor:
    return torch.randint(2, VOCAB, shape, generator=torch.Generator().manual_seed(100 + seed))


def own_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's own loss: Hugging Face computes it after ``logits.float()``."""
    return model(**batch).loss


def plain_t5_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


def _causal(seed: int) -> dict:
    ids = _tokens(seed)
    return {"input_ids": ids, "labels": ids}


def _seq2seq(seed: int) -> dict:
    return {"input_ids": _tokens(seed), "decoder_input_ids": _tokens(seed + 50, (2, 5)),
            "labels": _tokens(seed + 60, (2, 5))}


CASES = {
    "gpt2": (_gpt2, own_loss, _causal),
    "llama": (_llama, own_loss, _causal),
    "t5": (_t5, plain_t5_loss, _seq2seq),
}


# every tensor at the defaults of gradwatch.check; the planted-bug tests below check the other
# tensors of Llama (seed 1) and T5's encoder feed-forward block too (the file stays under a minute)
@pytest.mark.parametrize(("name", "seed"), [("gpt2", 0), ("llama", 0), ("t5", 0)])
def test_correct_real_model_is_verified(name: str, seed: int) -> None:
    build, loss_fn, data = CASES[name]
    model = build(seed)
    report = gradwatch.check(model, loss_fn, data(seed), seed=seed)
    assert report.reliable, report.reason  # before: "returned a float32 loss on the float64 copy" (own loss)
    assert report.ok, str(report)
    verdicts = {t.verdict for t in report.tensors.values()}
    assert verdicts <= {"pass", "kink"} and "pass" in verdicts, str(report)
    assert report.kept_casts > 0  # the .float() casts were kept in float64 ...
    assert report.replay_loss == pytest.approx(report.train_loss, rel=1e-5)  # ... and the dropout masks replayed


class _BuggyLinearFn(torch.autograd.Function):
    """``x @ W.T + b`` whose weight gradient is 2% too large on the first eighth of the rows."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        grad_w[: max(1, weight.shape[0] // 8)] *= 1.02
        return grad @ weight, grad_w, None


class _BuggyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BuggyLinearFn.apply(x, self.weight, self.bias)


def _plant(model: nn.Module, path: str) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, attr)
    new = _BuggyLinear(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    setattr(parent, attr, new)


@pytest.mark.parametrize(
    ("name", "layer", "names"),
    [
        ("llama", "model.layers.0.mlp.down_proj", None),  # the deepest MLP of two layers, every tensor checked
        ("t5", "encoder.block.0.layer.1.DenseReluDense.wo", "encoder.block.0.layer.1."),  # under the decoder
    ],
)
def test_planted_bug_in_a_deep_linear_is_caught_and_named(name: str, layer: str, names: str | None) -> None:
    build, loss_fn, data = CASES[name]
    model = build(1)
    _plant(model, layer)
    if names is not None:
        names = [n for n, _ in model.named_parameters() if n.startswith(names)]
        assert len(names) == 3
    report = gradwatch.check(model, loss_fn, data(1), seed=1, names=names)
    assert report.reliable, report.reason
    assert [t.name for t in report.failures] == [f"{layer}.weight"], str(report)
    assert report.failures[0].message.startswith(f"'{layer}.weight'")


@pytest.mark.parametrize("seed", [0, 1])
def test_a_hook_that_edits_an_eighth_of_a_deep_bert_weight_by_two_percent_fails_the_first_watched_step(
        seed: int) -> None:
    """GradWatch at its defaults: step 0 is the smallest check (the joint probe alone). Before, the
    gap of ``.grad`` from the float64 reference was judged against 1% of it, then against a floor
    of ``8·eps·|L|`` per element (2% of this layer's gradient RMS): the hook passed, claiming a
    resolving power of 6e-4."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertForMaskedLM(config).train()  # dropout 0.1, replayed
    weight = model.bert.encoder.layer[1].output.dense.weight

    def edit(grad):
        grad = grad.clone()
        grad[: weight.shape[0] // 8] *= 1.02
        return grad

    weight.register_hook(edit)
    ids = torch.randint(2, 64, (4, 12), generator=torch.Generator().manual_seed(seed))
    batch = {"input_ids": ids, "labels": ids}
    watch = gradwatch.GradWatch(model, own_loss, seed=seed, on_failure=lambda report: None)
    with watch.step(batch):
        own_loss(model, batch).backward()
    report = watch.last_report
    assert [t.name for t in report.failures] == ["bert.encoder.layer.1.output.dense.weight"], str(report)
