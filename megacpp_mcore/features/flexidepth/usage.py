"""FlexiDepth's bookkeeping: the per-token usage sum behind the usage penalty, the router score
that carries the penalty's gradient, per-layer statistics and the model-level summary.

Usage penalty (the paper's layer-skipping loss): ``L = w * mean_t S_t^2`` with ``S_t = sum_l g_t^l``
over the FlexiDepth layers ``l`` of one *usage segment* and the tokens ``t`` of one micro-batch
(``N`` of them, all sequence-parallel shards counted). ``dL/dg_t^l = 2 w S_t / N`` for every layer
of the segment, so each layer's backward needs the sum over ALL the segment's layers. A segment
is a run of a pipeline chunk's FlexiDepth layers (split further at
``FlexiDepthConfig.usage_boundaries``): its :class:`UsageSegment` belongs to the chunk being built
(``LayerContext.chunk``), its first layer starts a fresh ``S`` each forward and every layer adds its
scores in place; the tensor a micro-batch filled stays with that micro-batch's autograd graph, so
pipeline schedules with several micro-batches in flight keep theirs apart. The gradient is applied
in the score's own backward (:class:`UsageGate`), scaled by Megatron's auxiliary-loss scale
(``MoEAuxLossAutoScaler``, through :func:`megacpp_mcore.features.mod.gate.aux_loss_scale`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import torch

from megacpp_mcore.features.mod.gate import aux_loss_scale


class UsageSegment:
    """The FlexiDepth layers sharing one usage sum, and the current micro-batch's sum
    ``total [s, b, 1]`` (fp32, fp64 for fp64 scores; this rank's sequence shard under sequence
    parallelism)."""

    def __init__(self, start: int):
        self.start = start
        self.layers: list[int] = []
        self.total: torch.Tensor | None = None


class UsageLedger:
    """The usage segments of one model chunk (see the module docstring); layers register once,
    in layer order, when their spec is made."""

    def __init__(self, boundaries: tuple[int, ...]):
        self.boundaries = boundaries
        self.segments: list[UsageSegment] = []

    def register(self, index: int) -> "UsageSlot":
        """Layer ``index`` (0-based, global) joins the current segment, or starts a new one when a
        usage boundary lies in ``(previous layer, index]``."""
        last = self.segments[-1].layers[-1] if self.segments else None
        if last is not None and index <= last:
            raise RuntimeError(f"FlexiDepth layer {index} registered after layer {last}; the layers of "
                               "one chunk register once, in layer order (build a new chunk per model)")
        if last is None or any(last < b <= index for b in self.boundaries):
            self.segments.append(UsageSegment(index))
        segment = self.segments[-1]
        segment.layers.append(index)
        return UsageSlot(ledger=self, segment=segment, index=index, first=len(segment.layers) == 1)


@dataclasses.dataclass(frozen=True)
class UsageSlot:
    """One layer's place in its usage segment. It holds the ledger: the chunk's owner object keeps
    it only weakly, so the layers that use it keep it alive."""

    ledger: UsageLedger
    segment: UsageSegment
    index: int
    first: bool  # starts the segment's sum each forward

    @property
    def last(self) -> bool:
        """The segment's last layer: its forward sees the complete sum (for the loss value)."""
        return self.segment.layers[-1] == self.index

    def add(self, score: torch.Tensor) -> torch.Tensor:
        """Adds this layer's scores ``[s, b, 1]`` to the micro-batch's sum and returns the sum
        tensor (filled in place by the segment's later layers before any backward runs)."""
        seg = self.segment
        score = score.detach().to(torch.promote_types(score.dtype, torch.float32))
        if self.first:
            seg.total = score.clone()
        elif seg.total is None or seg.total.shape != score.shape:
            raise RuntimeError(
                f"FlexiDepth layer {self.index}: its usage segment (from layer {seg.start}) holds "
                f"{None if seg.total is None else tuple(seg.total.shape)} scores, this layer has "
                f"{tuple(score.shape)}; the segment's layers must run in order on the same tokens "
                "(full activation recomputation and partial forwards are not supported)")
        else:
            seg.total.add_(score)
        return seg.total


