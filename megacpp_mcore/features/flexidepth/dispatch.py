"""Hard-skip inference as route -> dispatch -> combine: the block runs on the kept tokens only.

:class:`SkipDispatcher` (one per layer whose hard inference gathers, see
``FlexiDepthConfig.hard_skip_symbols``), per forward:

* ``route``: the whole sequence and its keep mask (all-gathered from their sequence-parallel
  shards); per sequence, the kept positions in sequence order (the causal order stays right),
  padded at the END to the batch's largest count ``k`` (rounded up to a multiple of the TP size
  under SP) with the sequence's skipped positions, in order (each column of the index is a prefix
  of a permutation: no position twice). Pads sit after every real token, so a causal block never
  lets a real token see one; their outputs are dropped. ``k`` is read on the host (the block's
  shape depends on it): the one host synchronisation of a forward. :meth:`SkipDispatcher.start`
  queues its copy and :meth:`SkipDispatcher.finish` waits for it, so work queued between them
  (the adapter's update) runs on the device while the host waits and then queues the block.
* ``dispatch``: the gathered tokens ``[k, b, h]`` for the wrapped block, split over the TP ranks
  under SP (``[k/tp, b, h]``).
* ``combine``: the processed tokens (gathered back over TP under SP) and this rank's skip path
  make its output rows (``[s/tp, b, h]`` under SP, else ``[s, b, h]``) in one pass
  (:func:`.kernels.combine_rows`): a kept position's row is its block output (the route's ``src``
  names the processed row), every other row is ``x + update``, the skip path, computed there and
  only there. Static shapes, no data-dependent indexing, so no host synchronisation.

Every TP rank computes the same route (the whole sequence, replicated router), so the wrapped
block's TP collectives see equal shapes on all ranks.

With a ``capacity`` (``FlexiDepthConfig.hard_skip_capacity``) ``k`` is fixed, ``ceil(capacity *
s)`` (padded like a read count under SP), and nothing is read on the host: each sequence's first
``ceil(capacity * s)`` kept positions take the block and its later kept ones the skip path (the route's ``keep`` is
that effective mask), so the host can queue the block while the device still computes the layers
before it.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

from megacpp_mcore.features.flexidepth.kernels import combine_rows
from megacpp_mcore.spec import backends


@dataclasses.dataclass
class SkipRoute:
    """One forward's hard route (what :meth:`SkipDispatcher.route` returns)."""

    full: torch.Tensor  # [s, b, h] the whole sequence
    idx: torch.Tensor  # [k, b] kept positions per sequence, in order, then skipped ones (padding)
    keep: torch.Tensor  # [s/tp, b, 1] bool (SP; else [s, b, 1]): this rank's rows taking the block
    # (with a capacity, the kept rows that fit in it)
    start: int  # this rank's first sequence position (0 without SP)
    rows: int  # this rank's sequence rows
    src: torch.Tensor  # [rows, b] int64: per position of this rank, its row of the processed
    # tokens flattened ([k * b, h]: (rank - 1) * b + sequence), or -1 where it takes the skip path
    flat: torch.Tensor | None = None  # [k, b] idx's rows of the flattened [s * b, h] sequence


@dataclasses.dataclass
class _PendingRoute:
    """A route whose kept count is on its way to the host (:meth:`SkipDispatcher.start`)."""

    full: torch.Tensor
    keep: torch.Tensor
    order: torch.Tensor  # [s, b] kept positions first, in order, then skipped ones
    src: torch.Tensor  # [rows, b] SkipRoute.src
    longest: torch.Tensor | int  # 0-d: on the host (pinned) once ``ready`` fired, or on the CPU;
    # an int with a capacity
    ready: torch.cuda.Event | None
    start: int  # this rank's first sequence position (0 without SP)
    rows: int  # this rank's sequence rows
    flat: torch.Tensor | None = None  # SkipRoute.flat, where the route kernel made it


def kept_ranks(mask: torch.Tensor) -> torch.Tensor:
    """Each position's count of kept positions up to it in its sequence, ``[s, b]`` int32 for a
    bool ``[s, b]`` mask: the scan runs along contiguous memory (``[b, s]``). ``mask.cumsum(0)``
    scans the outer dimension with one serial thread per sequence on CUDA, 0.72 ms per call at
    4096 x 8 on an H100 (5.8 ms of a 71 ms nam56r-lite forward with eight gathering layers)."""
    return mask.t().contiguous().cumsum(1, dtype=torch.int32).t()


