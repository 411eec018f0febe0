"""``A``: the attention-only residual sub-layer (norm -> self-attention -> bias-dropout-add)."""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megacpp_mcore.spec.context import LayerContext


def self_attention_spec(ctx: LayerContext) -> ModuleSpec:
    """Standard causal self-attention; on TE the input norm is fused into the QKV projection."""
    backend = ctx.backend
    qk_norm = backend.layer_norm(for_qk=True) if ctx.config.qk_layernorm else IdentityOp
    fused = backend.fuse_layernorm_and_linear()
    core_attention = backend.core_attention()
    if ctx.has("moda"):
        from megacpp_mcore.features.moda import attention as moda

        core_attention = moda.core_attention(ctx)
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=(
                backend.column_parallel_layer_norm_linear()
                if fused
                else backend.column_parallel_linear()
            ),
            core_attention=core_attention,
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def attention_layer_spec(ctx: LayerContext) -> ModuleSpec:
    """The ``A`` sub-layer: attention only (the MLP slots stay identity). Attention (standard or
    MLA) and its input norm come from the MLA seam, :mod:`megacpp_mcore.layers.mla`."""
    from megacpp_mcore.layers import mla

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=mla.input_norm_spec(ctx),
            self_attention=mla.attention_spec(ctx),
            self_attn_bda=get_bias_dropout_add,
        ),
    )
