"""MLA, the ``self_attention`` feature: the only module that imports Megatron's multi-latent attention.

:func:`transform` is MLA's entry in the feature table (:mod:`megacpp_mcore.features`): the composer
hands it the standard self-attention spec of an ``A`` layer carrying ``mla`` and gets MLA's back
(every attention consumer, trunk ``A`` layers and the MTP shared block, builds through that seam;
MoDA then wraps the core attention at its own seam). :func:`check_placement` is the table's
per-layer guard. This module knows MLA only; backend choices (projection classes, core attention,
what a backend can run) are provider methods in :mod:`megacpp_mcore.spec.backends`. It answers:

* channel metadata for core attention (:func:`channel_metadata`): ``k_channels = qk_head_dim +
  qk_pos_emb_head_dim``, ``v_channels = v_head_dim``. Megatron's local ``DotProductAttention``
  rejects those arguments in 0.16 (Megatron-LM issue 1589), so the local backend uses
  :class:`LatentDotProductAttention`, a subclass that takes them and sizes its output by
  ``v_channels``;
* the packed (``thd``) rotary shape (:func:`packed_rotary_shape`) and packed core attention on both
  backends: the local subclass runs ``thd`` as a block-diagonal causal mask; on TE,
  :class:`LatentTEDotProductAttention` pads V to the QK head dim for ``thd`` (fixed upstream in 0.18);
* whether a backend can run this MLA shape (:func:`check_support`, with the provider's
  ``mla_problems``), raised at build time with the backend and the dimensions in the message,
  never at the first forward.

Upstream defects that a subclass cannot absorb are patches (``patches.mla_have_te``,
``patches.mla_down_proj_tp_marker``), applied by :func:`apply_patches` from explicit entry points
(``runtime.initialize`` and building an MLA layer spec), never on import. The down-projection classes are passed exactly as
upstream's allow-list expects (no subclasses, no ModuleSpecs: 0.16 rejects both).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import (
    MLASelfAttention,
    MLASelfAttentionSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megacpp_mcore.spec import compat
from megacpp_mcore.spec.context import LayerContext

# Registry entries (megacpp_mcore.patches) the seam needs; applied by apply_patches() only.
PATCHES = ("mla-have-te", "mla-down-proj-tp-marker")


class MLAUnsupported(ValueError):
    """The requested backend cannot run this MLA shape (message names backend and dims)."""


@dataclasses.dataclass(frozen=True)
class ChannelMetadata:
    """Per-head channel sizes core attention sees under MLA."""

    k_channels: int  # qk_head_dim + qk_pos_emb_head_dim (query and key)
    v_channels: int  # v_head_dim


def is_mla_config(config: TransformerConfig) -> bool:
    return isinstance(config, MLATransformerConfig) and bool(config.multi_latent_attention)


def channel_metadata(config: TransformerConfig) -> ChannelMetadata:
    """``k_channels``/``v_channels`` of core attention for ``config`` (MLA or standard)."""
    if is_mla_config(config):
        return ChannelMetadata(
            k_channels=config.qk_head_dim + config.qk_pos_emb_head_dim,
            v_channels=config.v_head_dim,
        )
    return ChannelMetadata(k_channels=config.kv_channels, v_channels=config.kv_channels)


def packed_rotary_shape(config: MLATransformerConfig, packed_seq_params: PackedSeqParams) -> tuple:
    """Shape of the rotary table MLA builds for a ``thd`` batch: ``[max_seqlen, 1, 1, pos_dim]``.

    Positions restart at every document boundary (``cu_seqlens``), so the table only needs the
    longest document, not the packed length; it is applied to the ``qk_pos_emb_head_dim`` slice.
    """
    _check_packed(packed_seq_params)
    longest = max(int(packed_seq_params.max_seqlen_q), int(packed_seq_params.max_seqlen_kv))
    return (longest, 1, 1, config.qk_pos_emb_head_dim)


def _check_packed(packed_seq_params: PackedSeqParams) -> None:
    if packed_seq_params.qkv_format != "thd":
        raise ValueError(
            f"packed MLA needs PackedSeqParams(qkv_format='thd'), got {packed_seq_params.qkv_format!r}"
        )
    if packed_seq_params.cu_seqlens_q is None or packed_seq_params.max_seqlen_q is None:
        raise ValueError("packed MLA needs cu_seqlens_q/kv and max_seqlen_q/kv in PackedSeqParams")


def _dims(config: TransformerConfig) -> str:
    meta = channel_metadata(config)
    return (
        f"k_channels={meta.k_channels} (qk_head_dim={config.qk_head_dim} + "
        f"qk_pos_emb_head_dim={config.qk_pos_emb_head_dim}), v_channels={meta.v_channels}, "
        f"q_lora_rank={config.q_lora_rank}, kv_lora_rank={config.kv_lora_rank}, "
        f"heads={config.num_attention_heads}, tp={config.tensor_model_parallel_size}"
    )


def check_support(config: TransformerConfig, backend) -> None:
    """Raises :class:`MLAUnsupported` when ``backend`` (a provider from
    :mod:`megacpp_mcore.spec.backends`) cannot run this MLA shape (``sbhd`` and packed ``thd``
    batches alike: both backends' MLA core attention takes ``thd``).

    Called by :func:`mla_self_attention_spec` at build time; callable on its own (e.g. before a
    launch: ``backends.provider("te")`` needs no Transformer Engine to answer).
    """
    if not is_mla_config(config):
        raise MLAUnsupported(
            f"MLA on backend {backend.name!r} needs an MLATransformerConfig with its dims "
            f"(runtime.transformer_config builds one when ModelConfig.mla is set); got "
            f"{type(config).__name__}"
        )
    problems = []
    if config.qk_pos_emb_head_dim % 2:
        problems.append("qk_pos_emb_head_dim must be even (rotary pairs)")
    if config.rope_type not in ("rope", "yarn"):
        problems.append(f"rope_type={config.rope_type!r} (allowed: 'rope', 'yarn')")
    problems += backend.mla_problems(config)
    if problems:
        raise MLAUnsupported(
            f"MLA is not supported on backend "
            f"{backend.name!r} for {_dims(config)}: " + "; ".join(problems)
        )


class LatentDotProductAttention(DotProductAttention):
    """Local core attention that takes MLA's ``k_channels``/``v_channels`` and ``thd`` batches.

    Upstream's constructor has no channel arguments and sizes its output by ``config.kv_channels``;
    here the output is ``v_channels`` per head. A ``thd`` batch ``[t, np, hn]`` runs as one sequence
    with a block-diagonal causal mask built from ``cu_seqlens`` (documents never see each other).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **_newer_upstream_kwargs,
    ):
        super().__init__(
            config=config,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            attention_type=attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        self.k_channels = k_channels or config.kv_channels
        self.v_channels = v_channels or config.kv_channels
        self.hidden_size_per_attention_head = self.k_channels
        self.hidden_size_per_partition = self.v_channels * self.num_attention_heads_per_partition
        if softmax_scale is None:
            self.softmax_scale = self.k_channels**-0.5
            if config.apply_query_key_layer_scaling:
                self.softmax_scale /= self.layer_number
        self.rope_key_grad_reduction: tuple[int, Any] | None = None  # set by LatentSelfAttention

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PackedSeqParams | None = None):
        if self.rope_key_grad_reduction is not None and key.requires_grad:
            key = _SumRopeKeyGrad.apply(key, *self.rope_key_grad_reduction)
        # Output width from this call's V: from megatron-core 0.18 MLA pads V of a packed (thd)
        # batch to the Q/K head dim itself and trims the output after (never padded twice: our
        # TE subclass pads only where upstream does not).
        self.hidden_size_per_partition = value.size(-1) * self.num_attention_heads_per_partition
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        _check_packed(packed_seq_params)
        # [t, np, hn] -> [t, 1, np, hn]: one "sequence" of all documents, masked per document.
        mask = packed_causal_mask(packed_seq_params, query.size(0), key.size(0), query.device)
        softmax = self.scale_mask_softmax
        causal = softmax.attn_mask_type
        softmax.attn_mask_type = AttnMaskType.padding  # use the explicit mask, also in fused kernels
        try:
            context = super().forward(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1),
                                      mask, attention_bias=attention_bias)
        finally:
            softmax.attn_mask_type = causal
        return context.squeeze(1)  # [t, np * v_width], TE's thd output layout


