"""``hybrid_block_spec``: one spec object that builds a whole NAM56R-style stack, lazily.

The depth, the pipeline stage and the backend are only known when Megatron builds the block, so the
returned ``ModuleSpec`` names :class:`HybridLayer`, a ``BaseTransformerLayer`` that Megatron's
``TransformerBlock`` fans out to one spec per layer of its stage (``get_num_layers_to_build``). When
Megatron builds layer ``layer_number`` (1-based, local to the stage), :class:`HybridLayer` computes
the global index from the config's pipeline offset, compiles the pattern against
``config.num_layers`` (validating every feature placement), builds that layer's real spec (the
symbol's builder from :data:`SYMBOL_SPECS`, then the composer's ``layer`` seam,
:func:`megacpp_mcore.spec.compose.at_seam`) and returns the module built from it. The stack
therefore holds plain ``TransformerLayer`` (or feature) modules with upstream parameter names;
``HybridLayer`` itself never becomes a module. Building writes nothing to a config that our
builders made (they set the checkpoint layout up front); see :func:`_check_checkpoint_layout` for
the one setting claimed under stock ``pretrain_gpt.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping

from megatron.core.transformer.spec_utils import ModuleSpec, get_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import BaseTransformerLayer

from megacpp_mcore.features import FEATURE_NAMES, get_feature
from megacpp_mcore.layers.attention import attention_layer_spec
from megacpp_mcore.layers.feedforward import feedforward_layer_spec
from megacpp_mcore.layers.mixers import m2rnn_layer_spec, mamba_layer_spec
from megacpp_mcore.spec import backends, compat
from megacpp_mcore.spec.compose import at_seam
from megacpp_mcore.spec.context import ChunkBuild, ChunkCursor, LayerContext
from megacpp_mcore.spec.pattern import (
    SEGMENT_SEPARATOR,
    FeaturePlacement,
    LayerEntry,
    PatternError,
    compile_layers,
    expand_pattern,
    validate_pattern,
)
from megacpp_mcore.spec.pattern import heterogeneous as _mixed_kinds

# Symbol -> the function building that symbol's layer spec from a LayerContext.
SYMBOL_SPECS: dict[str, Callable[[LayerContext], ModuleSpec]] = {
    "A": attention_layer_spec,
    "E": feedforward_layer_spec,
    "M": mamba_layer_spec,
    "R": m2rnn_layer_spec,
}


def layer_spec(ctx: LayerContext) -> ModuleSpec:
    """The spec of the layer ``ctx`` describes: its symbol's spec, then the ``layer`` seam."""
    return at_seam("layer", SYMBOL_SPECS[ctx.symbol](ctx), ctx)


def _placement(name: str, value: Any) -> FeaturePlacement:
    """The placement of feature ``name``: a bare FeaturePlacement or the feature's config."""
    if isinstance(value, FeaturePlacement):
        return value
    config_type = get_feature(name).config_type()
    if not isinstance(value, config_type):
        raise ValueError(
            f"feature {name!r}: expected a FeaturePlacement or a {config_type.__name__}, got {value!r}"
        )
    return value.placement


