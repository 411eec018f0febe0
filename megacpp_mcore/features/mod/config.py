"""MoD's configuration: :class:`MoDConfig` (modes, token budget, placement, kernels), validated."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from megacpp_mcore.spec.pattern import FEATURE_RULES, SYMBOLS, FeaturePlacement, option_items

MODES = ("gateskip", "threshold", "topk")
# Eval-time behaviour per mode; the first entry is the default ("soft" = same as training).
INFERENCE_MODES = {"gateskip": ("soft", "hard"), "threshold": ("soft",), "topk": ("soft", "causal")}
# Which formulation of the fused gateskip / top-k routing runs on CUDA tensors (see gate.py).
KERNELS = ("auto", "triton", "torch")


def _number(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r}")
    return float(value)


# The width at which MoD's router logit is w . x unscaled (MoDConfig.router_scale): nam56r-tiny's.
ROUTER_BASE_WIDTH = 128
# MoDConfig.with_options (train --mod): the settable fields, each value's type and the word that
# stands for None where None is allowed.
OPTION_TYPES: dict[str, tuple[type, str | None]] = {
    "mode": (str, None), "capacity": (float, None), "threshold": (float, None),
    "router_init_std": (float, None), "router_bias_init": (float, None), "router_scale": (float, "width"),
    "sparsity_loss_weight": (float, None), "router_aux_loss_weight": (float, None),
    "budget_start": (float, None), "budget_end": (float, None), "budget_steps": (int, "run"),
    "inference": (str, None), "kernels": (str, None),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoDConfig:
    """Mixture-of-Depths routing for the layers chosen by ``placement``.

    Args:
        mode: ``gateskip`` | ``threshold`` | ``topk``.
        capacity: ``topk`` only: fraction of each sequence's tokens that pay for the layer, (0, 1].
        threshold: ``threshold`` mode: a token is processed when ``sigmoid(router) >= threshold``.
        router_init_std: std of the router weight's normal init.
        router_bias_init: router bias init; ``sigmoid(2) = 0.88``, so training starts near dense.
        router_scale: multiplier of the router's ``w . x`` (the weight stays the parameter);
            1.0 (default): unscaled; ``None``: ``ROUTER_BASE_WIDTH / hidden_size``
            (:meth:`router_multiplier`). The router reads the un-normed residual stream, and
            under Adam each weight moves about ``lr`` a step, so an unscaled logit moves
            ~``lr * h * |x|`` a step: at h = 1024-2048 and lr 1e-3 the gates of most MoD layers
            fall from 0.88 to ~0.01 within 20-50 steps (nam56r-lite on an H100, a 1024-wide
            AEMEAE on the CPU). ``None`` keeps them alive (a router learns at nam56r-tiny's speed
            at any width), but it has not yet shown better bits per byte (docs/benchmarks.md,
            fifteenth session), so it is opt-in.
        sparsity_loss_weight: weight of ``relu(mean(gate) - budget)^2`` (gateskip, threshold).
        router_aux_loss_weight: weight of the topk router's BCE against its own top-k choice.
        budget_start, budget_end, budget_steps: token budget, linear from start to end over
            ``budget_steps`` training steps, then constant (``budget_steps=0``: always ``end``;
            ``None``: over the whole run, whose length the training loop gives: ``train
            --steps`` in ``megacpp-mcore train``, ``--train-iters`` under Megatron-LM's loop).
        inference: eval-time routing: gateskip ``soft``|``hard``; topk ``soft``|``causal``;
            threshold ``soft``.
        placement: which layers are wrapped (symbol class and/or 0-based indices).
        allow_on: opt-in symbols MoD refuses by default (``M``, ``R``); merged into ``placement``.
        kernels: the fused gateskip seam and the top-k routing on CUDA tensors: ``auto`` (the
            Triton kernels when Triton imports and the hidden size fits them, else torch ops),
            ``triton`` (required: building the layer fails without them) or ``torch`` (the torch
            formulation, e.g. for A/B measurements). Resolved once, when a layer is built; CPU
            tensors always take the torch formulation.
    """

    mode: str = "gateskip"
    capacity: float = 0.125
    threshold: float = 0.5
    router_init_std: float = 0.02
    router_bias_init: float = 2.0
    router_scale: float | None = 1.0
    sparsity_loss_weight: float = 1e-2
    router_aux_loss_weight: float = 1e-2
    budget_start: float = 1.0
    budget_end: float = 0.8
    budget_steps: int | None = 1000
    inference: str = "soft"
    placement: FeaturePlacement = FeaturePlacement(symbols="AE")
    allow_on: str = ""
    kernels: str = "auto"

    def router_multiplier(self, hidden_size: int) -> float:
        """The factor of the router's ``w . x`` at ``hidden_size`` (``router_scale``)."""
        return self.router_scale if self.router_scale is not None else ROUTER_BASE_WIDTH / hidden_size

    def __post_init__(self):
        owner = "MoDConfig"
        if self.mode not in MODES:
            raise ValueError(f"{owner}.mode={self.mode!r} is unknown; allowed: {', '.join(MODES)}")
        capacity = _number(owner, "capacity", self.capacity)
        if not 0.0 < capacity <= 1.0:
            raise ValueError(
                f"{owner}.capacity={self.capacity!r} is out of range; allowed: 0 < capacity <= 1 "
                "(the fraction of each sequence's tokens a topk layer processes)"
            )
        threshold = _number(owner, "threshold", self.threshold)
        if not 0.0 < threshold < 1.0:
            raise ValueError(
                f"{owner}.threshold={self.threshold!r} is out of range; allowed: 0 < threshold < 1 "
                "(compared against sigmoid(router))"
            )
        for name in ("router_init_std", "sparsity_loss_weight", "router_aux_loss_weight"):
            if _number(owner, name, getattr(self, name)) < 0:
                raise ValueError(f"{owner}.{name} must be >= 0, got {getattr(self, name)!r}")
        _number(owner, "router_bias_init", self.router_bias_init)
        if self.router_scale is not None and not _number(owner, "router_scale", self.router_scale) > 0:
            raise ValueError(f"{owner}.router_scale must be > 0 (or None: {ROUTER_BASE_WIDTH} / hidden "
                             f"size), got {self.router_scale!r}")
        for name in ("budget_start", "budget_end"):
            value = _number(owner, name, getattr(self, name))
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{owner}.{name}={value!r} is out of range; allowed: 0 < budget <= 1")
        steps = self.budget_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"{owner}.budget_steps={steps!r} is not allowed; allowed: an int >= 0, "
                             "or None (decay over the whole run)")
        allowed = INFERENCE_MODES[self.mode]
        if self.inference not in allowed:
            raise ValueError(
                f"{owner}.inference={self.inference!r} is not available in mode {self.mode!r}; "
                f"allowed: {', '.join(allowed)}"
            )
        if self.kernels not in KERNELS:
            raise ValueError(f"{owner}.kernels={self.kernels!r} is unknown; allowed: {', '.join(KERNELS)}")
        if not isinstance(self.placement, FeaturePlacement):
            raise ValueError(f"{owner}.placement must be a FeaturePlacement, got {self.placement!r}")
        opt_in = FEATURE_RULES["mod"]["opt_in"]
        if not isinstance(self.allow_on, str) or any(c not in opt_in for c in self.allow_on):
            raise ValueError(
                f"{owner}.allow_on={self.allow_on!r}: MoD can only be opted in on "
                f"{', '.join(sorted(opt_in))} (it is always allowed on A, E)"
            )
        if self.allow_on:  # one placement object carries the opt-in to the pattern compiler
            merged = "".join(s for s in SYMBOLS if s in self.allow_on or s in self.placement.allow_on)
            object.__setattr__(self, "placement", dataclasses.replace(self.placement, allow_on=merged))

    def with_options(self, text: str) -> "MoDConfig":
        """This config with the fields ``"key=value,key=value"`` replaces (``train --mod``), e.g.
        ``"router_scale=width,sparsity_loss_weight=0"``: keys from :data:`OPTION_TYPES` (not the
        placement: which layers carry MoD is the preset's); ``router_scale=width`` is ``None``
        (``ROUTER_BASE_WIDTH / hidden_size``), ``budget_steps=run`` is ``None`` (over the whole
        run). ``ValueError`` naming the bad item and what is allowed."""
        values: dict[str, Any] = {}
        for key, raw in option_items(text, OPTION_TYPES, "MoD").items():
            kind, none_word = OPTION_TYPES[key]
            if none_word is not None and raw == none_word:
                values[key] = None
                continue
            try:
                values[key] = kind(raw)
            except ValueError:
                what = {int: "an int", float: "a number"}[kind]
                also = f" or {none_word!r}" if none_word else ""
                raise ValueError(f"MoD option {key}={raw!r} is not {what}{also}") from None
        return dataclasses.replace(self, **values)

    @property
    def gathers(self) -> bool:
        """Whether training runs the wrapped block on each sequence's selected tokens only
        (``topk`` below capacity 1) rather than on the whole ``[s, b, h]`` sequence."""
        return self.mode == "topk" and self.capacity < 1.0

    def budget(self, step: int, total_steps: int | None = None) -> float:
        """Token budget at training ``step`` (0-based): linear from ``budget_start`` to
        ``budget_end`` over ``budget_steps`` steps, or over the run's ``total_steps`` when
        ``budget_steps`` is None (reaching ``budget_end`` at the run's last step)."""
        span = self.budget_steps
        if span is None:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
                raise ValueError(
                    f"MoDConfig.budget_steps=None decays the budget over the whole run, but the "
                    f"training loop gave total_steps={total_steps!r}; allowed: the run's step count "
                    "(an int >= 1), e.g. megacpp_set_step(step, total_steps=N)"
                )
            span = total_steps - 1
        if span == 0:
            return float(self.budget_end)
        frac = min(max(step, 0), span) / span
        return float(self.budget_start + (self.budget_end - self.budget_start) * frac)

    def describe(self) -> str:
        """One line for ``megacpp-mcore plan``: mode and token budget schedule."""
        over = ("the run" if self.budget_steps is None else f"{self.budget_steps} steps")
        what = (f"capacity {self.capacity:g}" if self.mode == "topk"
                else f"budget {float(self.budget_start)} -> {float(self.budget_end)} over {over}")
        return f"{self.mode}, {what}"

    def topk_count(self, seq_len: int, multiple: int = 1) -> int:
        """Tokens a topk layer processes in a sequence of ``seq_len``: ``ceil(capacity * T)``
        rounded up to ``multiple`` (the TP size under sequence parallelism), at most ``T``."""
        k = max(1, math.ceil(round(self.capacity * seq_len, 6)))
        k = -(-k // multiple) * multiple
        if k > seq_len:
            raise ValueError(
                f"MoD topk: capacity {self.capacity} of a {seq_len}-token sequence rounds up to "
                f"{k} tokens (a multiple of {multiple}), more than the sequence holds"
            )
        return k
