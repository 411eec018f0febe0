"""The weight GEMMs of a decode step at 1-3 rows: ``F.linear`` of nam56r-lite's weight shapes,
fp32 (TF32 off) and bf16, each replayed in a CUDA graph; us per call and the weight's read rate.

    python scripts/bench_small_gemm.py

Why: a speculative step verifies K + 1 positions through every trunk GEMM where a plain step runs
one row. A 1-row product is a GEMV, reading the weight near the memory's peak; 2-3 rows in fp32
take a GEMM kernel that reads it much slower, while bf16 tensor-core kernels cost the same at 1-3
rows. ``3x1`` is three 1-row calls. CUDA only.
"""

import sys

import torch
import torch.nn.functional as F

SHAPES = ((2048, 2048), (5632, 2048), (2048, 5632), (6144, 2048))  # (out, in) of nam56r-lite


def graphed_us(fn, calls: int = 200, per_graph: int = 20) -> float:
    """us per ``fn()`` call, ``per_graph`` calls captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls // per_graph):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_small_gemm: needs a CUDA device; none is visible here", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, TF32 off")
    print(f"{'weight':>11} {'dtype':>8} {'rows':>4} {'us':>7} {'GB/s':>6}")
    for out_dim, in_dim in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            weight = torch.randn(out_dim, in_dim, device="cuda", dtype=dtype)
            size = weight.numel() * weight.element_size()
            name = str(dtype).removeprefix("torch.")
            for rows in (1, 2, 3):
                x = torch.randn(rows, in_dim, device="cuda", dtype=dtype)
                us = graphed_us(lambda: F.linear(x, weight))
                print(f"{out_dim:>5}x{in_dim:<5} {name:>8} {rows:>4} {us:7.1f} {size / us / 1e3:6.0f}")
            x = torch.randn(3, in_dim, device="cuda", dtype=dtype)
            us = graphed_us(lambda: [F.linear(x[j:j + 1], weight) for j in range(3)])
            print(f"{out_dim:>5}x{in_dim:<5} {name:>8}  3x1 {us:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
