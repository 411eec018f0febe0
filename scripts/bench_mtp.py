#!/usr/bin/env python
"""Shared-block MTP (megacpp_mcore) versus upstream Megatron MTP, side by side on one GPU.

Same trunk for every variant: Megatron's TE GPT layer spec, 8 layers, hidden 2048, 16 heads,
SwiGLU/RMSNorm, bf16, seq 4096, micro-batch 2, untied embeddings. For each vocabulary size it runs

* ``trunk``     GPTModel without MTP (the baseline for memory),
* ``upstream``  GPTModel with ``mtp_num_layers=K`` and ``get_gpt_mtp_block_spec`` (K per-depth layers,
  materialized logits + Megatron's vocab-parallel CE),
* ``ours``      MTPGPTModel with ``MTPConfig(depth=K)``: one shared A+E block, fused linear CE,

timing forward+backward (CUDA events, after warm-up) and recording the peak allocated memory. It
prints a table and the two acceptance ratios:

* step-time ratio ``ours / upstream`` (target <= 1.0);
* MTP memory ratio ``(peak ours - peak trunk) / (peak upstream - peak trunk)`` (target <= 0.5).

Run on a CUDA host with TE 2.11 + megatron-core 0.16.1 (+ triton):
    python scripts/bench_mtp.py --out bench_mtp.json
    python scripts/bench_mtp.py --vocab 32768 --iters 5          # quicker
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def upstream_mtp_mode(args) -> dict:
    """``{"mtp_use_repeated_layer": True}`` for ``--upstream-repeated`` where this megatron-core has
    the field (0.17+); a clear error where it does not."""
    if not args.upstream_repeated:
        return {}
    import dataclasses
    from megatron.core.transformer import TransformerConfig
    if "mtp_use_repeated_layer" not in {f.name for f in dataclasses.fields(TransformerConfig)}:
        raise SystemExit("--upstream-repeated needs megatron-core >= 0.17 (TransformerConfig has no "
                         "mtp_use_repeated_layer here)")
    return {"mtp_use_repeated_layer": True}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--depth", type=int, default=2, help="MTP depth K (ours) = mtp_num_layers (upstream)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--loss-scale", type=float, default=0.3)
    p.add_argument("--fused-ce-impl", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--variants", nargs="+", default=["trunk", "upstream", "ours"],
                   choices=["trunk", "upstream", "ours"])
    p.add_argument("--recompute", action="store_true",
                   help="ours: recompute the shared block in backward (MTPConfig.recompute)")
    p.add_argument("--upstream-ce-fusion", action="store_true",
                   help="config.cross_entropy_loss_fusion=True (TE CE) for the unfused heads")
    p.add_argument("--upstream-repeated", action="store_true",
                   help="upstream: one MTP layer repeated K times (config.mtp_use_repeated_layer, "
                        "megatron-core >= 0.17): the shared-block MTP upstream ships, against ours")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="tiny local-backend run on CPU that exercises this script's code paths only")
    return p.parse_args(argv)


def preflight() -> dict:
    """Refuses to run where the comparison would be meaningless; returns the observed stack."""
    if not torch.cuda.is_available():
        sys.exit("bench_mtp: needs a CUDA GPU (torch.cuda.is_available() is False)")
    from megacpp_mcore.spec import backends

    env = backends.detect()
    if env.te is None:
        sys.exit(f"bench_mtp: Transformer Engine is not importable ({env.te_error}); "
                 "install transformer-engine[pytorch] 2.11")
    import megatron.core

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "te": env.te,
            "megatron_core": megatron.core.__version__, "triton": env.triton}


def build(variant: str, args, vocab: int, configs: dict):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
        get_gpt_mtp_block_spec,
    )

    from megacpp_mcore.features.mtp import MTPConfig, MTPGPTModel

    if args.smoke_cpu:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    else:
        layer_spec = get_gpt_layer_with_transformer_engine_spec()
    common = dict(transformer_layer_spec=layer_spec, vocab_size=vocab, max_sequence_length=args.seq,
                  pre_process=True, post_process=True, share_embeddings_and_output_weights=False,
                  position_embedding_type="rope")
    if variant == "trunk":
        return GPTModel(config=configs["plain"], **common)
    if variant == "upstream":
        config = configs["upstream"]
        mtp_spec = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=not args.smoke_cpu)
        return GPTModel(config=config, mtp_block_spec=mtp_spec, **common)
    mtp = MTPConfig(depth=args.depth, loss_scale=args.loss_scale, fused_ce_impl=args.fused_ce_impl,
                    recompute=args.recompute)
    return MTPGPTModel(config=configs["plain"], mtp=mtp, mtp_backend="local" if args.smoke_cpu else "te",
                       **common)


class _Clock:
    """CUDA events on GPU; wall clock in the CPU smoke run."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def measure(model, args, vocab: int) -> dict:
    cuda = not args.smoke_cpu
    dev = torch.device("cuda" if cuda else "cpu")
    g = torch.Generator(device=dev).manual_seed(0)
    tokens = torch.randint(0, vocab, (args.batch, args.seq), device=dev, generator=g)
    labels = torch.randint(0, vocab, (args.batch, args.seq), device=dev, generator=g)
    mask = torch.ones(args.batch, args.seq, device=dev)
    pos = torch.arange(args.seq, device=dev).expand(args.batch, -1)

    def step():
        out = model(tokens, pos, None, labels=labels, loss_mask=mask)  # [b, s] per-token LM loss
        loss = (out.float() * mask).sum() / mask.sum()
        loss.backward()
        return loss.detach()

    for _ in range(args.warmup):
        step()
        model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        with _Clock(cuda) as clock:
            loss = step()
        times.append(clock.ms)
        model.zero_grad(set_to_none=True)
    times.sort()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    out = {"ms_per_step": times[len(times) // 2], "ms_min": times[0], "peak_gib": peak,
           "lm_loss": float(loss)}
    block = getattr(model, "mtp_block", None)
    if block is not None:
        out["mtp_stats"] = block.megacpp_stats()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke_cpu:
        args.vocab, args.layers, args.hidden, args.heads = [256], 2, 64, 4
        args.ffn, args.seq, args.batch, args.warmup, args.iters = 128, 32, 2, 1, 2
    stack = {"smoke_cpu": True} if args.smoke_cpu else preflight()
    from megacpp_mcore.train import runtime
    from megacpp_mcore.models.presets import custom_model

    runtime.initialize(runtime.Parallelism(), seed=1234)
    results = {"stack": stack, "args": vars(args), "runs": {}}
    for vocab in args.vocab:
        model_cfg = custom_model(pattern="AE", num_layers=args.layers, hidden_size=args.hidden,
                                 num_attention_heads=args.heads, ffn_hidden_size=args.ffn,
                                 vocab_size=vocab, seq_length=args.seq, moe=None, mla=None,
                                 mtp_depth=0)
        overrides = ({"cross_entropy_loss_fusion": True, "cross_entropy_fusion_impl": "te"}
                     if args.upstream_ce_fusion else {})
        configs = {
            "plain": runtime.transformer_config(model_cfg, runtime.Parallelism(),
                                                bf16=not args.smoke_cpu, **overrides),
            "upstream": runtime.transformer_config(
                model_cfg, runtime.Parallelism(), bf16=not args.smoke_cpu, **overrides,
                mtp_num_layers=args.depth, mtp_loss_scaling_factor=args.loss_scale,
                **upstream_mtp_mode(args)),
        }
        runs = results["runs"][str(vocab)] = {}
        for variant in args.variants:
            print(f"[bench_mtp] vocab={vocab} variant={variant} ...", flush=True)
            model = None
            try:
                t0 = time.time()
                model = build(variant, args, vocab, configs)
                model = model if args.smoke_cpu else model.cuda()
                runs[variant] = measure(model, args, vocab)
                runs[variant]["params"] = sum(p.numel() for p in model.parameters())
                print(f"[bench_mtp]   {runs[variant]} ({time.time() - t0:.0f}s)", flush=True)
            except Exception as exc:  # keep the other variants' figures
                traceback.print_exc()
                runs[variant] = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                del model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        runs["ratios"] = ratios(runs)
    print_table(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"[bench_mtp] wrote {args.out}")
    runtime.shutdown()
    return 0


def ratios(runs: dict) -> dict:
    ok = all(k in runs and "error" not in runs[k] for k in ("trunk", "upstream", "ours"))
    if not ok:
        return {"step_time": None, "mtp_memory": None}
    trunk, up, ours = runs["trunk"], runs["upstream"], runs["ours"]
    up_inc = up["peak_gib"] - trunk["peak_gib"]
    return {
        "step_time": ours["ms_per_step"] / up["ms_per_step"],
        "mtp_memory": (ours["peak_gib"] - trunk["peak_gib"]) / up_inc if up_inc > 0 else None,
        "mtp_ms_ours": ours["ms_per_step"] - trunk["ms_per_step"],
        "mtp_ms_upstream": up["ms_per_step"] - trunk["ms_per_step"],
        "mtp_gib_ours": ours["peak_gib"] - trunk["peak_gib"],
        "mtp_gib_upstream": up_inc,
    }


def print_table(results: dict) -> None:
    print("\n| vocab | variant | ms/step | peak GiB | params |")
    print("|---|---|---|---|---|")
    for vocab, runs in results["runs"].items():
        for variant in ("trunk", "upstream", "ours"):
            r = runs.get(variant)
            if r is None:
                continue
            if "error" in r:
                print(f"| {vocab} | {variant} | error: {r['error'][:60]} | | |")
            else:
                print(f"| {vocab} | {variant} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} | "
                      f"{r['params'] / 1e6:.1f}M |")
    print()
    for vocab, runs in results["runs"].items():
        r = runs["ratios"]
        if r["step_time"] is None:
            print(f"vocab {vocab}: ratios unavailable (a variant failed)")
            continue
        mem = "n/a" if r["mtp_memory"] is None else f"{r['mtp_memory']:.2f}"
        print(f"vocab {vocab}: step-time ratio ours/upstream = {r['step_time']:.3f} (target <= 1.0); "
              f"MTP memory increase ours/upstream = {mem} (target <= 0.5); MTP cost "
              f"{r['mtp_ms_ours']:.1f} vs {r['mtp_ms_upstream']:.1f} ms, "
              f"{r['mtp_gib_ours']:.2f} vs {r['mtp_gib_upstream']:.2f} GiB")


if __name__ == "__main__":
    sys.exit(main())
