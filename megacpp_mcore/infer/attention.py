"""Attention with a cache: standard attention (K/V cache) and MLA (latent cache), MoDA included.

Both read the trained module's own submodules (QKV / latent projections, Q/K and latent norms,
output projection), so a checkpoint loads unchanged and either backend's modules serve; only the
core attention (``softmax(q k^T * scale) v`` over the cached keys) is computed here, because the
new queries attend to more keys than they are (``s`` queries, ``start + s`` keys).

* Standard attention caches the rotated K and V per KV group: ``[T, b, g, dk]`` / ``[T, b, g, dv]``.
* MLA caches what MLA compresses: the KV latent before its norm ``[T, b, kv_lora_rank]`` and the
  rotated RoPE key ``[T, b, qk_pos_emb_head_dim]`` (on TE the norm is fused into the up
  projection, so caching the pre-norm latent serves both backends). The prefill up-projects the
  latents with the layer's own ``kv_layernorm`` + ``linear_kv_up_proj``; decode and verification
  steps never expand the cache: the up projection's halves are absorbed into the queries and the
  output (:func:`_absorbed`), so a step reads ``kv_lora_rank + pe`` values per cached position
  instead of writing and reading ``heads * (qk + v)``.
* MoDA (a :class:`~megacpp_mcore.features.moda.DepthAwareAttention` core attention): the new
  positions also attend to the depth K/V that earlier layers of the segment pushed at the same
  positions in this forward (:meth:`.context.StepContext.read_depth`), and push their own.

Caches are preallocated for the session's capacity; rolling back is moving the committed length
(entries past it are overwritten by the next forward), so they hold no per-step state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megacpp_mcore.features.moda import DepthAwareAttention
from megacpp_mcore.infer.context import StepContext
from megacpp_mcore.spec import compat


class _Visibility:
    """Which cached positions later queries may see, for a layer that hides some (FlexiDepth hard
    skip that gathers the attention: the positions this layer skipped); ``visible`` is None for
    every other layer (all positions are keys)."""

    def _init_visibility(self, enabled: bool, capacity: int, batch: int, device) -> None:
        self.visible = torch.ones(capacity, batch, dtype=torch.bool, device=device) if enabled else None

    def _mark(self, ctx: StepContext, visible: torch.Tensor | None) -> None:
        if self.visible is None:
            return
        if visible is None:  # every new position visible: a fill, nothing to allocate
            self.visible.index_fill_(0, ctx.time, True)
        else:
            ctx.store(self.visible, visible)

    def mask(self, ctx: StepContext) -> torch.Tensor:
        """The step's attention mask ``[b, 1, s, end]``, less the hidden keys (a query still sees
        itself, so that a skipped query's discarded output stays finite)."""
        return ctx.attention_mask(None if self.visible is None else self.visible[:ctx.end])

    def bias(self, ctx: StepContext) -> torch.Tensor:
        """:meth:`mask` as an additive fp32 score bias (0 / -inf)."""
        return ctx.attention_bias(None if self.visible is None else self.visible[:ctx.end])


class KVCache(_Visibility):
    """Rotated keys ``[T, b, g, dk]`` and values ``[T, b, g, dv]`` of a standard attention layer."""

    def __init__(self, attn, batch: int, capacity: int, dtype, device, *, visibility: bool = False):
        g, d = attn.num_query_groups_per_partition, attn.hidden_size_per_attention_head
        self.key = torch.zeros(capacity, batch, g, d, dtype=dtype, device=device)
        self.value = torch.zeros(capacity, batch, g, d, dtype=dtype, device=device)
        self._init_visibility(visibility, capacity, batch, device)

    def write(self, ctx: StepContext, key: torch.Tensor, value: torch.Tensor, visible=None):
        """Stores the new positions (``visible`` ``[s, b]``: which later queries may see) and
        returns the keys/values the step attends over."""
        self._mark(ctx, visible)
        return ctx.store(self.key, key), ctx.store(self.value, value)


