"""Module-local checks and reference comparison of a custom attention op, in training.

The op is tests/_attn_op.py's ``torch.library.custom_op`` (forward raises on float64) with
planted backward bugs: dq without the softmax scale, dk from dS instead of dSᵀ, and a
backward that reads ``grad_output`` as if it were contiguous (its consumer is torch.cat, so
it is not). A small model (projections, the op, torch.cat, a head) trains under
``GradWatch`` (default modules="suspects", the op's module registered with its plain-PyTorch
reference); per precision and case it prints over the seeds: the checks whose module-local
failures were exactly the expected op inputs, the same for the reference comparison, the
smallest error/tolerance on a wrong input (local check and reference), the largest on a
correct one, the seconds of the local checks, and on CUDA the peak memory a check added.

Run:  python benchmarks/local_check.py                 (CPU)
      python benchmarks/local_check.py --device cuda
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import gradwatch
from _common import add_common_args, header
from tests._attn_op import BUG, FusedAttention, reference_attention

CASES = {"correct": set(), "dq": {"attn::input[0]"}, "dk": {"attn::input[1]"},
         "contiguous": {"attn::input[0]", "attn::input[1]", "attn::input[2]"}}


class Net(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, 3 * d)
        self.attn = FusedAttention()
        self.head = nn.Linear(2 * d, 3)

    def forward(self, x):
        q, k, v = self.inp(x).chunk(3, -1)
        return self.head(torch.cat([self.attn(q, k, v), v], -1)).mean(1)


def loss_fn(model, batch):
    return nn.functional.cross_entropy(model(batch[0]).float(), batch[1])


def run(device: str, precision: str, case: str, seed: int, d: int, length: int):
    BUG["mode"] = None if case == "correct" else case
    torch.manual_seed(seed)
    model = Net(d).to(device)
    gen = torch.Generator().manual_seed(seed)
    batch = (torch.randn(4, length, d, generator=gen).to(device), torch.randint(0, 3, (4,), generator=gen).to(device))
    watch = gradwatch.GradWatch(model, loss_fn, every_n_steps=1, max_overhead=None, seed=seed,
                                on_failure=lambda r: None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with watch.step(batch):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            loss = loss_fn(model, batch)
        loss.backward()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.startswith("cuda") else float("nan")
    report = watch.last_report
    local = {n: t for n, t in report.tensors.items() if n.startswith("attn::")}
    refs = {r.name: r for r in report.references if r.quantity.startswith("input[")}
    seconds = sum(m.seconds for m in report.modules)
    return local, refs, seconds, peak, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--dim", type=int, default=16, help="head dimension (default 16)")
    parser.add_argument("--length", type=int, default=32, help="sequence length (default 32)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    header(args)
    gradwatch.register_reference(FusedAttention, reference_attention)
    print(f"# attention op, batch 4, length {args.length}, dim {args.dim}; {args.seeds} seeds per row")
    print(f"{'precision':15} {'case':11} {'local exact':>11} {'ref exact':>9} {'min err/tol wrong (local, ref)':>31} "
          f"{'max err/tol right (local, ref)':>31} {'local s':>8} {'peak MiB':>9}  local precision")
    for precision in ("fp32", "bf16-autocast"):
        for case, wrong in CASES.items():
            exact_l = exact_r = 0
            min_wrong, max_right = [float("inf")] * 2, [0.0] * 2
            secs, peaks, precs = [], [], set()
            for seed in range(args.seeds):
                local, refs, seconds, peak, report = run(args.device, precision, case, seed, args.dim, args.length)
                exact_l += {n for n, t in local.items() if t.verdict == "fail"} == wrong
                exact_r += {n for n, r in refs.items() if r.failed} == wrong
                for n, t in local.items():
                    i = 0
                    if n in wrong:
                        min_wrong[i] = min(min_wrong[i], t.error_ratio)
                    else:
                        max_right[i] = max(max_right[i], t.error_ratio)
                for n, r in refs.items():
                    if n in wrong:
                        min_wrong[1] = min(min_wrong[1], r.error_ratio)
                    else:
                        max_right[1] = max(max_right[1], r.error_ratio)
                secs.append(seconds)
                peaks.append(peak)
                precs.update(m.precision for m in report.modules)
            fmt = lambda pair: ", ".join("-" if v in (float("inf"), 0.0) and not wrong and pair is min_wrong
                                         else f"{v:.3g}" for v in pair)
            print(f"{precision:15} {case:11} {exact_l:>5}/{args.seeds:<5} {exact_r:>3}/{args.seeds:<5} "
                  f"{fmt(min_wrong):>31} {fmt(max_right):>31} {sum(secs) / len(secs):8.3f} "
                  f"{max(peaks):9.1f}  {', '.join(sorted(precs))}")
    BUG["mode"] = None


if __name__ == "__main__":
    main()
