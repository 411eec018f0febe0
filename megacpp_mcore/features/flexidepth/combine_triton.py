"""Triton kernel of :func:`megacpp_mcore.features.flexidepth.kernels.combine_rows` (CUDA only)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_kernel(src_ptr, proc_ptr, x_ptr, upd_ptr, out_ptr, hidden,
                    HAS_UPDATE: tl.constexpr, BLOCK: tl.constexpr):
    """One program per output row: the block's row ``processed[src]`` for a kept token
    (``src >= 0``), else ``x + update`` summed in fp32; masked loads read only the side taken."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < hidden
    src = tl.load(src_ptr + row)
    # the row's source as a block, so that the masks are block & block (Triton 3.9's interpreter
    # rejects a block & scalar mask)
    kept = (tl.zeros([BLOCK], dtype=tl.int64) + src) >= 0
    skipped = ~kept
    block = tl.load(proc_ptr + src * hidden + cols, mask=inside & kept, other=0.0)
    skip = tl.load(x_ptr + row * hidden + cols, mask=inside & skipped, other=0.0).to(tl.float32)
    if HAS_UPDATE:
        skip += tl.load(upd_ptr + row * hidden + cols, mask=inside & skipped, other=0.0).to(tl.float32)
    out = tl.where(kept, block.to(tl.float32), skip)
    out = out.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # torch's rounding
    tl.store(out_ptr + row * hidden + cols, out, mask=inside)


def combine(src: torch.Tensor, processed: torch.Tensor, x: torch.Tensor,
            update: torch.Tensor | None) -> torch.Tensor:
    """``src [rows, b]`` int64, ``processed [k * b, h]``, ``x`` and ``update`` ``[rows, b, h]``
    (one dtype) -> ``[rows, b, h]``."""
    h = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    n = src.numel()
    if n == 0:
        return out
    block = triton.next_power_of_2(h)
    upd = x if update is None else update.contiguous()
    _combine_kernel[(n,)](src.contiguous(), processed.contiguous(), x, upd, out, h,
                          HAS_UPDATE=update is not None, BLOCK=block, num_warps=min(8, max(1, block // 256)))
    return out