class _SumRopeKeyGrad(torch.autograd.Function):
    """Identity on ``key`` [.., np, k_channels]; in backward, the gradient of the shared RoPE key
    slice (the last ``pe_dim`` channels, one vector expanded over all heads) is summed over the
    local heads, all-reduced over TP and spread evenly back over the local heads.

    Why: with a TP-sharded down projection, MLA gathers ``k_pos_emb`` and expands it over this
    rank's heads only; the gather's backward keeps just this rank's column slice, so the rope-key
    gradient would miss the other ranks' heads (megatron-core 0.16-0.19, local path). After this
    reduction every rank carries the full gradient, and the expand's backward (a sum over local
    heads) hands exactly that total to ``k_pos_emb``.
    """

    @staticmethod
    def forward(ctx, key, pe_dim, group):
        ctx.pe_dim, ctx.group = pe_dim, group
        return key.view_as(key)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        heads = grad.size(-2)
        total = grad[..., -ctx.pe_dim:].sum(dim=-2, keepdim=True)  # [.., 1, pe]
        torch.distributed.all_reduce(total, group=ctx.group)
        grad[..., -ctx.pe_dim:] = (total / heads).expand_as(grad[..., -ctx.pe_dim:])
        return grad, None, None


def packed_causal_mask(params: PackedSeqParams, sq: int, sk: int, device) -> torch.Tensor:
    """``[1, 1, sq, sk]`` bool mask (True = masked): causal inside each document, nothing across."""
    cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
    cu_k = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
    if int(cu_q[-1]) != sq or int(cu_k[-1]) != sk:
        raise ValueError(
            f"cu_seqlens end at q={int(cu_q[-1])}, kv={int(cu_k[-1])} but the packed batch has "
            f"{sq} query and {sk} key tokens"
        )
    doc_q = torch.bucketize(torch.arange(sq, device=device), cu_q[1:].to(device), right=True)
    doc_k = torch.bucketize(torch.arange(sk, device=device), cu_k[1:].to(device), right=True)
    pos_q = torch.arange(sq, device=device) - cu_q.to(device)[doc_q]
    pos_k = torch.arange(sk, device=device) - cu_k.to(device)[doc_k]
    visible = (doc_q[:, None] == doc_k[None, :]) & (pos_k[None, :] <= pos_q[:, None])
    return (~visible)[None, None]


