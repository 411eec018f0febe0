"""Megatron's schedule sets the auxiliary-loss backward scale only for models with MoE.

Auxiliary losses that ride on an activation's backward (Megatron's MoE load-balancing loss through
``MoEAuxLossAutoScaler``; MoD's sparsity and router losses, which read the same scale) need the
backward scale of the main loss: ``grad_scale_func(1) * cp / num_microbatches`` for a
per-micro-batch mean loss (``grad_scale_func(1)`` with per-token loss). megatron-core 0.16's
``schedules.forward_step`` (through ``forward_step_calc_loss``) sets
``MoEAuxLossAutoScaler.main_loss_backward_scale`` to that value on every micro-batch, but only
when ``config.num_moe_experts`` is not None: on a dense model the scale stays unset (read as 1),
and MoD's losses act ``num_microbatches`` times too strongly relative to the LM loss (and ignore
the fp16 loss scale).

The patch wraps ``schedules.forward_step``: after upstream's step returns on a model without MoE
(``config.num_moe_experts is None``), it sets the same scale through upstream's own
``MoEAuxLossAutoScaler.set_loss_scale``. Models with MoE go through upstream unchanged. Every
schedule (no pipelining, 1F1B, interleaved, hybrid CP) calls ``forward_step`` through the module
at call time, so wrapping the module attribute reaches them all.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch

from megacpp_mcore.patches._wrapping import is_patched, upstream, wrap

NAME = "aux-loss-scale-without-moe"
TARGETS = "megatron-core >=0.16,<0.20"  # verified on 0.16 (the status asks to widen it)
DESCRIPTION = (
    "schedules.forward_step sets MoEAuxLossAutoScaler's backward scale (grad_scale * cp / "
    "num_microbatches) only when num_moe_experts is set, so auxiliary losses of dense models "
    "(MoD) keep scale 1"
)

_SCHEDULES = "megatron.core.pipeline_parallel.schedules"
_MOE_UTILS = "megatron.core.transformer.moe.moe_utils"


def _targets():
    """``(schedules module, MoEAuxLossAutoScaler)``, or ``None`` when either is gone."""
    try:
        schedules = importlib.import_module(_SCHEDULES)
        scaler = importlib.import_module(_MOE_UTILS).MoEAuxLossAutoScaler
    except (ImportError, AttributeError):
        return None
    if not (callable(getattr(schedules, "forward_step", None))
            and hasattr(scaler, "main_loss_backward_scale")):
        return None
    return schedules, scaler


def _probe(forward_step: Callable, scaler) -> object:
    """Runs upstream's ``forward_step`` once on a dense (no MoE) one-layer config, a stand-in
    model and a forward step returning a constant, at 4 micro-batches; returns the scale it left
    in ``scaler`` (``None``: not set). The scaler's state is restored afterwards."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    class _Model(torch.nn.Module):
        def set_input_tensor(self, tensor) -> None:
            pass

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                               use_cpu_initialization=True)
    saved = scaler.main_loss_backward_scale
    scaler.main_loss_backward_scale = None
    try:
        forward_step(lambda data_iterator, model: (torch.zeros(1), None), None, _Model(), 4, None,
                     [], config, 1, is_last_stage=True)
        return scaler.main_loss_backward_scale
    finally:
        scaler.main_loss_backward_scale = saved


def check() -> str:
    """``needed`` while upstream's ``forward_step`` leaves the aux-loss scale unset on a model
    without MoE; ``fixed-upstream`` once it sets it."""
    targets = _targets()
    if targets is None:
        return "target-missing"
    schedules, scaler = targets
    try:
        scale = _probe(upstream(schedules.forward_step, NAME), scaler)
    except (TypeError, AttributeError):  # the signature or the config contract changed: re-base
        return "target-missing"
    return "needed" if scale is None else "fixed-upstream"


def _set_scale(scaler, config, cp_group_size: int, num_microbatches: int, output) -> None:
    """``MoEAuxLossAutoScaler``'s scale for this micro-batch, as upstream sets it for MoE models:
    the main loss's backward scale (``grad_scale_func(1)``, 1 without one) divided over the
    micro-batches and multiplied by the CP size, unless the loss is per token."""
    tensor = output[0] if isinstance(output, (list, tuple)) and output else output
    if not isinstance(tensor, torch.Tensor):  # nothing differentiable came out (data collection)
        return
    ones = torch.ones(1, device=tensor.device)
    scale = config.grad_scale_func(ones) if config.grad_scale_func is not None else ones
    if not config.calculate_per_token_loss:
        scale = scale * cp_group_size / num_microbatches
    scaler.set_loss_scale(scale)


def _make_wrapper(original: Callable, scaler) -> Callable:
    signature = inspect.signature(original)

    def forward_step(*args, **kwargs):
        result = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs).arguments
        config = bound["config"]
        if getattr(config, "num_moe_experts", None) is None:  # upstream set it for MoE models
            _set_scale(scaler, config, bound["cp_group_size"], bound["num_microbatches"], result[0])
        return result

    return wrap(original, forward_step, NAME)


def applied() -> bool:
    targets = _targets()
    return targets is not None and is_patched(targets[0].forward_step, NAME)


def apply() -> list[str]:
    """Wraps ``schedules.forward_step`` (once); returns what it wrapped."""
    targets = _targets()
    if targets is None:
        return []
    schedules, scaler = targets
    if is_patched(schedules.forward_step, NAME):
        return []
    schedules.forward_step = _make_wrapper(schedules.forward_step, scaler)
    return [f"{_SCHEDULES}.forward_step"]
