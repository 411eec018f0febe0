"""Dimensions of the ``M`` (Mamba-2) and ``R`` (M2RNN) mixers, in one place.

Pure Python (no megatron import): :mod:`megacpp_mcore.models.accounting` counts parameters from the same numbers
the mixers are built with, and :func:`mixer_config_kwargs` tells ``runtime.transformer_config`` which
``TransformerConfig`` fields the ``M`` block needs for a model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Mamba-2 defaults, equal to megatron-core's TransformerConfig defaults (mamba_*) and MambaMixer's.
MAMBA_EXPAND, MAMBA_HEAD_DIM, MAMBA_STATE, MAMBA_GROUPS, MAMBA_CONV = 2, 64, 128, 8, 4
# M2RNN: per-head key/query dim, value dim (state is K x V), short-conv width.
M2RNN_K_DIM, M2RNN_V_DIM, M2RNN_CONV = 64, 16, 4


@dataclasses.dataclass(frozen=True, kw_only=True)
class MambaDims:
    """Global (un-split) Mamba-2 mixer sizes; TP splits ``nheads`` and ``ngroups``."""

    d_model: int
    nheads: int
    head_dim: int = MAMBA_HEAD_DIM
    d_state: int = MAMBA_STATE
    ngroups: int = MAMBA_GROUPS
    d_conv: int = MAMBA_CONV

    def __post_init__(self):
        for name in ("d_model", "nheads", "head_dim", "d_state", "ngroups", "d_conv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaDims.{name} must be an int >= 1, got {value!r}")
        if self.nheads % self.ngroups:
            raise ValueError(
                f"Mamba mixer: nheads={self.nheads} is not divisible by ngroups={self.ngroups}; "
                f"allowed ngroups: divisors of {self.nheads}"
            )

    @property
    def d_inner(self) -> int:
        return self.nheads * self.head_dim

    @property
    def conv_dim(self) -> int:  # x, B, C go through the causal conv
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def in_proj_dim(self) -> int:  # z, x, B, C, dt
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    def check_tp(self, tp: int) -> None:
        for name, value in (("nheads", self.nheads), ("ngroups", self.ngroups)):
            if value % tp:
                raise ValueError(
                    f"Mamba mixer: {name}={value} is not divisible by tensor_model_parallel_size={tp}"
                )

    def num_params(self) -> int:
        """Mixer parameters (no input norm): in_proj, conv (+bias), A_log, D, dt_bias, gated norm, out_proj."""
        return (self.d_model * self.in_proj_dim + self.conv_dim * (self.d_conv + 1)
                + 3 * self.nheads + self.d_inner + self.d_inner * self.d_model)

    def matmul_params(self) -> int:
        """The weights every token's projections multiply (FLOP accounting): in_proj and out_proj."""
        return self.d_model * self.in_proj_dim + self.d_inner * self.d_model


def default_mamba_groups(hidden_size: int) -> int:
    """``MAMBA_GROUPS`` (8), reduced to a divisor of the head count for small models."""
    nheads = MAMBA_EXPAND * hidden_size // MAMBA_HEAD_DIM
    return math.gcd(MAMBA_GROUPS, max(nheads, 1))


def mamba_dims(hidden_size: int, *, d_state: int = MAMBA_STATE) -> MambaDims:
    """The ``M`` mixer of a model with ``hidden_size`` (and SSM state size ``d_state``, a preset's
    ``mamba_state_dim``) built by this package's runtime."""
    if (MAMBA_EXPAND * hidden_size) % MAMBA_HEAD_DIM:
        raise ValueError(
            f"Mamba mixer: expand*hidden_size={MAMBA_EXPAND * hidden_size} is not a multiple of "
            f"the head dim {MAMBA_HEAD_DIM}; use a hidden_size that is a multiple of "
            f"{MAMBA_HEAD_DIM // math.gcd(MAMBA_HEAD_DIM, MAMBA_EXPAND)}"
        )
    return MambaDims(d_model=hidden_size, nheads=MAMBA_EXPAND * hidden_size // MAMBA_HEAD_DIM,
                     d_state=d_state, ngroups=default_mamba_groups(hidden_size))


