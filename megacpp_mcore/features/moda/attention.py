"""The depth-aware core attention of a MoDA ``A`` layer, and MoDA's transform at the
``core_attention`` seam.

:func:`transform` takes the core attention the layer would have (the backend's, or MLA's) and
returns the spec of :class:`DepthAwareAttention`, with the layer's place in its segment's depth
buffer claimed from the chunk being built (``LayerContext.chunk``, :mod:`.buffer`).

A layer that reads no depth keys (the first MoDA layer of a segment) runs the backend's own core
attention (``TEDotProductAttention`` / ``DotProductAttention``) and only pushes. Layers that read
depth keys run the fast path (:mod:`.fast`: a sequence kernel that returns its log-sum-exp merged
with the depth part) or, with ``MoDAConfig(kernel="reference")``, the reference (:mod:`.reference`).
The kernels used are recorded in :attr:`DepthAwareAttention.observed_kernel` and
:attr:`~DepthAwareAttention.observed_depth_kernel`.

Mixture-of-Depths: MoDA pushes happen inside the core attention, for the positions the attention
sees. MoD's ``gateskip`` and ``threshold`` modes keep every position on the path, so every position
pushes. A token-dropping (``topk``) wrapper that hands the attention a shorter sequence is refused at
the push with a shape error; such a wrapper must run the attention on all positions.

Not supported (refused at build time with a ValueError): recomputing the core attention (full
recompute, or selective with ``core_attn``: it would replay pushes), context parallelism, attention
dropout, non-vanilla softmax, sliding windows; at run time: packed (``thd``) sequences and KV-cache
inference.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from megacpp_mcore.features.moda import depth as depth_math
from megacpp_mcore.features.moda import sequence
from megacpp_mcore.features.moda.buffer import DepthSlot, claim_slot
from megacpp_mcore.features.moda.config import MoDAConfig
from megacpp_mcore.features.moda.fast import DepthFlashAttention
from megacpp_mcore.features.moda.reference import reference_depth_attention
from megacpp_mcore.spec.pattern import FeaturePlacement


class DepthAwareAttention(MegatronModule):
    """``core_attention`` for ``SelfAttention`` / ``MLASelfAttention`` with a MoDA depth buffer.

    Takes the upstream core-attention constructor arguments (``k_channels``/``v_channels`` for MLA)
    plus ``moda`` (the config), ``depth`` (this layer's :class:`~.buffer.DepthSlot`), ``backend``
    (the provider; it resolves ``cuda_kernel="auto"``) and ``sequence_attention`` (the core attention
    this wraps); :func:`transform` binds them. Forward has the upstream signature: query
    ``[s, b, np, dk]``, key ``[s, b, g, dk]``, value ``[s, b, g, dv]`` -> ``[s, b, np * dv]``.
    Parameter-free.

    With ``kernel="fast"``, a layer that reads no depth keys builds ``sequence_attention`` and only
    pushes; with MLA shapes (``k_channels`` given) it uses the fast path instead, since the local
    class rejects ``k_channels`` in megatron-core 0.16.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, *, moda: MoDAConfig,
                 depth: DepthSlot, backend, sequence_attention=None,
                 **kwargs):  # upstream kwargs added later (num_splits, ...)
        super().__init__(config=config)
        _refuse_unsupported(config, attn_mask_type, attention_dropout, depth.index)
        self.layer_number = layer_number
        self.moda = moda
        self.layer_index, self.buffer, self.reads = depth.index, depth.buffer, depth.reads
        self.slot, self.starts_micro_batch = depth.slot, depth.starts_micro_batch
        self.k_channels = k_channels or config.kv_channels
        self.v_channels = v_channels or config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(self.k_channels) if softmax_scale is None else softmax_scale
        # decided once here: "auto" is the backend provider's choice for these head dims
        self.cuda_kernel = backend.moda_cuda_kernel(moda.cuda_kernel,
                                                    equal_dims=self.k_channels == self.v_channels)
        self.observed_kernel: str | None = None
        self.observed_depth_kernel: str | None = None
        self.sequence_attention = None
        if (self.reads == 0 and moda.kernel == "fast" and sequence_attention is not None
                and k_channels is None and v_channels is None):
            self.sequence_attention = build_module(
                sequence_attention, config=config, layer_number=layer_number,
                attn_mask_type=attn_mask_type, attention_type=attention_type,
                attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                cp_comm_type=cp_comm_type, pg_collection=pg_collection)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(f"MoDA layer {self.layer_index}: packed sequences and attention_bias "
                             "are not supported")
        if query.shape[0] != key.shape[0]:
            raise ValueError(
                f"MoDA layer {self.layer_index}: query length {query.shape[0]} != key length "
                f"{key.shape[0]}; KV-cache inference is not supported"
            )
        # attention_mask: the layer is causal (checked at build), as with TE's causal mask type.
        if self.starts_micro_batch:
            self.buffer.begin()
        depth_key, depth_value, attached = self.buffer.read(self.reads)
        if self.sequence_attention is not None:  # no depth keys: the backend's own attention
            self.observed_kernel = f"backend:{type(self.sequence_attention).__name__}"
            out = self.sequence_attention(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                          attention_bias=None, packed_seq_params=None)
            if self.slot is not None:
                self.buffer.push(self.slot, key, value)
            return out
        if self.moda.kernel == "reference":
            out = self._reference(query, key, value, depth_key, depth_value, attached)
        else:
            self.observed_kernel = sequence.sequence_kernel(
                query, max(query.shape[-1], value.shape[-1]), self.cuda_kernel)
            if depth_key is not None:
                fused = depth_math.fused_kernels(self.moda.depth_kernel, query)
                self.observed_depth_kernel = "torch" if fused is None else "triton"
            out = DepthFlashAttention.apply(query, key, value, depth_key, depth_value,
                                            self.softmax_scale, self.observed_kernel,
                                            self.moda.depth_kernel, *attached)
        if self.slot is not None:
            self.buffer.push(self.slot, key, value)
        s, b, heads, dv = out.shape
        return out.reshape(s, b, heads * dv)

    def _reference(self, query, key, value, depth_key, depth_value, attached):
        self.observed_kernel = "reference"
        self.observed_depth_kernel = None if depth_key is None else "reference"
        if attached:
            depth_key = torch.stack(attached[0::2], dim=3)
            depth_value = torch.stack(attached[1::2], dim=3)
        elif depth_key is not None:  # autograd would save views that later pushes bump
            depth_key, depth_value = depth_key.clone(), depth_value.clone()
        return reference_depth_attention(query, key, value, depth_key, depth_value,
                                         scale=self.softmax_scale)

    def megacpp_stats(self) -> dict[str, float]:
        """Depth keys read by this layer; the segment's first layer also reports the buffer bytes."""
        stats = {"moda_depth_keys": float(self.reads)}
        if self.starts_micro_batch:
            stats["moda_buffer_bytes"] = float(self.buffer.allocated_bytes)
        return stats


