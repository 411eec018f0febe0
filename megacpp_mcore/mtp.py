"""Stable public name: shared-block MTP lives in :mod:`megacpp_mcore.features.mtp`."""

from megacpp_mcore.features.mtp import (
    MTPConfig,
    cast_keeping_shard_markers,
    roll_and_mask,
    step_weights,
)


def __getattr__(name):
    if name == "MTPGPTModel":
        from megacpp_mcore.features.mtp.model import MTPGPTModel

        return MTPGPTModel
    raise AttributeError(f"module 'megacpp_mcore.mtp' has no attribute {name!r}")


__all__ = ["MTPConfig", "MTPGPTModel", "cast_keeping_shard_markers", "roll_and_mask", "step_weights"]
