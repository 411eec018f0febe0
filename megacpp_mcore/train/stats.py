"""The per-module statistics hooks that the training loop drives.

Any ``nn.Module`` in the model may define

* ``megacpp_set_step(self, step: int) -> None``: called before every training step (schedules that
  depend on the step, e.g. a MoD token budget that decays over training); a hook that also takes
  ``total_steps`` gets the run's length (a budget that decays over the whole run);
* ``megacpp_stats(self) -> dict[str, float]``: called after every training step (per-layer
  statistics: MoD fraction processed, MTP per-depth loss, ...).

:class:`StatsCollector` finds those modules once (walking ``model.modules()`` of every chunk, below
Megatron's DDP wrapper), prefixes each key with the module's qualified name and keeps the latest
values; :meth:`StatsCollector.gather` merges them over all ranks (pipeline stages hold different
layers) for logging and the run receipt.

Under Megatron-LM's own loop (``pretrain_gpt.py``) nobody calls these hooks: the MoD layers read
Megatron-LM's iteration themselves and record their statistics in Megatron's MoE metrics tracker,
which its ``training_log`` prints (:mod:`megacpp_mcore.features.mod.stats`).
"""

from __future__ import annotations

import inspect
import math
from typing import Iterable

import torch

from megacpp_mcore.train.runtime import unwrap_model

SET_STEP = "megacpp_set_step"
STATS = "megacpp_stats"


def _global_layer_prefixes(model: torch.nn.Module) -> dict[str, str]:
    """``decoder.layers.<i>`` (the index in this chunk's module list) -> ``decoder.layers.<g>`` (the
    global 0-based layer index, from the layer's ``layer_number``): pipeline stages and virtual
    chunks number their module lists from 0, so local names of different stages would collide."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None:
        return {}
    return {f"decoder.layers.{i}": f"decoder.layers.{layer.layer_number - 1}"
            for i, layer in enumerate(layers) if isinstance(getattr(layer, "layer_number", None), int)}


def _globalise(name: str, prefixes: dict[str, str]) -> str:
    parts = name.split(".")
    head = ".".join(parts[:3])
    return ".".join([prefixes[head], *parts[3:]]) if head in prefixes else name


class StatsCollector:
    """Drives the ``megacpp_set_step``/``megacpp_stats`` hooks of every module of ``chunks``."""

    def __init__(self, chunks: Iterable[torch.nn.Module]):
        self.step_hooks: list[tuple[str, torch.nn.Module]] = []
        self._takes_total: set[int] = set()  # id() of the modules whose hook takes total_steps
        self.stat_hooks: list[tuple[str, torch.nn.Module]] = []
        for chunk in chunks:
            model = unwrap_model(chunk)
            global_names = _global_layer_prefixes(model)
            for name, module in model.named_modules():
                name = _globalise(name, global_names)
                if callable(getattr(module, SET_STEP, None)):
                    self.step_hooks.append((name, module))
                    if "total_steps" in inspect.signature(getattr(module, SET_STEP)).parameters:
                        self._takes_total.add(id(module))
                if callable(getattr(module, STATS, None)):
                    self.stat_hooks.append((name, module))
        self.latest: dict[str, float] = {}

    def __len__(self) -> int:
        return len({name for name, _ in self.step_hooks + self.stat_hooks})

    def set_step(self, step: int, total_steps: int | None = None) -> None:
        """Before step ``step`` (0-based) of a ``total_steps`` run: tell every scheduled module the
        step (and the run's length, to the hooks that take it)."""
        for _, module in self.step_hooks:
            if id(module) in self._takes_total:
                getattr(module, SET_STEP)(step, total_steps=total_steps)
            else:
                getattr(module, SET_STEP)(step)

    def collect(self) -> dict[str, float]:
        """After a step: every module's statistics, keys prefixed ``<qualified name>.``."""
        out: dict[str, float] = {}
        for name, module in self.stat_hooks:
            values = getattr(module, STATS)()
            if not isinstance(values, dict):
                raise TypeError(f"{name or type(module).__name__}.{STATS}() must return a dict, "
                                f"got {type(values).__name__}")
            for key, value in values.items():
                out[f"{name}.{key}" if name else str(key)] = float(value)
        self.latest = out
        return out

    def gather(self) -> dict[str, float]:
        """The latest statistics of all ranks, merged (call on every rank)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return dict(self.latest)
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, self.latest)
        merged: dict[str, float] = {}
        for part in parts:
            merged.update(part or {})
        return dict(sorted(merged.items()))


def format_stats(stats: dict[str, float], limit: int = 8) -> str:
    """A compact one-line rendering of up to ``limit`` statistics."""
    items = [f"{k}={v:.4g}" for k, v in list(stats.items())[:limit] if not math.isnan(v)]
    more = len(stats) - limit
    return " ".join(items) + (f" (+{more} more)" if more > 0 else "")
