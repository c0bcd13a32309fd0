"""A tiny transformer with attention dropout inside ``F.scaled_dot_product_attention``.

On CUDA under bf16/fp16 autocast, SDPA with ``dropout_p > 0`` runs the flash or
memory-efficient kernel, which draws its dropout mask with its own RNG; the float64
replay runs the math path, whose mask differs. This script trains the model for a few
steps with :class:`gradwatch.GradWatch` checking every step under autocast, and prints
each report's verdict, reliability and reason, with ``dropout_p=0`` as the control.
It judges nothing itself: it shows what gradwatch says (a silent wrong verdict would be
a "fail" on this correct model, or a "pass" whose replayed loss does not match).

Run:  python benchmarks/sdpa_dropout.py                      (CPU)
      python benchmarks/sdpa_dropout.py --device cuda
"""

from __future__ import annotations

import argparse
import collections
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from _common import add_common_args, header


class TinyAttention(nn.Module):
    """Embedding, one pre-norm causal self-attention block (SDPA with dropout), mean pool, head."""

    def __init__(self, vocab: int = 64, d: int = 64, heads: int = 4, classes: int = 5, dropout_p: float = 0.1) -> None:
        super().__init__()
        self.heads, self.dropout_p = heads, dropout_p
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0, is_causal=True)
        h = h + self.out(a.transpose(1, 2).reshape(b, t, d))
        return self.head(h.mean(1))


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def run(device: str, dropout_p: float, dtype: torch.dtype, steps: int, batch: int, seq: int) -> None:
    torch.manual_seed(0)
    model = TinyAttention(dropout_p=dropout_p).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    device_type = torch.device(device).type
    scaler = torch.amp.GradScaler(device_type) if dtype == torch.float16 else None
    watch = gradwatch.GradWatch(model, loss_fn, every_n_steps=1, max_overhead=None, seed=0, scaler=scaler,
                                on_failure=lambda report: None)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        data = (torch.randint(0, 64, (batch, seq), generator=g).to(device),
                torch.randint(0, 5, (batch,), generator=g).to(device))
        opt.zero_grad()
        with watch.step(data):
            with torch.autocast(device_type, dtype=dtype):
                loss = loss_fn(model, data)
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    for step, r in watch.reports:
        verdicts = collections.Counter(t.verdict for t in r.tensors.values())
        print(f"dropout_p={dropout_p:<4} {str(dtype)[6:]:9} step {step}: verdict {r.verdict:8} reliable "
              f"{str(r.reliable):5} train_loss {r.train_loss:.6g} replay_loss {r.replay_loss:.6g} "
              f"grad_precision {r.grad_precision} tensors {dict(verdicts)} {r.seconds:.2f}s")
        if r.reason:
            print(f"    reason: {r.reason}")
        for t in r.failures:
            print(f"    {t.message}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    header(args)
    warnings.simplefilter("ignore")
    logging.getLogger("gradwatch").setLevel(logging.ERROR)
    if args.device.startswith("cuda"):
        b = torch.backends.cuda
        print(f"# SDPA backends enabled: flash {b.flash_sdp_enabled()}, mem_efficient {b.mem_efficient_sdp_enabled()}, "
              f"math {b.math_sdp_enabled()}; cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32}, "
              f"matmul.allow_tf32 {torch.backends.cuda.matmul.allow_tf32}")
    for dtype in args.dtypes:
        for dropout_p in (0.0, 0.1):
            run(args.device, dropout_p, getattr(torch, dtype), args.steps, args.batch, args.seq)


if __name__ == "__main__":
    main()
