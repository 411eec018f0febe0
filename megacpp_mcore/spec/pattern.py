"""The NAM56R pattern language: one character per residual sub-layer.

``A`` attention, ``E`` feed-forward (MoE or dense MLP), ``M`` Mamba-2 mixer, ``R`` M2RNN mixer.
A pattern shorter than the depth tiles to it; ``|`` splits explicit pipeline-stage segments, and
then the segments must add up to the depth exactly (no tiling).

Features (MLA, MoD, MoDA, ...) attach to layers through :class:`FeaturePlacement` (by symbol class
and/or explicit 0-based layer index) and are checked by :func:`compile_layers` against
:data:`FEATURE_RULES`, which refuses any
placement that does not mean what the user thinks (an attention-only feature on a Mamba layer, an
index beyond the depth, ...). Messages name the layer index and its symbol.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Iterable, Mapping

SYMBOLS = "AEMR"
SEGMENT_SEPARATOR = "|"
SYMBOL_NAMES = {"A": "attention", "E": "feed-forward", "M": "mamba", "R": "m2rnn"}

# The placement guards of every layer feature, in one place: which symbols each feature may attach
# to; ``opt_in`` symbols need ``allow_on``. A feature's seam, config and transform are its row of the
# feature table (megacpp_mcore.features), which names the same features.
FEATURE_RULES: dict[str, dict[str, frozenset[str]]] = {
    "mla": {"allowed": frozenset("A"), "opt_in": frozenset()},
    "moda": {"allowed": frozenset("A"), "opt_in": frozenset()},
    "mod": {"allowed": frozenset("AE"), "opt_in": frozenset("MR")},
    "flexidepth": {"allowed": frozenset("AE"), "opt_in": frozenset("MR")},
}


class PatternError(ValueError):
    """A malformed pattern, depth or feature placement."""


def _segments(pattern: str) -> list[str]:
    """Splits ``pattern`` at ``|`` after validating every character; refuses empty segments."""
    if not isinstance(pattern, str):
        raise PatternError(f"pattern must be a str, got {type(pattern).__name__} {pattern!r}")
    if not pattern:
        raise PatternError(f"pattern is empty; use symbols from {SYMBOLS!r}, e.g. 'AEMEAEMEAEMR'")
    for pos, ch in enumerate(pattern):
        if ch not in SYMBOLS and ch != SEGMENT_SEPARATOR:
            hint = " (symbols are uppercase)" if ch.upper() in SYMBOLS else ""
            raise PatternError(
                f"pattern {pattern!r}: unknown symbol {ch!r} at position {pos}{hint}; "
                f"allowed: {', '.join(SYMBOLS)} and '{SEGMENT_SEPARATOR}' between pipeline stages"
            )
    segments = pattern.split(SEGMENT_SEPARATOR)
    for i, seg in enumerate(segments):
        if not seg:
            raise PatternError(
                f"pattern {pattern!r}: pipeline segment {i} is empty; "
                f"every '{SEGMENT_SEPARATOR}'-separated stage needs at least one layer"
            )
    return segments


def validate_pattern(pattern: str) -> list[str]:
    """Checks symbols and segments (not the depth); returns the ``|``-separated segments."""
    return _segments(pattern)


def _check_depth(num_layers: object) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise PatternError(f"num_layers must be an int, got {type(num_layers).__name__} {num_layers!r}")
    if num_layers < 1:
        raise PatternError(f"num_layers must be >= 1, got {num_layers}")
    return num_layers


def expand_pattern(pattern: str, num_layers: int) -> list[str]:
    """Returns one symbol per layer (``num_layers`` of them).

    >>> "".join(expand_pattern("AEM", 7))
    'AEMAEMA'
    """
    num_layers = _check_depth(num_layers)
    segments = _segments(pattern)
    if len(segments) > 1:
        total = sum(len(s) for s in segments)
        if total != num_layers:
            raise PatternError(
                f"pattern {pattern!r} has {len(segments)} pipeline segments with "
                f"{'+'.join(str(len(s)) for s in segments)}={total} layers, but num_layers is "
                f"{num_layers}; with '{SEGMENT_SEPARATOR}' the segments must add up to the depth exactly"
            )
        return list("".join(segments))
    unit = segments[0]
    return [unit[i % len(unit)] for i in range(num_layers)]


def stage_lengths(pattern: str, num_layers: int, pp: int = 1) -> list[int]:
    """Layers per pipeline stage: the explicit segments, or an even split of the depth."""
    expand_pattern(pattern, num_layers)  # validates
    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        raise PatternError(f"pipeline size must be an int >= 1, got {pp!r}")
    segments = _segments(pattern)
    if len(segments) > 1:
        if pp != len(segments):
            raise PatternError(
                f"pattern {pattern!r} defines {len(segments)} pipeline stages but the pipeline "
                f"size is {pp}; use --pp {len(segments)} or drop the '{SEGMENT_SEPARATOR}' split"
            )
        return [len(s) for s in segments]
    if num_layers % pp:
        raise PatternError(
            f"num_layers {num_layers} is not divisible by pipeline size {pp}; "
            f"choose a pipeline size among {[d for d in range(1, num_layers + 1) if num_layers % d == 0]} "
            f"or split the stages explicitly with '{SEGMENT_SEPARATOR}'"
        )
    return [num_layers // pp] * pp


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeaturePlacement:
    """Which layers carry a feature: every layer whose symbol is in ``symbols`` from layer index
    ``skip_first`` on, plus ``layers``.

    ``allow_on`` opts in symbols that the feature refuses by default (e.g. MoD on ``M``/``R``).
    ``skip_first`` keeps the symbol class off the first layers at any depth (the public NAM56R
    stack's MoD ``skip_first_n=4``); explicit ``layers`` are not affected by it.
    """

    symbols: str = ""
    layers: tuple[int, ...] = ()
    allow_on: str = ""
    skip_first: int = 0

    def __post_init__(self):
        for field_name in ("symbols", "allow_on"):
            value = getattr(self, field_name)
            if not isinstance(value, str):
                raise PatternError(f"FeaturePlacement.{field_name} must be a str of symbols, got {value!r}")
            bad = [c for c in value if c not in SYMBOLS]
            if bad:
                raise PatternError(
                    f"FeaturePlacement.{field_name}={value!r}: unknown symbol {bad[0]!r}; "
                    f"allowed: {', '.join(SYMBOLS)}"
                )
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
            raise PatternError(f"FeaturePlacement.layers must be a sequence of ints, got {self.layers!r}")
        layers = tuple(self.layers)
        for idx in layers:
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise PatternError(
                    f"FeaturePlacement.layers: {idx!r} is not a layer index (0-based int >= 0)"
                )
        if len(set(layers)) != len(layers):
            dup = [i for i, n in Counter(layers).items() if n > 1]
            raise PatternError(f"FeaturePlacement.layers lists layer {dup[0]} more than once")
        object.__setattr__(self, "layers", layers)
        skip = self.skip_first
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise PatternError(f"FeaturePlacement.skip_first={skip!r} must be an int >= 0 (the number "
                               "of leading layers the symbol class leaves out)")

    @property
    def empty(self) -> bool:
        return not self.symbols and not self.layers

    def resolve(self, feature: str, symbols: list[str]) -> frozenset[int]:
        """Layer indices carrying ``feature``; raises :class:`PatternError` on a bad placement."""
        rules = FEATURE_RULES.get(feature)
        if rules is None:
            raise PatternError(f"unknown feature {feature!r}; known: {', '.join(sorted(FEATURE_RULES))}")
        allowed = rules["allowed"] | (rules["opt_in"] & frozenset(self.allow_on))
        refused = frozenset(self.allow_on) - rules["opt_in"] - rules["allowed"]
        if refused:
            raise PatternError(
                f"{feature}: allow_on={self.allow_on!r} names {''.join(sorted(refused))!r}, which "
                f"{feature} can never attach to; opt-in symbols for {feature}: "
                f"{''.join(sorted(rules['opt_in'])) or 'none'}"
            )
        for sym in self.symbols:
            if sym not in allowed:
                raise PatternError(self._refusal(feature, sym, None, rules, allowed))
        chosen = {i for i, s in enumerate(symbols) if s in self.symbols and i >= self.skip_first}
        for idx in self.layers:
            if idx >= len(symbols):
                raise PatternError(
                    f"{feature}: layer {idx} is beyond the depth; the model has {len(symbols)} "
                    f"layers (valid indices 0..{len(symbols) - 1})"
                )
            if symbols[idx] not in allowed:
                raise PatternError(self._refusal(feature, symbols[idx], idx, rules, allowed))
            chosen.add(idx)
        return frozenset(chosen)

    @staticmethod
    def _refusal(feature, sym, idx, rules, allowed) -> str:
        where = f"layer {idx} is {sym!r}" if idx is not None else f"symbol class {sym!r}"
        msg = (
            f"{feature} cannot attach to {where} ({SYMBOL_NAMES[sym]}); {feature} is allowed on "
            f"{', '.join(sorted(allowed))}"
        )
        if sym in rules["opt_in"]:
            msg += f"; to place it on {sym!r} layers anyway pass allow_on={sym!r}"
        return msg


@dataclasses.dataclass(frozen=True)
class LayerEntry:
    """One compiled layer: 0-based global index, symbol, features, pipeline stage."""

    index: int
    symbol: str
    features: frozenset[str]
    stage: int


def compile_layers(
    pattern: str,
    num_layers: int,
    features: Mapping[str, FeaturePlacement | None] | None = None,
    pp: int = 1,
) -> list[LayerEntry]:
    """Expands ``pattern`` and attaches validated features; the layer table every builder reads."""
    symbols = expand_pattern(pattern, num_layers)
    lengths = stage_lengths(pattern, num_layers, pp)
    stage_of = [s for s, n in enumerate(lengths) for _ in range(n)]
    per_layer: list[set[str]] = [set() for _ in symbols]
    for name, placement in (features or {}).items():
        if placement is None:
            continue
        if not isinstance(placement, FeaturePlacement):
            raise PatternError(f"feature {name!r}: expected a FeaturePlacement, got {placement!r}")
        for idx in placement.resolve(name, symbols):
            per_layer[idx].add(name)
    return [
        LayerEntry(index=i, symbol=s, features=frozenset(per_layer[i]), stage=stage_of[i])
        for i, s in enumerate(symbols)
    ]


def heterogeneous(table: Iterable[LayerEntry]) -> bool:
    """Whether the compiled layers differ in symbol or features. Megatron stacks the layers of a
    homogeneous block into one checkpoint tensor per parameter name; a mixed stack (A layers have no
    MLP, E layers no attention, MoD adds parameters to some layers only) needs per-layer keys
    (``TransformerConfig.hetereogenous_dist_checkpoint``)."""
    return len({(e.symbol, e.features) for e in table}) > 1


def symbol_counts(symbols: Iterable[str]) -> dict[str, int]:
    """Counts per symbol in ``AEMR`` order (zeros included)."""
    counts = Counter(symbols)
    return {s: counts.get(s, 0) for s in SYMBOLS}


def option_items(text: str, allowed: Iterable[str], feature: str) -> dict[str, str]:
    """The ``key=value`` items of a feature's option string (``"a=1, b=x"``; empty: none), raw
    values by key, for the feature's config to read (``train --flexidepth`` / ``--mod``).
    ``ValueError`` naming the item: not ``key=value``, a key not in ``allowed`` (listed), a key
    given twice. ``feature`` names the feature in the messages (``"MoD"``)."""
    allowed = list(allowed)
    items: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or key not in allowed:
            raise ValueError(f"{feature} option {item!r} is not key=value with a known key; "
                             f"allowed keys: {', '.join(allowed)}")
        if key in items:
            raise ValueError(f"{feature} option {key!r} is given twice")
        items[key] = raw
    return items