def _refuse_unsupported(config, attn_mask_type, attention_dropout, index: int) -> None:
    where = f"MoDA layer {index}"
    checks = [
        (config.recompute_granularity == "full"
         or config.recompute_granularity == "selective" and "core_attn" in (config.recompute_modules or ()),
         f"recompute_granularity={config.recompute_granularity!r} recomputing the core attention "
         "(recomputation replays K/V pushes); allowed: None, or 'selective' without 'core_attn'"),
        (config.context_parallel_size != 1,
         f"context_parallel_size={config.context_parallel_size}; allowed: 1"),
        ((config.attention_dropout if attention_dropout is None else attention_dropout) != 0.0,
         "attention dropout > 0; allowed: 0.0"),
        (getattr(config, "softmax_type", "vanilla") != "vanilla",
         f"softmax_type={getattr(config, 'softmax_type', None)!r}; allowed: 'vanilla'"),
        (config.window_size is not None, f"window_size={config.window_size!r}; allowed: None"),
        (attn_mask_type != AttnMaskType.causal, f"attn_mask_type={attn_mask_type}; allowed: causal"),
        (config.apply_query_key_layer_scaling, "apply_query_key_layer_scaling=True; allowed: False"),
    ]
    for failed, message in checks:
        if failed:
            raise ValueError(f"{where}: unsupported {message}")


def transform(core_attention_spec, ctx) -> ModuleSpec:
    """MoDA at the ``core_attention`` seam: the depth-aware core attention of layer ``ctx``.

    ``core_attention_spec`` is the core attention the layer would otherwise have (the backend's,
    or MLA's, which then passes ``k_channels``/``v_channels`` when it builds this); the first MoDA
    layer of a segment, which has no depth keys, runs it. The layer's place in its segment's depth
    buffer is claimed here, from ``ctx.chunk`` (layers of a chunk are built in order).
    """
    moda = ctx.feature("moda")
    if not isinstance(moda, MoDAConfig):  # a bare placement: the default config at that placement
        moda = MoDAConfig(placement=moda or FeaturePlacement(symbols="A"))
    # A ModuleSpec (not a partial): MLA's attention builds its core attention with build_module.
    return ModuleSpec(module=DepthAwareAttention, params=dict(
        moda=moda, depth=claim_slot(ctx.chunk, ctx.config, moda, ctx.index), backend=ctx.backend,
        sequence_attention=core_attention_spec))
