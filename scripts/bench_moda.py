"""MoDA on one GPU: step time and peak memory versus the same model without MoDA, in one run.

    python scripts/bench_moda.py                         # seq 4096 and 16384, TE backend, bf16
    python scripts/bench_moda.py --seq 4096 --out moda.json

For every sequence length it builds the model through megatron-core (``runtime.build_model``,
Megatron DDP + Adam, bf16) as ``base`` (plain TE attention on every ``A`` layer), ``moda`` (MoDA on
every ``A`` layer, detached buffer, FlashAttention-2 sequence kernel through aten), ``moda-cudnn``
(same, cuDNN through aten) and ``moda-te`` (same, TE's fused attention: the kernel of the base
layers, with its softmax statistics), trains ``--warmup`` + ``--steps`` steps on synthetic batches and
reports ms/step and ``torch.cuda.max_memory_allocated``. Targets (issue 7): step-time ratio
moda/base <= 1.10, and the peak-memory increase within 10% of ``depth_kv_bytes`` (the formula),
which is also checked against the bytes the buffer actually allocated (``megacpp_stats``).

Every (seq, variant) runs in a FRESH Python process (this script re-invoked with ``--child``): the
allocator starts empty and nothing of the previous variant survives (in one process the previous
model + Adam state, ~10 GiB, stayed allocated and was counted in the next variant's peak).
Before the runs, ``--check-seq`` compares the fast path with the reference (output and gradients,
bf16, Megatron-like strided q/k/v) for every CUDA sequence kernel, with the fused Triton depth
kernels (where triton imports: training runs them unchecked, so this is their check on the
benchmark's shapes) and, on TE's kernel, with the torch depth path; ``--no-check`` skips it.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch


# variant -> MoDAConfig.cuda_kernel, or (cuda_kernel, depth_kernel) (None: no MoDA). The depth part
# runs the fused Triton kernels (depth_kernel "auto") except in "moda-te-torchdepth" (batched matmuls).
VARIANTS = {"base": None, "moda": "flash", "moda-cudnn": "cudnn", "moda-te": "te",
            "moda-te-torchdepth": ("te", "torch")}


def moda_config(variant: str):
    from megacpp_mcore.features.moda import MoDAConfig

    kind = VARIANTS[variant]
    cuda_kernel, depth_kernel = kind if isinstance(kind, tuple) else (kind, "auto")
    return MoDAConfig(cuda_kernel=cuda_kernel, depth_kernel=depth_kernel)


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
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="moda: FlashAttention-2 sequence kernel (aten); moda-cudnn: cuDNN (aten); "
                        "moda-te: TE's fused attention (cuDNN, as the base TE layers)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--check-seq", type=int, default=1024, help="sequence length of the kernel check")
    p.add_argument("--no-check", action="store_true", help="skip the fast-vs-reference kernel check")
    p.add_argument("--in-process", action="store_true",
                   help="run all variants in this process (allocator state then leaks across variants)")
    p.add_argument("--child", nargs=2, metavar=("SEQ", "VARIANT"), help=argparse.SUPPRESS)
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
        from megacpp_mcore.spec import backends

        backends.resolve_backend_name("te")  # raises with what to install


def model_config(args, seq: int, variant: str):
    from megacpp_mcore.models.presets import custom_model

    return custom_model(
        pattern=args.pattern, num_layers=args.layers, hidden_size=args.hidden,
        num_attention_heads=args.heads, num_query_groups=args.kv_groups, ffn_hidden_size=args.ffn,
        vocab_size=args.vocab, seq_length=seq, moe=None, mla=None, mtp_depth=0,
        features={} if VARIANTS[variant] is None else {"moda": moda_config(variant)},
    )


def run_variant(args, seq: int, variant: str) -> dict:
    from megacpp_mcore.train import runtime
    from megacpp_mcore.features.moda import DepthAwareAttention
    from megacpp_mcore.testing.parity import synthetic_batches

    start_allocated = torch.cuda.memory_allocated()  # 0 in a fresh process
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
    # parameters, grads, Adam state (+ the MoDA buffer of the last micro-batch, kept until the next)
    steady_allocated = torch.cuda.memory_allocated()
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
        "model_and_optimizer_bytes": steady_allocated,
    }
    cores = [mod for c in chunks for mod in c.modules() if isinstance(mod, DepthAwareAttention)]
    if cores:
        result["observed_kernel"] = sorted({c.observed_kernel for c in cores})
        # the depth part of the depth-reading layers: "triton" (fused kernels) or "torch"
        result["observed_depth_kernel"] = sorted({c.observed_depth_kernel for c in cores if c.reads})
        result["buffer_bytes_allocated"] = int(sum(
            c.megacpp_stats().get("moda_buffer_bytes", 0) for c in cores))
        result["buffer_bytes_formula"] = m.features["moda"].buffer_bytes(
            m, args.batch, dtype=config.params_dtype)
    del chunks, optimizer, cores
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run_child(args, seq: int, variant: str) -> dict:
    """This variant in a fresh process; its JSON result (or the error it died with)."""
    import os
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(seq), variant,
           "--batch", str(args.batch), "--pattern", args.pattern, "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--heads", str(args.heads), "--ffn", str(args.ffn),
           "--vocab", str(args.vocab), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--backend", args.backend]
    if args.kv_groups is not None:
        cmd += ["--kv-groups", str(args.kv_groups)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"variant": variant, "seq": seq, "error": f"child exited {proc.returncode}: {' | '.join(tail)[:400]}"}


def guarded_run(args, seq: int, variant: str) -> dict:
    try:
        return run_variant(args, seq, variant)
    except Exception as exc:  # OOM or a kernel refusing the shape: record it, go on
        res = {"variant": variant, "seq": seq, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        gc.collect()
        torch.cuda.empty_cache()
        return res


def kernel_check(args) -> list[dict]:
    """Fast path versus reference on this model's head shapes (bf16, Megatron-like q/k/v strides:
    v a view of the fused QKV output), 7 depth keys: max |error| of the output and of dq/dk/dv,
    relative to the largest reference value. Rows name the sequence and the depth kernel."""
    from megacpp_mcore.features.moda.depth import load_kernels
    from megacpp_mcore.features.moda.fast import fast_depth_attention
    from megacpp_mcore.features.moda.reference import reference_depth_attention

    triton_depth = not isinstance(load_kernels(), ImportError)

    heads, groups = args.heads, args.kv_groups or args.heads
    d, s, b, n, r = args.hidden // args.heads, args.check_seq, 1, 7, args.heads // (args.kv_groups or args.heads)
    out = []
    for seq_kernel, depth_kernel in (("flash", "auto"), ("cudnn", "auto"), ("te", "auto"), ("te", "torch")):
        kernel = f"{seq_kernel}+{'triton' if depth_kernel == 'auto' and triton_depth else 'torch'}-depth"
        try:
            g = torch.Generator(device="cuda").manual_seed(0)
            mixed = torch.randn(s, b, groups, (r + 2) * d, device="cuda", dtype=torch.bfloat16,
                                generator=g).requires_grad_()
            q = mixed[..., : r * d].reshape(s, b, heads, d) * 1.0
            k = mixed[..., r * d: (r + 1) * d] * 1.0
            v = mixed[..., (r + 1) * d:]
            kd = torch.randn(s, b, groups, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            vd = torch.randn(s, b, groups, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            grad = torch.randn(s, b, heads, d, device="cuda", dtype=torch.bfloat16, generator=g)
            fast = fast_depth_attention(q, k, v, kd, vd, scale=d ** -0.5, cuda_kernel=seq_kernel,
                                        depth_kernel=depth_kernel)
            g_fast = torch.autograd.grad(fast, [mixed], grad, retain_graph=True)[0]
            ref = reference_depth_attention(*(x.float() for x in (q, k, v, kd, vd)), scale=d ** -0.5)
            g_ref = torch.autograd.grad(ref, [mixed], grad.float())[0]
            rel = lambda a, b_: float((a.detach().float() - b_.detach()).abs().max() / b_.detach().abs().max())  # noqa: E731
            res = {"kernel": kernel, "seq": s, "out_rel_err": rel(fast, ref), "grad_rel_err": rel(g_fast, g_ref)}
            res["ok"] = res["out_rel_err"] < 2e-2 and res["grad_rel_err"] < 5e-2
        except Exception as exc:
            res = {"kernel": kernel, "seq": s, "error": f"{type(exc).__name__}: {str(exc)[:300]}", "ok": False}
        print(json.dumps(res), flush=True)
        out.append(res)
    gc.collect()
    torch.cuda.empty_cache()  # the children get the whole GPU
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    check_environment(args)
    if args.child:
        from megacpp_mcore.train import runtime

        runtime.initialize(runtime.Parallelism(), seed=1234)
        res = guarded_run(args, int(args.child[0]), args.child[1])
        print("RESULT " + json.dumps(res), flush=True)
        runtime.shutdown()
        return 0
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  backend {args.backend}  "
          f"model {args.pattern} x {args.layers}, hidden {args.hidden}, heads {args.heads}, batch {args.batch}")
    checks = [] if args.no_check else kernel_check(args)
    results = []
    if args.in_process:
        from megacpp_mcore.train import runtime

        runtime.initialize(runtime.Parallelism(), seed=1234)
    for seq in args.seq:
        for variant in args.variants:
            res = guarded_run(args, seq, variant) if args.in_process else run_child(args, seq, variant)
            print(json.dumps(res), flush=True)
            results.append(res)
    summary = summarize(results)
    print(format_table(results, summary, checks))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "kernel_check": checks, "results": results, "summary": summary},
                      fh, indent=1)
    if args.in_process:
        runtime.shutdown()
    return 0


def depth_note(r: dict) -> str:
    """' +triton-depth' / ' +torch-depth' for MoDA rows (which depth kernel ran)."""
    ran = r.get("observed_depth_kernel")
    return "".join(f" +{name}-depth" for name in ran) if ran else ""


def summarize(results: list[dict]) -> list[dict]:
    out = []
    for seq in sorted({r["seq"] for r in results}):
        by = {r["variant"]: r for r in results if r["seq"] == seq and "error" not in r}
        base = by.get("base")
        for name in [v for v in VARIANTS if VARIANTS[v] is not None]:
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


def format_table(results: list[dict], summary: list[dict], checks: list[dict] = ()) -> str:
    lines = []
    if checks:
        lines += ["", "| kernel check | seq | out rel err (<2e-2) | grad rel err (<5e-2) |", "|---|---|---|---|"]
        for c in checks:
            if "error" in c:
                lines.append(f"| {c['kernel']} | {c['seq']} | {c['error']} | |")
            else:
                lines.append(f"| {c['kernel']} | {c['seq']} | {c['out_rel_err']:.2e} | {c['grad_rel_err']:.2e} "
                             f"{'ok' if c['ok'] else 'MISS'} |")
    lines += ["", "| seq | variant | ms/step | peak GiB | model+optimizer GiB | final loss | kernel |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['variant']} | {r['error']} | | | | |")
        else:
            lines.append(f"| {r['seq']} | {r['variant']} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} | "
                         f"{r['model_and_optimizer_bytes'] / 2**30:.2f} | {r['final_loss']:.3f} | "
                         f"{','.join(r.get('observed_kernel', ['backend default']))}"
                         f"{depth_note(r)} |")
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
