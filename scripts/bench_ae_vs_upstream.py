"""Our hybrid `AE` x 8 (16 sub-layers, TE backend) versus upstream's
`get_gpt_layer_with_transformer_engine_spec()` GPTModel with 8 layers of the same shapes, side by
side in one process on one GPU: parameter counts, step-0 loss on identical weights, fwd+bwd step
time (interleaved repetitions, median) and peak memory.

    python scripts/bench_ae_vs_upstream.py [--out result.json] [--seq 4096] [--batch 2]

Our A/E sub-layers hold exactly the parameters of upstream's layer halves, so upstream's weights are
copied into ours (layer i -> sub-layers 2i, 2i+1) and step-0 losses must agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def build(args):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    from megacpp_mcore.train import runtime
    from megacpp_mcore.spec.block import hybrid_block_spec
    from megacpp_mcore.models.presets import custom_model

    model = custom_model(pattern="AE", num_layers=2 * args.layers, hidden_size=args.hidden,
                         num_attention_heads=args.heads, ffn_hidden_size=args.ffn,
                         vocab_size=args.vocab, seq_length=args.seq, moe=None, mla=None, mtp_depth=0)
    par = runtime.Parallelism()
    runtime.initialize(par, seed=1234)
    ours_cfg = runtime.transformer_config(model, par, bf16=True)
    up_cfg = runtime.transformer_config(model.replace(num_layers=args.layers), par, bf16=True)

    def gpt(config, spec):
        return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab,
                        max_sequence_length=args.seq, position_embedding_type="rope",
                        share_embeddings_and_output_weights=False).cuda()

    upstream = gpt(up_cfg, get_gpt_layer_with_transformer_engine_spec())
    ours = gpt(ours_cfg, hybrid_block_spec("AE", backend="te", num_layers=2 * args.layers))
    return ours, upstream


def copy_upstream_into_ours(upstream, ours) -> int:
    """Layer i's attention params -> our layer 2i, its MLP params -> our layer 2i+1."""
    ours_params = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in upstream.named_parameters():
            target = name
            if name.startswith("decoder.layers."):
                _, _, idx, rest = name.split(".", 3)
                sub = 2 * int(idx) + (0 if rest.startswith(("self_attention", "input_layernorm")) else 1)
                target = f"decoder.layers.{sub}.{rest}"
            ours_params[target].copy_(param)
            copied += 1
    if copied != len(ours_params):
        raise SystemExit(f"weight mapping covered {copied} of {len(ours_params)} parameters")
    return copied


def step(model, tokens, position_ids):
    loss = model(tokens, position_ids, None, labels=tokens)
    loss.float().mean().backward()
    return loss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_ae_vs_upstream: needs a CUDA GPU with Transformer Engine", file=sys.stderr)
        return 2

    ours, upstream = build(args)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_up = sum(p.numel() for p in upstream.parameters())
    copy_upstream_into_ours(upstream, ours)
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda", generator=g)
    pos = torch.arange(args.seq, device="cuda").unsqueeze(0).expand(args.batch, -1)
    with torch.no_grad():
        loss_up = float(upstream(tokens, pos, None, labels=tokens).float().mean())
        loss_ours = float(ours(tokens, pos, None, labels=tokens).float().mean())

    times = {"ours": [], "upstream": []}
    peaks = {}
    models = {"ours": ours, "upstream": upstream}
    for name, model in models.items():  # warm-up both, then measure peak memory per model
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            step(model, tokens, pos)
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    for _ in range(args.iters):  # interleave so drift hits both equally
        for name, model in models.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(model, tokens, pos)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3)
            model.zero_grad(set_to_none=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "params": {"ours": n_ours, "upstream": n_up, "equal": n_ours == n_up},
        "step0_loss": {"ours": loss_ours, "upstream": loss_up, "abs_diff": abs(loss_ours - loss_up)},
        "ms_per_step_median": med,
        "ratio_ours_over_upstream": med["ours"] / med["upstream"],
        "peak_gib": peaks,
        "shape": vars(args) | {"out": None},
        "versions": _versions(),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result["versions"]))
    print(f"{'variant':<10} {'params':>12} {'loss@0':>10} {'ms/step':>9} {'peak GiB':>9}")
    for name in ("upstream", "ours"):
        print(f"{name:<10} {result['params'][name]:>12} {result['step0_loss'][name]:>10.5f} "
              f"{med[name]:>9.2f} {peaks[name]:>9.2f}")
    print(f"ratio ours/upstream = {result['ratio_ours_over_upstream']:.4f} (target <= 1.02); "
          f"params equal: {n_ours == n_up}; |loss diff| = {result['step0_loss']['abs_diff']:.2e}")
    return 0


def _versions() -> dict:
    import megatron.core

    out = {"torch": torch.__version__, "megatron_core": megatron.core.__version__,
           "gpu": torch.cuda.get_device_name()}
    try:
        import transformer_engine

        out["transformer_engine"] = transformer_engine.__version__
    except ImportError:
        out["transformer_engine"] = None
    return out


if __name__ == "__main__":
    sys.exit(main())
