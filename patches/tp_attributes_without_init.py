"""Tensor-parallel weights lose their shard markers when ``perform_initialization=False``.

In megatron-core 0.16 and 0.17, ``ColumnParallelLinear``, ``RowParallelLinear`` and
``VocabParallelEmbedding`` set ``tensor_model_parallel``/``partition_dim``/``partition_stride`` on
their weight only inside the weight-initialisation helpers, which run only when
``config.perform_initialization`` is true (``--no-initialization``, or a model built only to load a
checkpoint into). Without the markers ``param_is_not_tensor_parallel_duplicate`` treats every
sharded weight as a replica, so under TP > 1 the gradient norm (and clipping) counts only TP rank
0's shards, and anything that reads ``partition_dim`` (MTP's vocab-parallel loss) sees a weight
without its ownership contract. Fixed upstream in 0.18 (the markers are set in the ``else`` branch).

The patch wraps the three constructors: after upstream's ``__init__``, a weight that still lacks the
markers gets exactly what the initialisation helper would have set (column/embedding: dim 0, row:
dim 1, the layer's ``stride``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch

from megacpp_mcore.patches._wrapping import is_patched, upstream, wrap

NAME = "tp-attributes-without-init"
TARGETS = "megatron-core >=0.16,<0.18"
DESCRIPTION = (
    "tensor-parallel linears/embedding get no tensor_model_parallel/partition_dim markers when "
    "perform_initialization=False, so TP>1 grad norms count one shard"
)

_LAYERS = "megatron.core.tensor_parallel.layers"
# class name -> partition dim of its weight (what upstream's init helpers set)
PARTITION_DIM = {"ColumnParallelLinear": 0, "RowParallelLinear": 1, "VocabParallelEmbedding": 0}


class _SoloGroup:
    """A one-rank stand-in for a tensor-parallel group (the probe never communicates)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def _layers():
    try:
        module = importlib.import_module(_LAYERS)
    except ImportError:
        return None
    names = (*PARTITION_DIM, "set_tensor_model_parallel_attributes")
    return module if all(hasattr(module, n) for n in names) else None


def _probe_weights(module) -> list[torch.nn.Parameter]:
    """Weights of the three layers built by upstream's own ``__init__`` without initialisation."""
    from megatron.core.model_parallel_config import ModelParallelConfig

    config = ModelParallelConfig(perform_initialization=False, use_cpu_initialization=True)
    init = torch.nn.init.zeros_
    args = {
        "ColumnParallelLinear": ((4, 4), dict(config=config, init_method=init, bias=False)),
        "RowParallelLinear": ((4, 4), dict(config=config, init_method=init, bias=False,
                                           input_is_parallel=True, skip_bias_add=False)),
        "VocabParallelEmbedding": ((4, 4), dict(config=config, init_method=init)),
    }
    weights = []
    for cls_name, (positional, kwargs) in args.items():
        cls = getattr(module, cls_name)
        layer = cls.__new__(cls)
        upstream(cls.__init__, NAME)(layer, *positional, tp_group=_SoloGroup(), **kwargs)
        weights.append(layer.weight)
    return weights


def check() -> str:
    """``needed`` while upstream leaves the probe weights without ``tensor_model_parallel``."""
    module = _layers()
    if module is None:
        return "target-missing"
    try:
        weights = _probe_weights(module)
    except TypeError:  # constructor signatures changed: re-base
        return "target-missing"
    if all(getattr(w, "tensor_model_parallel", None) is True for w in weights):
        return "fixed-upstream"
    return "needed"


def _make_init(original: Callable, dim: int, set_attributes: Callable) -> Callable:
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        weight = getattr(self, "weight", None)
        if isinstance(weight, torch.Tensor) and not hasattr(weight, "tensor_model_parallel"):
            stride = signature.bind(self, *args, **kwargs).arguments.get("stride", 1)
            set_attributes(weight, True, dim, stride)

    return wrap(original, __init__, NAME)


def applied() -> bool:
    module = _layers()
    return module is not None and all(
        is_patched(getattr(module, cls).__init__, NAME) for cls in PARTITION_DIM
    )


def apply() -> list[str]:
    """Wraps the three constructors (once); returns the ones it wrapped."""
    module = _layers()
    if module is None:
        return []
    changed = []
    for cls_name, dim in PARTITION_DIM.items():
        cls = getattr(module, cls_name)
        if is_patched(cls.__init__, NAME):
            continue
        cls.__init__ = _make_init(cls.__init__, dim, module.set_tensor_model_parallel_attributes)
        changed.append(f"{_LAYERS}.{cls_name}.__init__")
    return changed
