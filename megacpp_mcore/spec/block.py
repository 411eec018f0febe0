"""``hybrid_block_spec``: one spec object that builds a whole NAM56R-style stack, lazily.

The depth, the pipeline stage and the backend are only known when Megatron builds the block, so the
returned ``ModuleSpec`` names :class:`HybridLayer`, a ``BaseTransformerLayer`` that Megatron's
``TransformerBlock`` fans out to one spec per layer of its stage (``get_num_layers_to_build``). When
Megatron builds layer ``layer_number`` (1-based, local to the stage), :class:`HybridLayer` computes
the global index from the config's pipeline offset, compiles the pattern against
``config.num_layers`` (validating every feature placement), asks the symbol's builder for that
layer's real spec and returns the module built from it. The stack therefore holds plain
``TransformerLayer`` (or feature) modules with upstream parameter names; ``HybridLayer`` itself never
becomes a module.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Mapping

from megatron.core.transformer.spec_utils import ModuleSpec, build_module, get_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import BaseTransformerLayer

from megacpp_mcore.spec import backends, compat
from megacpp_mcore.spec.context import LayerContext
from megacpp_mcore.spec.pattern import (
    FEATURE_RULES,
    SEGMENT_SEPARATOR,
    FeaturePlacement,
    LayerEntry,
    PatternError,
    compile_layers,
    expand_pattern,
    validate_pattern,
)

# Symbol -> "module:function" building that symbol's layer spec from a LayerContext.
SYMBOL_BUILDERS: dict[str, str] = {
    "A": "megacpp_mcore.layers.attention:attention_layer_spec",
    "E": "megacpp_mcore.layers.feedforward:feedforward_layer_spec",
    "M": "megacpp_mcore.layers.mixers:mamba_layer_spec",
    "R": "megacpp_mcore.layers.mixers:m2rnn_layer_spec",
}

def _placement(name: str, value: Any) -> FeaturePlacement:
    placement = value if isinstance(value, FeaturePlacement) else getattr(value, "placement", None)
    if not isinstance(placement, FeaturePlacement):
        raise ValueError(
            f"feature {name!r}: expected a FeaturePlacement or a config with a `.placement` "
            f"FeaturePlacement, got {value!r}"
        )
    return placement


@dataclasses.dataclass(frozen=True, kw_only=True)
class HybridLayerSubmodules:
    """The data behind a hybrid stack: pattern, backend request and feature configs."""

    pattern: str
    backend: str = "auto"
    features: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_layers: int | None = None  # when given, checked against the config at build time

    def __post_init__(self):
        if self.backend not in backends.BACKENDS:
            raise ValueError(
                f"unknown backend {self.backend!r}; allowed: {', '.join(backends.BACKENDS)}"
            )
        unknown = sorted(set(self.features) - set(FEATURE_RULES))
        if unknown:
            raise ValueError(
                f"unknown feature {unknown[0]!r}; known features: {', '.join(sorted(FEATURE_RULES))}"
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

    def layer_spec(self, config: TransformerConfig, index: int) -> ModuleSpec:
        """The concrete spec of global layer ``index`` for ``config``."""
        if self.num_layers is not None and self.num_layers != config.num_layers:
            raise PatternError(
                f"hybrid spec was declared for {self.num_layers} layers but the model config has "
                f"num_layers={config.num_layers}"
            )
        entry = self.table(config.num_layers)[index]
        ctx = LayerContext(
            config=config,
            backend=backends.get_backend(self.backend),
            index=entry.index,
            symbol=entry.symbol,
            features=entry.features,
            feature_configs=self.features,
        )
        spec = _builder(entry.symbol)(ctx)
        if "mod" in entry.features:
            from megacpp_mcore.features.mod.layer import mod_layer_spec

            spec = mod_layer_spec(spec, ctx)
        return spec


@functools.lru_cache(maxsize=64)
def _compiled(pattern, num_layers, placements) -> list[LayerEntry]:
    return compile_layers(pattern, num_layers, dict(placements))


def _builder(symbol: str) -> Callable[[LayerContext], ModuleSpec]:
    module_name, func = SYMBOL_BUILDERS[symbol].split(":")
    return getattr(importlib.import_module(module_name), func)


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
        spec = submodules.layer_spec(config, index)
        if len({(e.symbol, e.features) for e in submodules.table(config.num_layers)}) > 1:
            # Megatron stacks homogeneous layers into one checkpoint tensor per parameter name; a
            # mixed stack (A layers have no MLP, E layers no attention, a feature such as MoD adds
            # parameters to some layers only) needs per-layer keys.
            setattr(config, compat.HETEROGENEOUS_CHECKPOINT_FIELD, True)
        return build_module(
            spec,
            config=config,
            layer_number=layer_number,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
            **compat.layer_kwargs(get_module(spec), kwargs),
        )


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
        **features: ``mla=``, ``mod=``, ``moda=``: a :class:`FeaturePlacement` or a feature config
            with a ``placement`` attribute.
    """
    validate_pattern(pattern)
    return ModuleSpec(
        module=HybridLayer,
        submodules=HybridLayerSubmodules(
            pattern=pattern, backend=backend, features=features, num_layers=num_layers
        ),
    )
