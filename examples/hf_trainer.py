"""Train a tiny GPT-2 with the Hugging Face ``Trainer`` after patching a hand-written GELU
kernel with a planted backward bug into every block.

``FusedGELU`` is written the way patched kernels are (a fused Triton/CUDA activation
wrapped in an ``autograd.Function``): ``forward`` computes GPT-2's tanh GELU and
``backward`` returns a hand-derived gradient. The planted bug drops the ``3·0.044715·x²``
term of the derivative of the tanh argument: the loss still falls, nothing looks wrong,
and every tensor upstream of an activation gets a slightly wrong gradient. One line,
``callbacks=[GradWatchTrainerCallback()]``, catches it and names the tensors.

The model is built from a config (no download); the data are generated token sequences
that follow ``(a + b·t) mod 64``. The Trainer logs to TensorBoard under
``<output>/runs/``, gradwatch's keys included.

Run:
    python examples/hf_trainer.py            # catches the planted bug
    python examples/hf_trainer.py --fixed    # the correct backward passes
    tensorboard --logdir hf_trainer_output/runs
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments

from gradwatch import Report
from gradwatch.hf import GradWatchTrainerCallback

VOCAB, SEQ = 64, 24
_C = math.sqrt(2 / math.pi)


class FusedGELUFn(torch.autograd.Function):
    """GPT-2's ``0.5·x·(1 + tanh(c·(x + 0.044715·x³)))`` with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, planted_bug):
        t = torch.tanh(_C * (x + 0.044715 * x.pow(3)))
        ctx.save_for_backward(x, t)
        ctx.planted_bug = planted_bug
        return 0.5 * x * (1 + t)

    @staticmethod
    def backward(ctx, grad_out):
        x, t = ctx.saved_tensors
        inner = _C if ctx.planted_bug else _C * (1 + 3 * 0.044715 * x.pow(2))  # the bug: the cubic term's derivative
        return grad_out * (0.5 * (1 + t) + 0.5 * x * (1 - t.pow(2)) * inner), None


class FusedGELU(nn.Module):
    def __init__(self, planted_bug: bool) -> None:
        super().__init__()
        self.planted_bug = planted_bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FusedGELUFn.apply(x, self.planted_bug)


class Progressions(Dataset):
    """Token sequences ``(a + b·t) mod VOCAB``: learnable, so the loss falls."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randint(0, VOCAB, (n, 1), generator=g), torch.randint(1, 8, (n, 1), generator=g)
        self.ids = (a + b * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def causal_lm_loss(model: nn.Module, inputs: dict) -> torch.Tensor:
    """GPT-2's loss as the Trainer backpropagates it (summed token cross-entropy over the
    Trainer's label count), kept in the logits' dtype so that gradwatch can evaluate it in
    float64 (the model's own loss casts the logits to float32)."""
    logits = model(input_ids=inputs["input_ids"]).logits
    total = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), inputs["labels"][:, 1:].reshape(-1), reduction="sum")
    return total / inputs["num_items_in_batch"]


def build_model(*, planted_bug: bool, seed: int = 0) -> GPT2LMHeadModel:
    """A tiny random-init GPT-2 with ``FusedGELU`` patched into every block (``planted_bug``: the wrong backward).

    Example:
        >>> model = build_model(planted_bug=True)  # doctest: +SKIP
    """
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                       bos_token_id=0, eos_token_id=0))
    for block in model.transformer.h:  # the "kernel" patched into every block
        block.mlp.act = FusedGELU(planted_bug=planted_bug)
    return model


def main(argv: list[str] | None = None) -> GradWatchTrainerCallback:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default 40)")
    parser.add_argument("--every", type=int, default=20, help="check every N steps (default 20)")
    parser.add_argument("--output", default="hf_trainer_output", help="the Trainer's output_dir")
    parser.add_argument("--fixed", action="store_true", help="use the correct backward")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", ".*loss_type=None.*")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = build_model(planted_bug=not args.fixed, seed=args.seed)
    failures: list[Report] = []
    # max_overhead=None: a demonstration, so every check probes every tensor; in real
    # training keep the default budget (2% of the training time, spent in turn over the tensors)
    callback = GradWatchTrainerCallback(every_n_steps=args.every, max_overhead=None, seed=args.seed,
                                        loss_fn=causal_lm_loss, on_failure=failures.append)
    training = TrainingArguments(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=3e-3,
        max_grad_norm=1.0, report_to="tensorboard", logging_steps=10, save_strategy="no", use_cpu=True,
        disable_tqdm=True, seed=args.seed,
    )
    trainer = Trainer(model=model, args=training, train_dataset=Progressions(512, args.seed), callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # the losses go to TensorBoard, not to stdout
    loss = trainer.train().training_loss

    checks = len(callback.reports)
    if failures:
        failing = sorted({t.name for r in failures for t in r.failures})
        print(f"gradwatch: FAIL in {len(failures)} of {checks} checks, {len(failing)} tensors - "
              f"{failures[0].failures[0].short_message} (mean loss {loss:.2f})")
    else:
        print(f"gradwatch: PASS in all {checks} checks (mean loss {loss:.2f})")
    print(f"view the logs: tensorboard --logdir {args.output}/runs")
    return callback


if __name__ == "__main__":
    main()
