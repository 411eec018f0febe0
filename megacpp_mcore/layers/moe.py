"""``E``'s MoE without the host waiting for the device, where every expert is on the rank.

Megatron's alltoall dispatcher copies the per-expert token counts to the host once per MoE forward
and waits for the copy (its ``cuda_sync_point``): TE's ``GroupedLinear`` splits its input on the
host, and the all-to-all needs its split sizes there. Each wait empties the device's queue, so the
launches that follow it (the grouped GEMMs, the activation, the un-permutation) run exposed: on the
stage benchmark's shared structure (one H100, micro-batch 4) about 60 ms of a 745 ms step is idle
device time inside MoE forwards (``docs/benchmarks.md``, eighteenth session). Without those waits
the same step runs x1.063 faster (nineteenth session), so this path is the default
(:data:`DEVICE_COUNTS`; the launcher's ``--megacpp-moe-device-counts off`` turns it off).

Where the layer's expert-parallel and expert-tensor-parallel groups are one rank each (every token's
experts are local: the one-GPU stage, or TP/DP layouts with ``--expert-tensor-parallel-size 1`` and
no expert parallelism), nothing needs the counts on the host:

* :class:`DeviceCountsDispatcher` keeps them on the device (no copy, no wait) and skips the
  second permutation in both directions, which on one rank is the identity (the tokens leave the
  first permutation in expert order) but costs a copy of the ``[tokens x top-k, hidden]`` tokens.
* :class:`DeviceCountsTEGroupedMLP` (TE) runs each projection as one ``torch._grouped_mm`` over the
  experts' row ranges with device offsets, reading TE's own ``weight0..weight{E-1}`` (parameters,
  initialisation and checkpoints are ``TEGroupedMLP``'s). ``SequentialMLP`` (``local``) reads the
  counts itself (one copy per forward, where the CPU has nothing to wait for).
* :class:`DeviceCountsMoELayer` is ``MoELayer`` with that dispatcher.

Anything else keeps Megatron's path unchanged: expert parallelism or expert TP > 1, token dropping
or capacity padding, router padding for FP8, shared-expert overlap, CUDA graphs of MoE parts; and in
the experts FP8/FP4, biases, activation recompute or offloading, activations other than SwiGLU.
Megatron's unfused permutation (``moe_permute_fusion`` off) still syncs inside ``masked_select``;
the fused one (TE) does not.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP  # defined without TE too
from megatron.core.transformer.moe import moe_layer as _moe_layer
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megacpp_mcore.spec import compat

# On (the default): MoE layers built afterwards take the device-counts dispatcher where it applies.
# The stage A/B measured it x1.063 over Megatron's dispatcher, and ours x1.058 over upstream with it
# (H100, nineteenth session, docs/benchmarks.md); the launcher's ``--megacpp-moe-device-counts off``
# turns it off.
DEVICE_COUNTS = True

# Megatron CUDA-graph scopes that capture part of an MoE layer's forward (its dispatcher state is
# then replayed from the graph's outputs, which expects Megatron's own path).
_MOE_GRAPH_SCOPES = frozenset({"moe", "moe_router", "moe_preprocess"})


def grouped_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], ends: torch.Tensor) -> torch.Tensor:
    """``x`` ``[n, in]`` (rows grouped by expert; expert ``e``'s rows end at ``ends[e]``, int32 on
    ``x``'s device) through each expert's ``weights[e]`` ``[out, in]``: ``[n, out]``, one grouped GEMM
    with device offsets. The weights are stacked for the GEMM and the stack is not kept for
    backward (:class:`_GroupedLinear` stacks them again there): ``E x out x in`` less memory per
    call than autograd through ``torch.stack``."""
    return _GroupedLinear.apply(x, ends, *weights)


def _stacked(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[E, in, out]``: on CUDA a column-major view (the layout of the ``x @ w.T`` the per-expert
    linears compute); contiguous on the CPU, whose kernel takes the row-major one."""
    stacked = torch.stack(tuple(weights)).transpose(1, 2)
    return stacked if stacked.is_cuda else stacked.contiguous()


class _GroupedLinear(torch.autograd.Function):
    """``torch._grouped_mm(x, stack(weights).T, offs=ends)`` saving ``x`` and the weights
    themselves (no copy) instead of their stack; backward: ``dx = dy @ w_e`` as one grouped GEMM
    over the restacked weights, ``dW_e = dy_e^T x_e`` as one grouped GEMM over the row ranges."""

    @staticmethod
    def forward(ctx, x, ends, *weights):
        ctx.save_for_backward(x, ends, *weights)
        return torch._grouped_mm(x, _stacked(weights), offs=ends)

    @staticmethod
    def backward(ctx, dy):
        x, ends, *weights = ctx.saved_tensors
        dy = dy.contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch._grouped_mm(dy, torch.stack(tuple(weights)), offs=ends)  # [E, out, in], row-major
        dws = [None] * len(weights)
        if any(ctx.needs_input_grad[2:]):
            # [E, out, in]; the groups run along the reduced dimension n, so dy^T is passed as the
            # column-major view of dy (its row stride, not n, must be a multiple of 16 bytes)
            dw = torch._grouped_mm(dy.transpose(0, 1), x, offs=ends)
            dws = [g if need else None for g, need in zip(dw.unbind(0), ctx.needs_input_grad[2:])]
        return dx, None, *dws


class DeviceCountsDispatcher(MoEAlltoAllTokenDispatcher):
    """Megatron's alltoall dispatcher; on one expert-parallel and expert-TP rank, dropless, it
    hands the experts the per-expert counts on the device and skips the identity sort by local
    expert (:attr:`counts_on_device`). The experts must take device counts (:class:`DeviceCountsMoELayer`
    turns :attr:`experts_take_device_counts` off where they do not)."""

    experts_take_device_counts = True

    @property
    def counts_on_device(self) -> bool:
        config = self.config
        graphs = compat.cuda_graph_modules(config)
        return bool(
            self.experts_take_device_counts
            and self.ep_size == 1
            and self.tp_size == 1
            and not self.drop_and_pad
            and config.moe_expert_capacity_factor is None
            and not getattr(config, "moe_router_padding_for_quantization", False)
            and self.shared_experts is None  # shared-expert overlap runs inside the dispatch steps
            # no CUDA graphs, or graphs of named scopes none of which is an MoE part (``()``:
            # whole layers)
            and (graphs is None or (bool(graphs) and not set(graphs) & _MOE_GRAPH_SCOPES))
        )

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        if self.counts_on_device:
            return tokens_per_expert
        return super()._maybe_dtoh_and_synchronize(point, tokens_per_expert)

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        if not self.counts_on_device:
            return super().dispatch_postprocess(global_input_tokens, global_probs)
        counts, self.tokens_per_expert = self.tokens_per_expert, None
        return global_input_tokens, counts, global_probs

    def combine_preprocess(self, hidden_states):
        if not self.counts_on_device:
            return super().combine_preprocess(hidden_states)
        return hidden_states


def _grouped_experts_take_device_counts(experts) -> bool:
    return isinstance(experts, SequentialMLP) or (
        isinstance(experts, DeviceCountsTEGroupedMLP) and experts.takes_device_counts
    )


class DeviceCountsMoELayer(MoELayer):
    """``MoELayer`` whose alltoall dispatcher is :class:`DeviceCountsDispatcher`; the same
    parameters, routing and outputs. Other dispatcher types are Megatron's."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, **kwargs):
        super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection,
                         **kwargs)
        if not DEVICE_COUNTS or type(self.token_dispatcher) is not MoEAlltoAllTokenDispatcher:
            return
        if pg_collection is None:  # what MoELayer resolved it to
            pg_collection = _moe_layer.get_default_pg_collection()
        dispatcher = DeviceCountsDispatcher(
            self.num_local_experts, self.local_expert_indices, config=self.config,
            pg_collection=pg_collection)
        dispatcher.experts_take_device_counts = _grouped_experts_take_device_counts(self.experts)
        upstream = self.token_dispatcher
        if upstream.shared_experts is not None:
            dispatcher.set_shared_experts(upstream.shared_experts)
        self.token_dispatcher = dispatcher
        if getattr(self, "_training_token_dispatcher", None) is upstream:  # 0.19's inference setup
            self._training_token_dispatcher = dispatcher


class DeviceCountsTEGroupedMLP(TEGroupedMLP):
    """``TEGroupedMLP`` that, given the per-expert counts on the device, computes fc1 ->
    probability-weighted SwiGLU -> fc2 as two ``torch._grouped_mm`` calls over the same weights
    (:attr:`takes_device_counts`); counts on the host, or a configuration this path does not
    cover, take ``TEGroupedMLP.forward``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.config
        self.takes_device_counts = bool(
            not (config.fp8 or getattr(config, "fp4", None))
            and not config.add_bias_linear
            and config.gated_linear_unit
            and config.activation_func is F.silu
            and not getattr(config, "use_te_activation_func", False)
            and getattr(config, "activation_func_clamp_value", None) is None
            and not getattr(config, "glu_linear_offset", 0.0)
            and not config.moe_apply_probs_on_input
            and not self.activation_recompute
            and not getattr(self, "offload_expert_fc1", False)
            and not getattr(self, "offload_moe_act", False)
        )

    def _weights(self, linear) -> list[torch.Tensor]:
        return [getattr(linear, f"weight{i}") for i in range(self.num_local_experts)]

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs, *args,
                **kwargs):
        extra = any(a is not None for a in args) or any(v is not None for v in kwargs.values())
        if (not self.takes_device_counts or extra or not torch.is_tensor(tokens_per_expert)
                or tokens_per_expert.device != permuted_local_hidden_states.device):
            return super().forward(permuted_local_hidden_states, tokens_per_expert,
                                   permuted_probs, *args, **kwargs)
        ends = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        fc1 = grouped_linear(permuted_local_hidden_states, self._weights(self.linear_fc1), ends)
        act = weighted_swiglu(fc1, permuted_probs.unsqueeze(-1), self.config)
        return grouped_linear(act, self._weights(self.linear_fc2), ends), None


def weighted_swiglu(x: torch.Tensor, probs: torch.Tensor, config) -> torch.Tensor:
    """``silu(gate) * up * probs`` in ``x``'s dtype, as ``TEGroupedMLP`` computes it: Megatron's
    fused weighted SwiGLU where ``bias_activation_fusion`` is on, else the same in plain torch."""
    if config.bias_activation_fusion:
        from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

        return weighted_bias_swiglu_impl(x, None, probs, config.activation_func_fp8_input_store)
    gate, up = torch.chunk(x, 2, dim=-1)
    return (F.silu(gate) * up * probs).to(x.dtype)
