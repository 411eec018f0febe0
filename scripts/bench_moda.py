"""MoDA on one GPU: step time and peak memory versus the same model without MoDA, in one run.

    python scripts/bench_moda.py                         # seq 4096 and 16384, TE backend, bf16
    python scripts/bench_moda.py --seq 4096 --out moda.json

For every sequence length it builds the model through megatron-core (``runtime.build_model``,
Megatron DDP + Adam, bf16) as ``base`` (plain TE attention on every ``A`` layer), ``moda`` (MoDA on
every ``A`` layer, detached buffer, FlashAttention-2 sequence kernel) and ``moda-cudnn`` (same, cuDNN
sequence kernel), trains ``--warmup`` + ``--steps`` steps on synthetic batches and
reports ms/step and ``torch.cuda.max_memory_allocated``. Targets (issue 7): step-time ratio
moda/base <= 1.10, and the peak-memory increase within 10% of ``depth_kv_bytes`` (the formula),
which is also checked against the bytes the buffer actually allocated (``megacpp_stats``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[4096, 16384], help="sequence lengths")
    p.add_argument("--batch", type=int, default=2, help="micro-batch size (one micro-batch per step)")
    p.add_argument("--pattern", default="AE", help="NAM56R pattern; MoDA goes on every A layer")
    p.add_argument("--layers", type=int, default=16, help="sub-layers (AE x 8 = 8 attention + 8 MLP)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-groups", type=int, default=None, help="GQA groups (default: heads)")
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="te", choices=["te", "local", "auto"])
    p.add_argument("--variants", nargs="+", default=["base", "moda", "moda-cudnn"],
                   choices=["base", "moda", "moda-cudnn"],
                   help="moda: FlashAttention-2 sequence kernel; moda-cudnn: cuDNN sequence kernel")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def check_environment(args) -> None:
    problems = []
    if not torch.cuda.is_available():
        problems.append("no CUDA device visible (this benchmark needs one GPU)")
    if args.hidden % args.heads:
        problems.append(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    head_dim = args.hidden // args.heads
    if head_dim > 256 or head_dim % 8:
        problems.append(f"head dim {head_dim} must be <= 256 and divisible by 8 (flash attention)")
    if args.kv_groups is not None and args.heads % args.kv_groups:
        problems.append(f"--kv-groups {args.kv_groups} must divide --heads {args.heads}")
    if "A" not in args.pattern:
        problems.append(f"--pattern {args.pattern!r} has no 'A' layer to put MoDA on")
    if problems:
        sys.exit("bench_moda: " + "; ".join(problems))
    if args.backend == "te":
        from megacpp_mcore import backends

        backends.resolve_backend_name("te")  # raises with what to install


def model_config(args, seq: int, variant: str):
    from megacpp_mcore.moda import MoDAConfig
    from megacpp_mcore.presets import custom_model

    return custom_model(
        pattern=args.pattern, num_layers=args.layers, hidden_size=args.hidden,
        num_attention_heads=args.heads, num_query_groups=args.kv_groups, ffn_hidden_size=args.ffn,
        vocab_size=args.vocab, seq_length=seq, moe=None, mla=None, mtp_depth=0,
        features={} if variant == "base" else
        {"moda": MoDAConfig(cuda_kernel="cudnn" if variant == "moda-cudnn" else "flash")},
    )


def run_variant(args, seq: int, variant: str) -> dict:
    from megacpp_mcore import runtime
    from megacpp_mcore.moda import DepthAwareAttention
    from megacpp_mcore.testing.parity import synthetic_batches

    start_allocated = torch.cuda.memory_allocated()  # leftovers of the previous variant would show here
    m = model_config(args, seq, variant)
    config = runtime.transformer_config(m, runtime.Parallelism())  # bf16 on CUDA
    chunks = runtime.build_model(m, config, backend=args.backend)
    optimizer = runtime.build_optimizer(chunks, lr=1e-4)

    def step(i: int) -> dict:
        micro = synthetic_batches(seed=0, step=i, global_batch=args.batch, seq_length=seq,
                                  vocab=args.vocab, dp_rank=0, dp=1, micro_batch_size=args.batch)
        return runtime.train_step(chunks, optimizer, iter(micro), num_microbatches=1,
                                  micro_batch_size=args.batch, seq_length=seq)

    for i in range(args.warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step(args.warmup + i)["loss"] for i in range(args.steps)]
    torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) / args.steps
    result = {
        "variant": variant, "seq": seq, "ms_per_step": elapsed * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_bytes": torch.cuda.max_memory_allocated(), "final_loss": losses[-1],
        "start_allocated_bytes": start_allocated,
    }
    cores = [mod for c in chunks for mod in c.modules() if isinstance(mod, DepthAwareAttention)]
    if cores:
        result["observed_kernel"] = sorted({c.observed_kernel for c in cores})
        result["buffer_bytes_allocated"] = int(sum(
            c.megacpp_stats().get("moda_buffer_bytes", 0) for c in cores))
        result["buffer_bytes_formula"] = m.features["moda"].buffer_bytes(
            m, args.batch, dtype=config.params_dtype)
    del chunks, optimizer, cores
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    check_environment(args)
    from megacpp_mcore import runtime

    runtime.initialize(runtime.Parallelism(), seed=1234)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  backend {args.backend}  "
          f"model {args.pattern} x {args.layers}, hidden {args.hidden}, heads {args.heads}, batch {args.batch}")
    results = []
    for seq in args.seq:
        for variant in args.variants:
            try:
                res = run_variant(args, seq, variant)
            except Exception as exc:  # OOM or a kernel refusing the shape: record it, go on
                res = {"variant": variant, "seq": seq, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                gc.collect()
                torch.cuda.empty_cache()
            print(json.dumps(res), flush=True)
            results.append(res)
    summary = summarize(results)
    print(format_table(results, summary))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "results": results, "summary": summary}, fh, indent=1)
    runtime.shutdown()
    return 0


def summarize(results: list[dict]) -> list[dict]:
    out = []
    for seq in sorted({r["seq"] for r in results}):
        by = {r["variant"]: r for r in results if r["seq"] == seq and "error" not in r}
        base = by.get("base")
        for name in ("moda", "moda-cudnn"):
            moda = by.get(name)
            if base is None or moda is None:
                continue
            increase = moda["peak_bytes"] - base["peak_bytes"]
            formula = moda["buffer_bytes_formula"]
            ratio = moda["ms_per_step"] / base["ms_per_step"]
            out.append({
                "seq": seq, "variant": name,
                "step_time_ratio": ratio,
                "peak_increase_bytes": increase,
                "formula_bytes": formula,
                "increase_over_formula": increase / formula if formula else float("nan"),
                "allocated_equals_formula": moda["buffer_bytes_allocated"] == formula,
                "time_ok": ratio <= 1.10,
                "memory_ok": formula > 0 and abs(increase / formula - 1) <= 0.10,
            })
    return out


def format_table(results: list[dict], summary: list[dict]) -> str:
    lines = ["", "| seq | variant | ms/step | peak GiB | kernel |", "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['variant']} | {r['error']} | | |")
        else:
            lines.append(f"| {r['seq']} | {r['variant']} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} | "
                         f"{','.join(r.get('observed_kernel', ['backend default']))} |")
    lines += ["", "| seq | variant | step-time ratio (<=1.10) | peak increase GiB | formula GiB | "
              "increase/formula (0.9..1.1) | allocated==formula |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(
            f"| {s['seq']} | {s['variant']} | {s['step_time_ratio']:.3f} {'ok' if s['time_ok'] else 'MISS'} | "
            f"{s['peak_increase_bytes'] / 2**30:.3f} | {s['formula_bytes'] / 2**30:.3f} | "
            f"{s['increase_over_formula']:.3f} {'ok' if s['memory_ok'] else 'MISS'} | "
            f"{s['allocated_equals_formula']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
