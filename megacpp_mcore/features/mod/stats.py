"""Per-layer MoD statistics, kept on device and reduced lazily.

A forward only appends tensors it already has (gate means, router logits and top-k positions): no
extra kernels, no host synchronisation. The loss VALUES (sparsity, router BCE), whose gradients
the gate's backward applies implicitly, are computed here from those records when the statistics
are read, after the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megacpp_mcore.features.mod.config import MoDConfig


class MoDStats:
    """Running means of one MoD layer over a window (the forwards since :meth:`start_window`):
    ``fraction_processed``, ``gate_mean`` and the loss terms ``loss_sparsity`` (gateskip,
    threshold) or ``loss_router_aux`` (topk), at the window's token ``budget``."""

    FOLD_AT = 64  # pending records per statistic before they are folded (bounded memory)

    def __init__(self, mod: MoDConfig, budget: float):
        self.mod = mod
        self.start_window(budget)

    def start_window(self, budget: float) -> None:
        """Forgets everything recorded; later sparsity losses are taken against ``budget``."""
        self.budget = budget
        self._sums: dict[str, tuple] = {}  # name -> (running sum, count), on device
        self._pending: dict[str, list] = {}  # name -> recorded tensors not yet folded

    def pending(self, name: str) -> int:
        """How many records of ``name`` wait to be folded (at most :attr:`FOLD_AT` - 1)."""
        return len(self._pending.get(name, ()))

    def record(self, name: str, value: torch.Tensor | float) -> None:
        """One value of statistic ``name`` (a 0-d device tensor or a float)."""
        if isinstance(value, torch.Tensor):
            self._append(name, value.detach())
            return
        total, count = self._sums.get(name, (0.0, 0))
        self._sums[name] = (total + value, count + 1)

    def record_topk(self, logits: torch.Tensor, idx: torch.Tensor) -> None:
        """A top-k route: router logits ``[s, b, 1]`` and chosen positions ``[k, b, 1]``."""
        self._append("_topk", (logits, idx))

    def means(self) -> dict[str, float]:
        """The window's means (one host read per statistic) and its ``budget``."""
        for name in list(self._pending):
            self._fold(name)
        out = {name: float(total) / count for name, (total, count) in self._sums.items()}
        out["budget"] = self.budget
        return out

    def _append(self, name: str, item) -> None:
        pending = self._pending.setdefault(name, [])
        pending.append(item)
        if len(pending) >= self.FOLD_AT:
            self._fold(name)

    def _fold(self, name: str) -> None:
        pending = self._pending.pop(name, [])
        if not pending:
            return
        if name == "_topk":  # (logits, idx) pairs -> gate mean and the router's BCE
            self._add("gate_mean", [torch.sigmoid(lg).mean() for lg, _ in pending])
            if self.mod.mode == "topk":
                losses = []
                for logits, idx in pending:
                    target = torch.zeros_like(logits).scatter_(0, idx, 1.0)
                    losses.append(self.mod.router_aux_loss_weight
                                  * F.binary_cross_entropy_with_logits(logits, target))
                self._add("loss_router_aux", losses)
            return
        self._add(name, pending)
        if name == "gate_mean" and self.mod.mode != "topk":  # sparsity loss at the window's budget
            excess = F.relu(torch.stack(pending) - self.budget)
            self._add("loss_sparsity", self.mod.sparsity_loss_weight * excess * excess)

    def _add(self, name: str, values: list | torch.Tensor) -> None:
        """Adds ``values`` (0-d tensors, or one tensor of them) to ``name``'s running sum."""
        values = values if isinstance(values, torch.Tensor) else torch.stack(values)
        total, count = self._sums.get(name, (0.0, 0))
        self._sums[name] = (total + values.float().sum(), count + values.numel())


# MoDStats key -> the metric name in Megatron's MoE metrics tracker (and so in Megatron-LM's log
# line and tensorboard). Names ending in "loss" are averaged over the log interval by
# Megatron-LM's training_log; the others print the iteration's value (core_v0.18+) or are
# averaged too (core_v0.16/0.17).
TRACKER_NAMES = {
    "gate_mean": "mod_gate_mean",
    "fraction_processed": "mod_fraction_processed",
    "budget": "mod_budget",
    "loss_sparsity": "mod_sparsity_loss",
    "loss_router_aux": "mod_router_aux_loss",
}


class TrackerMetrics:
    """One MoD layer's statistics of every training forward, recorded into Megatron's MoE metrics
    tracker (:func:`megacpp_mcore.spec.compat.record_layer_metric`), which Megatron-LM's
    ``training_log`` reports each iteration, with or without the package's launcher.

    ``training_log`` multiplies a metric by ``1 / num_microbatches`` (the mean over the
    iteration's micro-batches), sums it over the layers and divides by
    :func:`~megacpp_mcore.spec.compat.tracker_layer_count`; every value is recorded times
    ``scale = tracker_layer_count / (layers carrying MoD)``, so the printed figure is the mean over
    the MoD layers (per-layer tensorboard entries, ``--moe-per-layer-logging``, carry the factor).
    A handful of 0-d device ops per layer and micro-batch (only while a Megatron-LM training
    loop runs); no host synchronisation.
    """

    def __init__(self, mod: MoDConfig, *, layer_number: int, size: int, scale: float):
        self.mod, self.layer_number, self.size, self.scale = mod, layer_number, size, scale

    def _record(self, key: str, value: torch.Tensor, scaled: bool = False) -> None:
        from megacpp_mcore.spec.compat import record_layer_metric

        value = value.detach().float()
        if not scaled and self.scale != 1.0:
            value = value * self.scale
        record_layer_metric(TRACKER_NAMES[key], value, layer_number=self.layer_number,
                            num_layers=self.size)

    def gate(self, gate_mean: torch.Tensor, budget: float) -> None:
        """The forward's gate mean (0-d) and, outside topk, its sparsity loss at ``budget``."""
        self._record("gate_mean", gate_mean)
        if self.mod.mode != "topk":
            excess = F.relu(gate_mean.detach().float() - budget)
            self._record("loss_sparsity", self.mod.sparsity_loss_weight * excess * excess)

    def topk(self, logits: torch.Tensor, idx: torch.Tensor) -> None:
        """A top-k route: router logits ``[s, b, 1]``, chosen positions ``[k, b, 1]``."""
        logits = logits.detach()
        self._record("gate_mean", torch.sigmoid(logits).mean())
        target = torch.zeros_like(logits).scatter_(0, idx, 1.0)
        self._record("loss_router_aux", self.mod.router_aux_loss_weight
                     * F.binary_cross_entropy_with_logits(logits, target))

    def step(self, fraction: torch.Tensor | float, budget: float, device: torch.device) -> None:
        """The forward's fraction of tokens processed and the budget it trained against."""
        if isinstance(fraction, torch.Tensor):
            self._record("fraction_processed", fraction)
        else:  # a host float: one fill, scaled on the host
            self._record("fraction_processed", torch.full((), fraction * self.scale, device=device),
                         scaled=True)
        self._record("budget", torch.full((), budget * self.scale, device=device), scaled=True)
