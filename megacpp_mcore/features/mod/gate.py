"""MoD's router and gate: router logits, the gate mean, the sparsity loss riding on the gate's
backward, the fused gateskip residual, and the one choice between Triton kernels and torch ops.

The router is a replicated ``Linear(h, 1)``; the gate is ``g = sigmoid(router(x))``. Auxiliary
losses (the sparsity loss here, the top-k router's BCE in :mod:`.topk`) are not separate graphs:
their gradient is added where the gate's gradient is formed, scaled by :func:`aux_loss_scale`, the
scale Megatron's pipeline schedule sets for every auxiliary loss (``MoEAuxLossAutoScaler``).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler


# ------------------------------------------------------------------------------ kernel choice
@functools.cache
def _triton_importable() -> str | None:
    """``None`` when :mod:`.kernels` (Triton) imports, else why not (a constant of the host)."""
    try:
        from megacpp_mcore.features.mod import kernels  # noqa: F401
    except Exception as exc:  # no Triton on this host: the torch formulation runs
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_kernels(choice: str, hidden_size: int) -> bool:
    """Resolves ``MoDConfig.kernels`` once, when a layer is built: whether its fused gateskip seam
    and top-k routing use the Triton kernels of :mod:`.kernels` (on CUDA tensors; CPU tensors
    always take the torch formulation). ``triton`` raises ``ImportError`` where they cannot run."""
    if choice == "torch":
        return False
    missing = _triton_importable()
    if missing is None:
        from megacpp_mcore.features.mod import kernels

        fits = hidden_size <= kernels.MAX_HIDDEN
        if choice == "triton" and not fits:
            raise ValueError(f"MoDConfig.kernels='triton': hidden size {hidden_size} is wider than the "
                             f"kernels take ({kernels.MAX_HIDDEN}); use kernels='auto' or 'torch'")
        return fits
    if choice == "triton":
        raise ImportError(f"MoDConfig.kernels='triton' needs Triton (pip install triton): {missing}")
    return False


# ----------------------------------------------------------------------------- router, gate
def aux_loss_scale() -> float | torch.Tensor:
    """The backward scale of MoD's auxiliary losses, read at backward time: Megatron's
    ``MoEAuxLossAutoScaler.main_loss_backward_scale``, which the pipeline schedule's
    ``forward_step`` sets for every micro-batch (``grad_scale * cp / num_microbatches``; for
    models without MoE through the ``aux-loss-scale-without-moe`` patch). ``None`` (no schedule
    has run: a bare forward/backward) is 1, as upstream reads it. A tensor scale stays on device:
    no host synchronisation."""
    scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    return 1.0 if scale is None else scale


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., h] -> [..., 1]`` router logits in ``dtype``: the GEMV runs in the activation dtype
    with fp32 accumulation (an fp32 copy of the activations would cost more than the router)."""
    return F.linear(x, weight.to(x.dtype), bias.to(x.dtype)).to(dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16/32-bit activations, fp64 for fp64 (gates, router logits and their gradients)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def global_mean(values: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """Mean of ``values`` over the whole sequence (0-d, not differentiable) and the count it
    covers; ``group``: the TP group whose equal sequence-parallel shards make up the sequence
    (the shard means are all-reduced over it), or ``None``. THE reduction of every MoD statistic
    and loss term: the gate mean of the sparsity loss and the fraction of tokens processed."""
    mean = values.detach().mean()  # one reduction kernel (sum and divide fused)
    count = values.numel()
    if group is not None:
        torch.distributed.all_reduce(mean, group=group)
        mean.div_(group.size())
        count *= group.size()
    return mean, count


def budget_mask(gate: torch.Tensor, budget: float, group) -> torch.Tensor:
    """Hard budget (gateskip eval): per sequence, the ``ceil(budget * T)`` highest gates are
    processed. ``gate [s, b, 1]`` (``[s/tp, b, 1]`` shards of the TP ``group`` under sequence
    parallelism, else ``group=None``) -> bool mask of the same shape."""
    full = gate if group is None else gather_from_sequence_parallel_region(
        gate, tensor_parallel_output_grad=False, group=group)
    k = max(1, math.ceil(round(budget * full.shape[0], 6)))  # rounded first: 0.3 * 10 is 3
    kth = full.topk(k, dim=0).values[-1:]  # [1, b, 1]
    return gate >= kth


def sparsity_pressure(mean: torch.Tensor, budget: float) -> tuple[torch.Tensor, float]:
    """``relu(mean - budget)`` (0-d) and the float factor to scale it by, the auxiliary-loss scale
    (:func:`aux_loss_scale`) applied: a tensor scale is multiplied in, a float one returned."""
    excess = (mean - budget).clamp_min(0.0)
    scale = aux_loss_scale()
    if isinstance(scale, torch.Tensor):
        return excess * scale.to(excess), 1.0
    return excess, scale


class SparsityGate(torch.autograd.Function):
    """``gate = sigmoid(logits)`` whose backward also carries the sparsity loss.

    ``L = w * relu(mean(gate) - budget)^2`` over the whole sequence (``group``: the TP group whose
    SP shards make it up, or ``None``) has ``dL/dgate_i = 2 w relu(mean - budget) / N``, times
    :func:`aux_loss_scale`. Folding it into the gate's backward keeps one control surface (the
    gate) at the cost of a few scalar kernels, where the loss as a separate graph (mean, relu,
    square, auto-scaler on the layer output) cost a dozen launches per layer in forward and
    backward. Returns ``(gate, mean)``; ``mean`` is detached (statistics).
    """

    @staticmethod
    def forward(ctx, logits, loss_weight: float, budget: float, group):
        ctx.set_materialize_grads(False)  # no zeros kernel for the (statistics-only) mean's grad
        gate = torch.sigmoid(logits)
        mean, count = global_mean(gate, group)
        ctx.save_for_backward(gate, mean)
        ctx.coef, ctx.budget = 2.0 * loss_weight / count, budget
        ctx.mark_non_differentiable(mean)
        return gate, mean

    @staticmethod
    def backward(ctx, grad_gate, _grad_mean):
        gate, mean = ctx.saved_tensors
        excess, scale = sparsity_pressure(mean, ctx.budget)
        alpha = ctx.coef * scale
        if grad_gate is None:
            grad = (excess * alpha).expand_as(gate)
        else:  # the loss gradient's scale rides on the add (one kernel, no separate multiply)
            grad = torch.add(grad_gate, excess, alpha=alpha)
        return torch.ops.aten.sigmoid_backward(grad, gate), None, None, None


class FusedGateSkip(torch.autograd.Function):
    """The gateskip residual with its router read at the seam:
    ``y = x + sigmoid(x . w + b) * out``, where ``x`` is the layer input (the residual AND the
    router's input) and ``out`` the block output.

    The sparsity loss rides on the gate's backward exactly as in :class:`SparsityGate`
    (``dL/dg_i = 2 w relu(mean(g) - budget) / N`` times :func:`aux_loss_scale`; ``group``: the TP
    group whose SP shards make up the sequence). With ``use_triton`` the whole thing is two Triton
    kernels (:mod:`.kernels`): forward reads ``x`` and ``out`` once, backward folds the router's
    input gradient into the residual gradient; otherwise the same math runs as torch ops (the
    reference the kernels are tested against). Returns ``(y, mean(g))``; the mean is detached.
    """

    @staticmethod
    def forward(ctx, x, out, weight, bias, loss_weight: float, budget: float, group, use_triton: bool):
        ctx.set_materialize_grads(False)
        hidden = x.shape[-1]
        x2, o2 = x.reshape(-1, hidden), out.reshape(-1, hidden)  # [N, h]
        if use_triton:
            from megacpp_mcore.features.mod import kernels

            x2, o2 = x2.contiguous(), o2.contiguous()
            y, gate = kernels.gate_forward(x2, o2, weight.reshape(-1), bias.reshape(-1))
        else:  # the unfused formulation (same ops as the router + addcmul path), >= fp32 gates
            gate = torch.sigmoid(router_logits(x2, weight, bias, accumulation_dtype(x2.dtype))).squeeze(-1)
            y = torch.addcmul(x2, o2, gate.unsqueeze(-1).to(x2.dtype))
        mean, count = global_mean(gate, group)  # gate: [N]
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
        dy = grad_y.reshape(-1, x2.shape[-1])  # [N, h]
        excess, scale = sparsity_pressure(mean, ctx.budget)
        extra = excess * (ctx.coef * scale)  # the sparsity loss's dL/dg_i, the same for every token
        if ctx.use_triton:
            from megacpp_mcore.features.mod import kernels

            dx, dout, dweight, dbias = kernels.gate_backward(dy.contiguous(), x2, o2, weight.reshape(-1),
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