def kept_first(mask: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Per sequence (column of a bool ``[s, b]`` mask), its kept positions in order, then its other
    positions in order: ``[s, b]`` int64, what a stable sort of ``~mask`` along dim 0 returns, from
    :func:`kept_ranks`' ``ranks`` by one scatter (a kept position ``p`` goes to row ``ranks[p] -
    1``, another one after the column's kept count, behind the ``p - ranks[p]`` others before it).
    The sort took a radix sort and its copies per gathering layer (0.2 ms a forward of
    nam56r-lite's eight on an H100)."""
    pos = torch.arange(mask.shape[0], device=mask.device, dtype=ranks.dtype).unsqueeze(1)  # [s, 1]
    dest = torch.where(mask, ranks - 1, ranks[-1:] + pos - ranks)
    order = torch.empty(mask.shape, dtype=torch.long, device=mask.device)
    return order.scatter_(0, dest.long(), pos.long().expand(mask.shape))


# A capacity route as :mod:`.route_triton`'s one kernel where it can run. Off until it has run
# on a GPU: it equals the torch route under the Triton interpreter (the CPU test), but no device
# machine was lent after it was written (sixteenth session); its GPU test is
# tests/test_flexidepth.py::test_route_kernel_on_cuda_equals_the_torch_route, and
# `bench_flexidepth --route-kernel` times it.
ROUTE_KERNEL = False


def _route_kernel(mask: torch.Tensor) -> bool:
    """Whether a capacity route runs as :mod:`.route_triton`'s one kernel: allowed
    (:data:`ROUTE_KERNEL`), CUDA, outside autograd, Triton installed."""
    return (ROUTE_KERNEL and mask.is_cuda and not torch.is_grad_enabled()
            and backends.detect().triton is not None)


class SkipDispatcher:
    """Route -> dispatch -> combine of one layer's hard-skip inference (module docstring).

    ``tp_group``: the layer's tensor-parallel group; ``sequence_parallel``: whether the layer's
    inputs and outputs are ``[s/tp, b, h]`` shards of it (all gathers and scatters happen here).
    """

    def __init__(self, tp_group, *, sequence_parallel: bool, capacity: float | None = None):
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.capacity = capacity  # None: the exact kept count (one host read per forward)

    def _round(self, k: int) -> int:
        """``k`` rounded up to a multiple of the TP size under SP (the block's input is split)."""
        if not self.sequence_parallel:
            return k
        tp = self.tp_group.size()
        return -(-k // tp) * tp

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=False, group=self.tp_group)

    def route(self, hidden_states: torch.Tensor, keep: torch.Tensor) -> SkipRoute:
        """``hidden_states`` and ``keep`` (bool ``[s, b, 1]``: take the full block), shards under
        SP -> the route of the whole sequence (:meth:`start`, then :meth:`finish`)."""
        return self.finish(self.start(hidden_states, keep))

    def start(self, hidden_states: torch.Tensor, keep: torch.Tensor) -> _PendingRoute:
        """Queues the route's device work and the kept count's copy to the host (on CUDA into
        pinned memory, with an event), without waiting: what the caller queues next (the skip
        path) keeps the device busy while the count travels and the host queues the block."""
        sp = self.sequence_parallel
        full = self._gather(hidden_states) if sp else hidden_states
        mask = self._gather(keep.to(hidden_states.dtype)).bool() if sp else keep
        mask = mask.squeeze(-1)  # [s, b]
        rows = hidden_states.shape[0]
        start = self.tp_group.rank() * rows if sp else 0
        ready = None
        if self.capacity is not None:  # a fixed length: the first kept positions, no host read
            longest = min(mask.shape[0], math.ceil(self.capacity * mask.shape[0]))  # the same on any TP
            if _route_kernel(mask):  # the rest of the route in one launch
                from megacpp_mcore.features.flexidepth import route_triton

                mask, order, flat, src = route_triton.route(mask, longest, self._round(longest), start, rows)
                return _PendingRoute(full, mask[start:start + rows].unsqueeze(-1), order, src, longest, None,
                                     start, rows, flat)
            ranks = kept_ranks(mask)
            mask = mask & (ranks <= longest)
            ranks = ranks.clamp(max=longest)  # the effective mask's ranks
            keep = mask[start:start + rows].unsqueeze(-1)  # this rank's rows of the effective mask
        else:
            ranks = kept_ranks(mask)
            longest = mask.sum(0).max()  # 0-d: the largest per-sequence kept count
            if longest.is_cuda:
                host = torch.empty((), dtype=longest.dtype, pin_memory=True)
                host.copy_(longest, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                longest = host
        order = kept_first(mask, ranks)  # [s, b]: kept positions first, each group in order
        # this rank's positions: a kept one's block output is row ranks - 1 of its sequence
        local, seq = mask[start:start + rows], torch.arange(mask.shape[1], device=mask.device)
        src = torch.where(local, (ranks[start:start + rows].long() - 1) * mask.shape[1] + seq, -1)
        return _PendingRoute(full, keep, order, src, longest, ready, start, rows)

    def finish(self, pending: _PendingRoute) -> SkipRoute:
        """The route of :meth:`start`, once the kept count is on the host: the forward's one
        host synchronisation (on CUDA it waits for the count's copy only, not for the work
        queued after it)."""
        if pending.ready is not None:
            pending.ready.synchronize()
        k = self._round(int(pending.longest))
        idx = pending.order[:k]
        return SkipRoute(full=pending.full, idx=idx, keep=pending.keep, start=pending.start,
                         rows=pending.rows, src=pending.src,
                         flat=None if pending.flat is None else pending.flat[:k])

    def dispatch(self, route: SkipRoute) -> torch.Tensor:
        """The block's input: the kept tokens ``[k, b, h]`` (``[k/tp, b, h]`` under SP), whole
        rows of the flattened sequence (``index_select``)."""
        full = route.full
        k, b = route.idx.shape
        flat = route.flat
        if flat is None:  # [k, b] rows of [s * b, h]
            flat = route.idx * b + torch.arange(b, device=route.idx.device)
        tokens = full.reshape(-1, full.shape[-1]).index_select(0, flat.reshape(-1)).view(k, b, full.shape[-1])
        return scatter_to_sequence_parallel_region(tokens, group=self.tp_group) if self.sequence_parallel else tokens

    def combine(self, route: SkipRoute, processed: torch.Tensor, x: torch.Tensor,
                update: torch.Tensor | None) -> torch.Tensor:
        """This rank's output rows: ``processed`` (the block's output of :meth:`dispatch`'s
        tokens) at its kept positions, the skip path ``x + update`` (``update``: the adapter's,
        ``None`` for none) at the others, in one pass (:func:`.kernels.combine_rows`)."""
        if x.shape[0] != route.rows:
            raise ValueError(f"SkipDispatcher.combine: x holds {x.shape[0]} rows; the route has "
                             f"{route.rows} for this rank")
        if self.sequence_parallel:
            processed = self._gather(processed)  # [k, b, h]
        return combine_rows(route.src, processed, x, update)
