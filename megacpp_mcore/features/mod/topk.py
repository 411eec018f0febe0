"""MoD top-k token selection, shaped like Megatron's MoE route -> dispatch -> combine.

:class:`TopkDispatcher` (one per top-k layer) does, per forward:

* ``route``: the whole sequence (all-gathered from its sequence-parallel shards) goes through the
  router; per sequence the ``k`` highest-logit tokens are picked in sequence order (the causal
  mask stays right) and gathered with their gates (:class:`TopkRouteIn`);
* ``dispatch``: the gathered tokens and their gate weights go to the wrapped block, split over the
  TP ranks under sequence parallelism (``k`` is a multiple of the TP size);
* ``combine``: the processed tokens come back (gathered over TP), are written into their rows of
  the sequence while every other token passes through exactly (:class:`TopkRouteOut`), and the
  result is split into this rank's sequence shard again.

Under sequence parallelism the route is computed on the full sequence, identically on every TP
rank, so the router's gradient is complete on each rank (its parameters are not flagged
``sequence_parallel``).

Backward: :class:`TopkRouteOut` hands its output gradient to :class:`TopkRouteIn` (through a
:class:`TopkHandoff`), which forms the layer's WHOLE input gradient in one pass, with the gate's
gradient and the router's auxiliary BCE (scaled by :func:`.gate.aux_loss_scale`) folded in.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

from megacpp_mcore.features.mod.config import MoDConfig
from megacpp_mcore.features.mod.gate import accumulation_dtype, aux_loss_scale, router_logits


class TopkHandoff:
    """Carries the output gradient from :class:`TopkRouteOut`'s backward (which runs first) to
    :class:`TopkRouteIn`'s, so the input gradient is formed in one pass (see there)."""

    __slots__ = ("dy",)

    def __init__(self):
        self.dy = None


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> torch.Tensor:
    """``arange(n)`` int32 on ``device``, cached (one op fewer per top-k backward)."""
    return torch.arange(n, device=device, dtype=torch.int32)


class TopkRouteIn(torch.autograd.Function):
    """Top-k routing of ``x [s, b, h]``. Returns the gathered tokens ``[k, b, h]``, their gates
    ``sigmoid(logit)`` ``[k, b, 1]`` in ``x.dtype``, the ``k`` positions per sequence ``[k, b]`` in
    sequence order (the causal mask stays right) and the router logits ``[s, b, 1]`` (fp32, for
    the statistics; not differentiable).

    The router's auxiliary loss ``aux_weight * mean(BCE(logit, onehot(idx)))`` over every position
    rides on the backward (``dL/dlogit = c (sigmoid(logit) - onehot)`` with ``c = aux_weight / N``
    times :func:`.gate.aux_loss_scale`); its value is computed lazily for the statistics
    (:class:`.stats.MoDStats`).

    Backward forms the WHOLE input gradient of the routed layer in one pass over ``[s, b, h]``:
    ``dx = dy`` on the rows that were not selected (the pass-through of :class:`TopkRouteOut`,
    whose own backward returns no ``x`` gradient and hands ``dy`` over), the block's gradient
    ``dselected`` on the selected rows, plus the router's ``dlogit * w`` everywhere, with ``dlogit``
    (gate gradient on the selected rows, the BCE term everywhere) formed in the same pass, and the
    router's weight gradient. Unfused, autograd spent a zeros + scatter-add (gather), a copy with
    zeroed rows (scatter), an outer-product GEMM (router), two full-size accumulations on it and a
    handful of ``[s, b]`` ops for the gate. With ``use_triton`` the router GEMV and this pass are
    Triton kernels (:mod:`.kernels`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, k: int, aux_weight: float, handoff: TopkHandoff, use_triton: bool):
        seq, batch, hidden = x.shape
        if use_triton:
            from megacpp_mcore.features.mod import kernels

            logits = kernels.router_logits(x.reshape(-1, hidden).contiguous(), weight.reshape(-1),
                                           bias.reshape(-1), batch)  # [b, s] contiguous
        else:
            logits = router_logits(x, weight, bias, accumulation_dtype(x.dtype)).view(seq, batch).t()
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
        coef = ctx.aux_weight * aux_loss_scale() / logits.numel() if ctx.aux_weight else 0.0
        if isinstance(coef, torch.Tensor):
            coef = coef.to(logits)
        if ctx.use_triton:
            from megacpp_mcore.features.mod import kernels

            pos = torch.full((seq, batch), -1, device=x.device, dtype=torch.int32).scatter_(
                0, idx, _arange(k * batch, x.device).view(k, batch))
            dx, dweight, dbias = kernels.topk_backward(
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


class TopkRouteOut(torch.autograd.Function):
    """``x`` with the selected rows replaced by the processed tokens. Its backward gives the
    processed tokens their rows of ``dy`` and hands ``dy`` to :class:`TopkRouteIn` (which forms
    the input gradient) instead of returning a copy of ``dy`` with the selected rows zeroed."""

    @staticmethod
    def forward(ctx, x, processed, idx, handoff: TopkHandoff):
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
class TopkRoute:
    """One forward's routing decision (what :meth:`TopkDispatcher.route` returns)."""

    full: torch.Tensor  # [s, b, h] the whole sequence (gathered from its SP shards)
    selected: torch.Tensor  # [k, b, h] the chosen tokens, in sequence order
    gate: torch.Tensor  # [k, b, 1] sigmoid(router logit) of the chosen tokens, activation dtype
    idx: torch.Tensor  # [k, b] their positions
    logits: torch.Tensor  # [s, b, 1] fp32 router logits (statistics; not differentiable)
    handoff: TopkHandoff  # TopkRouteOut's backward -> TopkRouteIn's backward


