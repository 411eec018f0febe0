"""The hard-skip combine of a gathering FlexiDepth layer as one pass (Triton on CUDA, torch
elsewhere): each output row is either the block's output for a kept token or the skip path
``x + update`` of a skipped one.

``combine_rows(src, processed, x, update)``: ``src`` ``[rows, b]`` int64, per position the row of
``processed`` (``[k * b, h]`` flattened, the block's output of the gathered tokens) that holds its
output, or ``-1`` where it takes the skip path; ``x`` ``[rows, b, h]`` the layer input; ``update``
the adapter's ``up(act(down(z)))`` (same shape, or ``None`` for ``adapter="none"``).

Unfused, the skip path ``x + update`` is one more full pass to write (an ``addmm`` with ``x`` as its
input matrix first copies ``x`` into its output, then reads it back as the GEMM's ``C``) and the
kept rows are scattered over it afterwards, so a kept row's skip path is computed, written and
overwritten. Here each row reads only what it needs: a kept row its block output, a skipped row
``x`` and ``update``; every row is written once. ``x + update`` is summed in fp32 and rounded once,
as torch's ``x + update`` does, so the two paths agree bit for bit.
"""

from __future__ import annotations

import torch

from megacpp_mcore.spec import backends

MAX_HIDDEN = 16384  # one row per program; wider layers take the torch formulation


def combine_rows(src: torch.Tensor, processed: torch.Tensor, x: torch.Tensor,
                 update: torch.Tensor | None) -> torch.Tensor:
    """``[rows, b, h]``: ``processed[src]`` where ``src >= 0``, else ``x + update`` (module
    docstring); the Triton kernel for CUDA tensors outside autograd, torch ops otherwise."""
    h = x.shape[-1]
    processed = processed.reshape(-1, h).to(x.dtype)
    if (x.is_cuda and not torch.is_grad_enabled() and h <= MAX_HIDDEN and processed.shape[0]
            and backends.detect().triton is not None):
        from megacpp_mcore.features.flexidepth import combine_triton

        return combine_triton.combine(src, processed, x, update)
    return _combine_torch(src, processed, x, update)


def _combine_torch(src, processed, x, update):
    """The torch form: the skip path into a buffer of the output rows plus a spare one, then the
    processed rows copied onto their positions (``index_copy_``; rows no position of this rank
    takes, e.g. other TP ranks' tokens under SP, land on the spare row, which is dropped). No
    data-dependent shapes, so no host synchronisation. Under autograd, out-of-place ops."""
    n, h = src.numel(), x.shape[-1]
    slots = processed.shape[0]
    # per processed row, the output row that takes it (the spare row n where none does); the
    # skipped positions all write the extra slot `slots`, which is cut off
    target = torch.full((slots + 1,), n, dtype=torch.long, device=x.device)
    target.scatter_(0, torch.where(src >= 0, src, slots).reshape(-1), torch.arange(n, device=x.device))
    target = target[:slots]
    flat = x.reshape(n, h)
    if torch.is_grad_enabled():
        skip = flat if update is None else flat + update.reshape(n, h)
        spare = torch.cat([skip, skip.new_zeros(1, h)])
        return spare.index_copy(0, target, processed)[:n].view(x.shape)
    buffer = x.new_empty(n + 1, h)
    if update is None:
        buffer[:n].copy_(flat)
    else:
        torch.add(flat, update.reshape(n, h), out=buffer[:n])
    return buffer.index_copy_(0, target, processed)[:n].view(x.shape)