class UsageGate(torch.autograd.Function):
    """``g = sigmoid(logits)`` (``[s, b, 1]``) whose backward also carries the usage penalty:
    ``dL/dg_t = 2 w S_t / N`` times :func:`~megacpp_mcore.features.mod.gate.aux_loss_scale`, with
    ``S`` the segment's sum (complete by backward time), ``N = logits.numel() * shards``."""

    @staticmethod
    def forward(ctx, logits, slot: UsageSlot, weight: float, shards: int):
        ctx.set_materialize_grads(False)
        score = torch.sigmoid(logits)
        ctx.total = slot.add(score)  # not save_for_backward: later layers add to it in place
        ctx.coef = 2.0 * weight / (logits.numel() * shards)
        ctx.save_for_backward(score)
        return score

    @staticmethod
    def backward(ctx, grad_score):
        (score,) = ctx.saved_tensors
        scale = aux_loss_scale()
        if isinstance(scale, torch.Tensor):
            extra = ctx.total * (scale.to(ctx.total) * ctx.coef)
        else:
            extra = ctx.total * (scale * ctx.coef)
        extra = extra.to(score.dtype)
        grad = extra if grad_score is None else grad_score + extra
        return torch.ops.aten.sigmoid_backward(grad, score), None, None, None


def shard_means(values: list[torch.Tensor], group) -> torch.Tensor:
    """Means of ``values`` over the whole sequence (``[len(values)]``, detached): the local means,
    all-reduced over ``group`` (the TP group whose equal sequence-parallel shards make up the
    sequence; ``None``: no reduction). One collective for all of them."""
    means = torch.stack([v.detach().float().mean() for v in values])
    if group is not None:
        torch.distributed.all_reduce(means, group=group)
        means.div_(group.size())
    return means


class FlexiDepthStats:
    """Running means of one layer's statistics over a window (the forwards since
    :meth:`start_window`), kept on device: one add per forward, one host read per window."""

    def __init__(self):
        self.start_window()

    def start_window(self) -> None:
        self._names: tuple[str, ...] = ()
        self._sum: torch.Tensor | None = None
        self._count = 0

    def record(self, names: tuple[str, ...], values: torch.Tensor) -> None:
        """One forward's ``values`` (``[len(names)]``) of the statistics ``names`` (the same names
        every forward of a layer)."""
        self._names = names
        if self._sum is not None and self._sum.device != values.device:  # the layer was moved
            self._sum = self._sum.to(values.device)
        self._sum = values if self._sum is None else self._sum + values
        self._count += 1

    def means(self) -> dict[str, float]:
        if self._sum is None:
            return {}
        totals = self._sum.tolist()
        return {name: total / self._count for name, total in zip(self._names, totals)}


_SKIP_RATE = re.compile(r"^(?P<layer>.*)[./]skip_rate$")
_USAGE_LOSS = re.compile(r"^(?P<layer>.*)[./]loss_usage$")
_LAYER_INDEX = re.compile(r"(^|\.)layers\.(?P<index>\d+)$")


# FlexiDepth's statistics in Megatron's MoE metrics tracker (what training_log reports).
TRACKER_NAMES = {
    "skip_rate": "flexidepth_skip_rate",
    "score_mean": "flexidepth_score_mean",
    "loss_usage": "flexidepth_usage_loss",
}