class TopkDispatcher:
    """Route -> dispatch -> combine of one MoD top-k layer (see the module docstring).

    ``tp_group``: the layer's tensor-parallel group; ``sequence_parallel``: whether the layer's
    inputs and outputs are ``[s/tp, b, h]`` shards of it (all gathers and scatters happen here);
    ``use_triton``: :func:`.gate.triton_kernels`'s answer for the layer (CUDA tensors only).
    """

    def __init__(self, mod: MoDConfig, tp_group, *, sequence_parallel: bool, use_triton: bool):
        self.mod = mod
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel
        self.use_triton = use_triton

    def route(self, hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              aux_weight: float) -> TopkRoute:
        """Routes ``hidden_states`` (``[s/tp, b, h]`` under SP, else ``[s, b, h]``) on the whole
        sequence with the router's ``weight`` ``[1, h]`` and ``bias``; the router BCE of weight
        ``aux_weight`` rides on its backward."""
        sp, group = self.sequence_parallel, self.tp_group
        full = gather_from_sequence_parallel_region(
            hidden_states, tensor_parallel_output_grad=False, group=group) if sp else hidden_states
        k = self.mod.topk_count(full.shape[0], group.size() if sp else 1)
        handoff = TopkHandoff()
        # logits [s, b, 1] fp32 and idx [k, b]: identical on all TP ranks (full sequence)
        selected, gate, idx, logits = TopkRouteIn.apply(
            full, weight, bias, k, aux_weight, handoff, self.use_triton and full.is_cuda)
        return TopkRoute(full=full, selected=selected, gate=gate, idx=idx, logits=logits, handoff=handoff)

    def dispatch(self, route: TopkRoute, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's input: the selected tokens and the ``weight`` that scales their residual
        contribution (``[k, b, 1]``, the gate or a forced value), as ``[k/tp, b, .]`` shards under
        SP."""
        if not self.sequence_parallel:
            return route.selected, weight
        group = self.tp_group
        return (scatter_to_sequence_parallel_region(route.selected, group=group),
                scatter_to_sequence_parallel_region(weight, group=group))

    def combine(self, route: TopkRoute, processed: torch.Tensor) -> torch.Tensor:
        """The layer's output: ``processed`` (the block's output of :meth:`dispatch`'s tokens)
        written into their rows, every other token passed through exactly; this rank's shard under
        SP."""
        sp, group = self.sequence_parallel, self.tp_group
        if sp:
            processed = gather_from_sequence_parallel_region(processed, tensor_parallel_output_grad=False,
                                                             group=group)
        if processed.dtype != route.full.dtype:
            processed = processed.to(route.full.dtype)
        out = TopkRouteOut.apply(route.full, processed, route.idx, route.handoff)  # [s, b, h]
        return scatter_to_sequence_parallel_region(out, group=group) if sp else out
