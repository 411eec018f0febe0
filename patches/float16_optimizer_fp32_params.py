"""Megatron's bf16/fp16 optimizer cannot checkpoint a model that also holds fp32 parameters.

``Float16OptimizerWithFloat16Params`` keeps 16-bit parameters (through fp32 main copies) and fp32
parameters (as they are) in the same inner-optimizer parameter groups. Its
``sharded_state_dict`` numbers the parameters by enumerating the 16-bit ones only
(``chain(self.float16_groups)``), while the inner optimizer's state is numbered over every
parameter of its groups; and it pairs each group's ids with that group's fp32 main copies by
position. As soon as one fp32 parameter precedes a 16-bit one, ids point at the wrong model
tensors: ``make_sharded_optimizer_tensor`` fails on the shape, or (equal shapes) the state lands
under another parameter's key. Megatron-LM never meets it (``Float16Module`` casts every
parameter to 16 bits); ``megacpp-mcore train`` builds the model in bf16 directly and keeps
Mamba-2's ``A_log``/``D`` and M2RNN's state parameters in fp32, so its first checkpoint on a GPU
failed (H200, 2026-12-04).

The patch wraps ``sharded_state_dict``: when the optimizer holds fp32 parameters it numbers the
inner optimizer's parameters as the inner optimizer does, maps each to its model parameter (a
16-bit parameter's fp32 main copy to the 16-bit parameter) and builds the same structure with
upstream's own helpers (``make_sharded_optimizer_tensor``, ``optim_state_to_sharding_state``,
the common step), so ``load_state_dict`` reads it unchanged. Optimizers without fp32 parameters
go through upstream unchanged.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from megacpp_mcore.patches._wrapping import is_patched, upstream, wrap

NAME = "float16-optimizer-fp32-params"
TARGETS = "megatron-core >=0.16,<0.20"  # the defect is in 0.16.1 and 0.19.2
DESCRIPTION = (
    "Float16OptimizerWithFloat16Params.sharded_state_dict numbers only the 16-bit parameters while "
    "the optimizer state is numbered over all, so a bf16 model with fp32 parameters (Mamba A_log/D, "
    "M2RNN) cannot save a checkpoint"
)

_OPTIMIZER = "megatron.core.optimizer.optimizer"


def _target():
    """``Float16OptimizerWithFloat16Params``, or ``None`` when it or the helpers moved."""
    try:
        module = importlib.import_module(_OPTIMIZER)
        importlib.import_module("megatron.core.dist_checkpointing.optimizer")
    except ImportError:
        return None
    cls = getattr(module, "Float16OptimizerWithFloat16Params", None)
    if cls is None or not callable(getattr(cls, "sharded_state_dict", None)):
        return None
    return cls


def _id_map(optimizer, model_sharded_state_dict) -> tuple[dict, set[int]]:
    """(inner-optimizer parameter index -> the model's ShardedTensor, the indices that are fp32
    main copies of 16-bit parameters). Indices follow ``torch.optim.Optimizer.state_dict``: every
    parameter of every group, in order; upstream's own mapping helper takes them in that order,
    each main copy replaced by its 16-bit model parameter."""
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

    model_of = {}  # id(fp32 main copy) -> the 16-bit model parameter
    for params, mains in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups):
        for param, main in zip(params, mains):
            model_of[id(main)] = param
    inner = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
    id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict,
                                               [model_of.get(id(p), p) for p in inner])
    return id_map, {i for i, p in enumerate(inner) if id(p) in model_of}


def _sharded_state_dict(optimizer, model_sharded_state_dict, is_loading: bool = False):
    """Upstream's structure with the parameters numbered right (module docstring)."""
    from megatron.core.dist_checkpointing.optimizer import (
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    if is_loading:
        optimizer.init_state_fn(optimizer.optimizer, optimizer.config)
    state_dict = optimizer.state_dict()
    id_map, mains = _id_map(optimizer, model_sharded_state_dict)
    groups = state_dict["optimizer"]["param_groups"]
    assert len(state_dict["fp32_from_fp16_params"]) == len(groups)
    state_dict["fp32_from_fp16_params"] = [
        [make_sharded_optimizer_tensor(id_map[i], main, prefix="optimizer.state.fp32_param")
         for i, main in zip([i for i in group["params"] if i in mains], fp32_group)]
        for fp32_group, group in zip(state_dict["fp32_from_fp16_params"], groups)
    ]
    step = optimizer._extract_common_per_param_step(state_dict["optimizer"])
    optim_state_to_sharding_state(state_dict["optimizer"], id_map, exclude_keys="step")
    if step:
        state_dict["optimizer"]["state"]["common_step"] = step
    return state_dict


def _has_fp32_params(optimizer) -> bool:
    return any(group for group in getattr(optimizer, "fp32_from_fp32_groups", ()))


def _make_wrapper(original: Callable) -> Callable:
    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, *args, **kwargs):
        if not _has_fp32_params(self):
            return original(self, model_sharded_state_dict, is_loading, *args, **kwargs)
        return _sharded_state_dict(self, model_sharded_state_dict, is_loading)

    return wrap(original, sharded_state_dict, NAME)


def _probe_optimizer(cls):
    """A stand-in of ``cls`` (built without its CUDA-allocating ``__init__``) over an fp32
    parameter ``a`` [3] followed by a 16-bit one ``b`` [5], one Adam step taken; and the model's
    sharded state dict of the two."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(5, dtype=torch.bfloat16))
    main = b.detach().clone().float()
    inner = torch.optim.Adam([a, main])
    a.grad, main.grad = torch.ones(3), torch.ones(5)
    inner.step()
    optimizer = cls.__new__(cls)
    optimizer.optimizer, optimizer.grad_scaler, optimizer.config = inner, None, None
    optimizer.float16_groups, optimizer.fp32_from_float16_groups = [[b]], [[main]]
    optimizer.fp32_from_fp32_groups = [[a]]
    model = {"a": ShardedTensor.from_rank_offsets("a", a), "b": ShardedTensor.from_rank_offsets("b", b)}
    return optimizer, model


def check() -> str:
    """``needed`` while upstream's ``sharded_state_dict`` fails or files an fp32 parameter's
    state under another key (probe: fp32 ``a`` then bf16 ``b``); ``fixed-upstream`` once ``a``'s
    moments are keyed ``a``."""
    cls = _target()
    if cls is None:
        return "target-missing"
    try:
        optimizer, model = _probe_optimizer(cls)
    except (TypeError, AttributeError, ImportError):
        return "target-missing"
    try:
        state = upstream(cls.sharded_state_dict, NAME)(optimizer, model)
    except (AssertionError, KeyError, ValueError):  # the ids point at the wrong tensors
        return "needed"
    except (TypeError, AttributeError):  # the method's contract changed: re-base
        return "target-missing"
    moments = state["optimizer"]["state"].get(0, {})
    key = getattr(moments.get("exp_avg"), "key", "")
    return "fixed-upstream" if key.endswith(".a") else "needed"


def applied() -> bool:
    cls = _target()
    return cls is not None and is_patched(cls.sharded_state_dict, NAME)


def apply() -> list[str]:
    """Wraps ``Float16OptimizerWithFloat16Params.sharded_state_dict`` (once)."""
    cls = _target()
    if cls is None or applied():
        return []
    cls.sharded_state_dict = _make_wrapper(cls.sharded_state_dict)
    return [f"{_OPTIMIZER}.Float16OptimizerWithFloat16Params.sharded_state_dict"]
