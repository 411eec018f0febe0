"""``E``: the feed-forward-only residual sub-layer: Megatron's MoE, or a dense gated MLP.

Whether ``E`` is MoE is read from the config it is built with (``num_moe_experts``), so one layer
spec serves both; MoE uses routed experts, an optional shared expert
(``moe_shared_expert_intermediate_size``) and, on TE with ``moe_grouped_gemm``, grouped GEMM.
The MoE layer and TE's grouped experts are :mod:`megacpp_mcore.layers.moe`'s: Megatron's, or
(opt-in) without the host waiting for the per-expert counts where every expert is on the rank.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megacpp_mcore.layers import moe as device_counts
from megacpp_mcore.spec import compat
from megacpp_mcore.spec.context import LayerContext


def feedforward_layer_spec(ctx: LayerContext) -> ModuleSpec:
    """The ``E`` sub-layer: norm -> MoE or MLP -> bias-dropout-add (attention slots identity)."""
    config, backend = ctx.config, ctx.backend
    moe = config.num_moe_experts is not None
    mlp = get_mlp_module_spec_for_backend(
        backend=backend,
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=backend.moe_grouped_gemm(config.moe_grouped_gemm),
    )
    if moe:
        mlp = compat.with_moe_modules(mlp, device_counts.DeviceCountsMoELayer,
                                      {device_counts.TEGroupedMLP: device_counts.DeviceCountsTEGroupedMLP})
    # Dense MLP on TE fuses the norm into fc1; MoE (and every local MLP) needs an explicit norm.
    fused_norm = not moe and backend.fuse_layernorm_and_linear()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=IdentityOp if fused_norm else backend.layer_norm(),
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )
