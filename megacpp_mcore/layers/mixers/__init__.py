"""``M`` (Mamba-2) and ``R`` (M2RNN) sequence mixers as residual sub-layers of the pattern.

Each symbol is a ``TransformerLayer`` whose self-attention slot holds the mixer (norm -> mixer ->
bias-dropout-add; MLP slots identity), so the stack keeps upstream layer plumbing (SP, recompute,
checkpoint keys). On TE the input norm is fused into the mixer's input projection.

Megatron is imported inside the builders so that :mod:`megacpp_mcore.layers.mixers.dims` stays importable
without it (the planner and the runtime config read the dimensions from there).
"""

from __future__ import annotations


def _mixer_layer_spec(ctx, mixer):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    fused = ctx.backend.fuse_layernorm_and_linear()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else ctx.backend.layer_norm(),
            self_attention=mixer,
            self_attn_bda=get_bias_dropout_add,
        ),
    )


def mamba_layer_spec(ctx):
    """The ``M`` sub-layer: MambaMixer (te, mamba_ssm kernels) or the torch SSD mixer (local)."""
    from megacpp_mcore.layers.mixers.mamba import mixer_spec

    return _mixer_layer_spec(ctx, mixer_spec(ctx.config, ctx.backend))


def m2rnn_layer_spec(ctx):
    """The ``R`` sub-layer: the M2RNN mixer (Triton scan on CUDA when available, torch otherwise)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megacpp_mcore.layers.mixers.dims import m2rnn_dims
    from megacpp_mcore.layers.mixers.m2rnn import M2RNNMixer, M2RNNSubmodules

    config, backend = ctx.config, ctx.backend
    dims = m2rnn_dims(config.hidden_size, config.num_attention_heads)
    dims.check_tp(config.tensor_model_parallel_size)
    fused = backend.fuse_layernorm_and_linear()
    in_proj = backend.column_parallel_layer_norm_linear() if fused else backend.column_parallel_linear()
    mixer = ModuleSpec(module=M2RNNMixer, params={"dims": dims},
                       submodules=M2RNNSubmodules(in_proj=in_proj, out_proj=backend.row_parallel_linear()))
    return _mixer_layer_spec(ctx, mixer)


__all__ = ["mamba_layer_spec", "m2rnn_layer_spec"]
