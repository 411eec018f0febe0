"""Stable public name: the pattern language lives in :mod:`megacpp_mcore.spec.pattern`."""

from megacpp_mcore.spec.pattern import (
    SYMBOLS,
    FeaturePlacement,
    LayerEntry,
    PatternError,
    compile_layers,
    expand_pattern,
    stage_lengths,
    symbol_counts,
    validate_pattern,
)

__all__ = [
    "SYMBOLS",
    "FeaturePlacement",
    "LayerEntry",
    "PatternError",
    "compile_layers",
    "expand_pattern",
    "stage_lengths",
    "symbol_counts",
    "validate_pattern",
]
