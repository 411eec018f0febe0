"""Pieces both mixers share: parameter device, TP marks, the slot-interface guard, sharded keys."""

from __future__ import annotations

import torch
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint


def param_device(config) -> torch.device:
    """Where Megatron modules allocate parameters for ``config`` (CPU without CUDA)."""
    if torch.cuda.is_available() and not config.use_cpu_initialization:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mark_tensor_parallel(*params: torch.Tensor) -> None:
    """Flags per-rank parameters split along dim 0 (grad-norm and checkpoint code read these)."""
    for param in params:
        param.tensor_model_parallel = True
        param.partition_dim = 0
        param.partition_stride = 1


def check_slot_call(name: str, inference_context, packed_seq_params) -> None:
    """The mixers sit in TransformerLayer's self-attention slot; refuse what they cannot honour."""
    if packed_seq_params is not None:
        raise ValueError(
            f"{name}: packed sequences (packed_seq_params, 'thd') are not supported by this mixer; "
            "allowed: packed_seq_params=None"
        )
    if inference_context is not None:
        raise ValueError(
            f"{name}: inference_context (KV/state cache decoding) is not supported by this mixer; "
            "allowed: inference_context=None"
        )


def sharded_own_params(module, prefix, axis_map, sharded_offsets, metadata, tp_group):
    """ShardedTensors for ``module``'s direct parameters, split across TP along ``axis_map``."""
    state = {}
    module._save_to_state_dict(state, "", keep_vars=True)
    return make_sharded_tensors_for_checkpoint(
        state, prefix, axis_map, sharded_offsets,
        tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"],
    )
