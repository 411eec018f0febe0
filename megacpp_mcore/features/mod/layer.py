"""Mixture-of-Depths (MoD): a per-token router decides how much a token pays for a layer.

:func:`mod_layer_spec` wraps the spec of an ``A``/``E`` layer (``M``/``R`` only when the placement
opts in) into :class:`MoDLayer`, a subclass of the wrapped ``TransformerLayer`` class built from
the very same submodules (upstream parameter names are kept; the router adds ``mod_router.*``).
The router is a replicated ``Linear(h, 1)`` read on the layer INPUT (pre-norm), in fp32.

Modes (``MoDConfig.mode``):

* ``gateskip`` (default): every token goes through the block; the gate ``g = sigmoid(router)``
  scales the block's residual contribution, ``y = x + g * f(x)``. A sparsity loss
  ``w_s * relu(mean(g) - budget)^2`` pushes the gate mass under a token budget that decays
  linearly over training (``budget_start -> budget_end`` over ``budget_steps``, driven by
  ``megacpp_set_step``). ``inference="hard"`` (eval only) keeps, per sequence, the
  ``ceil(budget * T)`` highest-gate tokens and lets the others pass through exactly: the budget
  training wrote is the budget inference reads.
* ``threshold``: tokens with ``g < threshold`` skip the block (``torch.where`` on a mask: static
  shapes, the block still runs on all tokens); processed tokens get ``x + g * f(x)``.
* ``topk`` (original MoD): per sequence, the ``ceil(capacity * T)`` tokens with the highest router
  logits are gathered (in sequence order, so the causal mask stays right), processed, weighted by
  ``g`` so the router learns, and scattered back; unselected tokens pass through exactly. An
  auxiliary BCE loss teaches ``sigmoid(router) > 0.5`` to predict the top-k choice, so
  ``inference="causal"`` (eval) can decide per token without looking at future tokens.

The gate is applied inside the wrapped layer's bias-dropout-add (the residual seam), so a gate of
exactly 1 reproduces the unwrapped layer bit for bit. Forward has static shapes (``topk``'s ``k``
follows from the sequence length) and no host synchronisation; statistics stay on device until
``megacpp_stats()`` is called after the step.

Parallelism. Router weights are replicated (``tensor_model_parallel=False``). Without sequence
parallelism every TP rank sees the full sequence and computes identical routes. With SP:
``gateskip``/``threshold`` route each token on the rank that owns it (a per-token decision needs
nothing else), so the router's gradient is partial per rank and its parameters are flagged
``sequence_parallel`` (``finalize_model_grads`` all-reduces them over TP); the gate mean of the
sparsity loss is all-reduced over TP. ``topk`` needs the whole sequence to rank tokens: it
all-gathers the hidden states, routes on the full sequence (identical on all TP ranks, router NOT
flagged), splits the ``k`` selected tokens over the TP ranks for the wrapped block
(``k`` is rounded up to a multiple of the TP size) and gathers them back.

Side contracts of the wrapped block. MoE auxiliary losses are attached inside the block and keep
flowing (the block output is always part of the graph). MoDA depth pushes happen inside the wrapped
attention: in ``gateskip``/``threshold`` the wrapped layer runs on every position, so a push covers
all positions (:attr:`MoDLayer.attention_sees_all_positions` is True). In ``topk`` the wrapped
attention only sees the ``k`` selected positions, so a depth push from inside it would cover those
only; :func:`mod_layer_spec` therefore refuses ``topk`` on a layer that also carries MoDA.

In ``topk`` an ``E`` layer's MoE router (and its load-balancing loss) sees the selected tokens only.

Extra losses ride on the gate's own backward (:class:`_SparsityGate`, :class:`_FusedGateSkip`, :class:`_TopkRouteIn`:
custom autograd functions that add the loss gradient where the gate's gradient is formed), so the gate is
the one control surface of LM loss, sparsity loss and router loss, and no separate loss graph (mean,
relu, square, auto-scaler on the layer output) costs kernel launches. Their scale is
:class:`MoDLossAutoScaler`'s (Megatron's aux-loss contract); ``runtime.train_step`` sets it to
``1 / num_microbatches`` like the schedule does for MoE. Under a stock ``pretrain_gpt.py`` loop nobody
sets it, so the scale stays 1 and the MoD loss weights act per micro-batch (effectively
``num_microbatches`` times larger relative to the LM loss). Loss VALUES are computed lazily from
the recorded gate means / router logits when ``megacpp_stats()`` is called.

Performance. A gateskip layer with one residual seam (every split ``A``/``E`` layer) reads its
router AT the seam, where the layer input is also the residual: :class:`_FusedGateSkip` computes
``y = x + sigmoid(x . w + b) * out`` and, in backward, folds the router's input gradient into the
residual gradient; on CUDA both directions are single Triton kernels (:mod:`megacpp_mcore.features.mod.kernels`),
elsewhere the same math runs as torch ops. Other gateskip cases (forced gate, hard-budget eval,
dropout, two seams) and ``threshold`` read the router before the block and apply the gate with one
``addcmul`` in the bias-dropout-add. A topk layer's attention and MLP run on the ``k`` gathered
tokens only; :class:`_TopkRouteIn`/:class:`_TopkRouteOut` write the layer's whole input gradient in
one pass (Triton router GEMV and backward on CUDA); the gate and the router's auxiliary loss
come out of / ride on that same function. Its attention (:class:`TokenRopeAttention`) applies the
gathered tokens' RoPE as a flat ``[k*b]`` sequence, so TE's fused RoPE kernel runs on top-k layers
too. A top-k layer's GPU work is small enough that its host time (Megatron's layer code plus the
routing, a few ms per layer) exceeds it: where no dense layer before it has built the host a lead
(block 0 routed, at the start of a step), the GPU waits (see ``docs/benchmarks.md``).
With Transformer Engine, attention layers of two shapes (topk and dense) alternate, and TE's
process-wide one-entry backend-selection cache then re-runs its CPU-side selection on every call;
``patches.te_attention_backend_per_layer`` gives each attention layer its own cache entry
(``scripts/bench_mod.py`` applies it and counts selections).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import get_data_parallel_rng_tracker_name
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megacpp_mcore.spec.context import LayerContext
from megacpp_mcore.spec.pattern import FEATURE_RULES, SYMBOLS, FeaturePlacement

MODES = ("gateskip", "threshold", "topk")
# Eval-time behaviour per mode; the first entry is the default ("soft" = same as training).
INFERENCE_MODES = {"gateskip": ("soft", "hard"), "threshold": ("soft",), "topk": ("soft", "causal")}


def _number(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoDConfig:
    """Mixture-of-Depths routing for the layers chosen by ``placement``.

    Args:
        mode: ``gateskip`` | ``threshold`` | ``topk``.
        capacity: ``topk`` only: fraction of each sequence's tokens that pay for the layer, (0, 1].
        threshold: ``threshold`` mode: a token is processed when ``sigmoid(router) >= threshold``.
        router_init_std: std of the router weight's normal init.
        router_bias_init: router bias init; ``sigmoid(2) = 0.88``, so training starts near dense.
        sparsity_loss_weight: weight of ``relu(mean(gate) - budget)^2`` (gateskip, threshold).
        router_aux_loss_weight: weight of the topk router's BCE against its own top-k choice.
        budget_start, budget_end, budget_steps: token budget, linear from start to end over
            ``budget_steps`` training steps, then constant (``budget_steps=0``: always ``end``).
        inference: eval-time routing: gateskip ``soft``|``hard``; topk ``soft``|``causal``;
            threshold ``soft``.
        placement: which layers are wrapped (symbol class and/or 0-based indices).
        allow_on: opt-in symbols MoD refuses by default (``M``, ``R``); merged into ``placement``.
    """

    mode: str = "gateskip"
    capacity: float = 0.125
    threshold: float = 0.5
    router_init_std: float = 0.02
    router_bias_init: float = 2.0
    sparsity_loss_weight: float = 1e-2
    router_aux_loss_weight: float = 1e-2
    budget_start: float = 1.0
    budget_end: float = 0.8
    budget_steps: int = 1000
    inference: str = "soft"
    placement: FeaturePlacement = FeaturePlacement(symbols="AE")
    allow_on: str = ""

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
        for name in ("budget_start", "budget_end"):
            value = _number(owner, name, getattr(self, name))
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{owner}.{name}={value!r} is out of range; allowed: 0 < budget <= 1")
        steps = self.budget_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{owner}.budget_steps must be an int >= 0, got {steps!r}")
        allowed = INFERENCE_MODES[self.mode]
        if self.inference not in allowed:
            raise ValueError(
                f"{owner}.inference={self.inference!r} is not available in mode {self.mode!r}; "
                f"allowed: {', '.join(allowed)}"
            )
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

    def budget(self, step: int) -> float:
        """Token budget at training ``step``: linear from ``budget_start`` to ``budget_end``."""
        if self.budget_steps == 0:
            return float(self.budget_end)
        frac = min(max(step, 0), self.budget_steps) / self.budget_steps
        return float(self.budget_start + (self.budget_end - self.budget_start) * frac)

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


class MoDLossAutoScaler(torch.autograd.Function):
    """Identity on an activation whose backward also feeds ``d loss = scale`` into an extra loss.

    Same contract as Megatron's ``MoEAuxLossAutoScaler``; the scale (``1 / num_microbatches`` for a
    per-micro-batch mean LM loss) is set by the training step through :meth:`set_loss_scale`.
    """

    main_loss_backward_scale: float | torch.Tensor = 1.0

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(loss) * MoDLossAutoScaler.main_loss_backward_scale

    @staticmethod
    def set_loss_scale(scale: float | torch.Tensor) -> None:
        MoDLossAutoScaler.main_loss_backward_scale = scale


def _loss_scale():
    return MoDLossAutoScaler.main_loss_backward_scale


def _router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., h] -> [..., 1]`` router logits in ``dtype``: the GEMV runs in the activation dtype
    with fp32 accumulation (an fp32 copy of the activations would cost more than the router)."""
    return F.linear(x, weight.to(x.dtype), bias.to(x.dtype)).to(dtype)