@functools.cache
def te_core_attention_class() -> type:
    """:class:`LatentTEDotProductAttention` (defined on first use: it subclasses a TE module)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class LatentTEDotProductAttention(TEDotProductAttention):
        """TE core attention that pads V to the QK head dim for ``thd`` batches and trims the
        output back (MLA's V is narrower than Q/K; upstream pads from 0.18 on)."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None, **kwargs):
            v_dim = value.shape[-1]
            pad = (packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
                   and query.shape[-1] != v_dim)
            if not pad:
                return super().forward(query, key, value, attention_mask,
                                       attn_mask_type=attn_mask_type, attention_bias=attention_bias,
                                       packed_seq_params=packed_seq_params, **kwargs)
            padded = query.shape[-1]
            value = torch.nn.functional.pad(value, [0, padded - v_dim])  # [t, np, hk]
            saved = getattr(self, "hidden_size_per_attention_head_v", None)
            if saved is not None:
                self.hidden_size_per_attention_head_v = padded
            try:
                out = super().forward(query, key, value, attention_mask,
                                      attn_mask_type=attn_mask_type, attention_bias=attention_bias,
                                      packed_seq_params=packed_seq_params, **kwargs)
            finally:
                if saved is not None:
                    self.hidden_size_per_attention_head_v = saved
            heads = query.shape[-2]
            out = out.reshape(*out.shape[:-1], heads, padded)[..., :v_dim]  # [t, np, hv]
            return out.reshape(*out.shape[:-2], heads * v_dim)

    return LatentTEDotProductAttention


@dataclasses.dataclass(frozen=True)
class TokenPositions:
    """The positions ``index`` ``[k, b]`` (long) of ``k`` tokens per sequence gathered from a
    sequence of ``length`` (MoD top-k, FlexiDepth hard skip), handed to MLA as its
    ``rotary_pos_emb``: MLA builds its rotary table inside the attention from the length of what it
    is given, which for gathered tokens would be positions ``0..k-1``."""

    index: torch.Tensor
    length: int


class _GatheredRotary:
    """Stands in for an MLA attention's rotary module for one forward: the table of the whole
    sequence, gathered at :class:`TokenPositions` (``[k, b, 1, d]``, which Megatron's unfused
    ``apply_rotary_pos_emb`` broadcasts over the heads); everything else is the module's."""

    def __init__(self, module, positions: TokenPositions):
        self._module, self._positions = module, positions

    def __getattr__(self, name):
        if name == "get_cached_cos_sin":  # the fused MLA RoPE path: refused at build time
            raise RuntimeError("MLA with gathered tokens needs the unfused RoPE (apply_rope_fusion=False)")
        return getattr(self._module, name)

    def __call__(self, _seq_len, *args, **kwargs):
        out = self._module(self._positions.length, *args, **kwargs)  # [L, 1, 1, d] (YaRN: , mscale)
        table, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        gathered = table[:, 0][self._positions.index]  # [k, b, 1, d]
        return gathered if rest is None else (gathered, *rest)


class LatentSelfAttention(MLASelfAttention):
    """Megatron's ``MLASelfAttention``, accepting constructor kwargs newer upstream layers pass
    (``pp_layer_offset``, ``name``, ...). ``layer_number`` arrives global (pipeline offset applied
    by ``TransformerLayer``), which is what MLA's core attention and checkpoint keys use.

    ``rotary_pos_emb=TokenPositions(...)`` (gathered tokens: MoD top-k, FlexiDepth hard skip)
    rotates each token at its own position; any other value goes to upstream unchanged (MLA builds
    its own table)."""

    def __init__(self, config, submodules, layer_number, attn_mask_type=AttnMaskType.causal,
                 cp_comm_type=None, pg_collection=None, **_newer_upstream_kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection)
        if self.pg_collection.tp.size() > 1 and isinstance(self.core_attention, LatentDotProductAttention):
            # the local down projection is TP-sharded: see _SumRopeKeyGrad
            self.core_attention.rope_key_grad_reduction = (
                self.config.qk_pos_emb_head_dim, self.pg_collection.tp)

    def forward(self, hidden_states, *args, rotary_pos_emb=None, **kwargs):
        if not isinstance(rotary_pos_emb, TokenPositions):
            return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)
        # an instance attribute shadows the registered submodule for this forward only
        object.__setattr__(self, "rotary_pos_emb", _GatheredRotary(self._modules["rotary_pos_emb"],
                                                                   rotary_pos_emb))
        try:
            return super().forward(hidden_states, *args, rotary_pos_emb=None, **kwargs)
        finally:
            del self.__dict__["rotary_pos_emb"]

    def _resolve_qk_norm_config(self, submodules):
        """megatron-core 0.19 asks this hook which Q/KV norms and projections to build; answer
        with the spec's own (0.16 - 0.18 never call it): :func:`compat.mla_norms_as_specified`."""
        return compat.mla_norms_as_specified(self.config, submodules)


