"""The LM head and loss alone, forward + backward, on one GPU: upstream's output GEMM + cross-entropy
against the package's fused linear cross-entropy (``FusedLossGPTModel``'s path), same tensors.

    python scripts/bench_lm_loss.py [--tokens 8192] [--hidden 4096] [--vocab 131072] [--iters 10]
        [--profile]   # ours: device time per kernel name (torch.profiler)

Variants (each: forward, then backward of ``c * sum(loss * loss_mask)`` as pretrain_gpt's
``loss_func`` and the schedule do):

* ``upstream``: ``hidden @ W^T`` (bf16 logits), ``tensor_parallel.vocab_parallel_cross_entropy``
  (megatron-core's default: an fp32 copy of the logits, its softmax kept for backward);
* ``upstream_te``: the same GEMM, TE's fused cross-entropy (``--cross-entropy-loss-fusion
  --cross-entropy-fusion-impl te``);
* ``ours``: ``fused_linear_cross_entropy(..., loss_mask=...)``: gradients in forward, scaled in backward;
* ``ours_recompute``: the per-token entry without the mask (logits blocks recomputed in backward).

Prints the median ms per forward + backward, peak memory above the inputs, and ratios to upstream.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("upstream", "upstream_te", "ours", "ours_recompute")


def _init_megatron() -> None:
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


def _marked(weight: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(weight, True, 0, 1)
    return weight


def step_fn(variant: str, hidden, weight, labels, mask, scale: float):
    """One forward + backward of ``variant``; returns a callable (imports resolved outside it)."""
    from megatron.core import parallel_state, tensor_parallel

    from megacpp_mcore.features.mtp.fused_ce import fused_linear_cross_entropy

    if variant == "upstream_te":
        from megatron.core.extensions.transformer_engine import te_parallel_cross_entropy

        tp_group = parallel_state.get_tensor_model_parallel_group()

    def run():
        hidden.grad = weight.grad = None
        if variant.startswith("upstream"):
            logits = (hidden @ weight.t()).unsqueeze(1)  # [s, b=1, V]
            if variant == "upstream":
                loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels[:, None])
            else:
                loss = te_parallel_cross_entropy(logits, labels[:, None], tp_group)
            loss = loss.view(-1)
        else:
            loss = fused_linear_cross_entropy(hidden, weight, labels,
                                              loss_mask=mask if variant == "ours" else None)
        (scale * (loss.float() * mask).sum()).backward()

    return run


def measure(run, iters: int, warmup: int = 2) -> tuple[float, float]:
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def profile(run, top: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    run()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(event.name[:90], [0.0, 0])
            entry[0] += event.device_time_total / 1e3
            entry[1] += 1
    print("\nours, device time by kernel (ms, calls):")
    for name, (ms, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {ms:8.2f} {calls:4d}  {name}")
    print(f"  {sum(v[0] for v in totals.values()):8.2f}       total")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        print(f"--variants {args.variants}: unknown {bad or 'empty'}; allowed: {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_lm_loss: needs a CUDA GPU", file=sys.stderr)
        return 2
    _init_megatron()
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = _marked((torch.randn(args.vocab, args.hidden, device="cuda", generator=g) * 0.02)
                     .bfloat16().requires_grad_())
    labels = torch.randint(0, args.vocab, (args.tokens,), device="cuda", generator=g)
    mask = torch.ones(args.tokens, device="cuda")
    scale = 1.0 / args.tokens
    rows = {}
    for variant in variants:
        try:
            rows[variant] = measure(step_fn(variant, hidden, weight, labels, mask, scale), args.iters)
        except Exception as exc:  # noqa: BLE001 (an unavailable variant is reported, not fatal)
            rows[variant] = None
            print(f"{variant}: failed: {type(exc).__name__}: {str(exc)[:200]}")
        torch.cuda.empty_cache()
    print(f"\ntokens {args.tokens}, hidden {args.hidden}, vocab {args.vocab}, bf16, "
          f"{torch.cuda.get_device_name()}")
    print("| variant | ms fwd+bwd | peak GiB above inputs | vs upstream |")
    print("|---|---|---|---|")
    ref = rows.get("upstream")
    for variant, row in rows.items():
        if row is None:
            print(f"| {variant} | failed | - | - |")
            continue
        ratio = f"{ref[0] / row[0]:.3f}x" if ref else "-"
        print(f"| {variant} | {row[0]:.2f} | {row[1]:.2f} | {ratio} |")
    if args.profile:
        profile(step_fn("ours", hidden, weight, labels, mask, scale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
