"""One layer of the stack over new positions, with its inference state.

The stack holds plain ``TransformerLayer`` modules (or MoD subclasses) whose self-attention slot
holds standard attention, MLA, the Mamba-2 mixer or the M2RNN mixer (``A``/``M``/``R``) and whose
MLP slot holds the MoE or dense MLP (``E``). :func:`plan_layer` tells which, once, and refuses what
has no causal incremental meaning; :func:`run_layer` runs the layer's own norms, projections and
bias-dropout-add around the cached mixer steps of :mod:`.attention` and :mod:`.mixers`:

* ``A``: K/V cache (standard attention) or latent cache (MLA), MoDA's depth K/V of the new
  positions through the step context;
* ``M`` / ``R``: conv window + recurrent state, rolled back by keeping per-position states;
* ``E``: stateless (MoE routing and the MLP are per token); an MoE layer runs without host syncs
  at decode sizes through :mod:`.moe` where its layout allows, else through Megatron's layer.

MoD. A MoD layer's router reads the layer input per token, as in training: ``gateskip`` (soft)
gives ``x + sigmoid(router(x)) * f(x)``; ``threshold`` and ``topk`` with ``inference="causal"``
also skip a token exactly where the per-token rule says so. ``gateskip`` with the hard budget and
``topk`` with ``inference="soft"`` rank tokens against later tokens of the sequence, which a
decoder has not seen: refused.

FlexiDepth. The router reads the layer input per token, as the layer does: ``inference="soft"``
gives ``g * B(x) + (1 - g) * P(x)``, ``"hard"`` gives ``B(x)`` where ``g >= threshold`` and the skip
path ``P(x)`` elsewhere. Where the layer's hard skip gathers its attention (``A`` in
``hard_skip_symbols``: the kept tokens attend to the kept tokens only), the attention cache marks
the positions this layer skipped as invisible to later queries; ``E`` blocks are per token, so
running them on every new position and selecting equals running them on the kept ones. A gathering
``M``/``R`` layer (an opted-in placement) is refused: its recurrence would run over the kept
tokens only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.transformer_layer import TransformerLayer

from megacpp_mcore.features.flexidepth.layer import FlexiDepthLayer
from megacpp_mcore.features.mod import MoDLayer
from megacpp_mcore.features.mod.gate import router_logits
from megacpp_mcore.infer import attention, mixers
from megacpp_mcore.infer.context import StepContext
from megacpp_mcore.infer.moe import plan_moe
from megacpp_mcore.layers.mixers.m2rnn import M2RNNMixer
from megacpp_mcore.layers.mixers.mamba import TorchMambaMixer


class UnsupportedForInference(ValueError):
    """A model part without a causal incremental path (the message names the layer and why)."""


def _is_mamba(mixer) -> bool:
    """The portable mixer, or Megatron's ``MambaMixer`` (te backend; checked without importing
    it, since importing it needs mamba_ssm)."""
    upstream = sys.modules.get("megatron.core.ssm.mamba_mixer")
    return isinstance(mixer, TorchMambaMixer) or (
        upstream is not None and isinstance(mixer, upstream.MambaMixer))


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one layer runs: its mixer kind (``attention``, ``mla``, ``mamba``, ``m2rnn`` or
    ``None``), whether it has an MLP, its MoD rule (``None``, ``soft``, ``mask``, ``causal``), and
    for an MoE layer its sync-free path (:class:`.moe.SyncFreeMoE`) or why it has none."""

    layer: Any
    where: str  # e.g. "layer 3" or "MTP block": for error messages
    mixer: str | None
    has_mlp: bool
    mod: str | None
    moe: Any = None  # SyncFreeMoE, or None: the layer's own mlp forward
    moe_fallback: str | None = None  # why an MoE layer runs through Megatron's layer
    flexi: str | None = None  # FlexiDepth: "soft", "hard", or "gather" (hard, attention on kept only)


def plan_layer(layer, where: str) -> LayerPlan:
    """The :class:`LayerPlan` of ``layer``; :class:`UnsupportedForInference` when it has none."""
    if not isinstance(layer, TransformerLayer):
        raise UnsupportedForInference(f"{where}: {type(layer).__name__} is not a TransformerLayer")
    slot = layer.self_attention
    if isinstance(slot, IdentityOp):
        mixer = None
    elif isinstance(slot, MLASelfAttention):
        mixer = "mla"
    elif isinstance(slot, SelfAttention):
        for flag in ("attention_output_gate", "apply_query_key_layer_scaling"):
            if getattr(layer.config, flag, False):
                raise UnsupportedForInference(f"{where}: {flag}=True is not supported; allowed: False")
        mixer = "attention"
    elif _is_mamba(slot):
        mixer = "mamba"
    elif isinstance(slot, M2RNNMixer):
        mixer = "m2rnn"
    else:
        raise UnsupportedForInference(f"{where}: no inference state for {type(slot).__name__}")
    mod = None
    if isinstance(layer, MoDLayer):
        mode, rule = layer.mod.mode, layer.mod.inference
        allowed = {("gateskip", "soft"): "soft", ("threshold", "soft"): "mask",
                   ("topk", "causal"): "causal"}
        if (mode, rule) not in allowed:
            raise UnsupportedForInference(
                f"{where}: MoD mode {mode!r} with inference={rule!r} ranks a token against later "
                "tokens of the sequence, which decoding has not seen; allowed for generation: "
                "gateskip (soft), threshold, topk with inference='causal'")
        mod = allowed[(mode, rule)]
    flexi = None
    if isinstance(layer, FlexiDepthLayer):
        flexi = layer.fd.inference
        if flexi == "hard" and layer.hard_skip_capacity is not None:
            raise UnsupportedForInference(
                f"{where}: FlexiDepth hard_skip_capacity={layer.hard_skip_capacity} sends a kept "
                "token past each sequence's capacity to the skip path, which needs a per-row "
                "count a decoder does not keep; allowed for generation: hard_skip_capacity=None")
        if flexi == "hard" and layer.gathers and mixer is not None:
            if mixer in ("mamba", "m2rnn"):
                raise UnsupportedForInference(
                    f"{where}: FlexiDepth hard skip gathers this {mixer} layer's recurrence over the "
                    "kept tokens only, which a decoder's per-position state cannot follow; allowed "
                    "for generation: hard_skip_symbols without M/R, or inference='soft'")
            flexi = "gather"
    moe, fallback = plan_moe(layer.mlp) if isinstance(layer.mlp, MoELayer) else (None, None)
    return LayerPlan(layer=layer, where=where, mixer=mixer,
                     has_mlp=not isinstance(layer.mlp, IdentityOp), mod=mod, moe=moe,
                     moe_fallback=fallback, flexi=flexi)