class TrackerUsage:
    """One FlexiDepth layer's statistics of a training forward, recorded into Megatron's MoE
    metrics tracker (:func:`megacpp_mcore.spec.compat.record_layer_metric`) while a Megatron-LM
    loop runs. ``training_log`` takes a metric's mean over micro-batches, sums it over layers and
    divides by :func:`~megacpp_mcore.spec.compat.tracker_layer_count`; so ``skip_rate`` and
    ``score_mean`` are recorded times ``count / layers`` (the printed figure: their mean over the
    FlexiDepth layers) and ``loss_usage`` (only on a usage segment's last layer) times ``count``
    (the printed figure: the total penalty over the segments)."""

    def __init__(self, config, *, layer_number: int, layers: int | None):
        from megacpp_mcore.spec import compat

        count = compat.tracker_layer_count(config)
        self.layer_number, self.size = layer_number, compat.tracker_size(config)
        self.scale = {"skip_rate": count / layers if layers else 1.0,
                      "score_mean": count / layers if layers else 1.0, "loss_usage": float(count)}

    def record(self, names: tuple[str, ...], means: torch.Tensor) -> None:
        """``means[i]`` (0-d, this forward's) is statistic ``names[i]``."""
        from megacpp_mcore.spec.compat import record_layer_metric

        for name, value in zip(names, means.detach().float()):
            record_layer_metric(TRACKER_NAMES[name], value * self.scale[name],
                                layer_number=self.layer_number, num_layers=self.size)


def usage_summary(stats: Mapping[str, float], num_layers: int | None = None) -> dict[str, float]:
    """Model-level usage from per-layer statistics (keys ``<layer>.skip_rate``, as the training
    loop logs ``megacpp_stats()``): ``flexidepth_layers``, ``layers_skipped`` (mean per token,
    ``sum_l skip_rate_l``), ``mean_layers_used`` and ``overall_skip_rate`` over ``num_layers``
    (the model's depth; by default the FlexiDepth layers only)."""
    rates = [float(v) for k, v in stats.items() if _SKIP_RATE.match(k)]
    depth = len(rates) if num_layers is None else num_layers
    if depth < len(rates):
        raise ValueError(f"usage_summary: num_layers={num_layers} is below the {len(rates)} layers "
                         "reporting a skip rate")
    skipped = sum(rates)
    return {"flexidepth_layers": float(len(rates)), "layers_skipped": skipped,
            "mean_layers_used": depth - skipped,
            "overall_skip_rate": skipped / depth if depth else 0.0}


def usage_report(stats: Mapping[str, float], num_layers: int) -> dict:
    """FlexiDepth's bookkeeping of one window, from the training loop's statistics: the model-level
    :func:`usage_summary` over ``num_layers``, plus ``skip_rate_per_layer`` (``{"<layer index>":
    rate}``, the global index read from ``...layers.<i>``, else the module name) and
    ``usage_loss`` (the squared total-usage penalty, summed over the usage segments; 0 when no
    segment reported one, e.g. a window without a training forward)."""
    per_layer = {}
    for key, value in stats.items():
        match = _SKIP_RATE.match(key)
        if match:
            index = _LAYER_INDEX.search(match["layer"])
            per_layer[index["index"] if index else match["layer"]] = float(value)
    loss = sum(float(v) for k, v in stats.items() if _USAGE_LOSS.match(k))
    return {**usage_summary(stats, num_layers), "usage_loss": loss,
            "skip_rate_per_layer": dict(sorted(per_layer.items(), key=lambda kv: (len(kv[0]), kv[0])))}


def format_usage(report: Mapping) -> str:
    """One progress-line fragment of a :func:`usage_report`: mean layers used of the depth, the
    overall skip rate, the usage penalty and the skip rate per layer."""
    depth = report["mean_layers_used"] + report["layers_skipped"]
    per_layer = " ".join(f"{k}:{v:.2f}" for k, v in report["skip_rate_per_layer"].items())
    return (f"flexidepth layers used {report['mean_layers_used']:.2f}/{depth:.0f} skip "
            f"{100 * report['overall_skip_rate']:.1f}% usage loss {report['usage_loss']:.3g} "
            f"(skip per layer {per_layer})")
