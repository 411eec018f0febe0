#!/usr/bin/env python
"""Mixture-of-Depths step time versus the same dense model, on one CUDA GPU with Transformer Engine.

Measures, in ONE run and on the same synthetic batches (fwd + bwd + Adam step, bf16):

* ``upstream-dense``: Megatron-Core's own TE GPT layer spec (``get_gpt_layer_with_transformer_engine_spec``),
  ``blocks`` full transformer layers: the upstream reference;
* ``dense``: our hybrid spec, pattern ``AE`` at ``2 * blocks`` sub-layers (the same network);
* ``gateskip``: ``dense`` with MoD gateskip on every layer (target ratio <= 1.05);
* ``topk``: ``dense`` with MoD top-k at ``--capacity`` (0.125) on every other block, i.e. the ``A``
  and ``E`` sub-layers of blocks 0, 2, 4, ... (``--topk-blocks odd``: 1, 3, 5, ...; the MoD
  paper's setting; target ratio <= 0.65);

then checks that a gateskip layer's forward captures in a CUDA graph and replays to the eager output.
RoPE is TE's fused kernel in every variant (``--rope unfused``: Megatron's unfused ops); a top-k
layer applies it to its gathered tokens as a flat ``[k*b]`` sequence of positions
(``features.mod.TokenRopeAttention``). ``--mod-kernels torch`` times the MoD variants with torch
ops instead of the Triton kernels. Prints a table and the ratios; ``--out`` writes JSON.

    python scripts/bench_mod.py --out mod_bench.json

At the default micro-batch 2 the step is host-bound on an H200 (gpu busy 0.5-0.8: Python and
kernel launches set the step time); the targets are checked where the GPU sets it, 32k tokens per
micro-batch, on 16 blocks (docs/benchmarks.md has these and the 8-block figures):

    python scripts/bench_mod.py --batch 8 --blocks 16 --cross-entropy te --out mod_bench_b8.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"gateskip": 1.05, "topk": 0.65}


def _fail(message: str) -> None:
    print(f"bench_mod: {message}", file=sys.stderr)
    raise SystemExit(2)


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=8, help="transformer blocks (A+E pairs)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2, help="micro-batch size")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--capacity", type=float, default=0.125)
    p.add_argument("--topk-blocks", choices=("even", "odd"), default="even",
                   help="which every-other blocks route top-k: 0, 2, 4, ... (block 0 routed) or "
                        "1, 3, 5, ... (block 0 dense)")
    p.add_argument("--cross-entropy", choices=("unfused", "native", "te"), default="unfused",
                   help="LM loss kernel of every variant: Megatron's unfused vocab-parallel CE, its "
                        "fused 'native' one, or TE's fused CE (cross_entropy_loss_fusion)")
    p.add_argument("--rope", choices=("fused", "unfused"), default="fused",
                   help="RoPE kernel of every variant: TE's fused one (top-k layers apply it to their "
                        "gathered tokens as a flat [k*b] sequence) or Megatron's unfused ops")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", default="upstream-dense,dense,gateskip,topk")
    p.add_argument("--skip-graph", action="store_true", help="skip the CUDA graph capture check")
    p.add_argument("--mod-kernels", choices=("auto", "triton", "torch"), default="auto",
                   help="MoDConfig.kernels of the MoD variants: the fused gateskip seam and the top-k "
                        "routing as Triton kernels (auto: where Triton imports) or as torch ops (A/B)")
    p.add_argument("--no-te-backend-per-layer", action="store_true",
                   help="do not apply patches.te_attention_backend_per_layer (measure TE's one-entry "
                        "backend cache re-selecting on every top-k/dense alternation)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--trace", type=Path, default=None,
                   help="write a gzipped Chrome trace of one extra step per variant into this folder "
                        "(CPU + CUDA, each layer's forward annotated)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="exercise the script on CPU with the local backend (no timings that mean anything)")
    args = p.parse_args(argv)
    if args.micro_batches < 1:
        _fail(f"--micro-batches {args.micro_batches} must be >= 1")
    if args.hidden % args.heads:
        _fail(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    k = math.ceil(args.capacity * args.seq)
    if not 0 < args.capacity <= 1 or k < 1:
        _fail(f"--capacity {args.capacity} must be in (0, 1]")
    unknown = set(args.variants.split(",")) - {"upstream-dense", "dense", "gateskip", "topk"}
    if unknown:
        _fail(f"unknown variants {sorted(unknown)}; allowed: upstream-dense, dense, gateskip, topk")
    return args


def _check_host(cpu_smoke: bool) -> dict:
    import torch

    from megacpp_mcore.spec import backends

    if cpu_smoke:
        return {"gpu": "cpu-smoke", "torch": torch.__version__, "te": None, "megatron_core": "n/a"}
    if not torch.cuda.is_available():
        _fail("no CUDA device visible; this benchmark needs one GPU with Transformer Engine")
    env = backends.detect()
    if env.te is None:
        _fail(f"Transformer Engine does not import ({env.te_error or 'not installed'})")
    import megatron.core

    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "te": env.te,
            "megatron_core": getattr(megatron.core, "__version__", "unknown")}


def _model(args, variant: str):
    from megacpp_mcore.features.mod import MoDConfig
    from megacpp_mcore.spec.pattern import FeaturePlacement
    from megacpp_mcore.models.presets import ModelConfig

    features = {}
    if variant == "gateskip":
        features["mod"] = MoDConfig(mode="gateskip", kernels=args.mod_kernels)
    elif variant == "topk":
        first = 0 if args.topk_blocks == "even" else 1
        layers = tuple(i for i in range(2 * args.blocks) if (i // 2) % 2 == first)
        features["mod"] = MoDConfig(mode="topk", capacity=args.capacity, kernels=args.mod_kernels,
                                    placement=FeaturePlacement(layers=layers))
    return ModelConfig(name=f"bench-{variant}", pattern="AE", num_layers=2 * args.blocks,
                       hidden_size=args.hidden, num_attention_heads=args.heads,
                       ffn_hidden_size=args.ffn, vocab_size=args.vocab, seq_length=args.seq,
                       features=features)


def _config_overrides(args) -> dict:
    """TransformerConfig settings every variant shares."""
    out = {"apply_rope_fusion": args.rope == "fused" and not args.cpu_smoke}
    if args.cross_entropy != "unfused":
        out.update(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl=args.cross_entropy)
    return out


def _build(args, variant: str):
    """DDP-wrapped chunks and the TransformerConfig for ``variant``."""
    from megacpp_mcore.train import runtime

    par = runtime.Parallelism()
    model = _model(args, variant)
    backend = "local" if args.cpu_smoke else "te"
    if variant != "upstream-dense":
        config = runtime.transformer_config(model, par, **_config_overrides(args))
        return runtime.build_model(model, config, backend=backend), config
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_layer_specs

    config = runtime.transformer_config(model.replace(num_layers=args.blocks), par,
                                        **_config_overrides(args))
    spec = (gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm") if args.cpu_smoke
            else gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec())
    gpt = GPTModel(config=config, transformer_layer_spec=spec,
                   vocab_size=args.vocab, max_sequence_length=args.seq,
                   share_embeddings_and_output_weights=False, position_embedding_type="rope")
    gpt.to(runtime.device())
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                        use_distributed_optimizer=False)
    return [DistributedDataParallel(config=config, ddp_config=ddp, module=gpt)], config


def _release(chunks, optimizer) -> None:
    """Breaks the reference cycles that keep a finished variant alive.

    ``runtime.build_optimizer`` stores ``chunks[0].no_sync`` and ``optimizer.scale_loss`` (bound
    methods) in the TransformerConfig that every module holds, so model <-> config <-> optimizer
    form a cycle that only the cyclic GC frees. Before this fix, ``_time_variant`` called
    ``gc.collect()`` while a loop variable still held a module (hence the config, the optimizer
    and every parameter): the variant survived until the NEXT variant's timed steps, and that
    variant's peak memory included it (dense 25.4 GiB = its own 16.3 + upstream-dense's 9.1).
    """
    config = chunks[0].config
    config.finalize_model_grads_func = None
    config.grad_scale_func = None
    config.no_sync_func = None
    chunks.clear()
    del optimizer


def _time_variant(args, variant: str) -> dict:
    import torch

    from megacpp_mcore.train import runtime

    dev = runtime.device()
    cuda = dev.type == "cuda"
    base_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    chunks, _ = _build(args, variant)
    optimizer = runtime.build_optimizer(chunks, lr=1e-4)
    mod_layers = [m for m in chunks[0].modules() if hasattr(m, "megacpp_set_step")]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=dev, generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(args.batch, args.seq, device=dev)}
    times, losses = [], []

    def step(i):
        for layer in mod_layers:
            layer.megacpp_set_step(i)
        return runtime.train_step(chunks, optimizer, iter([batch] * args.micro_batches),
                                  num_microbatches=args.micro_batches,
                                  micro_batch_size=args.batch, seq_length=args.seq)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        result = step(i)
        sync()
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
        losses.append(result["loss"])
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    busy, breakdown = _gpu_profile(step, args.warmup + args.steps) if cuda else (None, None)
    if cuda and args.trace:
        _trace_step(step, args.warmup + args.steps + 3, args.trace / f"trace_{variant}.json.gz", chunks[0])
    stats = {name: module.megacpp_stats() for name, module in chunks[0].named_modules()
             if hasattr(module, "megacpp_stats")}
    out = {
        "ms_per_step": statistics.median(times),
        "ms_min": min(times),
        "peak_gib": peak,
        "alloc_before_build_gib": base_gib,  # ~0 when the previous variant was freed
        "gpu_busy_fraction": busy,
        "gpu_breakdown": breakdown,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "mod_layers": len(mod_layers),
        "mod_stats_last_step": stats,
    }
    mod_layers.clear()
    _release(chunks, optimizer)
    return out


# Kernel-name patterns of the GPU-time breakdown (first match wins; the rest is "other").
_KERNEL_GROUPS = (
    ("attention", re.compile(r"fmha|flash|cudnn|attn|sdpa", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|cublas|xmma|splitk", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|l2norm", re.I)),
    ("cross_entropy", re.compile(r"cross_entropy|log_softmax|softmax|logsumexp", re.I)),
    ("norm", re.compile(r"rmsnorm|layernorm|layer_norm|rms_norm", re.I)),
    ("index", re.compile(r"gather|scatter|index|topk|sort|radix", re.I)),
)


def _gpu_profile(step, first: int, steps: int = 3):
    """GPU kernel time over ``steps`` profiled steps: the busy fraction (kernel time / wall time;
    well below 1 means the step is bound by the host, so cutting GPU work cannot show in the step
    time and every extra op costs launch overhead, not FLOPs), the kernel time per step by group
    (``_KERNEL_GROUPS``) and the forty longest kernels. Returns ``(busy, breakdown)``."""
    import torch

    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for i in range(steps):
                step(first + i)
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - start) * 1e6
        # Device-side events only (kernels, memcpy, memset): host events that launched them also
        # carry the kernels' time and would count it twice.
        kernels = [(e.key, getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
                   for e in prof.key_averages() if getattr(e, "device_type", None) == DeviceType.CUDA]
        kernel_us = sum(us for _, us in kernels)
        groups: dict[str, float] = {}
        for name, us in kernels:
            group = next((g for g, rx in _KERNEL_GROUPS if rx.search(name)), "other")
            groups[group] = groups.get(group, 0.0) + us / steps / 1e3
        top = sorted(kernels, key=lambda kv: -kv[1])[:40]
        breakdown = {"idle": _idle_gaps(prof, steps),
                     "kernel_ms_per_step": round(kernel_us / steps / 1e3, 2),
                     "groups_ms_per_step": {g: round(ms, 2) for g, ms in sorted(groups.items())},
                     "top_kernels_ms_per_step": [(n[:90], round(us / steps / 1e3, 2)) for n, us in top]}
        return round(kernel_us / wall_us, 3), breakdown
    except Exception as exc:  # a diagnostic only: never fail the benchmark over it
        print(f"[bench_mod] gpu profile unavailable: {type(exc).__name__}: {exc}", flush=True)
        return None, None


def _idle_gaps(prof, steps: int) -> dict:
    """Where the GPU waits: the gaps between consecutive kernels (union of device intervals), per
    step, split at 20 us (launch gaps inside a queued stream are a few us; longer ones mean the
    host was behind, or a host synchronisation), and the 8 longest with the kernels around them."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if getattr(e, "device_type", None) == DeviceType.CUDA)
    gaps, end, before = [], None, None
    for start, stop, name in spans:
        if end is not None and start > end:
            gaps.append((start - end, end - spans[0][0], before, name))
        if end is None or stop > end:
            end, before = stop, name
    long = [g for g in gaps if g[0] >= 20.0]
    return {"idle_ms_per_step": round(sum(g[0] for g in gaps) / steps / 1e3, 2),
            "idle_ms_in_gaps_ge_20us_per_step": round(sum(g[0] for g in long) / steps / 1e3, 2),
            "gaps_ge_20us_per_step": round(len(long) / steps, 1),
            "longest": [(round(g / 1e3, 3), round(at / 1e3, 2), a[:60], b[:60])
                        for g, at, a, b in sorted(gaps, reverse=True)[:8]]}


