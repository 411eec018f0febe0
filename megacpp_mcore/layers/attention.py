"""``A``: the attention-only residual sub-layer (norm -> self-attention -> bias-dropout-add).

This builder knows standard attention only. Features reach the attention through the composer's
seams (:func:`megacpp_mcore.spec.compose.at_seam`): ``self_attention`` (MLA replaces the standard
spec) and then ``core_attention`` of whatever self-attention that produced (MoDA wraps it).
"""

from __future__ import annotations

import dataclasses

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megacpp_mcore.spec.compose import at_seam
from megacpp_mcore.spec.context import LayerContext


def standard_self_attention_spec(ctx: LayerContext) -> ModuleSpec:
    """Standard causal self-attention from the backend; on TE the input norm is fused into the QKV
    projection. No feature is applied here."""
    backend = ctx.backend
    qk_norm = backend.layer_norm(for_qk=True) if ctx.config.qk_layernorm else IdentityOp
    fused = backend.fuse_layernorm_and_linear()
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=(
                backend.column_parallel_layer_norm_linear()
                if fused
                else backend.column_parallel_linear()
            ),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def self_attention_spec(ctx: LayerContext) -> ModuleSpec:
    """This layer's self-attention: the standard spec through the ``self_attention`` seam, then its
    core attention through the ``core_attention`` seam."""
    spec = at_seam("self_attention", standard_self_attention_spec(ctx), ctx)
    core = at_seam("core_attention", spec.submodules.core_attention, ctx)
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, core_attention=core))


def _fuses_input_norm(self_attention: ModuleSpec, backend) -> bool:
    """Whether the attention's first projection is the backend's fused norm+linear (standard
    attention on TE); MLA's down projections take an explicitly normed input."""
    fused = backend.column_parallel_layer_norm_linear() if backend.fuse_layernorm_and_linear() else None
    return fused is not None and getattr(self_attention.submodules, "linear_qkv", None) is fused


def attention_layer_spec(ctx: LayerContext) -> ModuleSpec:
    """The ``A`` sub-layer: attention only (the MLP slots stay identity)."""
    self_attention = self_attention_spec(ctx)
    fused = _fuses_input_norm(self_attention, ctx.backend)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else ctx.backend.layer_norm(),
            self_attention=self_attention,
            self_attn_bda=get_bias_dropout_add,
        ),
    )
