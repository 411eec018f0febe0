"""Torch-native norm for the local backend that also works under sequence parallelism.

Megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel``. With SP each TP rank normalizes its own
sequence shard with a replicated weight, so the weight's gradient is partial per rank; Megatron's
``finalize_model_grads`` all-reduces the gradients of parameters flagged ``sequence_parallel`` over the
tensor-parallel group. This norm sets that flag, which is all SP needs from a norm. Parameter names
(``weight``, ``bias``) match upstream norms, so state dicts line up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class LocalNorm(torch.nn.Module):
    """LayerNorm or RMSNorm (from ``config.normalization``) over the last dim of ``[s, b, h]``."""

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        **_upstream_kwargs,  # persist_layer_norm, zero_centered_gamma, normalization
    ):
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(
                f"LocalNorm: normalization={config.normalization!r} is not supported; "
                "allowed: 'LayerNorm', 'RMSNorm'"
            )
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        for param in self.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [s, b, h] -> [s, b, h]
        if self.rms:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