def _trace_step(step, index: int, path: Path, model) -> None:
    """One more step under the CPU + CUDA profiler, each transformer layer's forward annotated
    (``layer<N>``), written as a gzipped Chrome trace (host time is inflated by the profiler)."""
    import gzip
    import shutil

    import torch
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from torch.profiler import ProfilerActivity, profile, record_function

    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    ranges, handles = {}, []
    for i, layer in enumerate(layers):
        def pre(module, _inputs, i=i):
            ranges[i] = record_function(f"layer{i}:{type(module).__name__}")
            ranges[i].__enter__()

        def post(module, _inputs, _output, i=i):
            ranges.pop(i).__exit__(None, None, None)

        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(index)
            torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()


def _cuda_graph_check(args) -> dict:
    """Captures one gateskip MoD layer's forward (TE, bf16) in a CUDA graph and replays it."""
    import torch
    from megatron.core.transformer.spec_utils import build_module

    from megacpp_mcore.train import runtime
    from megacpp_mcore.layers.attention import attention_layer_spec
    from megacpp_mcore.spec.backends import get_backend
    from megacpp_mcore.spec.context import LayerContext
    from megacpp_mcore.features.mod import mod_layer_spec

    from megatron.core import tensor_parallel

    # CUDA graphs need Megatron's graph-safe RNG tracker (TE's attention forks it even at p=0),
    # and its generators registered with the graph (testing.cudagraph.capture does that).
    tensor_parallel.model_parallel_cuda_manual_seed(1234, use_cudagraphable_rng=True,
                                                    force_reset_rng=True)
    model = _model(args, "gateskip")
    config = runtime.transformer_config(model, runtime.Parallelism(), **_config_overrides(args))
    mod = model.features["mod"]
    ctx = LayerContext(config=config, backend=get_backend("te"), index=0, symbol="A",
                       features=frozenset({"mod"}), feature_configs={"mod": mod})
    layer = build_module(mod_layer_spec(attention_layer_spec(ctx), ctx), config=config,
                         layer_number=1).cuda().eval()
    dim = args.hidden // args.heads
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim))
    freqs = torch.outer(torch.arange(args.seq, device="cuda").float(), inv)
    rope = torch.cat([freqs, freqs], -1)[:, None, None, :]
    x = torch.randn(args.seq, args.batch, args.hidden, device="cuda", dtype=torch.bfloat16)
    static_x = x.clone()
    result = {"captured": False}
    try:
        from megacpp_mcore.testing.cudagraph import capture

        def fwd():
            return layer(hidden_states=static_x, attention_mask=None, rotary_pos_emb=rope)[0]

        with torch.no_grad():
            graph, static_out = capture(fwd)
            static_x.copy_(torch.randn_like(x))
            graph.replay()
            torch.cuda.synchronize()
            eager = fwd()
            result.update(captured=True,
                          max_abs_diff_vs_eager=float((static_out.float() - eager.float()).abs().max()))
    except Exception as exc:  # report, do not hide: the check fails with the reason
        result["error"] = f"{type(exc).__name__}: {exc}"
    # Replay runs the captured kernels on new data: it must equal eager up to bf16 rounding.
    result["ok"] = bool(result["captured"] and result.get("max_abs_diff_vs_eager", 1.0) <= 5e-2)
    return result


