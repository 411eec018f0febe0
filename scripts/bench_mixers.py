#!/usr/bin/env python
"""H200 check of the ``M`` and ``R`` fast paths against their torch references, in one run.

M: Megatron-Core's MambaMixer (TE linears + mamba_ssm Triton kernels, our slot adapter) vs our torch
   SSD mixer loaded with the SAME weights: output and gradient agreement (bf16) and fwd+bwd time.
R: the M2RNN Triton scan kernel vs the torch scan (fp32): forward and gradient agreement and time,
   at batch 2, seq 4096, 8 heads, key dim 64, value dim 16 by default (acceptance: >= 50x fwd+bwd).

Usage (CUDA host with TE 2.11, megatron-core 0.16.1, mamba_ssm, triton 3.6):
    PYTHONPATH=. python scripts/bench_mixers.py --out bench_mixers.json
Prints a table (also as markdown for docs/benchmarks.md); exits 1 if a check fails or errors.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import traceback

import torch


DEVICE = "cuda"  # module-level so the script's logic can be smoke-run on CPU (Triton interpreter)


def timed_ms(fn, *, reps: int, warmup: int) -> float:
    """Mean wall time of ``fn()`` in ms, measured with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) * 1e3 / reps
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against reference ``b``."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_mamba(args) -> dict:
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megacpp_mcore.spec import backends
    from megacpp_mcore.train import runtime
    from megacpp_mcore.layers.mixers import mamba
    from megacpp_mcore.models.presets import custom_model

    env = backends.detect()
    backends.require("mamba_ssm", "the M fast path benchmark")
    mem_eff = env.causal_conv1d is not None
    if args.hidden % 32:
        raise ValueError(f"--hidden {args.hidden} must be a multiple of 32 (Mamba head dim 64, expand 2)")
    model = custom_model(pattern="M", num_layers=1, hidden_size=args.hidden,
                         num_attention_heads=args.hidden // 128, seq_length=args.seq, moe=None,
                         mla=None, mtp_depth=0)
    runtime.initialize(runtime.Parallelism(), seed=1234)
    config = runtime.transformer_config(model, runtime.Parallelism(), bf16=True,
                                        use_mamba_mem_eff_path=mem_eff)
    spec = mamba.mixer_spec(config, backends.get_backend("te"))
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    fast = build_module(spec, config=config, layer_number=1, pg_collection=pgs).cuda()
    ref_spec = ModuleSpec(module=mamba.TorchMambaMixer, params=spec.params, submodules=spec.submodules)
    ref = build_module(ref_spec, config=config, layer_number=1, pg_collection=pgs).cuda()
    ref.load_state_dict(fast.state_dict())

    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(args.seq, args.batch, args.hidden, device=DEVICE, dtype=torch.bfloat16, generator=g)
    dy = torch.randn(x.shape, device=DEVICE, dtype=torch.bfloat16, generator=g)

    def run(mixer):
        xi = x.clone().requires_grad_()
        out, _ = mixer(xi)
        grads = torch.autograd.grad(out, [xi, mixer.in_proj.weight, mixer.A_log], dy)
        return out, grads

    out_f, grads_f = run(fast)
    out_r, grads_r = run(ref)
    errs = {"out": rel_err(out_f, out_r), "dx": rel_err(grads_f[0], grads_r[0]),
            "d_in_proj": rel_err(grads_f[1], grads_r[1]), "d_A_log": rel_err(grads_f[2], grads_r[2])}
    fast_ms = timed_ms(lambda: run(fast), reps=args.reps, warmup=2)
    ref_ms = timed_ms(lambda: run(ref), reps=args.reps, warmup=1)
    tol = args.mamba_tol
    return {
        "shape": {"seq": args.seq, "batch": args.batch, "hidden": args.hidden,
                  "nheads": fast.nheads, "ngroups": fast.ngroups, "d_state": fast.d_state},
        "fast_path": "MambaMixer mamba_split_conv1d_scan_combined" if mem_eff
        else "MambaMixer prefill path (causal_conv1d missing: use_mamba_mem_eff_path=False)",
        "rel_err": errs, "tolerance": tol,
        "fast_fwd_bwd_ms": fast_ms, "torch_fwd_bwd_ms": ref_ms, "speedup": ref_ms / fast_ms,
        "pass": all(math.isfinite(e) and e < tol for e in errs.values()),
    }


