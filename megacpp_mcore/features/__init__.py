"""The feature table: every layer feature is a config plus ONE transform applied at a named seam.

A seam is a point of a layer spec that a feature may replace, applied by one composer
(:func:`megacpp_mcore.spec.compose.at_seam`) in the order of :data:`SEAMS`, and inside a seam in the
order of :data:`FEATURES`:

* ``self_attention``: the self-attention spec of an ``A`` layer (standard attention from the
  backend); MLA swaps it for multi-latent attention;
* ``core_attention``: the core attention of that self-attention (the backend's, or MLA's); MoDA
  wraps it with depth-KV attention;
* ``layer``: the whole layer spec a symbol built; MoD wraps it with a per-token router, FlexiDepth
  with a per-token choice between the block and an adapter path.

A :class:`Feature` row may also carry a per-layer ``check`` that the composer runs at the seam on
every layer the feature could attach to, carrying it or not (MLA refuses standard attention in an
MLA model there). Which symbols a feature may attach to is its placement rule in
:data:`megacpp_mcore.spec.pattern.FEATURE_RULES`, the one place of placement guards, enforced when
the pattern is compiled. Adding a feature: a row here, its rule there, and its package exporting its
config class and ``transform``. MTP is model-level (:mod:`megacpp_mcore.features.mtp`), not a layer
seam.

This module stays import-light (no torch, no megatron): the config classes and transforms are
reached through the small loader functions below, which import the feature's module when a layer is
built (those modules import this package and the pattern language, never the other way round).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

SEAMS = ("self_attention", "core_attention", "layer")


@dataclasses.dataclass(frozen=True)
class Feature:
    """One layer feature: where it applies (``seam``), its config class and its transform."""

    name: str
    seam: str
    config_type: Callable[[], type]  # returns the feature's config class
    transform: Callable[[Any, Any], Any]  # (spec at the seam, LayerContext) -> ModuleSpec
    check: Callable[[Any], None] | None = None  # per-layer guard (LayerContext), see module doc

    def __post_init__(self):
        if self.seam not in SEAMS:
            raise ValueError(f"feature {self.name!r}: unknown seam {self.seam!r}; seams: {SEAMS}")


# Loaders: each imports the feature's module only when a layer is built (those modules import torch
# and megatron, and their packages import this one).
def _mla_config() -> type:
    from megacpp_mcore.models.presets import MLAConfig

    return MLAConfig


def _mla_transform(spec, ctx):
    from megacpp_mcore.layers import mla

    return mla.transform(spec, ctx)


def _mla_check(ctx) -> None:
    from megacpp_mcore.layers import mla

    mla.check_placement(ctx)


def _moda_config() -> type:
    from megacpp_mcore.features.moda import MoDAConfig

    return MoDAConfig


def _moda_transform(core_attention_spec, ctx):
    from megacpp_mcore.features import moda

    return moda.transform(core_attention_spec, ctx)


def _mod_config() -> type:
    from megacpp_mcore.features.mod import MoDConfig

    return MoDConfig


def _mod_transform(layer_spec, ctx):
    from megacpp_mcore.features import mod

    return mod.transform(layer_spec, ctx)


def _flexidepth_config() -> type:
    from megacpp_mcore.features.flexidepth import FlexiDepthConfig

    return FlexiDepthConfig


def _flexidepth_transform(layer_spec, ctx):
    from megacpp_mcore.features import flexidepth

    return flexidepth.transform(layer_spec, ctx)


FEATURES: tuple[Feature, ...] = (
    Feature("mla", seam="self_attention", config_type=_mla_config, transform=_mla_transform,
            check=_mla_check),
    Feature("moda", seam="core_attention", config_type=_moda_config, transform=_moda_transform),
    Feature("mod", seam="layer", config_type=_mod_config, transform=_mod_transform),
    # after MoD: on one layer the two are refused (FlexiDepth's transform says so), so the order only
    # fixes which of them names the conflict: FlexiDepth, which sees MoD's wrapped spec
    Feature("flexidepth", seam="layer", config_type=_flexidepth_config,
            transform=_flexidepth_transform),
)

FEATURE_NAMES = tuple(f.name for f in FEATURES)


def get_feature(name: str) -> Feature:
    """The table row of feature ``name``; raises ``KeyError`` naming the known features."""
    for row in FEATURES:
        if row.name == name:
            return row
    raise KeyError(f"unknown feature {name!r}; known features: {', '.join(sorted(FEATURE_NAMES))}")


__all__ = ["FEATURES", "FEATURE_NAMES", "SEAMS", "Feature", "get_feature"]