def mla_self_attention_spec(config: TransformerConfig, backend: Any) -> ModuleSpec:
    """MLA self-attention for ``backend`` (a provider from :mod:`megacpp_mcore.spec.backends`).

    Latent norms (q/kv ``layernorm`` on the compressed vectors, DeepSeek-V2 style) follow
    ``config.qk_layernorm``; the provider places them (fused into the up projections on TE,
    :class:`LocalNorm` locally) and names the down-projection class upstream's allow-list expects.
    """
    check_support(config, backend)
    # Building an MLA layer is an explicit entry point too (pretrain_gpt.py --spec never calls
    # runtime.initialize); the patches must be in before the down projections are constructed.
    apply_patches()
    return ModuleSpec(
        module=LatentSelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=backend.column_parallel_linear(),
            core_attention=backend.mla_core_attention(),
            linear_proj=backend.row_parallel_linear(),
            **backend.mla_projections(latent_norm=config.qk_layernorm),
        ),
    )


def check_placement(ctx: LayerContext) -> None:
    """The feature table's guard for ``mla`` on an ``A`` layer: refuses MLA/standard mixes
    Megatron cannot build."""
    mla_config = is_mla_config(ctx.config)
    if ctx.has("mla") and not mla_config:
        raise MLAUnsupported(
            f"layer {ctx.index} ({ctx.symbol!r}) carries 'mla' but the model config is a "
            f"{type(ctx.config).__name__} without MLA dims; build it with an MLATransformerConfig "
            "(runtime.transformer_config does when ModelConfig.mla is set)"
        )
    if mla_config and not ctx.has("mla"):
        raise MLAUnsupported(
            f"layer {ctx.index} ({ctx.symbol!r}) has standard attention in an MLA model: "
            "megatron-core 0.16 GPTModel computes no RoPE for standard attention when "
            "config.multi_latent_attention is set; place 'mla' on every attention layer"
        )


