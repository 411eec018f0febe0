"""The composer: applies the feature table (:mod:`megacpp_mcore.features`) at a named seam.

Symbol builders build their plain spec and hand each seam's spec to :func:`at_seam`; they never
import a feature module. The ``A`` builder asks for ``self_attention`` (standard attention in, MLA
out when the layer carries ``mla``) and then for that attention's ``core_attention`` (MoDA wraps
whatever core attention the self-attention has, standard or MLA); the hybrid block asks for
``layer`` on every symbol's spec (MoD). Inside a seam, features apply in the table's order.
"""

from __future__ import annotations

from typing import Any

from megacpp_mcore.features import FEATURES, SEAMS
from megacpp_mcore.spec.pattern import FEATURE_RULES


def at_seam(seam: str, spec: Any, ctx) -> Any:
    """``spec`` after every feature at ``seam`` that layer ``ctx`` carries, in table order.

    A feature's ``check`` runs on every layer whose symbol the feature may attach to, whether the
    layer carries it or not (e.g. standard attention in an MLA model is refused here).
    """
    if seam not in SEAMS:
        raise ValueError(f"unknown seam {seam!r}; seams: {', '.join(SEAMS)}")
    for feature in FEATURES:
        if feature.seam != seam:
            continue
        rule = FEATURE_RULES[feature.name]
        if feature.check is not None and ctx.symbol in rule["allowed"] | rule["opt_in"]:
            feature.check(ctx)
        if ctx.has(feature.name):
            spec = feature.transform(spec, ctx)
    return spec
