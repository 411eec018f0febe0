"""The trained shared MTP block as a self-speculative drafter.

Training (:mod:`megacpp_mcore.features.mtp`): depth ``k`` at position ``i`` computes
``h_k[i] = block(h_{k-1}[i], embed(ids[i + k]))`` (``h_0`` the trunk's final-normed output; the
block's attention runs causally over the depth-``k`` sequence) and predicts ``ids[i + k + 1]``. The
drafter keeps exactly that: one attention cache per depth (the block's ``A`` sub-layer, standard or
MLA latent cache; its ``E`` sub-layer is stateless) and the hidden states the next depth reads.

Drafting at the trunk's last position ``p`` with the pending token ``ids[p + 1]``: depth ``k`` runs
the positions it has not committed yet up to ``p`` (the whole prompt at the first call: that is the
MTP prefill) and its output at ``p`` drafts ``d_k = ids[p + 1 + k]``; depth ``k + 1`` reads ``d_k``.
After verification accepted ``m`` drafts, depth ``k``'s entry at position ``i`` stays valid iff the
tokens it read are the sequence's (``i + k <= p + 1 + m``) and ``i <= p``; the rest is rolled back
(its cache length moves back) and recomputed from real tokens at the next call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megacpp_mcore.infer.compiled import static_compiled
from megacpp_mcore.infer.engine import Engine, Session
from megacpp_mcore.infer.layers import new_state, run_layer
from megacpp_mcore.infer.sampling import Sampling


class _Hidden:
    """Hidden states ``[n, b, h]`` of time steps ``start .. start + n - 1``."""

    def __init__(self, start: int, values: torch.Tensor):
        self.start, self.values = start, values

    @property
    def end(self) -> int:
        return self.start + self.values.shape[0]

    def then(self, other: "_Hidden") -> "_Hidden":
        if other.start != self.end:
            raise RuntimeError(f"MTP drafter: hidden states {self.start}..{self.end} and "
                               f"{other.start}..{other.end} do not join")
        return _Hidden(self.start, torch.cat([self.values, other.values]))

    def slice(self, start: int, end: int) -> "_Hidden":
        return _Hidden(start, self.values[start - self.start:end - self.start])


class MTPDrafter:
    """Drafts ``k`` tokens per step with the model's shared MTP block (``k`` <= trained depth).

    Protocol shared with test drafters: :meth:`start` after the prefill, :meth:`draft` before each
    verification, :meth:`accept` after it.
    """

    def __init__(self, engine: Engine, session: Session, k: int):
        if engine.mtp_depth == 0:
            raise ValueError("the model has no MTP block to draft with (trained with mtp_depth=0); "
                             "use --speculative 0")
        if not 1 <= k <= engine.mtp_depth:
            raise ValueError(f"speculative K={k} is beyond the trained MTP depth "
                             f"{engine.mtp_depth}; allowed: 1..{engine.mtp_depth}")
        self.engine, self.session, self.k = engine, session, k
        model = engine.model
        self.block = model.mtp_block
        self.head_weight = model._head_weight()  # MTP embeds and predicts with the output head
        self.attn_plan, self.ffn_plan = engine.mtp_plans  # the block's A and E sub-layers
        self.caches = [new_state(self.attn_plan, session.batch, session.max_length, engine.dtype,
                                 engine.device) for _ in range(k)]
        # depth 1 reads the trunk's hidden states; depth k > 1 reads depth k - 1's outputs
        self.inputs: list[_Hidden] = [None] * k
        self.outputs: list[_Hidden] = [None] * k  # this step's outputs per depth
        self.logits: list[torch.Tensor] = []  # the last draft step's logits [b, V] per depth
        b = session.batch
        self.ids = torch.zeros(b, session.max_length + k + 1, dtype=torch.long, device=engine.device)

    @torch.no_grad()
    def start(self, prompt: torch.Tensor, hidden: torch.Tensor) -> None:
        """The MTP prefill, after the trunk's: prompt ``[b, P]`` (left-padded) and the trunk's
        hidden ``[P, b, h]``. Each depth runs the prompt positions whose tokens it reads are all
        in the prompt; the rest waits for the first :meth:`draft`."""
        self.ids[:, :prompt.shape[1]] = prompt
        p = prompt.shape[1] - 1
        feed = _Hidden(0, hidden)  # depth 0 reads the trunk at 0 .. p
        for depth in range(self.k):
            n = max(0, p - depth)  # positions i with ids[i + depth + 1] in the prompt
            out = self._block(depth, feed.slice(0, n)) if n else hidden[:0]
            self.inputs[depth] = feed.slice(n, feed.end)
            feed = _Hidden(0, out)

    def _block(self, depth: int, hidden: _Hidden, rows=None) -> torch.Tensor:
        """Depth ``depth`` (0-based) over positions ``hidden.start .. hidden.end - 1`` (the
        output's ``rows`` only, see :meth:`_run`)."""
        start, n = hidden.start, hidden.values.shape[0]
        tokens = self.ids[:, start + depth + 1:start + depth + 1 + n]  # ids[i + k], k = depth + 1
        return self._run(depth, hidden.values, tokens, self.session.context(start, n), rows)

    def _run(self, depth: int, hidden: torch.Tensor, tokens: torch.Tensor, ctx, rows=None) -> torch.Tensor:
        """Depth ``depth`` over the positions of ``ctx``: inputs ``hidden`` ``[n, b, h]`` and the
        tokens they read ``[b, n]``. ``rows`` (a slice or an index tensor of positions): the
        block's feed-forward sub-layer, per token, runs on those positions only and only they are
        returned; the attention sub-layer runs on all (its cache needs every position). The last
        depth of a draft step needs only its last position: nothing reads its other outputs."""
        engine, block = self.engine, self.block
        # the head's rows of the tokens, [n, b, h]: training's vocab-parallel lookup at TP=1 (the
        # engine's only size), in one kernel instead of its masking around the lookup
        embedded = F.embedding(tokens.t(), self.head_weight.to(hidden.dtype))
        x = F.linear(torch.cat([block.enorm(embedded), block.hnorm(hidden)], dim=-1),
                     block.eh_proj)
        x = run_layer(self.attn_plan, x, self.caches[depth], ctx, rotary=engine.rotary, keep=False)
        if rows is not None:
            x = x[rows]
        return run_layer(self.ffn_plan, x, None, ctx, rotary=engine.rotary, keep=False)

    @torch.no_grad()
    def draft(self, pending: torch.Tensor, sampling: Sampling, generator):
        """``k`` drafts ``[b, k]`` after the pending token ``[b]`` and their distributions
        ``[b, k, V]`` (None when greedy)."""
        engine, p = self.engine, self.session.length - 1  # p: the trunk's last position
        self.ids[:, p + 1] = pending
        drafts, probs, self.logits = [], [], []
        for depth in range(self.k):
            if depth == 0:
                hidden = self.inputs[0]
            else:  # real outputs kept from earlier steps, then this step's outputs of depth - 1
                hidden = self.inputs[depth].then(self.outputs[depth - 1])
            if depth + 1 < self.k:  # the next depth reads every output
                out = self._block(depth, hidden)
                self.outputs[depth] = _Hidden(hidden.start, out)
            else:
                out = self._block(depth, hidden, rows=slice(-1, None))
            logits = engine.logits(engine.final_norm(out[-1:]), sampling.vocab_limit)[:, 0]  # [b, V]
            self.logits.append(logits)
            token, dist = sampling.choose(logits, generator)
            self.ids[:, p + 2 + depth] = token
            drafts.append(token)
            probs.append(dist)
        drafts = torch.stack(drafts, dim=1)
        return drafts, None if sampling.greedy else torch.stack(probs, dim=1)

    def accept(self, m: int, hidden: torch.Tensor, emitted: torch.Tensor) -> None:
        """After verification: ``m`` drafts accepted, trunk hidden ``[m + 1, b, h]`` of the newly
        committed positions, ``emitted`` ``[b, m + 1]`` the tokens now known after the pending one."""
        p = self.session.length - 1 - (m + 1)  # the trunk's last position before this step
        self.ids[:, p + 2:p + 3 + m] = emitted
        # depth d (0-based) keeps position i iff i <= p and the token it read, ids[i + d + 1], is
        # known now (index <= p + 1 + m); its cache is rolled back to that length because the
        # next _block call writes from its input's start, which is exactly this length
        committed = [max(0, min(p, p + m - depth) + 1) for depth in range(self.k)]
        self.inputs[0] = _Hidden(p + 1, hidden)  # depth 1 reads the trunk at p + 1 .. p + 1 + m
        for depth in range(1, self.k):  # depth reads depth - 1's real outputs from its committed
            made = self.inputs[depth].then(self.outputs[depth - 1])
            self.inputs[depth] = made.slice(committed[depth], committed[depth - 1])


class StaticMTPDrafter:
    """The drafter with static shapes, for a speculative step that runs (and is captured as a CUDA
    graph) without the host: made from an :class:`MTPDrafter` after its :meth:`~MTPDrafter.start`.

    What the dynamic drafter keeps as variable-length lists lives in fixed buffers indexed by time:
    ``inputs[d]`` ``[T, b, h]`` what depth ``d`` reads (the trunk's hidden states for depth 0,
    depth ``d - 1``'s outputs after), and ``committed[d]`` (device) how many positions of depth
    ``d`` are final. Each step every depth runs a fixed window of ``K + 1`` positions from its
    committed length: that covers the positions it has not committed up to the trunk's last one
    (at most ``K + 1`` after any acceptance, see the module docstring), and the window's extra
    positions are written past the committed length, where the next window overwrites them before
    any query can see them (the static cache's causal rule, :mod:`.context`).

    ``compiled``: each depth's block runs through ``torch.compile`` (one graph per depth, static
    shapes; compiled on the first draft, which a CUDA-graph step runs eagerly before its capture).
    Inductor fuses the block's elementwise work between the projections -- norms, RoPE, the
    attention's masking and softmax, the routing, the residuals -- so a draft launches about half
    the kernels (what a graphed step at batch 1 pays per kernel). Only the drafts' rounding can
    change: the trunk, and so the emitted tokens, are untouched (a draft decides what is verified,
    never what is emitted).
    """

    def __init__(self, drafter: MTPDrafter, compiled: bool = False):
        self.drafter, self.k = drafter, drafter.k
        self._run = static_compiled(drafter._run) if compiled else drafter._run  # (:mod:`.compiled`)
        session, k = drafter.session, drafter.k
        self.session, self.window = session, k + 1
        first = drafter.inputs[0].values
        capacity, b, h = session.max_length, first.shape[1], first.shape[2]
        device = first.device
        self.inputs = [torch.zeros(capacity, b, h, dtype=first.dtype, device=device) for _ in range(k)]
        for depth, hidden in enumerate(drafter.inputs):
            self.inputs[depth][hidden.start:hidden.end] = hidden.values
        self.committed = torch.tensor([hidden.start for hidden in drafter.inputs], dtype=torch.long,
                                      device=device)
        self.offsets = torch.arange(self.window, device=device)
        # depth d reads ids[i + d + 1] and drafts the token at length + 1 + d
        self.ahead = torch.arange(1, k + 1, device=device)
        self.logits: list[torch.Tensor] = []

    def draft(self, pending: torch.Tensor, length: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        """Greedy drafts ``[b, K]`` after the pending token ``[b]``, the trunk's committed length
        ``length`` (0-d device tensor) being the pending token's time index; ``sampling`` (greedy)
        limits the vocabulary as it does for the trunk."""
        drafter, ids = self.drafter, self.drafter.ids
        ids.index_copy_(1, length.view(1), pending[:, None])
        drafts, self.logits = [], []  # the step's draft logits [b, V] per depth, as MTPDrafter's
        # every depth's indices at once: its window's times, the tokens it reads, the trunk's last
        # position in its window, where its draft goes
        times = self.committed[:, None] + self.offsets  # [K, K + 1]
        reads = times + self.ahead[:, None]
        lasts = (length - 1) - self.committed  # [K]
        slots = length + self.ahead  # [K]
        for depth in range(self.k):
            ctx = self.session.context(0, self.window, start_index=self.committed[depth],
                                       time=times[depth])
            last = lasts[depth:depth + 1]
            deeper = depth + 1 < self.k
            out = self._run(depth, self.inputs[depth].index_select(0, times[depth]),
                            ids.index_select(1, reads[depth]), ctx,
                            None if deeper else last)  # [K + 1 or 1, b, h]
            if deeper:
                self.inputs[depth + 1].index_copy_(0, times[depth], out)
                out = out.index_select(0, last)
            logits = drafter.engine.logits(drafter.engine.final_norm(out), sampling.vocab_limit)[:, 0]
            self.logits.append(logits)
            token, _ = sampling.choose(logits, None)
            ids.index_copy_(1, slots[depth:depth + 1], token[:, None])
            drafts.append(token)
        return torch.stack(drafts, dim=1)

    def accept(self, length: torch.Tensor, m: torch.Tensor, hidden: torch.Tensor,
               tokens: torch.Tensor) -> None:
        """After a verification at ``length`` (the trunk's committed length before it) accepted
        ``m`` drafts (0-d device tensors): the trunk's hidden ``[K + 1, b, h]`` and tokens
        ``[b, K + 1]`` of the verified positions (only the first ``m + 1`` are real; the rest are
        overwritten before they are read). Depth ``d`` keeps the positions whose tokens are known,
        ``length + min(0, m - d)`` of them, as :meth:`MTPDrafter.accept`."""
        times = length + self.offsets
        self.inputs[0].index_copy_(0, times, hidden.to(self.inputs[0].dtype))
        self.drafter.ids.index_copy_(1, times + 1, tokens)
        depths = torch.arange(self.k, device=m.device)
        self.committed.copy_((length + torch.clamp(m - depths, max=0)).clamp(min=0))