@dataclasses.dataclass(frozen=True, kw_only=True)
class HybridLayerSubmodules:
    """The data behind a hybrid stack: pattern, backend request and feature configs."""

    pattern: str
    backend: str = "auto"
    features: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_layers: int | None = None  # when given, checked against the config at build time
    # the chunk being built: HybridLayer starts a ChunkBuild (the owner of what a chunk's layers
    # share, e.g. MoDA's depth buffers) at each chunk's first layer; build state, not spec data
    chunks: ChunkCursor = dataclasses.field(default_factory=ChunkCursor, init=False, repr=False,
                                            compare=False)

    def __post_init__(self):
        if self.backend not in backends.BACKENDS:
            raise ValueError(
                f"unknown backend {self.backend!r}; allowed: {', '.join(backends.BACKENDS)}"
            )
        unknown = sorted(set(self.features) - set(FEATURE_NAMES))
        if unknown:
            raise ValueError(
                f"unknown feature {unknown[0]!r}; known features: {', '.join(sorted(FEATURE_NAMES))}"
            )
        object.__setattr__(
            self, "features", {k: v for k, v in self.features.items() if v is not None}
        )
        if self.num_layers is not None:
            self.table(self.num_layers)  # validate pattern and placements eagerly

    @property
    def placements(self) -> dict[str, FeaturePlacement]:
        return {name: _placement(name, value) for name, value in self.features.items()}

    def table(self, num_layers: int) -> list[LayerEntry]:
        """The compiled layer table at depth ``num_layers`` (validated, cached)."""
        return _compiled(self.pattern, num_layers, tuple(sorted(self.placements.items(), key=str)))

    def heterogeneous(self, num_layers: int) -> bool:
        """Whether the stack at depth ``num_layers`` mixes layer kinds, so that Megatron must
        checkpoint per-layer keys: the model builder then sets
        ``config.hetereogenous_dist_checkpoint`` (:func:`checkpoint_config_kwargs`)."""
        return _mixed_kinds(self.table(num_layers))

    def layer_spec(self, config: TransformerConfig, index: int,
                   chunk: ChunkBuild | None = None) -> ModuleSpec:
        """The concrete spec of global layer ``index`` for ``config``, a layer of ``chunk`` (by
        default a chunk of its own)."""
        if self.num_layers is not None and self.num_layers != config.num_layers:
            raise PatternError(
                f"hybrid spec was declared for {self.num_layers} layers but the model config has "
                f"num_layers={config.num_layers}"
            )
        table = self.table(config.num_layers)
        entry = table[index]
        ctx = LayerContext(
            config=config,
            backend=backends.get_backend(self.backend),
            index=entry.index,
            symbol=entry.symbol,
            features=entry.features,
            feature_configs=self.features,
            chunk=chunk if chunk is not None else ChunkBuild(),
            model_table=tuple(table),
        )
        return layer_spec(ctx)


@functools.lru_cache(maxsize=64)
def _compiled(pattern, num_layers, placements) -> list[LayerEntry]:
    # a "|"-segmented pattern compiles against its own stage count (Megatron's split is checked
    # per layer by _check_stage)
    return compile_layers(pattern, num_layers, dict(placements), pp=len(validate_pattern(pattern)))


def _pp_rank(pg_collection) -> int:
    pp_group = getattr(pg_collection, "pp", None) if pg_collection is not None else None
    if pp_group is not None:
        return pp_group.rank()
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_rank()


class HybridLayer(BaseTransformerLayer):
    """Spec-time dispatcher: ``HybridLayer(config, submodules, layer_number, ...)`` returns the module
    of the pattern's layer at that position (never an instance of this class)."""

    def __new__(
        cls,
        config: TransformerConfig,
        submodules: HybridLayerSubmodules,
        layer_number: int = 1,
        pg_collection=None,
        vp_stage: int | None = None,
        **kwargs,  # upstream kwargs added after 0.16 (pp_layer_offset, is_mtp_layer, name, ...)
    ):
        pp_rank = _pp_rank(pg_collection)
        index = compat.global_layer_index(config, layer_number, vp_stage=vp_stage, pp_rank=pp_rank,
                                          **kwargs)
        _check_stage(submodules.pattern, config, index, pp_rank, vp_stage)
        _check_checkpoint_layout(submodules, config)
        spec = submodules.layer_spec(config, index, submodules.chunks.for_layer(layer_number))
        return compat.build_layer(
            spec,
            config=config,
            layer_number=layer_number,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
            **compat.layer_kwargs(get_module(spec), kwargs),
        )


def checkpoint_config_kwargs(spec: ModuleSpec, num_layers: int) -> dict[str, bool]:
    """TransformerConfig kwargs a model builder passes for hybrid ``spec`` at ``num_layers``:
    per-layer checkpoint keys when the stack mixes layer kinds (Megatron stacks a homogeneous
    block's layers into one tensor per parameter name; a mixed stack has holes in those tensors)."""
    if getattr(spec, "module", None) is not HybridLayer or not spec.submodules.heterogeneous(num_layers):
        return {}
    return {compat.HETEROGENEOUS_CHECKPOINT_FIELD: True}


