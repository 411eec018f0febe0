"""Triton kernel of a capacity route (:meth:`.dispatch.SkipDispatcher.start` with a capacity, CUDA
only): per sequence, the effective keep mask, the block's gather index and each position's row of
the block output, in one launch instead of about twenty small torch ops (a scan, the capacity
cut, the kept-first order by a scatter, the combine's source rows, the dispatch's flat index).
An eager hard forward of nam56r-lite launches ~800 kernels against the dense forward's ~440, and
where a layer skips most of its tokens the device waits for the host that queues them.

One program per sequence walks it in chunks twice: first its kept count (capped at the capacity),
then the running rank ``r`` of each position among the kept ones. A kept position within the
capacity (``r <= longest``) takes slot ``r - 1`` of the gather index; any other position slot
``total + p - r`` (after the sequence's kept ones, in order), written only where the slot is below
``k``: exactly the first ``k`` rows of the stable "kept first" order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 1024


@triton.jit
def _route_kernel(mask_ptr, eff_ptr, idx_ptr, flat_ptr, src_ptr, S, B, longest, K, start, rows,
                  CHUNK: tl.constexpr, CHUNKS: tl.constexpr):
    j = tl.program_id(0)
    offs = tl.arange(0, CHUNK)
    total = 0
    for c in range(CHUNKS):
        p = c * CHUNK + offs
        total += tl.sum(tl.load(mask_ptr + p * B + j, mask=p < S, other=0).to(tl.int32), axis=0)
    total = tl.minimum(total, longest)
    carry = 0
    for c in range(CHUNKS):
        p = c * CHUNK + offs
        inside = p < S
        m = tl.load(mask_ptr + p * B + j, mask=inside, other=0).to(tl.int32)
        r = carry + tl.cumsum(m, axis=0)  # inclusive: kept positions up to p
        carry += tl.sum(m, axis=0)
        eff = (m != 0) & (r <= longest)
        r = tl.minimum(r, longest)  # the effective mask's ranks
        slot = tl.where(eff, r - 1, total + p - r)
        tl.store(eff_ptr + p * B + j, eff.to(tl.int8), mask=inside)
        into = inside & (slot < K)
        tl.store(idx_ptr + slot * B + j, p.to(tl.int64), mask=into)
        tl.store(flat_ptr + slot * B + j, p.to(tl.int64) * B + j, mask=into)
        local = p - start
        mine = inside & (local >= 0) & (local < rows)
        src = tl.where(eff, (r - 1).to(tl.int64) * B + j, -1)
        tl.store(src_ptr + local * B + j, src, mask=mine)


def route(mask: torch.Tensor, longest: int, k: int, start: int, rows: int):
    """``mask`` ``[s, b]`` bool (contiguous) -> (the effective mask ``[s, b]`` bool, the gather
    index ``[k, b]`` int64, its rows of the flattened ``[s * b, h]`` sequence ``[k, b]``, the
    source rows ``[rows, b]`` int64 of positions ``start .. start + rows``: ``SkipRoute.src``)."""
    s, b = mask.shape
    mask = mask.contiguous()
    eff = torch.empty((s, b), dtype=torch.int8, device=mask.device)
    idx = torch.empty((k, b), dtype=torch.long, device=mask.device)
    flat = torch.empty((k, b), dtype=torch.long, device=mask.device)
    src = torch.empty((rows, b), dtype=torch.long, device=mask.device)
    if b:
        _route_kernel[(b,)](mask.view(torch.int8), eff, idx, flat, src, s, b, longest, k, start, rows,
                            CHUNK=CHUNK, CHUNKS=triton.cdiv(s, CHUNK), num_warps=4)
    return eff.view(torch.bool), idx, flat, src
