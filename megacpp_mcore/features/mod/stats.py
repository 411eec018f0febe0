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
