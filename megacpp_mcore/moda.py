"""Stable public name: MoDA lives in :mod:`megacpp_mcore.features.moda`."""

from megacpp_mcore.features.moda import MoDAConfig, depth_kv_bytes

__all__ = ["MoDAConfig", "depth_kv_bytes"]