class LatentCache(_Visibility):
    """MLA's compressed cache: pre-norm KV latent ``[T, b, kv_lora_rank]`` and rotated RoPE key
    ``[T, b, qk_pos_emb_head_dim]`` (shared by all heads), not the expanded K/V."""

    def __init__(self, attn, batch: int, capacity: int, dtype, device, *, visibility: bool = False):
        config = attn.config
        self.latent = torch.zeros(capacity, batch, config.kv_lora_rank, dtype=dtype, device=device)
        self.rope_key = torch.zeros(capacity, batch, config.qk_pos_emb_head_dim, dtype=dtype,
                                    device=device)
        self._init_visibility(visibility, capacity, batch, device)

    def write(self, ctx: StepContext, latent: torch.Tensor, rope_key: torch.Tensor, visible=None):
        self._mark(ctx, visible)
        return ctx.store(self.latent, latent), ctx.store(self.rope_key, rope_key)


# Up to this many new positions (decode, verification) attention runs as explicit matmuls: SDPA
# with a mask would pick cuDNN on Hopper, which builds a new graph for every key length (measured
# on an H200: ~12 ms of host time per call, more than the whole rest of a decode step).
MATH_MAX_QUERIES = 16


def uses_sdpa(queries: int, depth_key=None) -> bool:
    """:func:`attend`'s path: SDPA for a prefill-sized forward without MoDA depth keys (the mask),
    else the explicit softmax (the additive bias)."""
    return depth_key is None and queries > MATH_MAX_QUERIES


