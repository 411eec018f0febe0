"""The ONE shared MTP block, reused for every prediction depth.

``x_k = proj([enorm(embed(ids shifted by k)), hnorm(h_{k-1})])``, then ``h_k = E(A(x_k))`` where
``A`` and ``E`` are the same sub-layers a hybrid stack builds (through
:func:`megacpp_mcore.layers.attention.attention_layer_spec` / :func:`megacpp_mcore.layers.feedforward.feedforward_layer_spec`
with a :class:`LayerContext`, so the backend provider and the MLA seam apply here too). The
projection ``[2h -> h]`` is replicated over TP (a ``[h, 2h]`` weight flagged ``sequence_parallel``
so that Megatron all-reduces its partial gradients under SP, like a norm).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megacpp_mcore.spec import backends, compat
from megacpp_mcore.spec.context import LayerContext

# Features of the trunk that also shape the MTP block (MoD / MoDA are per-trunk-layer only).
BLOCK_FEATURES = ("mla",)

# The per-depth cross entropy in Megatron's MoE metrics tracker (what Megatron-LM's training_log
# reports, with the registry's layer-metrics-in-moe-report patch on 0.18+): depth k -> name. Not
# upstream's own "mtp_k loss" key, which its MTP helper owns.
TRACKER_NAMES = {f"loss_depth{k}": f"mtp_depth{k}_loss" for k in range(1, 9)}  # MTPConfig.depth <= 8


@dataclasses.dataclass(kw_only=True)
class SharedMTPBlockSubmodules:
    """Norms for the embedding and the hidden state, and the ``A`` + ``E`` sub-layer specs."""

    enorm: ModuleSpec | type
    hnorm: ModuleSpec | type
    attention: ModuleSpec
    feedforward: ModuleSpec


def shared_block_spec(config: TransformerConfig, *, backend: str = "auto",
                      features: Mapping[str, Any] | None = None) -> ModuleSpec:
    """The spec of the shared block for ``config`` on ``backend`` (``mla`` in ``features`` routes
    the attention through the MLA seam, as on the trunk's ``A`` layers)."""
    from megacpp_mcore.layers import attention, feedforward

    features = {k: v for k, v in (features or {}).items() if k in BLOCK_FEATURES and v is not None}
    provider = backends.get_backend(backend)

    def ctx(symbol: str) -> LayerContext:
        return LayerContext(
            config=config, backend=provider, index=config.num_layers, symbol=symbol,
            features=frozenset(features) if symbol == "A" else frozenset(), feature_configs=features,
        )

    return ModuleSpec(
        module=SharedMTPBlock,
        submodules=SharedMTPBlockSubmodules(
            enorm=provider.layer_norm(),
            hnorm=provider.layer_norm(),
            attention=attention.attention_layer_spec(ctx("A")),
            feedforward=feedforward.feedforward_layer_spec(ctx("E")),
        ),
    )


class SharedMTPBlock(MegatronModule):
    """One A+E block with its input mixing; :meth:`forward` runs ONE depth."""

    def __init__(self, config: TransformerConfig, submodules: SharedMTPBlockSubmodules,
                 pg_collection=None, vp_stage: int | None = None):
        super().__init__(config=config)
        h = config.hidden_size
        norm_kwargs = dict(config=config, hidden_size=h, eps=config.layernorm_epsilon)
        self.enorm = build_module(submodules.enorm, **norm_kwargs)
        self.hnorm = build_module(submodules.hnorm, **norm_kwargs)
        self.eh_proj = torch.nn.Parameter(torch.empty(h, 2 * h, dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.eh_proj)
        self.eh_proj.sequence_parallel = bool(config.sequence_parallel)
        # TransformerLayer adds the stage offset to layer_number; the block sits after the trunk and
        # takes the last trunk layer's global number (MoE aux-loss trackers are sized num_layers).
        pp_rank = pg_collection.pp.rank() if pg_collection is not None and pg_collection.pp is not None else None
        if pp_rank is None:
            from megatron.core import parallel_state

            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        local_number = config.num_layers - get_transformer_layer_offset(config, vp_stage, pp_rank)
        layer_kwargs = dict(config=config, layer_number=local_number, vp_stage=vp_stage)
        if pg_collection is not None:
            layer_kwargs["pg_collection"] = pg_collection
        self.attention = build_module(submodules.attention, **layer_kwargs)
        self.feedforward = compat.build_layer(submodules.feedforward, **layer_kwargs)
        self._reset_stats()
        self._loop_driven = False  # set by megacpp_set_step: our loop reads megacpp_stats instead

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor, *, attention_mask=None,
                rotary_pos_emb=None, packed_seq_params=None) -> torch.Tensor:
        """hidden, embedded ``[s, b, h]`` (``s/tp`` under SP) -> next depth's hidden ``[s, b, h]``."""
        mixed = torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1)  # [s, b, 2h]
        x = F.linear(mixed, self.eh_proj)  # [s, b, h]
        x, _ = self.attention(x, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                              packed_seq_params=packed_seq_params)
        x, _ = self.feedforward(x, attention_mask=attention_mask)
        return x

    # ----------------------------------------------------------------- cross-feature hooks
    def _reset_stats(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def record(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Accumulates one micro-batch's detached MTP losses (``loss``, ``loss_depth<k>``). While a
        Megatron-LM training loop drives the model (and not ours), each depth's cross entropy also
        goes to Megatron's MoE metrics tracker, so its log line shows ``mtp_depth<k>_loss`` (the
        mean over the iteration's micro-batches: recorded times ``tracker_layer_count``, the
        divisor training_log applies to the sum over layers). Device ops only, no host sync."""
        for name, value in losses.items():
            self._sums[name] = self._sums.get(name, 0) + value.detach().float()
        self._count += 1
        if self.training and not self._loop_driven and compat.training_iteration() is not None:
            count, size = compat.tracker_layer_count(self.config), compat.tracker_size(self.config)
            for name, value in losses.items():
                if name in TRACKER_NAMES:
                    compat.record_layer_metric(TRACKER_NAMES[name], value.detach().float() * count,
                                               layer_number=1, num_layers=size)

    def megacpp_set_step(self, step: int) -> None:
        self._loop_driven = True
        self._reset_stats()

    def megacpp_stats(self) -> dict[str, float]:
        """Mean over this step's micro-batches: scaled total MTP loss and the per-depth CE."""
        if not self._count:
            return {}
        return {name: float(value) / self._count for name, value in self._sums.items()}
