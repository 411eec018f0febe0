"""What one forward over new positions knows about them: time indices, left padding, the causal
mask over the cache, per-row rotary embeddings and MoDA's depth K/V of these positions.

Time and position. A batch of prompts of different lengths is left-padded to one length, so every
row shares the time index ``t`` (the cache slot) and row ``r`` is at position ``t - pad[r]`` (the
RoPE position its own unpadded run would use). Padded slots are invisible: no query attends to a
padded key (except itself, so no softmax row is empty), and the recurrent mixers neither read nor
update state there (:mod:`.mixers`), so each row computes exactly what it would alone.

Static shapes (for CUDA graphs of the decode step). With ``start_index`` (a 0-d long device tensor
holding ``start``) the context takes its time indices from the device, every forward attends over
the session's whole capacity (keys past the new positions are masked by causality, so slots not
written yet are never read) and caches are written by index (:meth:`StepContext.store`): one
forward of ``s`` positions has the same shapes and the same kernels at every ``start``, and the
host need not know ``start`` for it.
"""

from __future__ import annotations

import torch


class StepContext:
    """The ``s`` new time steps ``start .. start + s - 1`` of one forward over a cache timeline.

    Args:
        start: time index of the first new position (the cache's committed length).
        s: number of new positions.
        pad: ``[b]`` left padding per row (long, on the model's device).
        rope_tables: the session's cache of full rotary tables (one per rotary module).
        max_length: the timeline's capacity (rotary tables are built that long, once).
    """

    def __init__(self, start: int, s: int, pad: torch.Tensor, rope_tables: dict, max_length: int,
                 start_index: torch.Tensor | None = None):
        if start + s > max_length:
            raise ValueError(f"inference: {start + s} positions exceed the session's capacity of "
                             f"{max_length}; start a session with a larger max_length")
        self.start, self.s = start, s
        self.static = start_index is not None
        # keys a forward attends over: up to its last new position, or (static) the whole capacity
        self.end = max_length if self.static else start + s
        self.pad = pad
        device = pad.device
        if self.static:  # [s]: start_index + 0 .. s - 1, read on the device
            self.time = start_index + torch.arange(s, device=device)
        else:
            self.time = torch.arange(start, start + s, device=device)  # [s]
        self.valid = self.time[None, :] >= pad[:, None]  # [b, s]: False on padded slots
        self.positions = (self.time[None, :] - pad[:, None]).clamp(min=0)  # [b, s]
        self._rope_tables = rope_tables
        self._max_length = max_length
        self._mask: torch.Tensor | None = None
        # MoDA: depth K/V pushed at these positions in this forward, per depth buffer (id -> list)
        self.depth: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def attention_mask(self, visible: torch.Tensor | None = None) -> torch.Tensor:
        """``[b, 1, s, end]`` bool, True = attend: causal over the timeline, padded keys hidden
        (a padded query sees only itself: its output is never used, but must stay finite).
        ``visible`` ``[end, b]``: keys a layer lets later queries see (False: hidden like padding;
        FlexiDepth's gathering hard skip); None: every key."""
        if visible is None and self._mask is not None:
            return self._mask
        keys = torch.arange(self.end, device=self.pad.device)  # [end]
        causal = keys[None, :] <= self.time[:, None]  # [s, end]
        real_key = keys[None, :] >= self.pad[:, None]  # [b, end]
        if visible is not None:
            real_key = real_key & visible.t()
        itself = keys[None, :] == self.time[:, None]  # [s, end]
        mask = (causal[None] & (real_key[:, None, :] | itself[None]))[:, None]
        if visible is None:
            self._mask = mask
        return mask

    def store(self, buffer: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Writes the new positions' ``values`` ``[s, ...]`` into the timeline ``buffer``
        ``[T, ...]`` and returns the keys this forward attends over (``buffer[:end]``)."""
        if self.static:
            buffer.index_copy_(0, self.time, values.to(buffer.dtype))
        else:
            buffer[self.start:self.start + self.s] = values
        return buffer[:self.end]

    def new_rows(self, timeline: torch.Tensor) -> torch.Tensor:
        """The rows of the new positions of a ``[end, ...]`` timeline tensor."""
        return timeline.index_select(0, self.time) if self.static else timeline[self.start:]

    def rotary(self, module) -> tuple[torch.Tensor, float]:
        """Per-row rotary frequencies ``[s, b, 1, d]`` of a Megatron ``RotaryEmbedding`` (the
        GPT model's, or an MLA attention's own) and its mscale (1.0 for plain RoPE).

        The module's full table ``[max_length, 1, 1, d]`` is built once per session and indexed by
        each row's positions, so a left-padded row gets the rotations of its unpadded run."""
        key = id(module)
        if key not in self._rope_tables:
            table = module(self._max_length)
            mscale = 1.0
            if isinstance(table, tuple):  # YaRN returns (emb, mscale)
                table, mscale = table
            self._rope_tables[key] = (table[:, 0, 0, :], float(mscale))  # [L, d]
        table, mscale = self._rope_tables[key]
        return table[self.positions].transpose(0, 1).unsqueeze(2), mscale  # [s, b, 1, d]

    def push_depth(self, buffer, slot: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """MoDA: layer's K ``[s, b, g, dk]`` / V of these positions into ``slot`` of ``buffer``."""
        pushed = self.depth.setdefault(id(buffer), [])
        if slot != len(pushed):
            raise RuntimeError(f"inference: MoDA slot {slot} pushed after {len(pushed)} slots "
                               "(layers ran out of order)")
        pushed.append((key, value))

    def read_depth(self, buffer, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """MoDA: the first ``n`` slots' K ``[s, b, g, n, dk]`` and V of these positions."""
        if n == 0:
            return None, None
        pushed = self.depth.get(id(buffer), [])
        if len(pushed) < n:
            raise RuntimeError(f"inference: a MoDA layer reads {n} depth slots, {len(pushed)} "
                               "were pushed at these positions")
        keys, values = zip(*pushed[:n])
        return torch.stack(keys, dim=3), torch.stack(values, dim=3)
