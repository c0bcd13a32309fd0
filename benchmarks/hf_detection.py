"""Time to name a planted bug in tiny Hugging Face models trained with `GradWatch` at its defaults.

Run:  python benchmarks/hf_detection.py                       (7 models x 2 seeds, both plants)
      python benchmarks/hf_detection.py --plant hook --models bert convnext
      python benchmarks/hf_detection.py --correct --every 25 --steps 200   (false alarms, full checks)

Each run builds a model from a tiny random-init config (GPT-2, Llama, BERT, T5, ConvNeXt, ResNet,
ViT; no download), plants a bug in one deep weight, and trains it ``--steps`` AdamW steps on
random batches with ``gradwatch.GradWatch(model, loss_fn, seed=seed)`` (defaults: a check at
step 0, then as the 2% overhead budget allows). The bug: the weight's gradient is 2% too large
on the first eighth of its rows, either in a custom ``autograd.Function`` that replaces the
layer's forward (``--plant function``: the backward code is wrong, a module-local suspect) or in
a tensor hook on the weight (``--plant hook``: ``.grad`` is edited, the backward is right).

Prints one line per run: the step that named the weight (``-``: never), other tensors that
failed, the number of checks, the check time as a share of the training time (the schedule's
own accounting), and the weight's verdict and resolving power at step 0; then a summary.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import add_common_args, header  # noqa: E402

VOCAB = 64


def _tokens(gen: torch.Generator, shape: tuple[int, int] = (4, 12)) -> torch.Tensor:
    return torch.randint(2, VOCAB, shape, generator=gen)


def _images(gen: torch.Generator, size: int) -> dict:
    return {"pixel_values": torch.randn(4, 3, size, size, generator=gen),
            "labels": torch.randint(0, 5, (4,), generator=gen)}


def _lm(gen: torch.Generator) -> dict:
    ids = _tokens(gen)
    return {"input_ids": ids, "labels": ids}


def _models(t):
    """name -> (builder, the deep layer planted, batch maker); ``t`` is ``transformers``."""
    return {
        "gpt2": (lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                                         n_head=2)),
                 "transformer.h.1.mlp.c_proj", _lm),
        "llama": (lambda: t.LlamaForCausalLM(t.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0)),
            "model.layers.1.mlp.down_proj", _lm),
        "bert": (lambda: t.BertForMaskedLM(t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=2, intermediate_size=64,
                                                         max_position_embeddings=32)),
                 "bert.encoder.layer.1.output.dense", _lm),
        "t5": (lambda: t.T5ForConditionalGeneration(t.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)),
            "encoder.block.1.layer.1.DenseReluDense.wo", lambda g: {"input_ids": _tokens(g), "labels": _tokens(g, (4, 8))}),
        "convnext": (lambda: t.ConvNextForImageClassification(t.ConvNextConfig(
            num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5, image_size=32,
            patch_size=4)),  # layer scale 1e-6: pwconv2's gradient is ~1e-6 of the model's
            "convnext.encoder.stages.1.layers.0.pwconv2", lambda g: _images(g, 32)),
        "resnet": (lambda: t.ResNetForImageClassification(t.ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=5)),
            "resnet.encoder.stages.1.layers.0.layer.1.convolution", lambda g: _images(g, 32)),
        "vit": (lambda: t.ViTForImageClassification(t.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=5)),
            None, lambda g: _images(g, 16)),  # its fc2 is named vit.layers.1.mlp.fc2 or vit.encoder.layer.1.output.dense
    }


def _rows(n: int) -> slice:
    return slice(0, max(1, n // 8))


class _Linear(torch.autograd.Function):
    """``F.linear`` whose weight gradient is 2% too large on the first eighth of the rows."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        gw[_rows(w.shape[0])] *= 1.02
        return g @ w, gw, g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias else None


