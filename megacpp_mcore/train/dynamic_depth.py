"""Dynamic depth in the training loop: the FlexiDepth fine-tune of a dense checkpoint, validation
with each feature's inference routing, and FlexiDepth's bookkeeping in the progress lines.

``megacpp-mcore train --load <dense checkpoint> --flexidepth [OPTIONS] --freeze-backbone``:

* :func:`check` (before anything starts) validates the flags and says what ``--load`` is to this
  run (:func:`~megacpp_mcore.train.checkpoint.check_checkpoint_matches`): ``"resume"`` (the same
  model, frozen the same way: model, optimizer, LR schedule, step and data position continue) or
  ``"backbone"`` (the checkpoint holds this model without FlexiDepth: its weights initialize the
  backbone, :func:`~megacpp_mcore.train.checkpoint.load_backbone`; the FlexiDepth parameters keep
  their initialization; optimizer, LR schedule, step and data position start fresh, as a
  fine-tune's do);
* :func:`trainable` is ``--freeze-backbone``'s parameter filter (FlexiDepth's routers, their norms
  and the adapters, :func:`~megacpp_mcore.features.flexidepth.is_branch_parameter`), applied by
  ``runtime.build_model`` before Megatron's DDP wrap: the frozen backbone gets no gradient buffer,
  and ``get_megatron_optimizer`` (0.16 and 0.19 alike) skips parameters without ``requires_grad``,
  so the optimizer holds the trainable ones only;
* :func:`validating` runs a validation in eval mode (as Megatron-LM's ``evaluate`` does), so
  FlexiDepth's ``inference="hard"`` really skips and MoD uses its ``inference`` routing, and reports
  FlexiDepth's usage over the validation forwards alone;
* :func:`usage` / :func:`usage_text`: mean layers used, overall and per-layer skip rate and the
  squared total-usage penalty (:func:`~megacpp_mcore.features.flexidepth.usage_report`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from megacpp_mcore.models.presets import ModelConfig
from megacpp_mcore.train.checkpoint import check_checkpoint_matches


def check(model: ModelConfig, cfg, load: tuple[Path, int] | None) -> str | None:
    """What ``--load`` is to this run (``"resume"`` | ``"backbone"``; ``None`` without one);
    ``ValueError`` for flags that do not fit together (module docstring)."""
    from megacpp_mcore.features.flexidepth.config import mod_conflict

    has_fd = "flexidepth" in model.features
    for e in model.layer_table() if has_fd else ():
        if {"mod", "flexidepth"} <= e.features:
            raise ValueError(mod_conflict(f"layer {e.index} ({e.symbol!r})") + " (or start from a preset "
                             "without MoD, e.g. --preset nam56r-tiny-dense)")
    if cfg.freeze_backbone and not has_fd:
        raise ValueError("--freeze-backbone trains FlexiDepth's routers and adapters only, and the model "
                         "carries no FlexiDepth; add --flexidepth")
    if cfg.freeze_backbone and load is None:
        raise ValueError("--freeze-backbone needs --load: the frozen backbone comes from a trained checkpoint "
                         "(a dense one to fine-tune, or this fine-tune's own to resume it)")
    if load is None:
        return None
    return check_checkpoint_matches(load[0], model, frozen_backbone=cfg.freeze_backbone)


def trainable(cfg) -> Callable[[str], bool] | None:
    """The parameter filter of ``--freeze-backbone`` (``None``: everything trains)."""
    from megacpp_mcore.features.flexidepth import is_branch_parameter

    return is_branch_parameter if cfg.freeze_backbone else None


def frozen_report(cfg) -> str | None:
    """The receipt's record of what trained: the trainable names' pattern, or ``None`` (all)."""
    from megacpp_mcore.features.flexidepth import TRAINABLE_PATTERN

    return TRAINABLE_PATTERN if cfg.freeze_backbone else None


def usage(stats: dict[str, float], model: ModelConfig) -> dict[str, Any] | None:
    """FlexiDepth's usage report of ``stats`` (``None`` for a model without FlexiDepth)."""
    from megacpp_mcore.features.flexidepth import usage_report

    return usage_report(stats, model.num_layers) if "flexidepth" in model.features else None


def usage_text(stats: dict[str, float], model: ModelConfig) -> str:
    """`` | flexidepth ...`` for a progress line ('' without FlexiDepth)."""
    from megacpp_mcore.features.flexidepth import format_usage

    report = usage(stats, model)
    return f" | {format_usage(report)}" if report else ""


def _gather(stats: dict[str, float]) -> dict[str, float]:
    """``stats`` of every rank merged (pipeline stages hold different layers)."""
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, stats)
    return {k: v for part in parts for k, v in part.items()}


@contextlib.contextmanager
def validating(chunks, collector, model: ModelConfig, step: int) -> Iterator[dict[str, Any]]:
    """Validation forwards in eval mode; the dict it yields is filled on exit with FlexiDepth's
    usage over those forwards (``skip_rate``, ``mean_layers_used``; empty without FlexiDepth).
    Every rank takes part (one all-gather)."""
    from megacpp_mcore.features.flexidepth import FlexiDepthLayer

    layers = [(name, m) for name, m in collector.stat_hooks if isinstance(m, FlexiDepthLayer)]
    for _, layer in layers:  # a fresh statistics window: the validation forwards only
        layer.megacpp_set_step(step)
    for chunk in chunks:
        chunk.eval()
    found: dict[str, Any] = {}
    try:
        yield found
    finally:
        for chunk in chunks:
            chunk.train()
    if "flexidepth" not in model.features:
        return
    report = usage(_gather({f"{name}.{k}": v for name, m in layers for k, v in m.megacpp_stats().items()}),
                   model)
    found.update(skip_rate=report["overall_skip_rate"], mean_layers_used=report["mean_layers_used"])
