"""Without TE and apex the block's final norm is ``WrappedTorchNorm``, which refuses sequence parallel.

``TransformerBlock`` fans a single layer spec out into ``TransformerBlockSubmodules(layer_norm=
LayerNormImpl)``; ``LayerNormImpl`` is ``TENorm``, apex's ``FusedLayerNorm`` or, on a CPU host,
``WrappedTorchNorm``, whose ``__new__`` asserts ``not config.sequence_parallel``. The patch sets
``LayerNormImpl`` to :class:`~megacpp_mcore.layers.norms.LocalNorm` (LayerNorm or RMSNorm that marks
its params sequence-parallel) when it is ``WrappedTorchNorm``. ``SCOPE = "cpu"``: the registry
applies it only on hosts without CUDA.
"""

from __future__ import annotations

import importlib
import inspect

NAME = "cpu-block-norm"
TARGETS = "megatron-core >=0.16,<0.20"  # defect read in 0.16.1, 0.17.1, 0.18.2, 0.19.2
SCOPE = "cpu"
DESCRIPTION = (
    "without TE/apex the fanned-out block's final norm is WrappedTorchNorm, which refuses "
    "sequence parallel; use megacpp_mcore.layers.norms.LocalNorm"
)

_BLOCK = "megatron.core.transformer.transformer_block"
_TORCH_NORM = "megatron.core.transformer.torch_norm"
_DEFECT = "not config.sequence_parallel"


def _targets():
    try:
        block = importlib.import_module(_BLOCK)
        torch_norm = importlib.import_module(_TORCH_NORM)
    except ImportError:
        return None
    if not hasattr(block, "LayerNormImpl") or not hasattr(torch_norm, "WrappedTorchNorm"):
        return None
    return block, torch_norm.WrappedTorchNorm


def check() -> str:
    """``needed`` while ``WrappedTorchNorm`` asserts ``not config.sequence_parallel``,
    ``fixed-upstream`` once it accepts SP, ``target-missing`` when either name moved."""
    targets = _targets()
    if targets is None:
        return "target-missing"
    _, wrapped_torch_norm = targets
    return "needed" if _DEFECT in inspect.getsource(wrapped_torch_norm) else "fixed-upstream"


def applied() -> bool:
    from megacpp_mcore.layers.norms import LocalNorm

    targets = _targets()
    return targets is not None and targets[0].LayerNormImpl is LocalNorm


def apply() -> list[str]:
    """Sets ``LayerNormImpl`` to ``LocalNorm`` when it is ``WrappedTorchNorm`` (TENorm and apex's
    norm are left alone); returns what changed."""
    from megacpp_mcore.layers.norms import LocalNorm

    targets = _targets()
    if targets is None:
        return []
    block, wrapped_torch_norm = targets
    if block.LayerNormImpl is not wrapped_torch_norm:
        return []
    block.LayerNormImpl = LocalNorm
    return [f"{_BLOCK}.LayerNormImpl"]