def mamba_dims_from_config(config: Any) -> MambaDims:
    """The ``M`` mixer sizes a ``TransformerConfig`` asks for (its ``mamba_*`` fields), as MambaMixer reads them."""
    head_dim = config.mamba_head_dim
    if config.mamba_num_heads is not None:
        nheads = config.mamba_num_heads
    else:
        d_inner = MAMBA_EXPAND * config.hidden_size
        if d_inner % head_dim:
            raise ValueError(
                f"Mamba mixer: d_inner={d_inner} (expand {MAMBA_EXPAND} x hidden_size "
                f"{config.hidden_size}) is not divisible by mamba_head_dim={head_dim}"
            )
        nheads = d_inner // head_dim
    return MambaDims(d_model=config.hidden_size, nheads=nheads, head_dim=head_dim,
                     d_state=config.mamba_state_dim, ngroups=config.mamba_num_groups)


@dataclasses.dataclass(frozen=True, kw_only=True)
class M2RNNDims:
    """Global M2RNN mixer sizes: ``nheads`` heads, each with a ``k_dim x v_dim`` matrix state."""

    d_model: int
    nheads: int
    k_dim: int = M2RNN_K_DIM
    v_dim: int = M2RNN_V_DIM
    d_conv: int = M2RNN_CONV

    def __post_init__(self):
        for name in ("d_model", "nheads", "k_dim", "v_dim", "d_conv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"M2RNNDims.{name} must be an int >= 1, got {value!r}")

    @property
    def qkv_dim(self) -> int:  # per head: q (K), k (K), v (V)
        return 2 * self.k_dim + self.v_dim

    @property
    def head_proj_dim(self) -> int:  # per head: q, k, v and the forget-gate logit
        return self.qkv_dim + 1

    def check_tp(self, tp: int) -> None:
        if self.nheads % tp:
            raise ValueError(
                f"M2RNN mixer: nheads={self.nheads} is not divisible by tensor_model_parallel_size={tp}"
            )

    def num_params(self) -> int:
        """Mixer parameters (no input norm): in_proj, conv (+bias), recurrent W, forget bias, out_proj."""
        h = self.nheads
        return (self.d_model * h * self.head_proj_dim + h * self.qkv_dim * (self.d_conv + 1)
                + h * self.v_dim * self.v_dim + h + h * self.v_dim * self.d_model)

    def matmul_params(self) -> int:
        """The weights every token multiplies (FLOP accounting): in_proj, the per-head ``V x V``
        recurrent weight (applied to the state once per token) and out_proj."""
        h = self.nheads
        return (self.d_model * h * self.head_proj_dim + h * self.v_dim * self.v_dim
                + h * self.v_dim * self.d_model)


def m2rnn_dims(hidden_size: int, num_heads: int) -> M2RNNDims:
    """The ``R`` mixer: one recurrent head per attention head, each with a ``M2RNN_K_DIM x
    M2RNN_V_DIM`` (64 x 16) state. The R builder reads only the TransformerConfig (hidden size and
    heads), so these per-head sizes are package constants, not a per-model setting."""
    return M2RNNDims(d_model=hidden_size, nheads=num_heads)


def mixer_config_kwargs(model: Any) -> dict[str, int]:
    """TransformerConfig fields for the ``M`` mixer of ``model`` (a presets.ModelConfig)."""
    if "M" not in model.pattern:
        return {}
    dims = mamba_dims(model.hidden_size, d_state=model.mamba_state_dim)
    return {"mamba_num_groups": dims.ngroups, "mamba_head_dim": dims.head_dim,
            "mamba_state_dim": dims.d_state}
