"""Triton kernel of the decode-sized MoE: every token through every expert some token chose,
reading only those experts' weights.

``expert_gemm(a, w, used)`` computes ``out[e] = a[e] @ w[e]`` for the experts with ``used[e]`` and
zeros for the others, ``a`` ``[E or 1, n, K]`` (one input shared by all experts: stride 0),
``w`` ``[E, K, N]`` contiguous, ``used`` ``[E]`` on the device. A program owns one expert and one
block of ``BLOCK_N`` output columns (and, with ``split_k`` > 1, a slice of ``K``: partial sums
added in torch, in a fixed order); it returns at once for an unused expert, so the weights read
are those of the experts the router chose, each once, whatever the number of tokens choosing it.
Against the torch routes of :class:`.moe.SyncFreeMoE` (the dense one reads all ``E`` experts; the
gathered one copies each token's ``k`` experts before its GEMMs read the copies, ~3 ``n k``
experts' bytes) that is the fewest bytes a decode step can read, without reading the routing on
the host (a CUDA graph replays it).

Tokens are padded to ``BLOCK_M`` rows (16 .. 64: one tile of ``tl.dot``; up to ``SMALL_ROWS``
fp32 tokens take their own rows and plain multiply-adds instead); fp32 inputs multiply in IEEE fp32 (no TF32).
Runs under ``TRITON_INTERPRET=1`` on CPU tensors (the CPU tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TOKENS = 64  # one BLOCK_M tile of tokens (moe.KERNEL_MAX_TOKENS routes no more here)
BLOCK_N = 64
BLOCK_K = 64
# fp32 tokens up to SMALL_ROWS skip tl.dot (see expert_gemm). From the H200 sweep of
# scripts/bench_moe_decode.py (2026-12-05, docs/benchmarks.md): the multiply-add path beats the
# torch routes at 1-3 tokens and loses to the tl.dot tile at 8 (221 vs ~94 us at nam56r-lite's
# shapes); its best blocks were BLOCK_N 32, split 4 at one token and BLOCK_N 64, split 2 at 2-3.
SMALL_ROWS = 4
SMALL_BLOCK_K = 32


@triton.jit
def _expert_gemm_kernel(a_ptr, w_ptr, used_ptr, out_ptr, n, K, N,
                        stride_ae, stride_am, stride_we, stride_wk, stride_os, stride_oe, stride_om,
                        K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, USE_DOT: tl.constexpr):
    e = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if tl.load(used_ptr + e) != 0:
        a_rows = a_ptr + e * stride_ae + rm[:, None] * stride_am
        w_cols = w_ptr + e * stride_we + rn[None, :]
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            rk = split * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_rows + rk[None, :], mask=(rm[:, None] < n) & (rk[None, :] < K), other=0.0)
            w = tl.load(w_cols + rk[:, None] * stride_wk, mask=(rk[:, None] < K) & (rn[None, :] < N),
                        other=0.0)
            if USE_DOT:
                acc += tl.dot(a, w, input_precision=PRECISION)
            else:  # a few fp32 rows: FMAs on exactly those rows, no tile of 16
                acc += tl.sum(a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    out = out_ptr + split * stride_os + e * stride_oe + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < n) & (rn[None, :] < N))


def expert_gemm(a: torch.Tensor, w: torch.Tensor, used: torch.Tensor, *, split_k: int | None = None,
                block_n: int | None = None, block_k: int = BLOCK_K) -> torch.Tensor:
    """``[E, n, N]``: ``a[e] @ w[e]`` where ``used[e]``, zeros elsewhere (see the module
    docstring); ``a`` ``[E or 1, n, K]``, ``w`` ``[E, K, N]``, ``used`` ``[E]`` (bool or int).
    ``split_k`` / ``block_n`` left out: the H200's best for the path taken (see SMALL_ROWS)."""
    num_experts, k_dim, n_dim = w.shape
    if a.dim() != 3 or a.shape[0] not in (1, num_experts) or a.shape[2] != k_dim:
        raise ValueError(f"expert_gemm: input {tuple(a.shape)} does not match weights {tuple(w.shape)}")
    tokens = a.shape[1]
    if not 1 <= tokens <= MAX_TOKENS:
        raise ValueError(f"expert_gemm: {tokens} tokens; allowed 1..{MAX_TOKENS}")
    # tl.dot takes tiles of >= 16 rows: 16-bit weights run on tensor cores, padding is free; fp32
    # (IEEE, no tensor cores) would spend 16 FMAs per real one at decode's 1-2 tokens, so up to
    # SMALL_ROWS fp32 tokens multiply-add on their own rows (a narrower K block bounds registers)
    dot = w.dtype != torch.float32 or tokens > SMALL_ROWS
    if split_k is None:
        split_k = 1 if dot else 4 if tokens == 1 else 2
    if block_n is None:
        block_n = BLOCK_N if dot or tokens > 1 else 32
    if split_k < 1:
        raise ValueError(f"expert_gemm: split_k={split_k}; allowed >= 1")
    for name, block in (("block_n", block_n), ("block_k", block_k)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"expert_gemm: {name}={block}; allowed: a power of two >= 16")
    a, w = a.contiguous(), w.contiguous()
    used = used.to(torch.int32)
    partial = split_k > 1
    out = torch.empty(split_k, num_experts, tokens, n_dim, device=w.device,
                      dtype=torch.float32 if partial else w.dtype)
    rows = max(16, triton.next_power_of_2(tokens)) if dot else triton.next_power_of_2(tokens)
    if not dot:
        block_k = min(block_k, SMALL_BLOCK_K)
    grid = (num_experts, triton.cdiv(n_dim, block_n), split_k)
    _expert_gemm_kernel[grid](
        a, w, used, out, tokens, k_dim, n_dim,
        0 if a.shape[0] == 1 else a.stride(0), a.stride(1), w.stride(0), w.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        K_PER_SPLIT=triton.cdiv(triton.cdiv(k_dim, split_k), block_k) * block_k,
        BLOCK_M=rows, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=dot,
        PRECISION="ieee" if w.dtype == torch.float32 else "tf32")
    return out.sum(dim=0).to(w.dtype) if partial else out[0]
