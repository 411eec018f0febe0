"""Triton epilogues of the fused cross-entropy (CUDA only; imported lazily by ``fused_ce``).

``row_stats``: one program per row streams a ``[c, V]`` logits block in ``BLOCK`` columns with an
online softmax and writes (row max, sum of exponentials, target logit). ``row_grad``: one program per
row rewrites its logits row in place into ``(softmax - onehot) * scale``, so the backward needs no
second ``[c, V]`` buffer. Both accumulate in fp32 whatever the logits dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _row_stats_kernel(logits_ptr, labels_ptr, in_shard_ptr, max_ptr, sum_ptr, target_ptr,
                      n_cols, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    run_max = tl.full([BLOCK], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, x)
        # lanes that have seen only -inf keep a zero sum (avoid inf - inf)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(x - safe)
        run_max = new_max
    row_max = tl.max(run_max, axis=0)
    row_sum = tl.sum(run_sum * tl.exp(run_max - row_max), axis=0)
    label = tl.load(labels_ptr + row)
    hit = tl.load(in_shard_ptr + row)
    target = tl.load(base + label).to(tl.float32)
    tl.store(max_ptr + row, row_max)
    tl.store(sum_ptr + row, row_sum)
    tl.store(target_ptr + row, tl.where(hit != 0, target, 0.0))


@triton.jit
def _row_grad_kernel(logits_ptr, lse_ptr, labels_ptr, in_shard_ptr, scale_ptr,
                     n_cols, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    label = tl.load(labels_ptr + row)
    hit = tl.load(in_shard_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        p = tl.where((cols == label) & (hit != 0), p - 1.0, p)
        tl.store(base + cols, (p * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def _check(logits: torch.Tensor) -> None:
    if not logits.is_cuda or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(
            f"triton CE epilogue needs a CUDA [c, V] row-major block, got {tuple(logits.shape)} "
            f"on {logits.device} with strides {logits.stride()}"
        )


def row_stats(logits: torch.Tensor, local_labels: torch.Tensor, in_shard: torch.Tensor):
    """(max, sum exp(x - max), target logit or 0) per row of ``logits`` ``[c, V]`` (fp32 each)."""
    _check(logits)
    c, v = logits.shape
    out = torch.empty(3, c, dtype=torch.float32, device=logits.device)
    _row_stats_kernel[(c,)](logits, local_labels.contiguous(), in_shard.to(torch.int8).contiguous(),
                            out[0], out[1], out[2], v, logits.stride(0), BLOCK=BLOCK)
    return out[0], out[1], out[2]


def row_grad(logits, lse, local_labels, in_shard, scale) -> torch.Tensor:
    """``(softmax - onehot) * scale`` written over ``logits`` (returned, same dtype)."""
    _check(logits)
    c, v = logits.shape
    _row_grad_kernel[(c,)](logits, lse.contiguous(), local_labels.contiguous(),
                           in_shard.to(torch.int8).contiguous(), scale.float().contiguous(), v,
                           logits.stride(0), BLOCK=BLOCK)
    return logits