def new_state(plan: LayerPlan, batch: int, capacity: int, dtype, device):
    """The layer's empty inference state (``None`` for a stateless layer)."""
    slot = plan.layer.self_attention
    gathers = plan.flexi == "gather"  # the cache tracks which positions later queries may see
    if plan.mixer == "attention":
        return attention.KVCache(slot, batch, capacity, dtype, device, visibility=gathers)
    if plan.mixer == "mla":
        return attention.LatentCache(slot, batch, capacity, dtype, device, visibility=gathers)
    if plan.mixer == "mamba":
        return mixers.new_mamba_state(slot, batch, dtype, device)
    if plan.mixer == "m2rnn":
        return mixers.new_m2rnn_state(slot, batch, dtype, device)
    return None


def _mixer(plan: LayerPlan, hidden, state, ctx: StepContext, rotary, keep: bool, visible=None):
    slot = plan.layer.self_attention
    if plan.mixer == "attention":
        return attention.attention_step(slot, hidden, state, ctx, rotary, visible)
    if plan.mixer == "mla":
        return attention.mla_step(slot, hidden, state, ctx, visible)
    if plan.mixer == "mamba":
        return mixers.mamba_step(slot, hidden, state, ctx, keep)
    return mixers.m2rnn_step(slot, hidden, state, ctx, keep)


def _mod_gate(layer: MoDLayer, rule: str, hidden: torch.Tensor):
    """The gate ``[s, b, 1]`` (activation dtype) and the keep-mask (or None) of a MoD layer,
    per token, from the layer input (as ``MoDLayer.forward`` reads it in eval)."""
    logits = router_logits(hidden, layer.router_weight(), layer.mod_router.bias)  # [s, b, 1] fp32
    gate = torch.sigmoid(logits)
    mask = None
    if rule == "mask":
        mask = gate >= layer.mod.threshold
    elif rule == "causal":
        mask = logits >= 0.0
    return layer._weight(gate).to(hidden.dtype), mask  # _weight: MoD's forced-gate test hook


def _residual(layer, bda_name: str, output_with_bias, residual, gate, mask):
    """The layer's own bias-dropout-add, or MoD's gated residual ``x + g * (out + bias)``."""
    if gate is None:
        bda = getattr(layer, bda_name)(layer.training, layer.config.bias_dropout_fusion)
        return bda(output_with_bias, residual, layer.hidden_dropout)
    out, bias = output_with_bias
    if bias is not None:
        out = out + bias
    mixed = torch.addcmul(residual, out, gate)
    return mixed if mask is None else torch.where(mask, mixed, residual)


def run_layer(plan: LayerPlan, hidden: torch.Tensor, state, ctx: StepContext, *, rotary,
              keep: bool) -> torch.Tensor:
    """The layer over the new positions ``[s, b, h] -> [s, b, h]``, advancing ``state``.

    ``rotary``: the model's RoPE module for standard attention (MLA uses its own);
    ``keep``: recurrent mixers keep per-position states (for a later partial commit)."""
    layer = plan.layer
    gate, mask = _mod_gate(layer, plan.mod, hidden) if plan.mod else (None, None)
    score = kept = skip = None
    if plan.flexi:  # the layer's own route, as its eval forward takes it (no usage bookkeeping)
        score, kept, skip = layer.route(hidden, bookkeeping=False)
    visible = kept[..., 0] if plan.flexi == "gather" else None  # [s, b]: keys later tokens may see
    if plan.mixer is not None:
        out = _mixer(plan, layer.input_layernorm(hidden), state, ctx, rotary, keep, visible)
        hidden = _residual(layer, "self_attn_bda", out, hidden, gate, mask)
    if plan.has_mlp:
        mlp = layer.mlp if plan.moe is None else plan.moe
        routing = layer.experts_for(kept) if plan.flexi == "hard" else contextlib.nullcontext()
        with routing:  # FlexiDepth hard_skip_moe="route": skipped tokens take no routed expert
            out = mlp(layer.pre_mlp_layernorm(hidden))
        hidden = _residual(layer, "mlp_bda", out, hidden, gate, mask)
    if plan.flexi == "soft":
        g = score.to(hidden.dtype)
        return torch.addcmul(hidden * g, skip, 1.0 - g)  # g B(x) + (1 - g) P(x)
    if plan.flexi:
        return torch.where(kept, hidden, skip)
    return hidden
