"""Per-token rotary embeddings for MoD top-k layers.

A top-k layer's attention sees ``k`` gathered tokens per sequence, each at its own position:
rotary embeddings ``[k, b, 1, d]`` instead of ``[s, 1, 1, d]``. :class:`TokenRopeAttention` (the
top-k layer's ``SelfAttention``, swapped in by :func:`with_token_rope`) applies them as a flat
``[k*b]`` sequence of positions, so TE's fused RoPE kernel runs on top-k layers too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec


@dataclasses.dataclass(frozen=True)
class TokenRope:
    """Per-token rotary embeddings ``[k, b, 1, d]`` (or a ``(q, k)`` pair of them) of top-k
    gathered tokens, on their way to a :class:`TokenRopeAttention`."""

    freqs: Any


def apply_token_rope(t: torch.Tensor, freqs: torch.Tensor, config, cp_group) -> torch.Tensor:
    """RoPE with a position per (token, sequence): ``t [k, b, h, d]``, ``freqs [k, b, 1, d]``.

    Applied through Megatron's own ``apply_rotary_pos_emb``. With ``apply_rope_fusion`` it runs on
    the ``[k*b, 1, h, d]`` view, where every row is its own position, so TE's fused kernel (which
    needs ``[s, 1, 1, d]`` frequencies) takes it exactly as on a dense layer; unfused, the
    ``[k, b, 1, d]`` frequencies broadcast as they are (no reshaping copies)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer import attention as upstream_attention

    mscale = getattr(upstream_attention, "_yarn_get_concentration_factor_from_config", lambda c: 1.0)(config)
    if not config.apply_rope_fusion:
        return apply_rotary_pos_emb(t, freqs, config=config, mscale=mscale, cp_group=cp_group)
    k, b = t.shape[:2]
    out = apply_rotary_pos_emb(t.reshape(k * b, 1, *t.shape[2:]),
                               freqs.reshape(k * b, 1, 1, freqs.shape[-1]), config=config,
                               mscale=mscale, cp_group=cp_group)
    return out.view(t.shape)


class TokenRopeAttention(SelfAttention):
    """``SelfAttention`` of a MoD top-k layer: takes :class:`TokenRope` embeddings and applies
    them to the query and key right after the QKV projection (and the q/k norms), through
    :func:`apply_token_rope`; upstream's forward then runs with no rotary embedding. Any other
    ``rotary_pos_emb`` goes to upstream unchanged."""

    def forward(self, hidden_states, *args, rotary_pos_emb=None, **kwargs):
        if not isinstance(rotary_pos_emb, TokenRope):
            return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)
        freqs = rotary_pos_emb.freqs
        # this module's own slot for the duration of one forward (read by the QKV hook below)
        self._megacpp_token_rope = freqs if isinstance(freqs, tuple) else (freqs, freqs)
        try:
            return super().forward(hidden_states, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self._megacpp_token_rope = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        rope = getattr(self, "_megacpp_token_rope", None)
        if rope is None:
            return out
        if len(out) < 3:  # (mixed_qkv, split list): fused single-QKV RoPE, refused for top-k
            raise RuntimeError("MoD topk per-token RoPE needs split q/k/v (fused_single_qkv_rope=False)")
        query, key, *rest = out
        cp = self.pg_collection.cp
        if rope[0] is not None:
            query = apply_token_rope(query, rope[0], self.config, cp)
        if rope[1] is not None:
            key = apply_token_rope(key, rope[1], self.config, cp)
        return (query, key, *rest)


@functools.cache
def _token_rope_class(cls: type) -> type:
    if cls is SelfAttention:
        return TokenRopeAttention
    return type(f"TokenRope{cls.__name__}", (TokenRopeAttention, cls), {"__module__": __name__})


def with_token_rope(submodules):
    """The wrapped layer's submodules with its plain ``SelfAttention`` (or subclass) swapped for the
    per-token-RoPE one; other attention (MLA, MoDA-carrying specs) is left as it is."""
    attn = getattr(submodules, "self_attention", None)
    module = getattr(attn, "module", None)
    if not (isinstance(attn, ModuleSpec) and isinstance(module, type) and issubclass(module, SelfAttention)):
        return submodules
    swapped = ModuleSpec(module=_token_rope_class(module), params=attn.params, submodules=attn.submodules)
    return dataclasses.replace(submodules, self_attention=swapped)


# Keyword inputs of a layer that a per-token gather (MoD top-k, FlexiDepth hard skip) cannot gather.
UNGATHERABLE_INPUTS = ("attention_mask", "packed_seq_params", "inference_context", "rotary_pos_cos",
                       "rotary_pos_sin", "rotary_pos_cos_sin", "attention_bias", "padding_mask",
                       "context", "sequence_len_offset")


def check_gatherable(args: tuple, kwargs: dict, owner: str, layer_number) -> None:
    """Refuses layer inputs a per-token gather cannot follow (positional inputs, any of
    :data:`UNGATHERABLE_INPUTS`); ``owner`` names the route, e.g. ``"MoD topk"``."""
    if args:
        raise TypeError(f"{owner} layers take the layer inputs as keywords "
                        "(as TransformerBlock passes them)")
    for name in UNGATHERABLE_INPUTS:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{owner} on layer {layer_number} cannot gather {name!r} per token; it supports "
                "causal self-attention with rotary_pos_emb (no explicit mask, no packed sequences, "
                "no inference cache)")


