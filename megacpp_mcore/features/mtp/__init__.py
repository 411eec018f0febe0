"""Shared-block multi-token prediction (MTP) for Megatron-Core GPT models.

* :class:`MTPConfig`, :func:`step_weights`, :func:`roll_and_mask`, :func:`cast_keeping_shard_markers`
  (no model needed; :mod:`megacpp_mcore.features.mtp.core`);
* :class:`MTPGPTModel`: ``GPTModel`` + ONE shared A+E block reused for K depths on the last pipeline
  stage (:mod:`.block`, :mod:`.model`); :class:`FusedLossGPTModel`, its base: the LM loss through
  the fused cross-entropy, no logits built;
* :mod:`.fused_ce`: chunked vocab-parallel fused linear cross-entropy (torch / Triton).

Model classes import megatron-core and are loaded lazily.
"""

from megacpp_mcore.features.mtp.core import MTPConfig, cast_keeping_shard_markers, roll_and_mask, step_weights


def __getattr__(name):
    if name in ("MTPGPTModel", "FusedLossGPTModel"):
        from megacpp_mcore.features.mtp import model

        return getattr(model, name)
    if name in ("SharedMTPBlock", "shared_block_spec"):
        from megacpp_mcore.features.mtp import block

        return getattr(block, name)
    raise AttributeError(f"module 'megacpp_mcore.features.mtp' has no attribute {name!r}")


__all__ = [
    "FusedLossGPTModel",
    "MTPConfig",
    "MTPGPTModel",
    "cast_keeping_shard_markers",
    "roll_and_mask",
    "step_weights",
]
