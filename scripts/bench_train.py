#!/usr/bin/env python
"""Training-step throughput of our hybrid spec versus upstream Megatron-Core's GPT spec, one run.

Measures, on one GPU (or CPU for a smoke check), full training steps (forward + backward +
optimizer, Megatron schedule and optimizer, bf16 on CUDA) of:

1. ``ours/<preset>``: the preset as given (M/R/MLA/MoE when the branch has them);
2. ``ours/<preset>-AE``: its A/E skeleton (pattern ``AE``, no MLA, no MTP), our spec;
3. ``upstream/<preset>-AE``: the same skeleton through megatron-core's own
   ``get_gpt_layer_with_transformer_engine_spec`` (or the local spec), where one upstream layer is
   one of our ``A`` + ``E`` pairs, so the weights and FLOPs are identical.

Prints tokens/s, model TFLOP/s (``megacpp_mcore.models.accounting.flops_per_token``: 6 N_active +
attention), ms/step, peak memory, and the ratio ours/upstream on the skeleton; writes JSON with
``--out``.

    python scripts/bench_train.py --preset nam56r-lite --out bench_train.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="nam56r-lite")
    p.add_argument("--num-layers", type=int, default=None, help="override the preset's depth")
    p.add_argument("--seq-length", type=int, default=None, help="default: the preset's")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--num-microbatches", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per path")
    p.add_argument("--backend", default="auto", choices=["auto", "te", "local"])
    p.add_argument("--skip-full", action="store_true", help="only the A/E skeleton comparison")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def skeleton(model):
    """The A/E skeleton of ``model``: pattern AE, same dimensions, no MLA/MTP/other features."""
    depth = 2 * max(1, sum(1 for e in model.layer_table() if e.symbol == "A"))
    return model.replace(name=f"{model.name}-AE", pattern="AE", num_layers=depth, mla=None,
                         mtp_depth=0, features={})


def build_upstream(model, config, backend: str) -> list:
    """GPTModel with megatron-core's own layer spec (one layer = attention + MLP/MoE), DDP-wrapped."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megacpp_mcore.train import runtime

    kwargs = dict(num_experts=model.moe.num_experts if model.moe else None,
                  moe_grouped_gemm=bool(config.moe_grouped_gemm))
    if backend == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(**kwargs)
    else:
        spec = get_gpt_layer_local_spec(**kwargs, normalization="RMSNorm")
    gpt = runtime.gpt_model(config, spec, vocab_size=model.vocab_size, max_sequence_length=model.seq_length,
                            pre_process=True, post_process=True,
                            share_embeddings_and_output_weights=False, position_embedding_type="rope")
    gpt.to(runtime.device())
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=gpt)]


def batches(args, seq: int, step: int) -> list[dict]:
    g = torch.Generator().manual_seed(step)
    out = []
    for _ in range(args.num_microbatches):
        seqs = torch.randint(0, 256, (args.micro_batch_size, seq + 1), generator=g)
        out.append({"tokens": seqs[:, :-1], "labels": seqs[:, 1:],
                    "loss_mask": torch.ones(args.micro_batch_size, seq)})
    return out


def measure(name: str, model, chunks, args, seq: int) -> dict:
    from megacpp_mcore.models.accounting import flops_per_token
    from megacpp_mcore.train import receipt, runtime

    optimizer = runtime.build_optimizer(chunks, lr=1e-4)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        micro = batches(args, seq, step)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = runtime.train_step(chunks, optimizer, iter(micro), num_microbatches=len(micro),
                                 micro_batch_size=args.micro_batch_size, seq_length=seq)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(out["loss"])
    ms = 1000 * sum(times) / len(times)
    tokens = args.micro_batch_size * args.num_microbatches * seq
    flops = flops_per_token(model, seq)
    observed = receipt.observe_backends(chunks)
    result = {
        "name": name,
        "layers": model.num_layers,
        "pattern": "".join(e.symbol for e in model.layer_table()),
        "params": sum(p.numel() for c in chunks for p in c.parameters()),
        "ms_per_step": ms,
        "tokens_per_s": tokens / (ms / 1000),
        "model_tflops_per_s": tokens / (ms / 1000) * flops["total"] / 1e12,
        "flops_per_token": flops["total"],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "attention": observed["attention"],
        "te_attention": (observed["te_attention"] or {}).get("kernel"),
    }
    print(f"  {name}: {ms:.1f} ms/step, {result['tokens_per_s']:,.0f} tokens/s, "
          f"{result['model_tflops_per_s']:.1f} TFLOP/s, peak {result['peak_gib']:.2f} GiB, "
          f"attention {result['attention']} {result['te_attention'] or ''}", flush=True)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    from megacpp_mcore.spec import backends
    from megacpp_mcore.train import runtime
    from megacpp_mcore.models.presets import get_preset

    model = get_preset(args.preset)
    if args.num_layers:
        model = model.replace(num_layers=args.num_layers)
    seq = args.seq_length or model.seq_length
    model = model.replace(seq_length=seq)
    backend = backends.resolve_backend_name(args.backend)
    if not torch.cuda.is_available():
        print("warning: no CUDA device; this measures the CPU path (smoke check only)", flush=True)
    env = backends.detect()
    print(f"torch {torch.__version__}, TE {env.te}, mamba_ssm {env.mamba_ssm}, triton {env.triton}, "
          f"backend {backend}, device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    runtime.initialize(runtime.Parallelism(), seed=1234)
    par = runtime.Parallelism()
    skel = skeleton(model)
    upstream_model = skel.replace(num_layers=skel.num_layers // 2)
    jobs = []
    if not args.skip_full:
        jobs.append((f"ours/{model.name}", model,
                     lambda: runtime.build_model(model, runtime.transformer_config(model, par), backend=backend)))
    jobs.append((f"ours/{skel.name}", skel,
                 lambda: runtime.build_model(skel, runtime.transformer_config(skel, par), backend=backend)))
    jobs.append((f"upstream/{skel.name}", skel,
                 lambda: build_upstream(upstream_model, runtime.transformer_config(upstream_model, par), backend)))
    results, errors = [], {}
    for name, m, build in jobs:
        print(f"{name}: building ({m.num_layers} layers, seq {seq}, mbs {args.micro_batch_size})", flush=True)
        try:
            chunks = build()
            results.append(measure(name, m, chunks, args, seq))
        except Exception as exc:  # keep measuring the other paths; report at the end
            errors[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        chunks = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    by_name = {r["name"]: r for r in results}
    ours, up = by_name.get(f"ours/{skel.name}"), by_name.get(f"upstream/{skel.name}")
    ratio = ours["tokens_per_s"] / up["tokens_per_s"] if ours and up else None
    print()
    print("| path | layers | ms/step | tokens/s | model TFLOP/s | peak GiB | attention |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['layers']} ({r['pattern'][:12]}) | {r['ms_per_step']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {r['model_tflops_per_s']:.1f} | {r['peak_gib']:.2f} | "
              f"{r['attention']} {r['te_attention'] or ''} |")
    if ratio is not None:
        print(f"\nours / upstream tokens/s on the A/E skeleton: {ratio:.3f} "
              f"(params {ours['params']:,} vs {up['params']:,})")
    for name, err in errors.items():
        print(f"ERROR {name}: {err}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results, "ratio_ours_over_upstream": ratio,
                       "errors": errors, "torch": torch.__version__, "te": env.te}, f, indent=1)
        print(f"wrote {args.out}")
    runtime.shutdown()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