class _Conv1D(torch.autograd.Function):
    """GPT-2's ``Conv1D`` (``x @ W + b``, W of shape (in, out)), output rows = W's columns, 2% off."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x @ w + b

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gw = x.reshape(-1, x.shape[-1]).t() @ g.reshape(-1, g.shape[-1])
        gw[:, _rows(w.shape[1])] *= 1.02
        return g @ w.t(), gw, g.reshape(-1, g.shape[-1]).sum(0)


class _Conv2d(torch.autograd.Function):
    """A bias-free ``F.conv2d`` whose weight gradient is 2% too large on the first eighth of the filters."""

    @staticmethod
    def forward(ctx, x, w, stride, padding):
        ctx.save_for_backward(x, w)
        ctx.geometry = stride, padding
        return F.conv2d(x, w, None, stride, padding)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = torch.nn.grad.conv2d_input(x.shape, w, g, *ctx.geometry)
        gw = torch.nn.grad.conv2d_weight(x, w.shape, g, *ctx.geometry)
        gw[_rows(w.shape[0])] *= 1.02
        return gx, gw, None, None


def _plant(model: nn.Module, path: str, plant: str) -> str:
    """Plant the bug in ``path``'s weight; returns the weight's name."""
    module = model.get_submodule(path)
    if plant == "hook":
        rows = _rows(module.weight.shape[0])

        def edit(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            grad[rows] *= 1.02
            return grad

        module.weight.register_hook(edit)
    elif isinstance(module, nn.Linear):
        module.forward = lambda x, m=module: _Linear.apply(x, m.weight, m.bias)
    elif isinstance(module, nn.Conv2d):
        module.forward = lambda x, m=module: _Conv2d.apply(x, m.weight, m.stride, m.padding)
    else:  # transformers' Conv1D
        module.forward = lambda x, m=module: _Conv1D.apply(x, m.weight, m.bias)
    return f"{path}.weight"


def _run(t, gradwatch, name: str, seed: int, args) -> dict:
    build, path, data = _models(t)[name]
    torch.manual_seed(seed)
    model = build().train()
    if path is None:  # ViT: the second layer's fc2, named as this transformers version names it
        path = next(n for n in ("vit.layers.1.mlp.fc2", "vit.encoder.layer.1.output.dense")
                    if n in dict(model.named_modules()))
    target = None if args.correct else _plant(model, path, args.plant)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss_fn(m, batch):
        return m(**batch).loss

    budget = {"every_n_steps": args.every, "max_overhead": None} if args.every else {}
    watch = gradwatch.GradWatch(model, loss_fn, seed=seed, on_failure=lambda report: None, **budget)
    gen = torch.Generator().manual_seed(1000 + seed)
    found, others, checks = None, set(), 0
    started = time.perf_counter()
    for step in range(args.steps):
        batch = data(gen)
        optimizer.zero_grad()
        with watch.step(batch):
            loss_fn(model, batch).backward()
        optimizer.step()
        if watch.reports and watch.reports[-1][0] == step:
            checks += 1
            for failed in watch.reports[-1][1].failures:
                if failed.name.replace("::", ".") == target:  # whole-model name, or a module-local one
                    found = step if found is None else found
                else:
                    others.add(failed.name)
    total = time.perf_counter() - started
    schedule = watch._watch.schedule
    share = schedule.check_seconds / max(total - schedule.check_seconds, 1e-9)
    first = watch.reports[0][1].tensors.get(target) if target else None
    return {"name": name, "seed": seed, "found": found, "others": sorted(others), "checks": checks, "share": share,
            "first": (first.verdict, first.resolving_power) if first is not None else None,
            "first_seconds": watch.reports[0][1].seconds, "total": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help="model names (default: all seven)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--plant", nargs="*", default=["function", "hook"], choices=["function", "hook"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=0,
                        help="check every N steps with no overhead budget (default 0: GradWatch's defaults)")
    parser.add_argument("--correct", action="store_true", help="no planted bug: count false alarms")
    add_common_args(parser)
    args = parser.parse_args()
    header(args)
    warnings.filterwarnings("ignore")
    logging.getLogger("gradwatch").setLevel(logging.ERROR)
    import transformers

    import gradwatch

    transformers.logging.set_verbosity_error()
    names = args.models or list(_models(transformers))
    for plant in ([None] if args.correct else args.plant):
        args.plant = plant
        rows = []
        for name in names:
            for seed in args.seeds:
                r = _run(transformers, gradwatch, name, seed, args)
                rows.append(r)
                first = "-" if r["first"] is None else f"{r['first'][0]} (resolving {r['first'][1]:.2g})"
                print(f"{plant or 'correct':8s} {name:9s} seed {seed}  named at step "
                      f"{'-' if r['found'] is None else r['found']:>3}  other failures {len(r['others'])}  "
                      f"checks {r['checks']:2d}  check share {r['share']:6.1%}  first check {r['first_seconds']:.2f} s "
                      f"of {r['total']:.1f} s  step-0 verdict {first}", flush=True)
        shares = [r["share"] for r in rows]
        if args.correct:
            alarms = sum(bool(r["others"]) for r in rows)
            print(f"# correct: {alarms}/{len(rows)} runs with a failure; ", end="")
        else:
            named = sum(r["found"] is not None for r in rows)
            print(f"# {plant}: named in {named}/{len(rows)} runs within {args.steps} steps; ", end="")
        print(f"check share median {statistics.median(shares):.1%}, max {max(shares):.1%}", flush=True)


if __name__ == "__main__":
    main()
