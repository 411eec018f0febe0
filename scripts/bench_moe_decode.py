"""Decode-sized MoE expert routes side by side: dense (every expert), gathered (each token's top-k
experts' weights copied, then batched GEMMs) and sparse (the Triton kernel reading each chosen
expert once, ``megacpp_mcore.infer.moe_triton``), at the token counts decoding runs (plain steps:
the batch; speculative verification: batch x (K + 1)), for nam56r-lite's and the public NAM56R's
expert shapes.

    python scripts/bench_moe_decode.py [--shapes lite,nam56r] [--tokens 1,2,3,8,24] [--dtype fp32,bf16]
    python scripts/bench_moe_decode.py --cpu-smoke     # the torch routes at tiny shapes, no timing claims

Each route runs as one CUDA graph of ``--calls`` calls (launch overhead hidden, as in a graphed
decode step), timed by CUDA events, the median of ``--repeats``; the sparse kernel once per
``--kernel-configs`` entry (block sizes and split of ``moe_triton.expert_gemm``), the fastest shown
with its configuration (what ``moe_triton``'s defaults should be). ``experts read`` is the bytes model
of ``SyncFreeMoE.route`` (in experts' weights); ``GB/s`` divides the bytes of the experts the route
reads (dense: all; gathered: 3 reads per chosen expert; sparse: the distinct chosen ones) by the
time. ``vs best torch`` is the sparse route's time against the faster torch route's, ``max err``
its largest difference from the dense route. The router is random top-k (softmax scores), seeded.
Prints one table; ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

SHAPES = {  # name -> (experts, top-k, hidden, expert ffn): presets.py
    "lite": (8, 2, 2048, 1024),
    "nam56r": (16, 4, 4096, 896),
    "tiny": (4, 2, 128, 128),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="lite,nam56r", help=f"comma-separated of {', '.join(SHAPES)}")
    p.add_argument("--tokens", default="1,2,3,8,16,24", help="comma-separated token counts")
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated of fp32, bf16")
    p.add_argument("--calls", type=int, default=20, help="route calls per CUDA graph (default 20)")
    p.add_argument("--repeats", type=int, default=10, help="timed graph replays (default 10)")
    p.add_argument("--kernel-configs", default="64x64x1,32x64x1,128x64x1,64x32x1,64x64x2,32x64x4",
                   help="the sparse kernel's BLOCK_NxBLOCK_KxSPLIT_K configurations to time; the "
                        "table shows the fastest per row (default: a sweep of six)")
    p.add_argument("--cpu-smoke", action="store_true", help="torch routes, tiny shape, on the CPU")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    for name in args.shapes.split(","):
        if name not in SHAPES:
            p.error(f"--shapes: unknown shape {name!r}; allowed: {', '.join(SHAPES)}")
    for name in args.dtype.split(","):
        if name not in DTYPES:
            p.error(f"--dtype: unknown dtype {name!r}; allowed: {', '.join(DTYPES)}")
    try:
        args.tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens: {args.tokens!r} is not a comma-separated list of integers")
    if any(t < 1 for t in args.tokens):
        p.error(f"--tokens: {args.tokens} has a count below 1")
    raw = args.kernel_configs
    try:
        args.kernel_configs = [dict(zip(("block_n", "block_k", "split_k"), map(int, c.split("x"))))
                               for c in raw.split(",")]
    except ValueError:
        args.kernel_configs = None
    if not args.kernel_configs or any(len(c) != 3 or min(c.values()) < 1 for c in args.kernel_configs):
        p.error(f"--kernel-configs: {raw!r} is not a comma-separated list of BLOCK_NxBLOCK_KxSPLIT_K "
                "(positive integers, e.g. 64x64x1)")
    if args.cpu_smoke:
        args.shapes, args.dtype = "tiny", "fp32"
    elif not torch.cuda.is_available():
        p.error("no CUDA device here; --cpu-smoke runs the torch routes on the CPU")
    return args


def routes_for(shape: str, dtype: torch.dtype, device: str):
    """A SyncFreeMoE holding random stacked expert weights of ``shape`` (routes only: no router),
    every route allowed (``picked``: what SyncFreeMoE.route takes with the kernel opted in)."""
    from megacpp_mcore.infer.moe import ROUTES, SyncFreeMoE

    experts, topk, hidden, ffn = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    w1 = (torch.randn(experts, hidden, 2 * ffn, generator=g) / hidden ** 0.5).to(device, dtype)
    w2 = (torch.randn(experts, ffn, hidden, generator=g) / ffn ** 0.5).to(device, dtype)
    fast = SyncFreeMoE(None, w1, w2, topk=topk)
    fast.routes = ROUTES
    return fast


def inputs(fast, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    experts, hidden = fast.num_experts, fast.w1.shape[1]
    x = torch.randn(tokens, hidden, generator=g)
    scores = torch.randn(tokens, experts, generator=g).softmax(-1)
    top = scores.topk(fast.topk, dim=-1)
    probs = torch.zeros(tokens, experts).scatter(1, top.indices, top.values)
    return x.to(fast.w1.device, fast.w1.dtype), probs.to(fast.w1.device), top.indices


def time_route(fn, calls: int, repeats: int) -> float:
    """Median microseconds per call of ``fn`` replayed as one CUDA graph of ``calls`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def measure(args) -> list[dict]:
    device = "cpu" if args.cpu_smoke else "cuda"
    rows = []
    for shape in args.shapes.split(","):
        for dtype_name in args.dtype.split(","):
            fast = routes_for(shape, DTYPES[dtype_name], device)
            expert_mb = (fast.w1[0].numel() + fast.w2[0].numel()) * fast.w1.element_size() / 1e6
            for tokens in args.tokens:
                x, probs, chosen = inputs(fast, tokens, seed=tokens)
                distinct = int(chosen.unique().numel())
                read = fast.expert_reads(tokens)  # the routes this run can take, and their reads
                if "sparse" in read:
                    read["sparse"] = distinct  # what the kernel reads here, not its bound
                routes = list(read)
                ref = fast.dense(x, probs).float()
                row = {"shape": shape, "dtype": dtype_name, "tokens": tokens,
                       "distinct_experts": distinct, "expert_mb": expert_mb, "picked": fast.route(tokens)}
                for route in routes:
                    out = getattr(fast, route)(x, probs).float()
                    row[f"{route}_max_err"] = float((out - ref).abs().max())
                    if device == "cuda":
                        configs = args.kernel_configs if route == "sparse" else [{}]
                        timed = {}
                        for options in configs:
                            fast.kernel_options = options
                            name = "x".join(map(str, options.values()))
                            timed[name] = time_route(lambda r=route: getattr(fast, r)(x, probs),
                                                     args.calls, args.repeats)
                        fast.kernel_options = {}
                        best = min(timed, key=timed.get)
                        us = timed[best]
                        row[f"{route}_us"] = us
                        row[f"{route}_gb_s"] = read[route] * expert_mb / 1e3 / (us / 1e6)
                        if route == "sparse":
                            row["sparse_config"], row["sparse_us_by_config"] = best, timed
                if "sparse_us" in row:
                    row["sparse_vs_best_torch"] = min(row["dense_us"], row["gathered_us"]) / row["sparse_us"]
                rows.append(row)
                print(f"[bench_moe_decode] {shape} {dtype_name} {tokens} tokens: " + ", ".join(
                    f"{r} {row[f'{r}_us']:.1f} us" if f"{r}_us" in row else
                    f"{r} max err {row[f'{r}_max_err']:.1e}" for r in routes), flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    def cell(row, key, fmt):
        return "-" if row.get(key) is None else format(row[key], fmt)

    print("\n| shape | dtype | tokens | experts chosen | picked | dense us (GB/s) | gathered us (GB/s) "
          "| sparse us (GB/s) | its config | sparse vs best torch | gathered max err | sparse max err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        timed = [f"{cell(r, f'{k}_us', '.1f')} ({cell(r, f'{k}_gb_s', '.0f')})"
                 for k in ("dense", "gathered", "sparse")]
        ratio = "-" if r.get("sparse_vs_best_torch") is None else f"x{r['sparse_vs_best_torch']:.2f}"
        print(f"| {r['shape']} | {r['dtype']} | {r['tokens']} | {r['distinct_experts']} | {r['picked']} "
              f"| {' | '.join(timed)} | {r.get('sparse_config', '-')} | {ratio} "
              f"| {cell(r, 'gathered_max_err', '.1e')} "
              f"| {cell(r, 'sparse_max_err', '.1e')} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.cpu_smoke:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 routes compared in fp32
    rows = measure(args)
    print_table(rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "gpu": None if args.cpu_smoke else
                                              torch.cuda.get_device_name()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