def attend(query, key, value, mask, scale: float, depth_key=None, depth_value=None, bias=None):
    """Causal attention of ``s`` new queries over ``T`` cached keys, optionally with MoDA depth keys.

    query ``[s, b, np, dk]``; key ``[T, b, g, dk]``; value ``[T, b, g, dv]`` (``np`` divisible by
    ``g``: head ``i`` reads group ``i // (np / g)``); mask ``[b, 1, s, T]`` (True = attend);
    depth_key ``[s, b, g', n, dk]`` / depth_value: per-position extra keys (``n`` earlier layers);
    bias: the mask as an additive fp32 bias (:meth:`.context.StepContext.attention_bias`), used
    by the explicit path when given. Returns ``[s, b, np * dv]``.
    """
    s, b, heads, _ = query.shape
    q = query.permute(1, 2, 0, 3)  # [b, np, s, dk]
    k, v = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)  # [b, g, T, d]
    if uses_sdpa(s, depth_key):  # prefill
        r = heads // k.shape[1]
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(r, dim=1),
                                             v.repeat_interleave(r, dim=1), attn_mask=mask,
                                             scale=scale)  # [b, np, s, dv]
    else:
        if bias is None:
            bias = torch.where(mask, 0.0, float("-inf"))
        out = _explicit(q, k, v, bias, scale, depth_key, depth_value)
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _explicit(q, k, v, bias, scale, depth_key, depth_value):
    """``softmax([q k^T * scale + bias, q k_depth^T * scale]) [v, v_depth]`` with fp32 scores
    (``bias`` ``[b, 1, s, T]``: 0 / -inf); the ``r = np / g`` query heads of a group are stacked
    so that K/V are read once per group. Returns ``[b, np, s, dv]``."""
    b, heads, s, dk = q.shape
    g, T = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    grouped = q.reshape(b, g, (heads // g) * s, dk)  # head i -> group i // r
    scores = torch.matmul(grouped, k.transpose(-1, -2)).view(b, heads, s, T)
    scores = torch.add(bias.to(acc), scores, alpha=scale)  # in acc: scale x + 0 is scale x exactly
    if depth_key is not None:
        r = heads // depth_key.shape[2]
        kd = depth_key.repeat_interleave(r, dim=2)  # [s, b, np, n, dk]
        depth_scores = torch.einsum("bhsd,sbhnd->bhsn", q.to(acc), kd.to(acc)) * scale
        scores = torch.cat([scores, depth_scores], dim=-1)
    probs = scores.softmax(dim=-1)
    seq = probs[..., :T].to(v.dtype).reshape(b, g, (heads // g) * s, T)
    out = torch.matmul(seq, v).view(b, heads, s, -1)
    if depth_key is not None:
        vd = depth_value.repeat_interleave(heads // depth_value.shape[2], dim=2)
        out = (out.to(acc) + torch.einsum("bhsn,sbhnd->bhsd", probs[..., T:], vd.to(acc))).to(v.dtype)
    return out


def _moda(core, ctx: StepContext, key, value):
    """MoDA: this layer's depth keys of the new positions (read first), then its own push."""
    if not isinstance(core, DepthAwareAttention):
        return None, None
    depth = ctx.read_depth(core.buffer, core.reads)
    if core.slot is not None:
        ctx.push_depth(core.buffer, core.slot, key, value)
    return depth


def softmax_scale(attn) -> float:
    """The scale the trained core attention applies: its own ``softmax_scale`` (local, TE and MoDA
    core attention keep one), else the config's, else ``1 / sqrt(head dim)`` as Megatron sets it."""
    scale = getattr(attn.core_attention, "softmax_scale", None)
    if scale is None:
        scale = getattr(attn.config, "softmax_scale", None) or attn.hidden_size_per_attention_head ** -0.5
    return float(scale)


def attention_step(attn, hidden, cache: KVCache, ctx: StepContext, rotary, visible=None):
    """One standard ``SelfAttention`` over the new positions: ``[s, b, h] -> (out, bias)``.

    ``rotary``: the model's ``RotaryEmbedding`` (None without RoPE), applied at each row's own
    positions (:meth:`.context.StepContext.rotation`; a fused RoPE kernel takes one position per
    sequence index, not per row)."""
    query, key, value = attn.get_query_key_value_tensors(hidden, None)  # [s, b, np|g, d]
    if rotary is not None:
        config = attn.config
        rotation = ctx.rotation(rotary, query.dtype, compat.rope_deinterleaves(config, mla=False),
                                config.rotary_interleaved)
        query, key = rotation.apply(query), rotation.apply(key)
    depth_key, depth_value = _moda(attn.core_attention, ctx, key, value)
    keys, values = cache.write(ctx, key, value, visible)
    bias = None if uses_sdpa(query.shape[0], depth_key) else cache.bias(ctx)
    out = attend(query, keys, values, cache.mask(ctx), softmax_scale(attn), depth_key, depth_value,
                 bias=bias)
    return attn.linear_proj(out)


def mla_step(attn, hidden, cache: LatentCache, ctx: StepContext, visible=None):
    """One ``MLASelfAttention`` over the new positions with the latent cache: ``(out, bias)``.

    The projections, norms and RoPE are MLA's own, in the order ``get_query_key_value_tensors``
    applies them (tensor parallel size 1: no gather of the down projections)."""
    config = attn.config
    s, b, _ = hidden.shape
    heads, qk, pe, dv = (attn.num_attention_heads_per_partition, config.qk_head_dim,
                         config.qk_pos_emb_head_dim, config.v_head_dim)
    if config.q_lora_rank is None:
        q, _ = attn.linear_q_proj(hidden)
    else:
        q_latent, _ = attn.linear_q_down_proj(hidden)
        q, _ = attn.linear_q_up_proj(attn.q_layernorm(q_latent))
    q_no_pe, q_pe = torch.split(q.view(s, b, heads, qk + pe), [qk, pe], dim=-1)
    combined, _ = attn.linear_kv_down_proj(hidden)  # [s, b, kv_lora_rank + pe]
    latent, k_pe = torch.split(combined, [config.kv_lora_rank, pe], dim=-1)

    rotation = ctx.rotation(attn.rotary_pos_emb, q_pe.dtype, compat.rope_deinterleaves(config, mla=True),
                            config.rotary_interleaved)
    q_pe, k_pe = rotation.apply(q_pe), rotation.apply(k_pe.unsqueeze(2)).squeeze(2)
    latents, rope_keys = cache.write(ctx, latent, k_pe, visible)  # [T, b, r], [T, b, pe]
    scale = float(attn.softmax_scale)
    if s > MATH_MAX_QUERIES:  # prefill: the expanded keys and values, SDPA
        mask = cache.mask(ctx)
        kv, _ = attn.linear_kv_up_proj(attn.kv_layernorm(latents))  # [T, b, np * (qk + dv)]
        keys, values = _expand(kv, rope_keys, heads, qk, dv)
        query = torch.cat([q_no_pe, q_pe], dim=-1)  # [s, b, np, qk + pe]
        depth_key, depth_value = _moda(attn.core_attention, ctx, ctx.new_rows(keys),
                                      ctx.new_rows(values))
        out = attend(query, keys, values, mask, scale, depth_key, depth_value)
        return attn.linear_proj(out)
    # decode / verification: absorbed into the latents (never the expanded cache); MoDA pushes
    # and reads the expanded keys of the new positions, as MLA hands them to core attention
    depth_key = depth_value = None
    if isinstance(attn.core_attention, DepthAwareAttention):
        kv_new, _ = attn.linear_kv_up_proj(attn.kv_layernorm(latent))
        depth_key, depth_value = _moda(attn.core_attention, ctx, *_expand(kv_new, k_pe, heads, qk, dv))
    out = _absorbed(attn, q_no_pe, q_pe, _latent_norm(attn, latents), rope_keys, cache.bias(ctx),
                    scale, depth_key, depth_value)
    return attn.linear_proj(out)


def _expand(kv: torch.Tensor, rope_keys: torch.Tensor, heads: int, qk: int, dv: int):
    """MLA's keys ``[T, b, np, qk + pe]`` (the RoPE key shared by all heads) and values from the
    up projection ``kv`` ``[T, b, np * (qk + dv)]``."""
    k_no_pe, values = torch.split(kv.view(*kv.shape[:2], heads, qk + dv), [qk, dv], dim=-1)
    keys = torch.cat([k_no_pe, rope_keys.unsqueeze(2).expand(-1, -1, heads, -1)], dim=-1)
    return keys, values


def _latent_norm(attn, latents: torch.Tensor) -> torch.Tensor:
    """The KV latents as MLA's up projection sees them: through ``kv_layernorm`` (local), or the
    norm TE fuses into ``linear_kv_up_proj`` (its ``layer_norm_weight``, ``normalization``,
    ``eps``, ``zero_centered_gamma``), or as they are without a latent norm."""
    up = attn.linear_kv_up_proj
    weight = getattr(up, "layer_norm_weight", None)
    if weight is None:
        return attn.kv_layernorm(latents)
    weight = weight.float() + 1.0 if getattr(up, "zero_centered_gamma", False) else weight.float()
    eps = up.eps if hasattr(up, "eps") else attn.config.layernorm_epsilon
    shape, x = (latents.shape[-1],), latents.float()
    if getattr(up, "normalization", "LayerNorm") == "RMSNorm":  # in fp32, cast back (as TE does)
        return F.rms_norm(x, shape, weight, eps).to(latents.dtype)
    bias = getattr(up, "layer_norm_bias", None)
    return F.layer_norm(x, shape, weight, None if bias is None else bias.float(), eps).to(latents.dtype)


def _absorbed(attn, q_no_pe, q_pe, latents, rope_keys, bias, scale, depth_key, depth_value):
    """MLA attention of ``s`` new queries over the normed latent cache without expanding it:
    the up projection's key half is folded into the queries (``q W_uk``, ``[s, b, np, r]``) and
    its value half applied after the attention weights sum the latents, so a step reads the cache
    at its compressed size (``kv_lora_rank + pe`` per position, not ``np * (qk + dv)``) and
    up-projects nothing per cached position. The same scores and outputs as the expanded path up
    to rounding (a bias of the up projection included: ``q . b_k`` per query, ``b_v`` per
    output). q_no_pe ``[s, b, np, qk]``, q_pe ``[s, b, np, pe]``, latents ``[T, b, r]``,
    rope_keys ``[T, b, pe]``, bias ``[b, 1, s, T]`` (the mask as 0 / -inf); MoDA's depth
    keys/values as :func:`attend` takes them. Returns ``[s, b, np * dv]``."""
    config = attn.config
    s, b, heads, qk = q_no_pe.shape
    dv = config.v_head_dim
    up = attn.linear_kv_up_proj
    w = up.weight.view(heads, qk + dv, -1)  # [np, qk + dv, r]
    acc = torch.float64 if latents.dtype == torch.float64 else torch.float32
    # per head q W_uk (one batched GEMM over heads), then the heads stacked as rows of one
    # [np * s, r] query block per sequence, so the latents are read once for all heads
    q_heads = q_no_pe.permute(2, 1, 0, 3).reshape(heads, b * s, qk)
    q_latent = torch.bmm(q_heads, w[:, :qk].to(q_heads.dtype))  # [np, b * s, r]
    rows = heads * s
    q_latent = q_latent.view(heads, b, s, -1).transpose(0, 1).reshape(b, rows, -1)
    q_rope = q_pe.permute(1, 2, 0, 3).reshape(b, rows, -1)  # [b, np * s, pe]
    scores = torch.baddbmm(torch.bmm(q_rope, rope_keys.permute(1, 2, 0)), q_latent,
                           latents.permute(1, 2, 0))  # [b, np * s, T]
    T = scores.shape[-1]
    scores = scores.view(b, heads, s, T)
    up_bias = getattr(up, "bias", None)
    b_v = None
    if up_bias is not None and up_bias.numel() and not getattr(up, "skip_bias_add", False):
        up_bias = up_bias.view(heads, qk + dv)
        b_k, b_v = up_bias[:, :qk], up_bias[:, qk:]
        scores = scores + torch.einsum("sbhq,hq->bhs", q_no_pe, b_k.to(q_no_pe.dtype)).unsqueeze(-1)
    scores = torch.add(bias.to(acc), scores, alpha=scale)  # in acc: scale x + 0 is scale x exactly
    if depth_key is not None:
        query = torch.cat([q_no_pe, q_pe], dim=-1)  # [s, b, np, qk + pe]
        depth_key = depth_key.repeat_interleave(heads // depth_key.shape[2], dim=2)
        depth_value = depth_value.repeat_interleave(heads // depth_value.shape[2], dim=2)
        depth_scores = torch.einsum("sbhd,sbhnd->bhsn", query.to(acc), depth_key.to(acc)) * scale
        scores = torch.cat([scores, depth_scores], dim=-1)
    probs = scores.softmax(dim=-1)
    seq = probs[..., :T].to(latents.dtype).reshape(b, rows, T)
    summed = torch.bmm(seq, latents.transpose(0, 1))  # [b, np * s, r]
    summed = summed.view(b, heads, s, -1).transpose(0, 1).reshape(heads, b * s, -1)
    out = torch.bmm(summed, w[:, qk:].transpose(1, 2).to(summed.dtype))  # [np, b * s, dv]
    out = out.view(heads, b, s, dv).permute(1, 0, 2, 3)  # [b, np, s, dv]
    if b_v is not None:  # each value carries b_v: weighted by the sequence part's total weight
        mass = probs[..., :T].sum(-1, keepdim=True).to(out.dtype)  # [b, np, s, 1]
        out = out + mass * b_v.to(out.dtype)[None, :, None]
    if depth_key is not None:
        depth = torch.einsum("bhsn,sbhnd->bhsd", probs[..., T:], depth_value.to(acc))
        out = (out.to(acc) + depth).to(out.dtype)
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)
