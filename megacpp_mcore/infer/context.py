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
        tables: the session's tables, built on first use and kept while the session lives (its
            :class:`RopeTable` per rotary module; the key ranks of :meth:`attention_mask`).
        max_length: the timeline's capacity (rotary tables are built that long, once).
    """

    def __init__(self, start: int, s: int, pad: torch.Tensor, tables: dict, max_length: int,
                 start_index: torch.Tensor | None = None, time: torch.Tensor | None = None):
        if start + s > max_length:
            raise ValueError(f"inference: {start + s} positions exceed the session's capacity of "
                             f"{max_length}; start a session with a larger max_length")
        self.start, self.s = start, s
        self.static = start_index is not None
        # keys a forward attends over: up to its last new position, or (static) the whole capacity
        self.end = max_length if self.static else start + s
        self.pad = pad
        device = pad.device
        if self.static:  # [s]: start_index + 0 .. s - 1, read on the device (or given so)
            self.time = start_index + torch.arange(s, device=device) if time is None else time
        else:
            self.time = torch.arange(start, start + s, device=device)  # [s]
        self.valid = self.time[None, :] >= pad[:, None]  # [b, s]: False on padded slots
        self.positions = (self.time[None, :] - pad[:, None]).clamp(min=0)  # [b, s]
        self._tables = tables
        self._max_length = max_length
        self._mask: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        self._rotations: dict[tuple, Rotation] = {}
        # MoDA: depth K/V pushed at these positions in this forward, per depth buffer (id -> list)
        self.depth: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def attention_mask(self, visible: torch.Tensor | None = None) -> torch.Tensor:
        """``[b, 1, s, end]`` bool, True = attend: causal over the timeline, padded keys hidden
        (a padded query sees only itself: its output is never used, but must stay finite).
        ``visible`` ``[end, b]``: keys a layer lets later queries see (False: hidden like padding;
        FlexiDepth's gathering hard skip); None: every key."""
        if visible is None and self._mask is not None:
            return self._mask
        keys, rank = self._key_ranks()
        if visible is not None:  # a hidden key ranks after every query, like a padded one
            rank = torch.where(visible.t(), rank, _NEVER)
        time = self.time[:, None]  # [s, 1]
        seen = rank[:, None, :] <= time  # [b, s, end]: causal over the real (visible) keys
        mask = (seen | (keys == time))[:, None]  # and each query itself
        if visible is None:
            self._mask = mask
        return mask

    def _key_ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The timeline's key indices ``[end]`` and their ranks ``[b, end]`` (the index, or
        :data:`_NEVER` on a row's padded slots), built once per session over its capacity: a
        query at time ``t`` sees the keys ranked ``<= t``."""
        if "key_ranks" not in self._tables:
            keys = torch.arange(self._max_length, device=self.pad.device)
            ranks = torch.where(keys[None, :] >= self.pad[:, None], keys, _NEVER)
            self._tables["key_ranks"] = (keys, ranks)
        keys, ranks = self._tables["key_ranks"]
        return keys[:self.end], ranks[:, :self.end]

    def attention_bias(self, visible: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`attention_mask` as an additive fp32 score bias: 0 where a query attends, -inf
        elsewhere (one kernel per forward; a layer adds it to its scaled scores in the same
        kernel, where a boolean mask costs a negation and a masked fill per layer)."""
        if visible is None and self._bias is not None:
            return self._bias
        mask = self.attention_mask(visible)
        bias = torch.where(mask, 0.0, float("-inf"))  # fp32
        if visible is None:
            self._bias = bias
        return bias

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

    def rotation(self, module, dtype: torch.dtype, deinterleave: bool, interleaved: bool) -> "Rotation":
        """The rotary embedding of a Megatron ``RotaryEmbedding`` (the GPT model's, or an MLA
        attention's own) at each row's positions, as a :class:`Rotation` for tensors of ``dtype``.
        ``deinterleave``/``interleaved``: the layout Megatron's unfused RoPE uses for the layer
        (:func:`megacpp_mcore.spec.compat.rope_deinterleaves`, ``config.rotary_interleaved``).

        The module's table over the session's capacity is built once per session (modules with
        equal tables share one: every MLA layer has its own module, all with the same angles) and
        indexed by each row's positions once per forward, so a left-padded row gets the
        rotations of its unpadded run and the layers of one forward share the lookup."""
        table = _rope_table(self._tables, module, self._max_length)
        key = (table.number, dtype, deinterleave, interleaved)
        rotation = self._rotations.get(key)
        if rotation is None:
            index, coefficients = table.coefficients(dtype, deinterleave, interleaved)
            step = coefficients[self.positions].transpose(0, 1).unsqueeze(2)  # [s, b, 1, 2d]
            rotation = self._rotations[key] = Rotation(index, step)
        return rotation

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


# The rank of a key no query sees (a padded or hidden slot): past any time index.
_NEVER = torch.iinfo(torch.long).max


class RopeTable:
    """One rotary embedding over a session's capacity: the angles ``[L, d]`` (fp32, as Megatron's
    ``RotaryEmbedding`` returns them) and its mscale (1.0 for plain RoPE; YaRN's otherwise), with
    the rotation's coefficients per dtype and layout built once (:meth:`coefficients`).
    ``number``: its order among the session's tables, what a forward's lookups are keyed by (the
    same in every session of a model, so compiled code's guards hold across sessions)."""

    def __init__(self, angles: torch.Tensor, mscale: float, number: int = 0):
        self.angles, self.mscale, self.number = angles, mscale, number
        self._coefficients: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def same(self, other: "RopeTable") -> bool:
        return (self.mscale == other.mscale and self.angles.shape == other.angles.shape
                and bool(torch.equal(self.angles, other.angles)))

    def coefficients(self, dtype: torch.dtype, deinterleave: bool,
                     interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index [2d], coefficients [L, 2d])`` such that the rotated ``t`` is
        ``(t[..., index] * coefficients[pos]).view(..., 2, d).sum(-2)``.

        The rotation Megatron's unfused RoPE computes: ``u = t`` with its dims regrouped as
        (even, odd) halves where ``deinterleave``, then ``u cos + rotate_half(u) sin`` with
        ``cos``/``sin`` of the angles times mscale cast to the tensor's dtype, ``rotate_half``
        pairing dim ``j`` with ``j +- d/2`` (or, ``interleaved``, ``2i`` with ``2i + 1``) and
        negating the first of each pair. Written as one gather of each output dim's two source
        dims, one product with the coefficients (cos, then the signed sin) and a sum over the
        pair: the same products and the same rounded sum, in three kernels for any layout."""
        key = (dtype, deinterleave, interleaved)
        if key not in self._coefficients:
            d = self.angles.shape[-1]
            half = torch.arange(d // 2)
            if deinterleave:  # u[j] = t[2j] for j < d/2, t[2(j - d/2) + 1] after
                source = torch.cat([2 * half, 2 * half + 1])
            else:
                source = torch.arange(d)
            if interleaved:  # rotate_half(u)[2i] = -u[2i + 1], [2i + 1] = u[2i]
                partner = torch.stack([2 * half + 1, 2 * half], dim=1).flatten()
                sign = torch.tensor([-1.0, 1.0]).repeat(d // 2)
            else:  # rotate_half(u)[j] = -u[j + d/2] for j < d/2, u[j - d/2] after
                partner = torch.cat([half + d // 2, half])
                sign = torch.cat([-torch.ones(d // 2), torch.ones(d // 2)])
            index = torch.cat([source, source[partner]]).to(self.angles.device)
            cos = (torch.cos(self.angles) * self.mscale).to(dtype)
            sin = (torch.sin(self.angles) * self.mscale).to(dtype)
            signed = sin * sign.to(device=sin.device, dtype=dtype)  # exact: a sign flip
            self._coefficients[key] = (index, torch.cat([cos, signed], dim=-1))
        return self._coefficients[key]


def _rope_table(tables: dict, module, max_length: int) -> RopeTable:
    """The session's :class:`RopeTable` of ``module`` (built on first use; a module whose table
    equals one already built shares it)."""
    key = id(module)
    if key not in tables:
        emb = module(max_length)
        mscale = 1.0
        if isinstance(emb, tuple):  # YaRN returns (emb, mscale)
            emb, mscale = emb
        built = {id(t) for t in tables.values() if isinstance(t, RopeTable)}
        table = RopeTable(emb[:, 0, 0, :], float(mscale), number=len(built))  # [L, d]
        tables[key] = next((t for t in tables.values() if isinstance(t, RopeTable) and t.same(table)), table)
    return tables[key]


class Rotation:
    """The rotary embedding of one forward's positions for one table, dtype and layout
    (:meth:`StepContext.rotation`): :meth:`apply` rotates ``[s, b, n, dim]`` tensors whose first
    ``d`` dims are rotated (the rest pass through, as in Megatron)."""

    def __init__(self, index: torch.Tensor, coefficients: torch.Tensor):
        self.index, self.coefficients = index, coefficients  # [2d], [s, b, 1, 2d]
        self.dim = index.shape[0] // 2

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        d = self.dim
        rotated, passed = (t, None) if t.shape[-1] == d else (t[..., :d], t[..., d:])
        pairs = rotated.index_select(-1, self.index) * self.coefficients  # [s, b, n, 2d]
        out = pairs.unflatten(-1, (2, d)).sum(dim=-2)
        return out if passed is None else torch.cat([out, passed], dim=-1)
