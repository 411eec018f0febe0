"""Hard-skip inference as route -> dispatch -> combine: the block runs on the kept tokens only.

:class:`SkipDispatcher` (one per layer whose hard inference gathers, see
``FlexiDepthConfig.hard_skip_symbols``), per forward:

* ``route``: the whole sequence and its keep mask (all-gathered from their sequence-parallel
  shards); per sequence, the kept positions in sequence order (the causal order stays right),
  padded at the END to the batch's largest count ``k`` (rounded up to a multiple of the TP size
  under SP). Pads sit after every real token, so a causal block never lets a real token see one;
  their outputs are dropped. ``k`` is read on the host (the block's shape depends on it).
* ``dispatch``: the gathered tokens ``[k, b, h]`` for the wrapped block, split over the TP ranks
  under SP (``[k/tp, b, h]``).
* ``combine``: the processed tokens (gathered back over TP under SP) written into their rows of
  this rank's skip-path output (``[s/tp, b, h]`` under SP, else ``[s, b, h]``); every other row
  keeps the skip path.

Every TP rank computes the same route (the whole sequence, replicated router), so the wrapped
block's TP collectives see equal shapes on all ranks.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)


@dataclasses.dataclass
class SkipRoute:
    """One forward's hard route (what :meth:`SkipDispatcher.route` returns)."""

    full: torch.Tensor  # [s, b, h] the whole sequence
    idx: torch.Tensor  # [k, b] kept positions per sequence, in order, then padding
    valid: torch.Tensor  # [k, b] bool: a real kept token (False: padding)
    start: int  # this rank's first sequence position (0 without SP)
    rows: int  # this rank's sequence rows


class SkipDispatcher:
    """Route -> dispatch -> combine of one layer's hard-skip inference (module docstring).

    ``tp_group``: the layer's tensor-parallel group; ``sequence_parallel``: whether the layer's
    inputs and outputs are ``[s/tp, b, h]`` shards of it (all gathers and scatters happen here).
    """

    def __init__(self, tp_group, *, sequence_parallel: bool):
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return gather_from_sequence_parallel_region(t, tensor_parallel_output_grad=False, group=self.tp_group)

    def route(self, hidden_states: torch.Tensor, keep: torch.Tensor) -> SkipRoute:
        """``hidden_states`` and ``keep`` (bool ``[s, b, 1]``: take the full block), shards under
        SP -> the route of the whole sequence."""
        sp = self.sequence_parallel
        full = self._gather(hidden_states) if sp else hidden_states
        mask = self._gather(keep.to(hidden_states.dtype)) if sp else keep
        mask = mask.squeeze(-1).bool()  # [s, b]
        counts = mask.sum(0)  # [b]
        k = int(counts.max())
        if sp:
            tp = self.tp_group.size()
            k = -(-k // tp) * tp
        # kept positions first, each group in sequence order (a stable sort on "skipped")
        order = torch.sort((~mask).to(torch.int32), dim=0, stable=True).indices  # [s, b]
        idx = order[:k]
        valid = torch.arange(k, device=idx.device).unsqueeze(-1) < counts.unsqueeze(0)
        rows = hidden_states.shape[0]
        start = self.tp_group.rank() * rows if sp else 0
        return SkipRoute(full=full, idx=idx, valid=valid, start=start, rows=rows)

    def dispatch(self, route: SkipRoute) -> torch.Tensor:
        """The block's input: the kept tokens ``[k, b, h]`` (``[k/tp, b, h]`` under SP)."""
        h = route.full.shape[-1]
        tokens = route.full.gather(0, route.idx.unsqueeze(-1).expand(-1, -1, h))
        return scatter_to_sequence_parallel_region(tokens, group=self.tp_group) if self.sequence_parallel else tokens

    def combine(self, route: SkipRoute, processed: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``skip`` (this rank's skip-path output) with the kept rows replaced by ``processed``
        (the block's output of :meth:`dispatch`'s tokens)."""
        if self.sequence_parallel:
            processed = self._gather(processed)  # [k, b, h]
        local = route.idx - route.start  # [k, b] row in this rank's shard
        mine = route.valid & (local >= 0) & (local < route.rows)
        cols = torch.arange(local.shape[1], device=local.device).expand_as(local)
        out = skip.clone()
        out[local[mine], cols[mine]] = processed[mine].to(out.dtype)
        return out