def _apply_backend_per_layer(args) -> str:
    """Top-k layers attend over k tokens, the dense layers between them over the full sequence:
    without the patch TE re-runs its CPU-heavy backend selection on every attention call.
    Counts the real selections (``dpa_utils.get_attention_backend``, the name TE's forward calls)."""
    if args.cpu_smoke:
        return "off"
    import importlib

    from megacpp_mcore.patches import _wrapping
    from megacpp_mcore.patches import te_attention_backend_per_layer as patch

    state = patch.check()
    if args.no_te_backend_per_layer:
        # runtime.initialize applied every needed registry entry: put TE's own forward back
        dpa = importlib.import_module(
            "transformer_engine.pytorch.attention.dot_product_attention.dot_product_attention"
        ).DotProductAttention
        dpa.forward = _wrapping.upstream(dpa.forward, patch.NAME)
        print(f"[bench_mod] {patch.NAME}: {state}; reverted to upstream's forward", flush=True)
        return f"{state}: reverted (upstream's process-wide cache)"
    applied = patch.applied()  # runtime.initialize applies it where needed
    print(f"[bench_mod] {patch.NAME}: {state}; applied: {applied}", flush=True)
    return f"{state}: applied={applied}"


def _count_backend_selections() -> list:
    """Wraps TE's ``dpa_utils.get_attention_backend`` with a counter (empty list without TE)."""
    calls: list = []
    try:
        from transformer_engine.pytorch.attention.dot_product_attention import utils
    except ImportError:
        return calls
    fn = utils.get_attention_backend

    def counting(params, *a, **k):
        calls.append(getattr(params, "max_seqlen_q", None))
        return fn(params, *a, **k)

    utils.get_attention_backend = counting
    return calls


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = _args(argv)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    host = _check_host(args.cpu_smoke)
    if args.cpu_smoke:
        args.skip_graph = True
    from megacpp_mcore.train import runtime

    runtime.initialize(runtime.Parallelism(), seed=1234)
    host["te_backend_per_layer_patch"] = _apply_backend_per_layer(args)
    selections = _count_backend_selections()
    results = {"host": host, "args": {k: str(v) if isinstance(v, Path) else v
                                      for k, v in vars(args).items()}, "variants": {}}
    for variant in args.variants.split(","):
        print(f"[bench_mod] timing {variant} ...", flush=True)
        before = len(selections)
        results["variants"][variant] = _time_variant(args, variant)
        results["variants"][variant]["te_backend_selections"] = len(selections) - before
        gc.collect()  # the variant's cycles (see _release) are freed before the next one builds
        _empty_cache()
    if not args.skip_graph:
        print("[bench_mod] CUDA graph capture of a gateskip layer forward ...", flush=True)
        results["cuda_graph"] = _cuda_graph_check(args)
    runtime.shutdown()

    variants = results["variants"]
    base = variants.get("dense")
    ratios = {}
    if base:
        for name, target in TARGETS.items():
            if name in variants:
                ratio = variants[name]["ms_per_step"] / base["ms_per_step"]
                ratios[name] = {"ratio_vs_dense": ratio, "target": target, "ok": ratio <= target}
        if "upstream-dense" in variants:
            ratios["dense_vs_upstream"] = {
                "ratio": base["ms_per_step"] / variants["upstream-dense"]["ms_per_step"]}
    results["ratios"] = ratios

    print(f"\nMoD benchmark: {host['gpu']}, TE {host['te']}, megatron-core {host['megatron_core']}, "
          f"seq {args.seq}, batch {args.batch} x {args.micro_batches} micro-batches, "
          f"hidden {args.hidden}, {args.blocks} blocks, "
          f"vocab {args.vocab}, cross-entropy {args.cross_entropy}")
    print(f"{'variant':<16}{'ms/step':>10}{'peak GiB':>10}{'pre GiB':>9}{'gpu busy':>10}"
          f"{'ratio':>8}{'target':>8}  ok")
    for name, v in variants.items():
        r = ratios.get(name, {})
        ratio = v["ms_per_step"] / base["ms_per_step"] if base else float("nan")
        target = f"{r['target']:.2f}" if r else "-"
        ok = ("yes" if r["ok"] else "NO") if r else ""
        busy = "-" if v["gpu_busy_fraction"] is None else f"{v['gpu_busy_fraction']:.2f}"
        print(f"{name:<16}{v['ms_per_step']:>10.1f}{v['peak_gib']:>10.1f}"
              f"{v['alloc_before_build_gib']:>9.2f}{busy:>10}{ratio:>8.3f}{target:>8}  {ok}")
    print("GPU kernel ms per step by group (3 profiled steps):")
    for name, v in variants.items():
        b = v.get("gpu_breakdown")
        if b:
            groups = ", ".join(f"{g} {ms:.1f}" for g, ms in b["groups_ms_per_step"].items())
            print(f"  {name:<14} total {b['kernel_ms_per_step']:.1f}: {groups}")
            idle = b.get("idle")
            if idle:
                print(f"  {'':<14} idle {idle['idle_ms_per_step']:.1f} ms, of which "
                      f"{idle['idle_ms_in_gaps_ge_20us_per_step']:.1f} in "
                      f"{idle['gaps_ge_20us_per_step']:.0f} gaps >= 20 us")
    print("TE attention-backend selections per variant (whole run): "
          + ", ".join(f"{n} {v['te_backend_selections']}" for n, v in variants.items()))
    if "cuda_graph" in results:
        print(f"cuda graph capture (gateskip layer fwd): {results['cuda_graph']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    failed = [n for n, r in ratios.items() if r.get("ok") is False]
    if "cuda_graph" in results and not results["cuda_graph"]["ok"]:
        failed.append("cuda_graph")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