def gather_rope(rope, idx: torch.Tensor, owner: str = "MoD topk"):
    """Rotary embeddings of the gathered positions: ``[s, 1, 1, d]`` -> ``[k, b, 1, d]`` (a
    ``(q, k)`` pair of them stays a pair); ``owner`` names the route in the error."""
    if isinstance(rope, tuple):
        return tuple(None if r is None else gather_rope(r, idx, owner) for r in rope)
    if rope.dim() != 4 or rope.shape[1] != 1:
        raise ValueError(f"{owner} expects rotary_pos_emb of shape [s, 1, 1, d], got {tuple(rope.shape)}")
    return rope[:, 0][idx]  # [k, b, 1, d]


def gathered_rotary(attention, rope, idx: torch.Tensor, length: int, owner: str):
    """The ``rotary_pos_emb`` a gathering layer (``owner``: MoD topk, FlexiDepth hard skip) hands its
    attention for the ``k`` tokens at ``idx`` ``[k, b]`` of a sequence of ``length``, given the
    model's ``rope`` (``[s, 1, 1, d]``, or None):

    * MLA builds its own table: :class:`~megacpp_mcore.layers.mla.TokenPositions` (it rotates each
      token at its own position instead of ``0..k-1``);
    * self-attention swapped by :func:`with_token_rope`: :class:`TokenRope` of the gathered rows;
    * other attention: the gathered ``[k, b, 1, d]`` rows; no attention (``E``) or no RoPE: None.
    """
    from megatron.core.transformer.identity_op import IdentityOp

    from megacpp_mcore.layers.mla import LatentSelfAttention, TokenPositions

    if isinstance(attention, LatentSelfAttention):
        return TokenPositions(idx, length)
    if rope is None or isinstance(attention, IdentityOp):
        return None
    rope = gather_rope(rope, idx, owner)  # [k, b, 1, d]
    # plain self-attention applies it as a flat [k*b] sequence, which the fused RoPE kernel takes
    return TokenRope(rope) if isinstance(attention, TokenRopeAttention) else rope


def check_gather(ctx, owner: str) -> None:
    """Refuses a per-token gather (``owner``: MoD topk, FlexiDepth hard skip) where it cannot give
    each gathered token its own position:

    * under context parallelism: each rank holds a slice of the sequence (and of the rotary table),
      while the route gathers positions of the whole sequence;
    * on an MLA ``A`` layer whose RoPE is fused: MLA's fused kernels take one rotary table for the
      whole sequence, not a position per gathered token (the unfused path takes
      :class:`~megacpp_mcore.layers.mla.TokenPositions`)."""
    cp = getattr(ctx.config, "context_parallel_size", 1) or 1
    if cp > 1:
        raise ValueError(
            f"layer {ctx.index} ({ctx.symbol!r}) uses {owner} with context_parallel_size={cp}: the "
            "route gathers positions of the whole sequence, while each rank holds a slice of it; "
            "allowed: context_parallel_size=1 (tensor, sequence, pipeline and expert parallelism "
            "work)")
    if ctx.symbol == "A" and ctx.has("mla") and getattr(ctx.config, "apply_rope_fusion", False):
        raise ValueError(
            f"layer {ctx.index} ('A') uses MLA with fused RoPE (apply_rope_fusion=True) and {owner}: "
            "the fused kernels rotate by one table for the whole sequence, not at each gathered "
            "token's position; turn RoPE fusion off (pretrain_gpt.py: --no-rope-fusion; "
            "FastPaths(mla_rope_fusion=False), the default)")
