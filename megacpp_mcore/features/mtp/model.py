"""``FusedLossGPTModel``: Megatron's ``GPTModel`` whose LM loss never builds the logits; and
``MTPGPTModel``: that model plus shared-block MTP on the last pipeline stage.

The fused LM loss (``fused_lm_loss=True``; ``train``'s and the launcher's default, off in this class
and in ``runtime.gpt_model`` unless asked for): with labels, ``GPTModel`` builds the ``[s, b, V]``
bf16 logits, and its cross-entropy an fp32 copy of them, kept as the softmax for backward (14.9 GiB
above the inputs at 16,384 tokens x 131,072 on an H100; ours 2.0, docs/benchmarks.md). Ours goes through :func:`~megacpp_mcore.features.mtp.fused_ce.vocab_parallel_linear_cross_entropy`
with the batch's ``loss_mask``: one ``[chunk, V]`` block alive at a time, and the gradients computed
in forward for Megatron's ``loss_func`` (``sum(loss * loss_mask)``): the three GEMMs of the
unfused head and no fp32 pass over the logits. Without labels (generation) and wherever upstream's
head does something ours does not (upstream MTP, inference contexts, fp16 cross-entropy, deferred
embedding wgrad, the config logger, 0.18's ``output_processor`` hook) the model is ``GPTModel``.

The trunk, the embedding, the output layer and their cross-stage tying are upstream's. MTP reads ONE
weight that every last stage has, the output head (``_head_weight``), both to embed the rolled-in
tokens (a vocab-parallel lookup) and as its output projection:

* tied (``share_embeddings_and_output_weights=True``): that weight IS the word embedding. With PP > 1
  ``GPTModel`` keeps it on the last stage as a copy initialised from the first stage over the
  embedding group, and ``finalize_model_grads`` all-reduces its gradient there every step, so MTP's
  gradient reaches the first stage's embedding and both copies stay identical.
* untied: the output layer's weight, on every PP layout. Upstream would add a second embedding copy
  on the last stage, synchronised only when ``config.mtp_num_layers`` is set (which also switches on
  upstream's own MTP); reading the head weight needs no copy and no cross-stage traffic, and PP=1 and
  PP>1 compute the same function.

The forward with labels returns the per-token LM loss ``[b, s]`` exactly as ``GPTModel`` does; the
scaled MTP loss joins it in backward through :class:`AttachLoss`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.utils.checkpoint
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import build_module

from megacpp_mcore.features.mtp.block import shared_block_spec
from megacpp_mcore.features.mtp.core import MTPConfig, cast_keeping_shard_markers, roll_and_mask, step_weights
from megacpp_mcore.features.mtp.fused_ce import IMPLS, vocab_parallel_linear_cross_entropy


class AttachLoss(torch.autograd.Function):
    """Returns ``lm_loss`` unchanged; in backward, ``extra`` (a scalar) receives the SUM of the
    incoming per-token gradient.

    That sum is the factor the schedule applied to the LM loss: with ``loss_func`` returning
    (sum(loss * mask), num_tokens), Megatron's schedule backpropagates ``grad_scale / num_tokens /
    num_microbatches`` per masked token, which sums to ``grad_scale / num_microbatches``. The extra
    loss is therefore weighted exactly like a per-micro-batch mean loss, under any schedule, without
    the module-level scales upstream's ``MTPLossAutoScaler`` needs (those are only set when
    ``config.mtp_num_layers`` is, which would also switch on upstream's own MTP).
    """

    @staticmethod
    def forward(ctx, lm_loss: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return lm_loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.sum().to(torch.float32)


def _vocab_parallel_lookup(ids: torch.Tensor, weight: torch.Tensor, *, tp_group,
                           sequence_parallel: bool) -> torch.Tensor:
    """Embeds ``ids`` ``[b, s]`` with a vocab-sharded table ``[V / tp, h]`` -> ``[s(/tp), b, h]``."""
    from megatron.core.tensor_parallel.mappings import (
        reduce_from_tensor_model_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    tp = tp_group.size() if tp_group is not None else 1
    shard = weight.shape[0]
    start = (tp_group.rank() if tp_group is not None else 0) * shard
    outside = (ids < start) | (ids >= start + shard)
    local = torch.where(outside, torch.zeros_like(ids), ids - start)
    emb = torch.nn.functional.embedding(local, weight)  # [b, s, h]
    emb = emb.masked_fill(outside[..., None], 0.0).transpose(0, 1).contiguous()  # [s, b, h]
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel_region(emb, group=tp_group)
    return reduce_from_tensor_model_parallel_region(emb, group=tp_group) if tp > 1 else emb


class FusedLossGPTModel(GPTModel):
    """``GPTModel`` with the fused LM loss (module docstring); ``fused_lm_loss=False`` is
    ``GPTModel`` itself. ``fused_ce_impl``: the cross-entropy epilogue (``auto``, ``torch``,
    ``triton``; :data:`~megacpp_mcore.features.mtp.fused_ce.IMPLS`)."""

    def __init__(self, *args, fused_lm_loss: bool = False, fused_ce_impl: str = "auto", **kwargs):
        if fused_ce_impl not in IMPLS:
            raise ValueError(f"fused_ce_impl {fused_ce_impl!r}; allowed: {', '.join(IMPLS)}")
        super().__init__(*args, **kwargs)
        self.fused_lm_loss = bool(fused_lm_loss)
        self.fused_ce_impl = fused_ce_impl

    def _fused_loss_applies(self, labels, mtp_in_postprocess, kwargs) -> bool:
        from megatron.core.config_logger import has_config_logger_enabled

        config = self.config
        return (self.fused_lm_loss and self.post_process and labels is not None
                and not mtp_in_postprocess and not config.mtp_num_layers
                and kwargs.get("inference_context") is None and kwargs.get("inference_params") is None
                and kwargs.get("output_processor") is None  # 0.18+: the caller's own head
                and not self.fp16_lm_cross_entropy
                and not getattr(config, "defer_embedding_wgrad_compute", False)
                and not has_config_logger_enabled(config))

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb,
                     rotary_pos_cos, rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None,
                     **kwargs):
        if not self._fused_loss_applies(labels, mtp_in_postprocess, kwargs):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels,
                                        rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                                        mtp_in_postprocess=mtp_in_postprocess, loss_mask=loss_mask,
                                        **kwargs)
        weight = self._head_weight()
        if weight.dtype != hidden_states.dtype:
            weight = cast_keeping_shard_markers(weight, hidden_states.dtype)
        mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask
        return vocab_parallel_linear_cross_entropy(
            hidden_states, weight, labels, loss_mask=mask, tp_group=self.pg_collection.tp,
            sequence_parallel=self.config.sequence_parallel, impl=self.fused_ce_impl)

    def _head_weight(self) -> torch.Tensor:
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


class MTPGPTModel(FusedLossGPTModel):
    """``GPTModel`` with shared-block multi-token prediction (``mtp=None``: :class:`FusedLossGPTModel`).

    Takes :class:`FusedLossGPTModel`'s constructor kwargs plus ``mtp`` (:class:`MTPConfig`), and optionally
    ``mtp_backend`` / ``mtp_features``; by default both come from the trunk spec when it is a
    :func:`~megacpp_mcore.spec.block.hybrid_block_spec` (so an MLA trunk gets an MLA block).
    """

    def __init__(self, *args, mtp: MTPConfig | None = None, mtp_backend: str | None = None,
                 mtp_features: Mapping[str, Any] | None = None, **kwargs):
        if mtp is not None and not isinstance(mtp, MTPConfig):
            raise ValueError(f"mtp must be an MTPConfig or None, got {type(mtp).__name__}")
        if mtp is not None and kwargs.get("mtp_block_spec") is not None:
            raise ValueError("pass either mtp= (shared-block MTP) or mtp_block_spec= (upstream MTP), not both")
        super().__init__(*args, **kwargs)
        self.mtp_config = mtp
        self.mtp_block = None
        if mtp is None or not self.post_process:
            return  # MTP lives on the last pipeline stage only
        if self.config.mtp_num_layers:
            raise ValueError(
                f"config.mtp_num_layers={self.config.mtp_num_layers} switches on upstream MTP; leave it "
                "unset when using MTPGPTModel(mtp=MTPConfig(...))"
            )
        trunk = getattr(self.transformer_layer_spec, "submodules", None)
        backend = mtp_backend or getattr(trunk, "backend", "auto")
        features = mtp_features if mtp_features is not None else getattr(trunk, "features", {})
        spec = shared_block_spec(self.config, backend=backend, features=features)
        self.mtp_block = build_module(spec, config=self.config, pg_collection=self.pg_collection,
                                      vp_stage=self.vp_stage)
        self.register_buffer("mtp_step_weights", step_weights(mtp.depth, mtp.decay), persistent=False)

    # ------------------------------------------------------------------------------ forward
    def _postprocess(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb,
                     rotary_pos_cos, rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None,
                     **kwargs):
        output = super()._postprocess(hidden_states, input_ids, position_ids, labels,
                                      rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                                      mtp_in_postprocess=mtp_in_postprocess, loss_mask=loss_mask,
                                      **kwargs)
        if self.mtp_block is None or labels is None:
            return output
        total = self.mtp_loss(hidden_states, input_ids, labels, loss_mask,
                              attention_mask=kwargs.get("attention_mask"),
                              rotary_pos_emb=rotary_pos_emb,
                              packed_seq_params=kwargs.get("packed_seq_params"))
        return AttachLoss.apply(output, total)

    def _embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Rolled-in token embeddings ``[s(/tp), b, h]`` from the (vocab-sharded) head weight."""
        return _vocab_parallel_lookup(ids, weight, tp_group=self.pg_collection.tp,
                                      sequence_parallel=self.config.sequence_parallel)

    def _run_block(self, hidden, embedded, *, attention_mask, rotary_pos_emb):
        """One depth of the shared block, recomputed in backward when ``MTPConfig.recompute``."""

        def block(h, e):
            return self.mtp_block(h, e, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)

        if not self.mtp_config.recompute or not torch.is_grad_enabled():
            return block(hidden, embedded)
        # both reentrant: the first forward runs without grad, so the MoE router adds (and logs) its
        # load-balancing loss once, in the recompute (a non-reentrant one would log it twice)
        if hidden.is_cuda:  # Megatron's checkpoint also restores its TP RNG tracker (dropout)
            from megatron.core import tensor_parallel

            return tensor_parallel.checkpoint(block, False, hidden, embedded)
        return torch.utils.checkpoint.checkpoint(block, hidden, embedded, use_reentrant=True)

    def mtp_loss(self, hidden_states, input_ids, labels, loss_mask=None, *,
                 attention_mask=None, rotary_pos_emb=None, packed_seq_params=None) -> torch.Tensor:
        """Scaled, step-weighted MTP loss (0-dim fp32) from the trunk output ``[s(/tp), b, h]``.

        Depth ``k`` shifts ids, labels and the loss mask left by ``k`` inside the fixed ``[b, s]``
        shape (tail: id 0, ignore index, mask 0), so position ``t`` predicts token ``t + 1 + k``.
        """
        cfg = self.mtp_config
        if packed_seq_params is not None:
            raise ValueError("shared-block MTP does not support packed (thd) sequences yet")
        weight = self._head_weight()
        if weight.dtype != hidden_states.dtype:
            weight = cast_keeping_shard_markers(weight, hidden_states.dtype)
        mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()
        final_norm = getattr(self.decoder, "final_layernorm", None)
        hidden = hidden_states
        total = hidden_states.new_zeros((), dtype=torch.float32)
        stats = {}
        for k in range(1, cfg.depth + 1):
            ids_k = roll_and_mask(input_ids, k, 0)
            mask_k = roll_and_mask(mask, k, 0.0)
            labels_k = roll_and_mask(labels, k, cfg.ignore_index)
            labels_k = torch.where(mask_k > 0, labels_k, torch.full_like(labels_k, cfg.ignore_index))
            hidden = self._run_block(hidden, self._embed(ids_k, weight),
                                     attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
            normed = final_norm(hidden) if final_norm is not None else hidden
            depth_loss = vocab_parallel_linear_cross_entropy(  # masked mean over [b, s]
                normed, weight, labels_k, token_weights=mask_k / mask_k.sum().clamp(min=1.0),
                tp_group=self.pg_collection.tp, sequence_parallel=self.config.sequence_parallel,
                ignore_index=cfg.ignore_index, chunk=cfg.chunk_tokens, impl=cfg.fused_ce_impl,
            )
            stats[f"loss_depth{k}"] = depth_loss
            total = total + self.mtp_step_weights[k - 1] * depth_loss
        total = cfg.loss_scale * total
        stats["loss"] = total
        self.mtp_block.record(stats)
        return total
