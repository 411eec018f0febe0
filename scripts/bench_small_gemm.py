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

from bench_moe_decode import time_route  # median us per call, replayed as one CUDA graph

SHAPES = ((2048, 2048), (5632, 2048), (2048, 5632), (6144, 2048))  # (out, in) of nam56r-lite


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
                us = time_route(lambda: F.linear(x, weight), calls=20, repeats=10)
                print(f"{out_dim:>5}x{in_dim:<5} {name:>8} {rows:>4} {us:7.1f} {size / us / 1e3:6.0f}")
            x = torch.randn(3, in_dim, device="cuda", dtype=dtype)
            us = time_route(lambda: [F.linear(x[j:j + 1], weight) for j in range(3)], calls=20, repeats=10)
            print(f"{out_dim:>5}x{in_dim:<5} {name:>8}  3x1 {us:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