MLA_DIM_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")


def _check_dims_agree(ctx: LayerContext) -> None:
    """An MLAConfig given to ``hybrid_block_spec(mla=...)`` must match the model config's dims
    (with ``pretrain_gpt.py --spec`` the dims come from Megatron's flags, not from the spec)."""
    feature = ctx.feature("mla")
    wrong = [
        f"{name}: spec {getattr(feature, name)!r} vs config {getattr(ctx.config, name)!r}"
        for name in MLA_DIM_FIELDS
        if hasattr(feature, name) and getattr(feature, name) != getattr(ctx.config, name)
    ]
    if wrong:
        raise MLAUnsupported(
            f"layer {ctx.index} ({ctx.symbol!r}): the MLA dims of the spec and of the model config "
            f"disagree ({'; '.join(wrong)}); pass the same dims to both"
        )


def transform(spec: ModuleSpec, ctx: LayerContext) -> ModuleSpec:
    """MLA's seam transform (``self_attention``): the standard self-attention ``spec`` of layer
    ``ctx`` becomes MLA self-attention for the layer's backend (its core attention is MLA's;
    the composer applies the ``core_attention`` seam to it afterwards)."""
    _check_dims_agree(ctx)
    return mla_self_attention_spec(ctx.config, ctx.backend)


def transformer_config_kwargs(mla) -> dict[str, Any]:
    """MLATransformerConfig fields for an :class:`~megacpp_mcore.models.presets.MLAConfig`."""
    return dict(
        multi_latent_attention=True,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_head_dim,
        qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim,
        v_head_dim=mla.v_head_dim,
        qk_layernorm=True,  # RMSNorm on the q/kv latents
        rope_type="rope",
        rotary_percent=1.0,
    )


def apply_patches() -> dict[str, list[str]]:
    """Applies the registry entries MLA needs where their status is ``needed`` (through
    ``registry.apply_needed``: its REQUIRES, scope and status rules); returns ``{patch: [changes]}``."""
    from megacpp_mcore.patches import registry

    return registry.apply_needed(PATCHES)