def bench_m2rnn(args) -> dict:
    import torch.nn.functional as F

    from megacpp_mcore.spec import backends
    from megacpp_mcore.layers.mixers.m2rnn import m2rnn_scan_torch

    backends.require("triton", "the M2RNN Triton kernel benchmark")
    from megacpp_mcore.layers.mixers.m2rnn_triton import m2rnn_scan_triton

    B, T, H, K, V = args.r_batch, args.r_seq, args.r_heads, args.r_kdim, args.r_vdim
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = F.normalize(torch.randn(B, T, H, K, device=DEVICE, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, device=DEVICE, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, device=DEVICE, generator=g)
    f = torch.sigmoid(torch.randn(B, T, H, device=DEVICE, generator=g) + 2.0)
    W = torch.randn(H, V, V, device=DEVICE, generator=g) * (0.5 / math.sqrt(V))
    ins = [t.requires_grad_() for t in (q, k, v, f, W)]
    dy = torch.randn(B, T, H, V, device=DEVICE, generator=g)

    def fwd_bwd(scan):
        y = scan(*ins)
        return y, torch.autograd.grad(y, ins, dy)

    y_r, g_r = fwd_bwd(m2rnn_scan_torch)
    y_t, g_t = fwd_bwd(m2rnn_scan_triton)
    errs = {"y": rel_err(y_t, y_r)} | {f"d{n}": rel_err(a, b) for n, a, b in zip("qkvfW", g_t, g_r)}
    with torch.no_grad():
        torch_fwd = timed_ms(lambda: m2rnn_scan_torch(*ins), reps=args.torch_reps, warmup=1)
        triton_fwd = timed_ms(lambda: m2rnn_scan_triton(*ins), reps=args.reps, warmup=1)
    torch_fb = timed_ms(lambda: fwd_bwd(m2rnn_scan_torch), reps=args.torch_reps, warmup=0)
    triton_fb = timed_ms(lambda: fwd_bwd(m2rnn_scan_triton), reps=args.reps, warmup=1)
    # Kernel sweep (state rows per program, warps, tl.dot precision): each config is checked, then
    # timed.
    sweep = []
    for block_k, warps, precision in ((16, 1, "tf32x3"), (16, 2, "tf32x3"), (32, 1, "tf32x3"),
                                      (32, 2, "tf32x3"), (64, 4, "tf32x3"), (16, 1, "ieee")):
        if block_k > max(K, 16):
            continue
        scan = functools.partial(m2rnn_scan_triton, block_k=block_k, num_warps=warps, precision=precision)
        y_s, g_s = fwd_bwd(scan)
        err = max([rel_err(y_s, y_r)] + [rel_err(a, b) for a, b in zip(g_s, g_r)])
        sweep.append({"block_k": block_k, "num_warps": warps, "precision": precision, "max_rel_err": err,
                      "fwd_bwd_ms": timed_ms(lambda: fwd_bwd(scan), reps=args.reps, warmup=1)})
        print("  sweep", sweep[-1])
    best = min((c for c in sweep if c["max_rel_err"] < args.m2rnn_tol), key=lambda c: c["fwd_bwd_ms"],
               default=None)
    speedup = torch_fb / triton_fb
    tol = args.m2rnn_tol
    return {
        "shape": {"batch": B, "seq": T, "heads": H, "k_dim": K, "v_dim": V},
        "rel_err": errs, "tolerance": tol,
        "torch_fwd_ms": torch_fwd, "triton_fwd_ms": triton_fwd, "fwd_speedup": torch_fwd / triton_fwd,
        "torch_fwd_bwd_ms": torch_fb, "triton_fwd_bwd_ms": triton_fb, "fwd_bwd_speedup": speedup,
        "sweep": sweep, "best": best,
        "best_fwd_bwd_speedup": torch_fb / best["fwd_bwd_ms"] if best else None,
        "required_speedup": args.required_speedup,
        "pass": all(e < tol for e in errs.values()) and speedup >= args.required_speedup,
    }


def print_table(results: dict) -> None:
    rows = []
    m = results.get("mamba")
    if m and "error" not in m:
        rows.append(("M fast (MambaMixer) vs torch SSD, fwd+bwd", f"{m['fast_fwd_bwd_ms']:.2f}",
                     f"{m['torch_fwd_bwd_ms']:.2f}", f"{m['speedup']:.1f}x",
                     f"{max(m['rel_err'].values()):.2e} (tol {m['tolerance']:.0e})", m["pass"]))
    r = results.get("m2rnn")
    if r and "error" not in r:
        errs = f"{max(r['rel_err'].values()):.2e} (tol {r['tolerance']:.0e})"
        rows.append(("R Triton vs torch scan, fwd", f"{r['triton_fwd_ms']:.2f}", f"{r['torch_fwd_ms']:.2f}",
                     f"{r['fwd_speedup']:.1f}x", errs, "-"))
        rows.append(("R Triton vs torch scan, fwd+bwd", f"{r['triton_fwd_bwd_ms']:.2f}",
                     f"{r['torch_fwd_bwd_ms']:.2f}", f"{r['fwd_bwd_speedup']:.1f}x (need "
                     f">= {r['required_speedup']:.0f}x)", errs, r["pass"]))
        if r.get("best"):
            b = r["best"]
            rows.append((f"R Triton best sweep config (block_k={b['block_k']}, warps={b['num_warps']}), "
                         "fwd+bwd", f"{b['fwd_bwd_ms']:.2f}", f"{r['torch_fwd_bwd_ms']:.2f}",
                         f"{r['best_fwd_bwd_speedup']:.1f}x", f"{b['max_rel_err']:.2e}", "-"))
    header = ("check", "fast ms", "reference ms", "ratio", "max rel err", "pass")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    for name in ("mamba", "m2rnn"):
        if results.get(name, {}).get("error"):
            print(f"{name}: ERROR {results[name]['error']}")


def main(argv=None) -> int:
    from megacpp_mcore.testing import stub_mamba1_extension

    stub_mamba1_extension()  # before backends.detect() runs (it is cached)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--skip-mamba", action="store_true")
    p.add_argument("--skip-m2rnn", action="store_true")
    p.add_argument("--seq", type=int, default=4096, help="M: sequence length")
    p.add_argument("--batch", type=int, default=2, help="M: micro-batch")
    p.add_argument("--hidden", type=int, default=2048, help="M: hidden size (nam56r-lite)")
    p.add_argument("--mamba-tol", type=float, default=2e-2, help="M: max relative L2 error (bf16)")
    p.add_argument("--r-batch", type=int, default=2)
    p.add_argument("--r-seq", type=int, default=4096)
    p.add_argument("--r-heads", type=int, default=8)
    p.add_argument("--r-kdim", type=int, default=64)
    p.add_argument("--r-vdim", type=int, default=16)
    p.add_argument("--m2rnn-tol", type=float, default=1e-3, help="R: max relative L2 error (fp32)")
    p.add_argument("--required-speedup", type=float, default=50.0)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions of the fast paths")
    p.add_argument("--torch-reps", type=int, default=2, help="timed repetitions of the torch scan")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_mixers.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from megacpp_mcore.spec import backends

    env = backends.detect()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "environment": {"te": env.te, "mamba_ssm": env.mamba_ssm, "triton": env.triton,
                               "causal_conv1d": env.causal_conv1d},
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(results))
    for name, fn, skip in (("m2rnn", bench_m2rnn, args.skip_m2rnn), ("mamba", bench_mamba, args.skip_mamba)):
        if skip:
            continue
        try:
            results[name] = fn(args)
        except Exception as exc:  # report and go on with the other check
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "pass": False}
        print(name, json.dumps(results[name], indent=1))
    print_table(results)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    ok = all(results[n]["pass"] for n in ("mamba", "m2rnn") if n in results)
    print("ALL CHECKS PASS" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