def _check_checkpoint_layout(submodules: HybridLayerSubmodules, config: TransformerConfig) -> None:
    """A mixed stack needs per-layer checkpoint keys. The model builders that own the config set
    them up front (:func:`checkpoint_config_kwargs`: ``runtime.transformer_config`` and the
    ``megacpp_mcore.launch_pretrain`` builder), so building a layer leaves their config alone.

    The one exception is stock ``pretrain_gpt.py --spec`` (Megatron-LM 0.16-0.19 has no command-line
    flag for the field and builds a fresh config per model): there the stack claims the setting on
    that model's config and says so once, instead of writing a checkpoint with holes."""
    field = compat.HETEROGENEOUS_CHECKPOINT_FIELD
    if submodules.heterogeneous(config.num_layers) and not getattr(config, field):
        warnings.warn(
            f"pattern {submodules.pattern!r} mixes layer kinds, so its distributed checkpoint needs "
            f"per-layer keys: setting {field}=True on this model's TransformerConfig (pretrain_gpt.py "
            "has no flag for it; python -m megacpp_mcore.launch_pretrain and "
            "megacpp_mcore.spec.block.checkpoint_config_kwargs set it up front)",
            stacklevel=3,
        )
        setattr(config, field, True)


def _check_stage(pattern: str, config: TransformerConfig, index: int, pp_rank: int, vp_stage) -> None:
    """With explicit ``|`` stages, Megatron's split must put this layer on the segment's stage."""
    if SEGMENT_SEPARATOR not in pattern:
        return
    segments = pattern.split(SEGMENT_SEPARATOR)
    pp = config.pipeline_model_parallel_size
    if pp != len(segments) or vp_stage not in (None, 0) and config.virtual_pipeline_model_parallel_size:
        raise PatternError(
            f"pattern {pattern!r} defines {len(segments)} pipeline stages, but the model runs with "
            f"pipeline_model_parallel_size={pp}"
            + (" and virtual pipeline stages" if config.virtual_pipeline_model_parallel_size else "")
        )
    start = sum(len(s) for s in segments[:pp_rank])
    if not start <= index < start + len(segments[pp_rank]):
        lengths = [len(s) for s in segments]
        raise PatternError(
            f"layer {index} lands on pipeline stage {pp_rank}, but pattern {pattern!r} places it "
            f"elsewhere (stage sizes {lengths}); set the model's stage split to match, e.g. "
            f"{pipeline_split_kwargs(pattern, config.num_layers)}"
        )


def pipeline_split_kwargs(pattern: str, num_layers: int) -> dict[str, int]:
    """TransformerConfig kwargs that make Megatron's stage split follow the ``|`` segments."""
    expand_pattern(pattern, num_layers)
    lengths = [len(s) for s in pattern.split(SEGMENT_SEPARATOR)]
    if len(lengths) == 1:
        return {}
    middle = lengths[1:-1]
    if len(set(middle)) > 1:
        raise PatternError(
            f"pattern {pattern!r}: middle stages {middle} differ in size; Megatron's uneven split "
            "only sets the first and last stage, so the middle stages must be equal"
        )
    kwargs = {"pipeline_model_parallel_size": len(lengths)}
    if not middle or lengths[0] != middle[0]:
        kwargs["num_layers_in_first_pipeline_stage"] = lengths[0]
    if not middle or lengths[-1] != middle[0]:
        kwargs["num_layers_in_last_pipeline_stage"] = lengths[-1]
    return kwargs


def hybrid_block_spec(
    pattern: str,
    *,
    backend: str = "auto",
    num_layers: int | None = None,
    **features: Any,
) -> ModuleSpec:
    """A spec for ``GPTModel(transformer_layer_spec=...)`` / ``pretrain_gpt.py --spec``.

    Args:
        pattern: NAM56R pattern, e.g. ``"AEMEAEMEAEMR"``; tiles to the config's depth.
        backend: ``auto`` | ``te`` | ``local``, resolved when the model is built.
        num_layers: optional; validates pattern and placements now and the config's depth later.
        **features: one keyword per feature of :data:`megacpp_mcore.features.FEATURES` (``mla=``,
            ``moda=``, ``mod=``, ``flexidepth=``): a :class:`FeaturePlacement` or that feature's
            config class (which carries a ``placement``).
    """
    validate_pattern(pattern)
    return ModuleSpec(
        module=HybridLayer,
        submodules=HybridLayerSubmodules(
            pattern=pattern, backend=backend, features=features, num_layers=num_layers
        ),
    )
