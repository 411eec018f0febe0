"""megacpp_mcore: a hybrid-model feature set (NAM56R patterns, MLA, MoD, MoDA, shared-block MTP)
registered with NVIDIA Megatron-Core as ``ModuleSpec``s.

Importing the package is cheap and has no side effects; megatron-core is imported by the modules
that need it.
"""

__version__ = "0.1.0"

from megacpp_mcore.spec.pattern import (  # noqa: E402
    FeaturePlacement,
    PatternError,
    compile_layers,
    expand_pattern,
)


def hybrid_block_spec(pattern, **options):
    """See :func:`megacpp_mcore.spec.block.hybrid_block_spec` (imported lazily: it needs megatron-core)."""
    from megacpp_mcore.spec.block import hybrid_block_spec as build

    return build(pattern, **options)


__all__ = [
    "FeaturePlacement",
    "PatternError",
    "compile_layers",
    "expand_pattern",
    "hybrid_block_spec",
]
