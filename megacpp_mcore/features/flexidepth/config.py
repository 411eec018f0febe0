"""FlexiDepth's configuration: :class:`FlexiDepthConfig` (router, adapter, usage penalty, modes,
placement, backbone freezing), validated when it is made, and its one-string form
(:meth:`FlexiDepthConfig.from_options`, what ``megacpp-mcore train --flexidepth`` takes)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from megacpp_mcore.spec.pattern import FEATURE_RULES, SYMBOLS, FeaturePlacement, option_items

ADAPTERS = ("mlp", "linear", "none")
TRAINING_MODES = ("soft",)
INFERENCE_MODES = ("soft", "hard")
FORCED_ROUTES = ("full", "skip")
HARD_SKIP_MOE = ("gather", "route")
# from_options: the settable fields (placement's included) and how each value is read. Not
# settable there: ``training`` (one mode), ``freeze_backbone`` (the whole backbone is the
# trainer's --freeze-backbone) and ``forced_route`` (tests, ablations).
_INT_LIST = "int_list"
OPTION_TYPES: dict[str, Any] = {
    "symbols": str, "layers": _INT_LIST, "skip_first": int, "allow_on": str, "adapter": str,
    "adapter_rank": int, "threshold": float, "router_init_std": float, "router_bias_init": float,
    "usage_loss_weight": float, "usage_boundaries": _INT_LIST, "inference": str,
    "hard_skip_symbols": str, "hard_skip_moe": str, "hard_skip_capacity": float,
}
_PLACEMENT_OPTIONS = ("symbols", "layers", "skip_first")


def mod_conflict(where: str) -> str:
    """Why MoD and FlexiDepth are refused on one layer (``where`` names the layer)."""
    return (f"{where} carries both MoD and FlexiDepth: two routers over one residual contribution "
            "have no defined composition; place them on different layers")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"FlexiDepthConfig.{name} must be a number, got {value!r}")
    return float(value)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"FlexiDepthConfig.{name}={value!r} is unknown; allowed: "
                         f"{', '.join(map(str, allowed))}")


def check_capacity(value: Any, name: str = "FlexiDepthConfig.hard_skip_capacity") -> None:
    """``ValueError`` unless ``value`` is None or a number with ``0 < value <= 1``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name}={value!r} is invalid; allowed: None (the exact kept count, read on "
                         "the host) or a fraction 0 < c <= 1 of the sequence")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlexiDepthConfig:
    """FlexiDepth (arXiv 2503.23798) on the layers chosen by ``placement``: per token, a router
    chooses between the full (pretrained, optionally frozen) block and a light adapter path.

    Per wrapped layer, with ``x [s, b, h]`` the layer input, ``z = norm(x)`` (the feature's own
    trainable norm), ``g = sigmoid(z . w + b)`` (``[s, b, 1]``, the router score) and ``B(x)`` the
    wrapped layer's output (its residual included):

    * skip path ``P(x) = x + up(act(down(z)))`` (``adapter="mlp"``; ``"linear"``: no activation;
      ``"none"``: ``P(x) = x``, the paper's attention skip);
    * training (``training="soft"``, static shapes, both branches on every token):
      ``y = g * B(x) + (1 - g) * P(x)``;
    * inference ``"soft"``: the same; ``"hard"``: ``y = B(x)`` where ``g >= threshold`` (kept),
      ``P(x)`` elsewhere (skipped), and on the layers whose symbol is in ``hard_skip_symbols``
      the block really runs on the kept tokens only (gathered per sequence, in order).

    Usage penalty (the paper's layer-skipping loss): ``usage_loss_weight * mean_t (sum_l g_t^l)^2``
    over the tokens ``t`` of a micro-batch, ``l`` over the FlexiDepth layers of one usage segment
    (the layers of one pipeline chunk, split further at ``usage_boundaries``). Its gradient rides
    on the router scores' backward, scaled like Megatron's MoE auxiliary losses.

    Args:
        placement: which layers are wrapped (symbol class and/or 0-based indices).
        allow_on: opt-in symbols refused by default (``M``, ``R``); merged into ``placement``.
        adapter: ``mlp`` | ``linear`` | ``none``: the skip path's adapter ``h -> r -> h``.
        adapter_rank: ``r``; ``None``: ``max(1, hidden_size // 16)`` (the paper's 16x narrower).
        threshold: ``tau``: a token takes the full block when ``g >= tau`` (0 < tau < 1).
        router_init_std: std of the router weight's normal init.
        router_bias_init: router bias init; ``sigmoid(3) = 0.95``: training starts close to the
            backbone (the adapter's up projection starts at zero, so ``P(x) = x`` at first).
        usage_loss_weight: weight of the squared total-usage penalty (>= 0).
        usage_boundaries: 0-based layer indices where a new usage segment starts (the sum over
            layers restarts); a pipeline chunk's first layer always starts one, so list the
            chunk starts to make one rank mean the same as ``pp`` ranks.
        training: ``soft`` (the only training mode: both branches, static shapes).
        inference: ``soft`` | ``hard`` (eval only; see above).
        hard_skip_symbols: symbols on which hard inference gathers the kept tokens and runs the
            block on them only. ``E`` (per-token blocks) gives exactly the output of the block on
            every token; on ``A``/``M``/``R`` the kept tokens then attend to (or recur over) the
            kept tokens only, which is not what soft training trained, so they opt in here.
        hard_skip_moe: how hard inference skips on an ``E`` layer with routed experts that
            ``hard_skip_symbols`` names: ``gather`` (as above) or ``route``: the layer runs on every
            token, but its router sends the skipped tokens to no routed expert, so the experts
            compute the kept tokens only (the norm and a shared expert still see every token)
            with no host read of a kept count and no gather or scatter. The same output.
        hard_skip_capacity: ``None`` (exact: the gathered length is each forward's largest
            per-sequence kept count, read on the host once per gathering layer) or a fraction
            ``0 < c <= 1``: a gathering layer runs its block on a fixed ``ceil(c * s)`` positions
            per sequence (padded to a multiple of the TP size under SP), so FlexiDepth reads
            nothing on the host (other host reads, e.g. a dropless MoE layer's expert counts,
            remain: on an H100 at batch 8 x 4096 it measured no faster than exact,
            docs/benchmarks.md). The first kept tokens of each sequence, in
            order, fill the capacity; a kept token past it takes the skip path, as a skipped one
            does (causal: a token's path depends on the tokens before it only), and the
            statistics count it as skipped. With ``c`` at least every sequence's kept fraction
            the output is the exact one. Generation refuses it (a decoder's per-row count is
            not built).
        freeze_backbone: the wrapped layer's own parameters get ``requires_grad=False``; only the
            router, its norm and the adapter train (the rest of the model is the caller's).
        forced_route: ``full`` | ``skip`` | ``None``: a constant score 1 or 0 instead of the
            router's (tests, ablations).
    """

    placement: FeaturePlacement = FeaturePlacement(symbols="AE")
    allow_on: str = ""
    adapter: str = "mlp"
    adapter_rank: int | None = None
    threshold: float = 0.5
    router_init_std: float = 0.02
    router_bias_init: float = 3.0
    usage_loss_weight: float = 1e-4
    usage_boundaries: tuple[int, ...] = ()
    training: str = "soft"
    inference: str = "soft"
    hard_skip_symbols: str = "E"
    hard_skip_moe: str = "gather"
    hard_skip_capacity: float | None = None
    freeze_backbone: bool = False
    forced_route: str | None = None

    def __post_init__(self):
        _choice("adapter", self.adapter, ADAPTERS)
        _choice("training", self.training, TRAINING_MODES)
        _choice("inference", self.inference, INFERENCE_MODES)
        _choice("hard_skip_moe", self.hard_skip_moe, HARD_SKIP_MOE)
        if self.forced_route is not None:
            _choice("forced_route", self.forced_route, FORCED_ROUTES + (None,))
        rank = self.adapter_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"FlexiDepthConfig.adapter_rank={rank!r} is invalid; allowed: an int >= 1, "
                             "or None for hidden_size // 16")
        threshold = _number("threshold", self.threshold)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"FlexiDepthConfig.threshold={self.threshold!r} is out of range; allowed: "
                             "0 < threshold < 1 (compared against the router score sigmoid(logit))")
        for name in ("router_init_std", "usage_loss_weight"):
            if _number(name, getattr(self, name)) < 0:
                raise ValueError(f"FlexiDepthConfig.{name}={getattr(self, name)!r} is out of range; "
                                 "allowed: >= 0")
        _number("router_bias_init", self.router_bias_init)
        check_capacity(self.hard_skip_capacity)
        bounds = self.usage_boundaries
        if isinstance(bounds, (str, bytes)) or not isinstance(bounds, (tuple, list)) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in bounds):
            raise ValueError(f"FlexiDepthConfig.usage_boundaries={bounds!r} is invalid; allowed: a "
                             "tuple of 0-based layer indices (ints >= 0)")
        object.__setattr__(self, "usage_boundaries", tuple(sorted(set(bounds))))
        for name in ("hard_skip_symbols", "allow_on"):
            value = getattr(self, name)
            if not isinstance(value, str) or any(c not in SYMBOLS for c in value):
                raise ValueError(f"FlexiDepthConfig.{name}={value!r} is invalid; allowed: a string "
                                 f"of the symbols {', '.join(SYMBOLS)}")
        if not isinstance(self.freeze_backbone, bool):
            raise ValueError(f"FlexiDepthConfig.freeze_backbone={self.freeze_backbone!r} must be a bool")
        if not isinstance(self.placement, FeaturePlacement):
            raise ValueError(f"FlexiDepthConfig.placement must be a FeaturePlacement, got {self.placement!r}")
        opt_in = FEATURE_RULES["flexidepth"]["opt_in"]
        if any(c not in opt_in for c in self.allow_on):
            raise ValueError(f"FlexiDepthConfig.allow_on={self.allow_on!r}: FlexiDepth can only be opted "
                             f"in on {', '.join(sorted(opt_in))} (it is always allowed on A, E)")
        if self.allow_on:  # one placement object carries the opt-in to the pattern compiler
            merged = "".join(s for s in SYMBOLS if s in self.allow_on or s in self.placement.allow_on)
            object.__setattr__(self, "placement", dataclasses.replace(self.placement, allow_on=merged))

    @classmethod
    def from_options(cls, text: str) -> "FlexiDepthConfig":
        """A config from ``"key=value,key=value"`` (empty: the defaults), e.g.
        ``"usage_loss_weight=1e-3,inference=hard,layers=1:3:5"``: keys from :data:`OPTION_TYPES`
        (``symbols``/``layers``/``skip_first`` make the placement, default ``symbols=AE``); lists
        of layer indices are ``:``-separated. ``ValueError`` naming the bad item and what is
        allowed."""
        values: dict[str, Any] = {}
        for key, raw in option_items(text, OPTION_TYPES, "FlexiDepth").items():
            kind = OPTION_TYPES[key]
            try:
                values[key] = (tuple(int(v) for v in raw.split(":") if v) if kind == _INT_LIST
                               else kind(raw))
            except ValueError:
                what = {_INT_LIST: "':'-separated ints", int: "an int", float: "a number"}[kind]
                raise ValueError(f"FlexiDepth option {key}={raw!r} is not {what}") from None
        where = {k: values.pop(k) for k in _PLACEMENT_OPTIONS if k in values}
        if where:
            where.setdefault("symbols", "" if "layers" in where else "AE")
            values["placement"] = FeaturePlacement(**where)
        return cls(**values)

    def rank(self, hidden_size: int) -> int:
        """The adapter's inner width ``r`` for a model of ``hidden_size``."""
        return self.adapter_rank if self.adapter_rank is not None else max(1, hidden_size // 16)

    def added_params(self, hidden_size: int, normalization: str = "RMSNorm") -> int:
        """Parameters FlexiDepth adds to one layer (what accounting adds per wrapped layer): its
        norm (``h``; LayerNorm ``2h``), the router ``h + 1`` and the adapter (``down [r, h]``,
        ``up [h, r]``, no biases; none for ``adapter="none"``)."""
        h = hidden_size
        norm = 2 * h if normalization == "LayerNorm" else h
        adapter = 0 if self.adapter == "none" else 2 * h * self.rank(h)
        return norm + h + 1 + adapter
