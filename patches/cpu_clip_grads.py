"""``clip_grad_by_total_norm_fp32`` asserts that every grad is a ``torch.cuda.FloatTensor``.

On a CPU host the optimizer's gradient clipping therefore fails. The patch replaces the function
(in ``clip_grads`` and in ``optimizer``, which imported it by name) with one that scales every grad
by the same clip coefficient, on any device. ``SCOPE = "cpu"``: the registry applies it only on
hosts without CUDA.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch

from megacpp_mcore.patches._wrapping import is_patched, upstream, wrap

NAME = "cpu-clip-grads"
TARGETS = "megatron-core >=0.16,<0.20"  # defect read in 0.16.1, 0.17.1, 0.18.2, 0.19.2
SCOPE = "cpu"
DESCRIPTION = (
    "clip_grad_by_total_norm_fp32 asserts torch.cuda.FloatTensor grads; scale the grads by the "
    "clip coefficient on any device"
)

_FUNCTION = "clip_grad_by_total_norm_fp32"
# modules holding the function under its name (optimizer imported it from clip_grads)
_MODULES = ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer")
_DEFECT = "torch.cuda.FloatTensor"


def _targets():
    try:
        modules = [importlib.import_module(name) for name in _MODULES]
    except ImportError:
        return None
    if not all(callable(getattr(m, _FUNCTION, None)) for m in modules):
        return None
    return modules


def _upstream_function(modules):
    return upstream(getattr(modules[0], _FUNCTION), NAME)


def check() -> str:
    """``needed`` while upstream's function asserts a CUDA grad type, ``fixed-upstream`` once it
    does not, ``target-missing`` when it moved or lost its ``max_norm``/``total_norm`` arguments."""
    modules = _targets()
    if modules is None:
        return "target-missing"
    original = _upstream_function(modules)
    if not {"max_norm", "total_norm"} <= set(inspect.signature(original).parameters):
        return "target-missing"
    return "needed" if _DEFECT in inspect.getsource(original) else "fixed-upstream"


def _clip_on_any_device(original: Callable) -> Callable:
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        # the clip coefficient upstream computes; every grad scaled in place, wherever it lives
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for param in parameters:
                grad = param.decoupled_grad if use_decoupled_grad else param.grad
                if grad is not None:
                    grad.detach().mul_(clip_coeff)

    return wrap(original, clip_grad_by_total_norm_fp32, NAME)


def applied() -> bool:
    modules = _targets()
    return modules is not None and all(is_patched(getattr(m, _FUNCTION), NAME) for m in modules)


def apply() -> list[str]:
    """Replaces the function in every module that still holds upstream's; returns those."""
    modules = _targets()
    if modules is None:
        return []
    replacement = _clip_on_any_device(_upstream_function(modules))
    changed = []
    for module in modules:
        if not is_patched(getattr(module, _FUNCTION), NAME):
            setattr(module, _FUNCTION, replacement)
            changed.append(f"{module.__name__}.{_FUNCTION}")
    return changed
