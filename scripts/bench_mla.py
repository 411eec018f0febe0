#!/usr/bin/env python
"""Our MLA ``A``+``E`` hybrid model versus upstream's MLA GPT layer: same weights, same batch.

Builds, in ONE process and with the same seed:

* ours: ``GPTModel`` from ``hybrid_block_spec("AE", mla=...)`` with ``2 * layers`` sub-layers
  (each upstream layer = one ``A`` (MLA) + one ``E`` (dense SwiGLU MLP) sub-layer);
* upstream: ``GPTModel`` from ``get_gpt_layer_with_transformer_engine_spec(multi_latent_attention=True,
  qk_layernorm=True)`` with ``layers`` layers,

copies our weights into upstream's (state-dict key map, every upstream key must be covered), runs
the same step-0 batch through both (loss difference) and times fwd+bwd alternately (median ms,
ratio ours/upstream, target <= 1.02) and the peak memory of one step of each.

H200 (TE 2.11, megatron-core 0.16.1, torch 2.11, bf16)::

    python scripts/bench_mla.py --out bench_mla.json

CPU smoke (local backend, fp32, tiny dims; upstream's local core attention rejects MLA's
k/v channels in 0.16, so both models use the seam's local core attention there)::

    python scripts/bench_mla.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

LOSS_TOLERANCE = 2e-3  # |ours - upstream| step-0 mean loss, bf16
TARGET_RATIO = 1.02


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="upstream layers (ours: 2x sub-layers)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--q-lora-rank", type=int, default=768, help="0 = no query compression")
    p.add_argument("--kv-lora-rank", type=int, default=256)
    p.add_argument("--qk-head-dim", type=int, default=128)
    p.add_argument("--qk-pos-emb-head-dim", type=int, default=64)
    p.add_argument("--v-head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke: local backend, fp32, tiny dims, 2 timed iterations")
    args = p.parse_args(argv)
    if args.smoke:
        args.__dict__.update(layers=2, hidden=64, heads=4, ffn=128, vocab=128, seq=32, batch=2,
                             q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8,
                             v_head_dim=16, warmup=1, iters=2)
    return args


def fail(message: str) -> None:
    print(f"bench_mla: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_environment(args) -> str:
    """Returns the backend to use; exits with a clear message when the host cannot run it."""
    import megatron.core

    from megacpp_mcore.spec import backends

    env = backends.detect()
    print(f"megatron-core {megatron.core.__version__}, torch {torch.__version__}, TE {env.te}, "
          f"cuda {env.cuda}" + (f" ({torch.cuda.get_device_name()})" if env.cuda else ""))
    if args.hidden % args.heads:
        fail(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if args.layers < 1 or args.iters < 1:
        fail("--layers and --iters must be >= 1")
    if args.smoke:
        return "local"
    if not env.cuda:
        fail("no CUDA device; run on the H200 or use --smoke on CPU")
    if env.te is None:
        fail(f"Transformer Engine is not importable ({env.te_error}); pip install 'megacpp-mcore[te]'")
    return "te"


def build_models(args, backend: str):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megacpp_mcore.layers import mla
    from megacpp_mcore.train import runtime
    from megacpp_mcore.models.presets import MLAConfig, ModelConfig

    par = runtime.Parallelism()
    runtime.initialize(par, seed=args.seed)
    model = ModelConfig(
        name="bench-mla", pattern="AE", num_layers=2 * args.layers, hidden_size=args.hidden,
        num_attention_heads=args.heads, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
        seq_length=args.seq, moe=None,
        mla=MLAConfig(q_lora_rank=args.q_lora_rank or None, kv_lora_rank=args.kv_lora_rank,
                      qk_head_dim=args.qk_head_dim, qk_pos_emb_head_dim=args.qk_pos_emb_head_dim,
                      v_head_dim=args.v_head_dim),
    )
    ours_config = runtime.transformer_config(model, par)
    (ours,) = runtime.build_model(model, ours_config, backend=backend, wrap_ddp=False)

    up_config = runtime.transformer_config(model.replace(num_layers=args.layers), par)
    if backend == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(multi_latent_attention=True, qk_layernorm=True)
    else:
        spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True)
        spec.submodules.self_attention.submodules.core_attention = mla.LatentDotProductAttention
    upstream = GPTModel(
        config=up_config, transformer_layer_spec=spec, vocab_size=args.vocab,
        max_sequence_length=args.seq, pre_process=True, post_process=True,
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
    ).to(runtime.device())
    return ours, upstream


def map_state_dict(ours_sd: dict, upstream_sd: dict) -> dict:
    """Our keys -> upstream keys: sub-layer 2i (A) and 2i+1 (E) both become upstream layer i."""
    mapped = {}
    for key, value in ours_sd.items():
        if key.endswith("_extra_state"):
            continue
        parts = key.split(".")
        if parts[:2] == ["decoder", "layers"]:
            sub = int(parts[2])
            rest = ".".join(parts[3:])
            attention_part = rest.startswith(("input_layernorm", "self_attention"))
            if attention_part != (sub % 2 == 0):
                raise RuntimeError(f"unexpected key {key!r}: A params on odd / E params on even layer")
            key = f"decoder.layers.{sub // 2}.{rest}"
        if key not in upstream_sd:
            raise RuntimeError(f"our parameter {key!r} has no upstream counterpart")
        if upstream_sd[key].shape != value.shape:
            raise RuntimeError(f"{key}: ours {tuple(value.shape)} vs upstream {tuple(upstream_sd[key].shape)}")
        mapped[key] = value
    uncovered = [k for k in upstream_sd if not k.endswith("_extra_state") and k not in mapped]
    if uncovered:
        raise RuntimeError(f"upstream parameters not covered by ours: {uncovered[:8]}")
    return mapped


def make_batch(args, device):
    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    tokens, labels = data[:, :-1].to(device), data[:, 1:].to(device)
    positions = torch.arange(args.seq, device=device)[None].expand(args.batch, -1)
    return tokens, positions, labels


def fwd_bwd(model, batch) -> float:
    tokens, positions, labels = batch
    model.zero_grad(set_to_none=True)
    loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    return loss.detach()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(model, batch) -> float:
    sync()
    start = time.perf_counter()
    fwd_bwd(model, batch)
    sync()
    return (time.perf_counter() - start) * 1e3


def peak_gib(model, batch) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.empty_cache()
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd(model, batch)
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def attention_kernels(model) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})


def main(argv=None) -> dict:
    args = parse_args(argv)
    backend = check_environment(args)
    ours, upstream = build_models(args, backend)
    mapped = map_state_dict(ours.state_dict(), upstream.state_dict())
    missing, unexpected = upstream.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        fail(f"weight copy incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    params = sum(p.numel() for p in ours.parameters())
    if params != sum(p.numel() for p in upstream.parameters()):
        fail("parameter counts differ between ours and upstream")

    batch = make_batch(args, next(ours.parameters()).device)
    ours.train()
    upstream.train()
    loss_ours, loss_up = float(fwd_bwd(ours, batch)), float(fwd_bwd(upstream, batch))
    for _ in range(args.warmup):
        fwd_bwd(ours, batch)
        fwd_bwd(upstream, batch)
    ms_ours, ms_up = [], []
    for i in range(args.iters):  # alternate (and swap order) so drift hits both equally
        pair = [(ours, ms_ours), (upstream, ms_up)]
        for model, sink in pair if i % 2 == 0 else pair[::-1]:
            sink.append(timed(model, batch))
    med_ours, med_up = statistics.median(ms_ours), statistics.median(ms_up)
    result = {
        "backend": backend,
        "shapes": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "ffn", "vocab", "seq",
                                                 "batch", "q_lora_rank", "kv_lora_rank",
                                                 "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")},
        "dtype": "bf16" if ours.config.bf16 else "fp32",
        "parameters": params,
        "attention_modules": {"ours": attention_kernels(ours), "upstream": attention_kernels(upstream)},
        "step0_loss": {"ours": loss_ours, "upstream": loss_up, "abs_diff": abs(loss_ours - loss_up)},
        "ms_per_step": {"ours": med_ours, "upstream": med_up, "ours_all": ms_ours, "upstream_all": ms_up},
        "ratio": med_ours / med_up,
        "peak_gib": {"ours": peak_gib(ours, batch), "upstream": peak_gib(upstream, batch)},
        "loss_match": abs(loss_ours - loss_up) <= LOSS_TOLERANCE,
        "ratio_ok": med_ours / med_up <= TARGET_RATIO,
        "env": {"torch": torch.__version__, "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }
    print_table(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    from megacpp_mcore.train import runtime

    runtime.shutdown()
    return result


def print_table(r: dict) -> None:
    peak = r["peak_gib"]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"\nMLA A+E vs upstream MLA layer, {r['shapes']['layers']} layers, hidden {r['shapes']['hidden']}, "
          f"seq {r['shapes']['seq']}, batch {r['shapes']['batch']}, {r['dtype']}, backend {r['backend']}, "
          f"{r['parameters'] / 1e6:.1f}M params")
    print(f"attention modules: ours {r['attention_modules']['ours']}, upstream {r['attention_modules']['upstream']}")
    print("| model | step-0 loss | ms/step (fwd+bwd, median) | peak GiB (step) |")
    print("|---|---|---|---|")
    print(f"| ours (hybrid AE, MLA seam) | {r['step0_loss']['ours']:.6f} | {r['ms_per_step']['ours']:.2f} | {fmt(peak['ours'])} |")
    print(f"| upstream (MLA layer spec) | {r['step0_loss']['upstream']:.6f} | {r['ms_per_step']['upstream']:.2f} | {fmt(peak['upstream'])} |")
    print(f"loss diff {r['step0_loss']['abs_diff']:.2e} ({'OK' if r['loss_match'] else 'MISMATCH'}, tol {LOSS_TOLERANCE}); "
          f"step-time ratio ours/upstream {r['ratio']:.3f} ({'OK' if r['ratio_ok'] else 'ABOVE'} target {TARGET_RATIO})")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