def _gate_mean(gate: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """Mean gate over the whole sequence and the token count it covers; ``group``: the TP group
    whose SP shards make up the sequence (all-reduced over it), or ``None``."""
    mean = gate.mean()  # one reduction kernel (sum and divide fused)
    count = gate.numel()
    if group is not None:
        torch.distributed.all_reduce(mean, group=group)
        mean.div_(group.size())
        count *= group.size()
    return mean, count


def _sparsity_pressure(mean: torch.Tensor, budget: float) -> tuple[torch.Tensor, float]:
    """``relu(mean - budget)`` (0-d) and the float factor to scale it by, the MoD loss scale
    (:class:`MoDLossAutoScaler`) applied: a tensor scale is multiplied in, a float one returned."""
    excess = (mean - budget).clamp_min(0.0)
    scale = _loss_scale()
    if isinstance(scale, torch.Tensor):
        return excess * scale.to(excess), 1.0
    return excess, scale


class _SparsityGate(torch.autograd.Function):
    """``gate = sigmoid(logits)`` whose backward also carries the sparsity loss.

    ``L = w * relu(mean(gate) - budget)^2`` over the whole sequence (``group``: the TP group whose
    SP shards make it up, or ``None``) has ``dL/dgate_i = 2 w relu(mean - budget) / N``, times the
    MoD loss scale (:class:`MoDLossAutoScaler`'s contract). Folding it into the gate's backward
    keeps one control surface (the gate) at the cost of a few scalar kernels, where the loss as a
    separate graph (mean, relu, square, auto-scaler on the layer output) cost a dozen launches per
    layer in forward and backward. Returns ``(gate, mean)``; ``mean`` is detached (statistics).
    """

    @staticmethod
    def forward(ctx, logits, loss_weight: float, budget: float, group):
        ctx.set_materialize_grads(False)  # no zeros kernel for the (statistics-only) mean's grad
        gate = torch.sigmoid(logits)
        mean, count = _gate_mean(gate, group)
        ctx.save_for_backward(gate, mean)
        ctx.coef, ctx.budget = 2.0 * loss_weight / count, budget
        ctx.mark_non_differentiable(mean)
        return gate, mean

    @staticmethod
    def backward(ctx, grad_gate, _grad_mean):
        gate, mean = ctx.saved_tensors
        excess, scale = _sparsity_pressure(mean, ctx.budget)
        alpha = ctx.coef * scale
        if grad_gate is None:
            grad = (excess * alpha).expand_as(gate)
        else:  # the loss gradient's scale rides on the add (one kernel, no separate multiply)
            grad = torch.add(grad_gate, excess, alpha=alpha)
        return torch.ops.aten.sigmoid_backward(grad, gate), None, None, None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16/32-bit activations, fp64 for fp64 (gates, router logits and their gradients)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def _triton_importable() -> bool:
    try:
        from megacpp_mcore.features.mod import kernels as mod_triton  # noqa: F401
    except Exception:  # no Triton on this host: the torch formulation runs
        return False
    return True


def _use_triton(x: torch.Tensor) -> bool:
    """The Triton kernels of :class:`_FusedGateSkip` run on CUDA tensors (``MEGACPP_MOD_TRITON=0``
    forces the torch formulation, for A/B measurements)."""
    if not x.is_cuda or os.environ.get("MEGACPP_MOD_TRITON", "1") == "0" or not _triton_importable():
        return False
    from megacpp_mcore.features.mod import kernels as mod_triton

    return mod_triton.supported(x)


class _FusedGateSkip(torch.autograd.Function):
    """The gateskip residual with its router read at the seam:
    ``y = x + sigmoid(x . w + b) * out``, where ``x`` is the layer input (the residual AND the
    router's input) and ``out`` the block output.

    The sparsity loss rides on the gate's backward exactly as in :class:`_SparsityGate`
    (``dL/dg_i = 2 w relu(mean(g) - budget) / N`` times the MoD loss scale; ``group``: the TP group
    whose SP shards make up the sequence). On CUDA the whole thing is two Triton kernels
    (:mod:`megacpp_mcore.features.mod.kernels`): forward reads ``x`` and ``out`` once, backward folds the
    router's input gradient into the residual gradient; elsewhere the same math runs as torch ops
    (the reference the kernels are tested against). Returns ``(y, mean(g))``; the mean is detached.
    """

    @staticmethod
    def forward(ctx, x, out, weight, bias, loss_weight: float, budget: float, group, use_triton: bool):
        ctx.set_materialize_grads(False)
        hidden = x.shape[-1]
        x2, o2 = x.reshape(-1, hidden), out.reshape(-1, hidden)
        if use_triton:
            from megacpp_mcore.features.mod import kernels as mod_triton

            x2, o2 = x2.contiguous(), o2.contiguous()
            y, gate = mod_triton.gate_forward(x2, o2, weight.reshape(-1), bias.reshape(-1))
        else:  # the unfused formulation (same ops as the router + addcmul path), >= fp32 gates
            gate = torch.sigmoid(_router_logits(x2, weight, bias, _accumulation_dtype(x2.dtype))).squeeze(-1)
            y = torch.addcmul(x2, o2, gate.unsqueeze(-1).to(x2.dtype))
        mean, count = _gate_mean(gate, group)
        ctx.save_for_backward(x2, o2, weight, gate, mean)
        ctx.coef, ctx.budget, ctx.use_triton = 2.0 * loss_weight / count, budget, use_triton
        ctx.shapes, ctx.bias_dtype = (x.shape, out.shape, bias.shape), bias.dtype
        ctx.mark_non_differentiable(mean)
        return y.view(x.shape), mean

    @staticmethod
    def backward(ctx, grad_y, _grad_mean):
        x2, o2, weight, gate, mean = ctx.saved_tensors
        x_shape, out_shape, bias_shape = ctx.shapes
        if grad_y is None:
            grad_y = torch.zeros_like(x2)
        dy = grad_y.reshape(-1, x2.shape[-1])
        excess, scale = _sparsity_pressure(mean, ctx.budget)
        extra = excess * (ctx.coef * scale)
        if ctx.use_triton:
            from megacpp_mcore.features.mod import kernels as mod_triton

            dx, dout, dweight, dbias = mod_triton.gate_backward(dy.contiguous(), x2, o2, weight.reshape(-1),
                                                                gate, extra.float())
        else:
            acc = gate.dtype
            dout = dy * gate.unsqueeze(-1).to(dy.dtype)
            dgate = (dy * o2).to(acc).sum(-1) + extra
            dlogit = torch.ops.aten.sigmoid_backward(dgate, gate)  # [N], >= fp32
            # dx = dy + dlogit (x) w, the router's input gradient folded into the residual's
            dx = torch.addmm(dy.to(acc), dlogit.unsqueeze(-1), weight.to(acc)).to(dy.dtype)
            dweight, dbias = dlogit @ x2.to(acc), dlogit.sum()
        return (dx.view(x_shape), dout.view(out_shape), dweight.view_as(weight).to(weight.dtype),
                dbias.view(bias_shape).to(ctx.bias_dtype), None, None, None, None)


class _TopkHandoff:
    """Carries the output gradient from :class:`_TopkRouteOut`'s backward (which runs first) to
    :class:`_TopkRouteIn`'s, so the input gradient is formed in one pass (see there)."""

    __slots__ = ("dy",)

    def __init__(self):
        self.dy = None


class _TopkRouteIn(torch.autograd.Function):
    """Top-k routing of ``x [s, b, h]``. Returns the gathered tokens ``[k, b, h]``, their gates
    ``sigmoid(logit)`` ``[k, b, 1]`` in ``x.dtype``, the ``k`` positions per sequence ``[k, b]`` in
    sequence order (the causal mask stays right) and the router logits ``[s, b, 1]`` (fp32, for
    the statistics; not differentiable).

    The router's auxiliary loss ``aux_weight * mean(BCE(logit, onehot(idx)))`` over every position
    rides on the backward (``dL/dlogit = c (sigmoid(logit) - onehot)`` with ``c = aux_weight / N``
    times the MoD loss scale); its value is computed lazily for the statistics
    (:meth:`MoDLayer.megacpp_stats`).

    Backward forms the WHOLE input gradient of the routed layer in one pass over ``[s, b, h]``:
    ``dx = dy`` on the rows that were not selected (the pass-through of :class:`_TopkRouteOut`,
    whose own backward returns no ``x`` gradient and hands ``dy`` over), the block's gradient
    ``dselected`` on the selected rows, plus the router's ``dlogit * w`` everywhere, with ``dlogit``
    (gate gradient on the selected rows, the BCE term everywhere) formed in the same pass, and the
    router's weight gradient. Unfused, autograd spent a zeros + scatter-add (gather), a copy with
    zeroed rows (scatter), an outer-product GEMM (router), two full-size accumulations on it and a
    handful of ``[s, b]`` ops for the gate. On CUDA the router GEMV and this pass are Triton
    kernels (:mod:`megacpp_mcore.features.mod.kernels`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, k: int, aux_weight: float, handoff: _TopkHandoff, use_triton: bool):
        seq, batch, hidden = x.shape
        if use_triton:
            from megacpp_mcore.features.mod import kernels as mod_triton

            logits = mod_triton.router_logits(x.reshape(-1, hidden).contiguous(), weight.reshape(-1),
                                              bias.reshape(-1), batch)  # [b, s] contiguous
        else:
            logits = _router_logits(x, weight, bias, _accumulation_dtype(x.dtype)).view(seq, batch).t()
        # the k positions of each sequence in sequence order (topk's own value sort would be thrown
        # away); along the last dim, which the kernel made contiguous: no transposing copies
        idx = logits.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # [b, k]
        gate = torch.sigmoid(logits.gather(1, idx))  # [b, k], >= fp32
        idx = idx.t()  # [k, b] (a view)
        selected = x.gather(0, idx.unsqueeze(-1).expand(-1, -1, hidden))
        ctx.save_for_backward(x, weight, idx, logits, gate)
        ctx.aux_weight, ctx.handoff, ctx.use_triton = aux_weight, handoff, use_triton
        ctx.bias_shape, ctx.bias_dtype = bias.shape, bias.dtype
        logits = logits.t().unsqueeze(-1)  # [s, b, 1] (a view)
        ctx.mark_non_differentiable(idx, logits)
        ctx.set_materialize_grads(False)
        return selected, gate.t().unsqueeze(-1).to(x.dtype), idx, logits

    @staticmethod
    def backward(ctx, dselected, dgate, _didx, _dlogits):
        x, weight, idx, logits, gate = ctx.saved_tensors  # logits, gate: [b, s], [b, k]
        dy, ctx.handoff.dy = ctx.handoff.dy, None
        seq, batch, hidden = x.shape
        k = idx.shape[0]
        coef = ctx.aux_weight * _loss_scale() / logits.numel() if ctx.aux_weight else 0.0
        if isinstance(coef, torch.Tensor):
            coef = coef.to(logits)
        if ctx.use_triton:
            from megacpp_mcore.features.mod import kernels as mod_triton

            pos = torch.full((seq, batch), -1, device=x.device, dtype=torch.int32).scatter_(
                0, idx, _arange(k * batch, x.device).view(k, batch))
            dx, dweight, dbias = mod_triton.topk_backward(
                None if dy is None else dy.reshape(-1, hidden).contiguous(),
                None if dselected is None else dselected.reshape(-1, hidden).contiguous(),
                None if dgate is None else dgate.reshape(-1).contiguous(),
                pos.view(-1), x.reshape(-1, hidden), weight.reshape(-1), logits, coef)
            dx = dx.view(seq, batch, hidden)
        else:
            acc, logits, gate = logits.dtype, logits.t(), gate.t()  # [s, b], [k, b]
            # dlogit: the BCE term c * sigmoid(logit) everywhere, minus c and plus the gate's
            # gradient on the selected positions
            dsel = (torch.zeros_like(gate) if dgate is None
                    else torch.ops.aten.sigmoid_backward(dgate.reshape(k, batch).to(acc), gate))
            if ctx.aux_weight:
                dl = (torch.sigmoid(logits) * coef).scatter_add_(0, idx, dsel - coef)
            else:
                dl = torch.zeros_like(logits).scatter_(0, idx, dsel)  # [s, b]
            w = weight.reshape(-1).to(acc)
            dx = dl.unsqueeze(-1) * w if dy is None else torch.addcmul(dy.to(acc), dl.unsqueeze(-1), w)
            sel = dl.gather(0, idx).unsqueeze(-1)  # selected rows: no pass-through
            sel = sel * w if dselected is None else torch.addcmul(dselected.to(acc), sel, w)
            dx = dx.scatter(0, idx.unsqueeze(-1).expand(-1, -1, hidden), sel).to(x.dtype)
            dweight, dbias = dl.reshape(-1) @ x.reshape(-1, hidden).to(acc), dl.sum()
        return (dx if ctx.needs_input_grad[0] else None, dweight.view_as(weight).to(weight.dtype),
                dbias.view(ctx.bias_shape).to(ctx.bias_dtype), None, None, None, None)


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` int32 on ``device``, cached (one op fewer per top-k backward)."""
    return torch.arange(n, device=device, dtype=torch.int32)


class _TopkRouteOut(torch.autograd.Function):
    """``x`` with the selected rows replaced by the processed tokens. Its backward gives the
    processed tokens their rows of ``dy`` and hands ``dy`` to :class:`_TopkRouteIn` (which forms
    the input gradient) instead of returning a copy of ``dy`` with the selected rows zeroed."""

    @staticmethod
    def forward(ctx, x, processed, idx, handoff: _TopkHandoff):
        idx_h = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        ctx.save_for_backward(idx)
        ctx.handoff = handoff
        return x.scatter(0, idx_h, processed)

    @staticmethod
    def backward(ctx, dy):
        (idx,) = ctx.saved_tensors
        ctx.handoff.dy = dy
        dprocessed = dy.gather(0, idx.unsqueeze(-1).expand(-1, -1, dy.shape[-1]))
        return None, dprocessed, None, None


@dataclasses.dataclass
class _Route:
    """What the gated bias-dropout-add of the current forward applies."""

    weight: torch.Tensor | None  # [s, b, 1] in the activation dtype: scales the block's contribution
    mask: torch.Tensor | None = None  # [s, b, 1] bool: False -> the token passes through exactly
    # Fused gateskip (weight None): the layer input, read by the router at the residual seam.
    router_input: torch.Tensor | None = None


class MoDLayer(TransformerLayer):
    """A ``TransformerLayer`` (or subclass) whose residual contributions are routed per token.

    Built by :func:`mod_layer_spec` from the wrapped spec's submodules plus ``mod=MoDConfig``.
    Exposes ``megacpp_set_step(step)`` (budget schedule) and ``megacpp_stats()`` (per-layer
    fraction processed, gate mean, loss terms, budget; averaged over the forwards since the last
    ``megacpp_set_step``).
    """

    def __init__(self, config, submodules, layer_number: int = 1, *, mod: MoDConfig, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        self.mod = mod
        if mod.mode == "topk" and config.fused_single_qkv_rope:
            raise ValueError(
                f"MoD topk on layer {self.layer_number}: gathered tokens carry per-token rotary "
                "embeddings [k, b, 1, d], which the fused single-QKV RoPE kernel does not take; "
                "set fused_single_qkv_rope=False (apply_rope_fusion is fine)"
            )
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.mod_router = torch.nn.Linear(config.hidden_size, 1, bias=True, device=device,
                                          dtype=config.params_dtype)
        self._init_router()
        for param in self.mod_router.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
            # Per-token routing on the local SP shard gives partial gradients per TP rank; topk
            # routes on the gathered sequence, identically on every rank (full gradients).
            param.sequence_parallel = bool(config.sequence_parallel and mod.mode != "topk")
        gated = 0
        for name in ("self_attn_bda", "mlp_bda"):
            bda = getattr(self, name)
            if not isinstance(bda, IdentityFuncOp):  # identity slots carry no contribution
                setattr(self, name, functools.partial(self._gated_bda, bda))
                gated += 1
        if not gated:
            raise ValueError(
                f"MoD on layer {self.layer_number}: the wrapped layer has no residual sub-layer "
                "(both bias-dropout-add slots are identity), so there is nothing to route"
            )
        self._gated_sites = gated
        self._route: _Route | None = None
        self._forced_gate: float | None = None
        self._budget = mod.budget(0)
        self._stats: dict[str, tuple] = {}  # name -> (running sum, count), on device
        self._pending: dict[str, list] = {}  # name -> recorded tensors not yet folded

    def _init_router(self) -> None:
        weight, bias = self.mod_router.weight, self.mod_router.bias
        with torch.no_grad():
            bias.fill_(self.mod.router_bias_init)
            if not self.config.perform_initialization:
                return
            tracker = tensor_parallel.get_cuda_rng_tracker()
            if tracker.is_initialized():  # same stream on every TP rank: replicated weights agree
                with tracker.fork(get_data_parallel_rng_tracker_name()):
                    weight.normal_(0.0, self.mod.router_init_std)
            else:
                weight.normal_(0.0, self.mod.router_init_std)

    # ----------------------------------------------------------------------------- public hooks
    @property
    def attention_sees_all_positions(self) -> bool:
        """True when, in training, the wrapped attention runs on every position (so MoDA depth
        pushes cover all positions): gateskip/threshold see the full ``[s, b, h]`` sequence; topk
        only the ``k`` selected tokens (unless capacity is 1). See :meth:`_run_inner`."""
        return self.mod.mode != "topk" or self.mod.capacity == 1.0

    def force_gate(self, value: float | None) -> None:
        """Ablation/test hook: use a constant gate ``value`` instead of ``sigmoid(router)``
        (routing decisions still come from the router); ``None`` restores the learned gate."""
        self._forced_gate = None if value is None else float(value)

    def megacpp_set_step(self, step: int) -> None:
        """Sets the budget for training ``step`` and starts a new statistics window."""
        self._budget = self.mod.budget(step)
        self._stats, self._pending = {}, {}

    def megacpp_stats(self) -> dict[str, float]:
        """Means since the last ``megacpp_set_step``: fraction processed, gate mean, losses."""
        for name in list(self._pending):
            self._fold(name)
        out = {name: float(total) / count for name, (total, count) in self._stats.items()}
        out["budget"] = self._budget
        return out

    @property
    def budget(self) -> float:
        return self._budget

    # ---------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.mod.mode == "topk" and not (not self.training and self.mod.inference == "causal"):
            return self._forward_topk(hidden_states, *args, **kwargs)
        if self._fused_gateskip():
            # the router runs at the residual seam (_gated_bda -> _FusedGateSkip), where the gate
            # is needed: one fused op instead of router GEMV + gate ops + addcmul
            self._route = _Route(weight=None, router_input=hidden_states)
            try:
                output, context = super().forward(hidden_states, *args, **kwargs)
            finally:
                self._route = None
            self._record("fraction_processed", 1.0)
            return output, context
        logits, gate = self._gate(hidden_states)
        sharded = self.config.sequence_parallel
        mask = None
        if self.mod.mode == "threshold":
            mask = gate.detach() >= self.mod.threshold
        elif self.mod.mode == "topk":  # eval, causal: the per-token predictor trained by the BCE
            mask = logits.detach() >= 0.0
        elif not self.training and self.mod.inference == "hard":
            mask = self._budget_mask(gate.detach())
        output, context = self._run_inner(hidden_states, self._weight(gate), mask, *args, **kwargs)
        fraction = 1.0 if mask is None else self._global_mean(mask.float(), sharded)
        self._record("fraction_processed", fraction)
        return output, context

    def _fused_gateskip(self) -> bool:
        """gateskip with the learned gate, no hard budget mask, one residual seam and no dropout
        (every layer of a split ``A``/``E`` stack) takes :class:`_FusedGateSkip`."""
        return (self.mod.mode == "gateskip" and self._forced_gate is None and self._gated_sites == 1
                and (self.training or self.mod.inference == "soft")
                and (self.config.hidden_dropout == 0.0 or not self.training))

    def _gate(self, hidden_states: torch.Tensor):
        """Router logits ``[s, b, 1]`` (fp32) and the gate, its mean recorded; in training the
        sparsity loss rides on the gate's backward (:class:`_SparsityGate`)."""
        logits = _router_logits(hidden_states, self.mod_router.weight, self.mod_router.bias)  # [s, b, 1]
        sharded = self.config.sequence_parallel
        if self.training and torch.is_grad_enabled() and self.mod.sparsity_loss_weight > 0:
            group = self.tp_group if sharded else None
            gate, gate_mean = _SparsityGate.apply(logits, self.mod.sparsity_loss_weight,
                                                  self._budget, group)
        else:
            gate = torch.sigmoid(logits)
            gate_mean = self._global_mean(gate.detach(), sharded)
        self._record("gate_mean", gate_mean)
        return logits, gate

    def _weight(self, gate: torch.Tensor) -> torch.Tensor:
        """The gate that scales the block's contribution (``force_gate`` overrides its value; the
        product with 0 keeps the gate in the graph so the losses riding on its backward flow)."""
        if self._forced_gate is not None:
            return gate * 0.0 + self._forced_gate
        return gate

    def _run_inner(self, hidden_states, weight, mask, *args, **kwargs):
        """The wrapped layer's forward with ``weight``/``mask`` applied at its residual seam.

        MoDA seam: this is the only place the wrapped layer (its attention, and any depth K/V push
        made from inside it) runs. gateskip/threshold pass every position here; topk passes the
        gathered ``k`` tokens, which is why topk is refused on MoDA layers.
        """
        if weight.dtype != hidden_states.dtype:
            weight = weight.to(hidden_states.dtype)
        self._route = _Route(weight=weight, mask=mask)
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self._route = None

    def _gated_bda(self, bda_factory, training: bool, fused: bool):
        """Replaces ``self_attn_bda``/``mlp_bda``: ``residual + weight * (out + bias)``, masked."""
        bda = bda_factory(training, fused)

        def gated(x_with_bias, residual, prob):
            route = self._route
            if route is None:
                raise RuntimeError("MoDLayer bias-dropout-add called outside MoDLayer.forward")
            out, bias = x_with_bias
            if route.weight is None:  # fused gateskip (see forward)
                if (bias is None and residual is route.router_input and out.dtype == residual.dtype
                        and out.shape == residual.shape and (prob == 0.0 or not training)):
                    return self._fused_gate(residual, out)
                route.weight = self._weight(self._gate(route.router_input)[1]).to(residual.dtype)
            if bias is not None:
                out = out + bias
            if (prob == 0.0 or not training) and out.dtype == residual.dtype:  # no dropout:
                # one fused op (a custom backward skipping addcmul's scaled copies measured no
                # better on host-bound steps: the Python Function costs what the kernels save)
                mixed = torch.addcmul(residual, out, route.weight)
            else:
                mixed = bda((out * route.weight, None), residual, prob)  # [s, b, h]
            if route.mask is not None:
                mixed = torch.where(route.mask, mixed, residual)
            return mixed

        return gated

    def _fused_gate(self, residual: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        sharded = self.config.sequence_parallel
        with_loss = self.training and torch.is_grad_enabled() and self.mod.sparsity_loss_weight > 0
        router = self.mod_router
        mixed, gate_mean = _FusedGateSkip.apply(
            residual, out, router.weight, router.bias,
            self.mod.sparsity_loss_weight if with_loss else 0.0, self._budget,
            self.tp_group if sharded else None, _use_triton(residual))
        self._record("gate_mean", gate_mean)
        return mixed

    # ------------------------------------------------------------------------------ topk path
    def _forward_topk(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("MoD topk layers take the layer inputs as keywords (as TransformerBlock passes them)")
        for name in ("attention_mask", "packed_seq_params", "inference_context", "rotary_pos_cos",
                     "rotary_pos_sin", "rotary_pos_cos_sin", "attention_bias", "padding_mask",
                     "context", "sequence_len_offset"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"MoD topk on layer {self.layer_number} cannot gather {name!r} per token; it "
                    "supports causal self-attention with rotary_pos_emb (no explicit mask, no "
                    "packed sequences, no inference cache)"
                )
        sp = self.config.sequence_parallel
        group = self.tp_group
        x = hidden_states  # [s/tp, b, h] under SP, else [s, b, h]
        full = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=group) if sp else x
        seq = full.shape[0]
        k = self.mod.topk_count(seq, group.size() if sp else 1)
        handoff = _TopkHandoff()
        router = self.mod_router
        # logits [s, b, 1] fp32 and idx [k, b]: identical on all TP ranks (full sequence)
        aux_weight = self.mod.router_aux_loss_weight if self.training else 0.0
        selected, gate, idx, logits = _TopkRouteIn.apply(full, router.weight, router.bias, k, aux_weight,
                                                         handoff, _use_triton(full))
        weight = self._weight(gate)  # [k, b, 1]
        self._record_topk(logits, idx.unsqueeze(-1))
        rope = kwargs.pop("rotary_pos_emb", None)
        if rope is not None and not isinstance(self.self_attention, IdentityOp):  # E layers: no rope
            rope = _gather_rope(rope, idx)
            # plain self-attention (swapped by mod_layer_spec) applies it as a flat [k*b] sequence,
            # which the fused RoPE kernel takes; other attention gets the [k, b, 1, d] tensor
            kwargs["rotary_pos_emb"] = _TokenRope(rope) if isinstance(self.self_attention, TokenRopeAttention) else rope
        if sp:
            selected = scatter_to_sequence_parallel_region(selected, group=group)
            weight = scatter_to_sequence_parallel_region(weight, group=group)
        processed, context = self._run_inner(selected, weight, None, **kwargs)
        if sp:
            processed = gather_from_sequence_parallel_region(
                processed, tensor_parallel_output_grad=False, group=group)
        if processed.dtype != full.dtype:
            processed = processed.to(full.dtype)
        out = _TopkRouteOut.apply(full, processed, idx, handoff)
        if sp:
            out = scatter_to_sequence_parallel_region(out, group=group)
        self._record("fraction_processed", k / seq)
        return out, context

    # --------------------------------------------------------------------------- losses, stats
    def _global_mean(self, values: torch.Tensor, sharded: bool) -> torch.Tensor:
        """Mean over the whole sequence; ``sharded`` values (SP shards) are all-reduced over TP."""
        total, count = values.sum(), values.numel()
        if sharded:
            total = reduce_from_tensor_model_parallel_region(total, group=self.tp_group)
            count *= self.tp_group.size()
        return total / count

    def _budget_mask(self, gate: torch.Tensor) -> torch.Tensor:
        """Hard budget: per sequence, the ``ceil(budget * T)`` highest gates are processed."""
        sp = self.config.sequence_parallel
        full = gather_from_sequence_parallel_region(
            gate, tensor_parallel_output_grad=False, group=self.tp_group) if sp else gate
        k = max(1, math.ceil(round(self._budget * full.shape[0], 6)))
        kth = full.topk(k, dim=0).values[-1:]  # [1, b, 1]
        return gate >= kth

    # Statistics stay on device and are reduced lazily: a forward only appends tensors it already
    # has (no extra kernels, no host sync); losses that the backward applies implicitly
    # (_SparsityGate, _FusedGateSkip, _TopkRouteIn) are evaluated here from the recorded gate means / logits.
    _FOLD_AT = 64  # pending entries per statistic before they are folded (bounded memory)

    def _record(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            pending = self._pending.setdefault(name, [])
            pending.append(value.detach())
            if len(pending) >= self._FOLD_AT:
                self._fold(name)
            return
        total, count = self._stats.get(name, (0.0, 0))
        self._stats[name] = (total + value, count + 1)

    def _record_topk(self, logits: torch.Tensor, idx: torch.Tensor) -> None:
        pending = self._pending.setdefault("_topk", [])
        pending.append((logits, idx))
        if len(pending) >= self._FOLD_AT:
            self._fold("_topk")

    def _fold(self, name: str) -> None:
        pending = self._pending.pop(name, [])
        if not pending:
            return
        if name == "_topk":  # (logits, idx) pairs -> gate mean and the router's BCE
            self._fold_values("gate_mean", [torch.sigmoid(lg).mean() for lg, _ in pending])
            if self.mod.mode == "topk":
                losses = []
                for logits, idx in pending:
                    target = torch.zeros_like(logits).scatter_(0, idx, 1.0)
                    losses.append(self.mod.router_aux_loss_weight
                                  * F.binary_cross_entropy_with_logits(logits, target))
                self._fold_values("loss_router_aux", losses)
            return
        self._fold_values(name, pending)
        if name == "gate_mean" and self.mod.mode != "topk":  # sparsity loss at the window's budget
            excess = F.relu(torch.stack(pending) - self._budget)
            self._fold_values("loss_sparsity", self.mod.sparsity_loss_weight * excess * excess)

    def _fold_values(self, name: str, values: list | torch.Tensor) -> None:
        """Adds ``values`` (0-d tensors, or one tensor of them) to ``name``'s running sum."""
        values = values if isinstance(values, torch.Tensor) else torch.stack(values)
        total, count = self._stats.get(name, (0.0, 0))
        self._stats[name] = (total + values.float().sum(), count + values.numel())


def _gather_rope(rope, idx: torch.Tensor):
    """Rotary embeddings of the selected positions: ``[s, 1, 1, d]`` -> ``[k, b, 1, d]``."""
    if isinstance(rope, tuple):
        return tuple(None if r is None else _gather_rope(r, idx) for r in rope)
    if rope.dim() != 4 or rope.shape[1] != 1:
        raise ValueError(f"MoD topk expects rotary_pos_emb of shape [s, 1, 1, d], got {tuple(rope.shape)}")
    return rope[:, 0][idx]  # [k, b, 1, d]


@dataclasses.dataclass(frozen=True)
class _TokenRope:
    """Per-token rotary embeddings ``[k, b, 1, d]`` (or a ``(q, k)`` pair of them) of top-k
    gathered tokens, on their way to a :class:`TokenRopeAttention`."""

    freqs: Any


def _apply_token_rope(t: torch.Tensor, freqs: torch.Tensor, config, cp_group) -> torch.Tensor:
    """RoPE with a position per (token, sequence): ``t [k, b, h, d]``, ``freqs [k, b, 1, d]``.

    Applied through Megatron's own ``apply_rotary_pos_emb``. With ``apply_rope_fusion`` it runs on
    the ``[k*b, 1, h, d]`` view, where every row is its own position, so TE's fused kernel (which
    needs ``[s, 1, 1, d]`` frequencies) takes it exactly as on a dense layer; unfused, the
    ``[k, b, 1, d]`` frequencies broadcast as they are (no reshaping copies)."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer import attention as upstream_attention

    mscale = getattr(upstream_attention, "_yarn_get_concentration_factor_from_config", lambda c: 1.0)(config)
    if not config.apply_rope_fusion:
        return apply_rotary_pos_emb(t, freqs, config=config, mscale=mscale, cp_group=cp_group)
    k, b = t.shape[:2]
    out = apply_rotary_pos_emb(t.reshape(k * b, 1, *t.shape[2:]),
                               freqs.reshape(k * b, 1, 1, freqs.shape[-1]), config=config,
                               mscale=mscale, cp_group=cp_group)
    return out.view(t.shape)


class TokenRopeAttention(SelfAttention):
    """``SelfAttention`` of a MoD top-k layer: takes :class:`_TokenRope` embeddings and applies
    them to the query and key right after the QKV projection (and the q/k norms), through
    :func:`_apply_token_rope`; upstream's forward then runs with no rotary embedding. Any other
    ``rotary_pos_emb`` goes to upstream unchanged."""

    def forward(self, hidden_states, *args, rotary_pos_emb=None, **kwargs):
        if not isinstance(rotary_pos_emb, _TokenRope):
            return super().forward(hidden_states, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)
        freqs = rotary_pos_emb.freqs
        self._megacpp_token_rope = freqs if isinstance(freqs, tuple) else (freqs, freqs)
        try:
            return super().forward(hidden_states, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self._megacpp_token_rope = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        rope = getattr(self, "_megacpp_token_rope", None)
        if rope is None:
            return out
        if len(out) < 3:  # (mixed_qkv, split list): fused single-QKV RoPE, refused for top-k
            raise RuntimeError("MoD topk per-token RoPE needs split q/k/v (fused_single_qkv_rope=False)")
        query, key, *rest = out
        cp = self.pg_collection.cp
        if rope[0] is not None:
            query = _apply_token_rope(query, rope[0], self.config, cp)
        if rope[1] is not None:
            key = _apply_token_rope(key, rope[1], self.config, cp)
        return (query, key, *rest)


@functools.cache
def _token_rope_class(cls: type) -> type:
    if cls is SelfAttention:
        return TokenRopeAttention
    return type(f"TokenRope{cls.__name__}", (TokenRopeAttention, cls), {"__module__": __name__})


def _with_token_rope(submodules):
    """The wrapped layer's submodules with its plain ``SelfAttention`` (or subclass) swapped for the
    per-token-RoPE one; other attention (MLA, MoDA-carrying specs) is left as it is."""
    attn = getattr(submodules, "self_attention", None)
    module = getattr(attn, "module", None)
    if not (isinstance(attn, ModuleSpec) and isinstance(module, type) and issubclass(module, SelfAttention)):
        return submodules
    swapped = ModuleSpec(module=_token_rope_class(module), params=attn.params, submodules=attn.submodules)
    return dataclasses.replace(submodules, self_attention=swapped)


@functools.cache
def mod_layer_class(cls: type) -> type:
    """The MoD subclass of a ``TransformerLayer`` class (``MoDLayer`` for the plain one)."""
    if not (isinstance(cls, type) and issubclass(cls, TransformerLayer)):
        raise ValueError(
            f"MoD wraps TransformerLayer-based blocks (it routes at their bias-dropout-add "
            f"residual seam); {cls!r} is not one"
        )
    if issubclass(cls, MoDLayer):
        raise ValueError(f"{cls.__name__} is already MoD-wrapped")
    if cls is TransformerLayer:
        return MoDLayer
    return type(f"MoD{cls.__name__}", (MoDLayer, cls), {"__module__": __name__})


def mod_layer_spec(spec: ModuleSpec, ctx: LayerContext) -> ModuleSpec:
    """Wraps layer ``ctx.index``'s spec with the MoD config in ``ctx.feature_configs["mod"]``."""
    config = ctx.feature("mod")
    if isinstance(config, FeaturePlacement):
        config = MoDConfig(placement=config)
    if not isinstance(config, MoDConfig):
        raise ValueError(
            f"layer {ctx.index} ({ctx.symbol!r}): feature 'mod' needs a MoDConfig or a "
            f"FeaturePlacement, got {config!r}"
        )
    if config.mode == "topk" and ctx.has("moda") and config.capacity < 1.0:
        raise ValueError(
            f"layer {ctx.index} ({ctx.symbol!r}) carries both MoD topk and MoDA: the wrapped "
            "attention only sees the selected tokens, so its depth K/V push would miss the other "
            "positions; use MoD mode 'gateskip' or 'threshold' on MoDA layers"
        )
    try:
        module = mod_layer_class(spec.module)
    except ValueError as exc:
        raise ValueError(f"layer {ctx.index} ({ctx.symbol!r}): {exc}") from None
    submodules = spec.submodules
    if config.mode == "topk" and dataclasses.is_dataclass(submodules):
        submodules = _with_token_rope(submodules)
    return ModuleSpec(module=module, params={**(spec.params or {}), "mod": config},
                      submodules=submodules)
