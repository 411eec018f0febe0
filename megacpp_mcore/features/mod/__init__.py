"""Mixture-of-Depths: a per-token router on an ``A`` or ``E`` layer (gateskip | threshold | topk).

The feature protocol: :class:`MoDConfig` and :func:`transform`, MoD's transform at the ``layer``
seam (``transform(layer_spec, ctx) -> ModuleSpec``: the layer's spec wrapped into a
:class:`MoDLayer`). Modules, in the order data flows through a MoD layer:

* :mod:`.config`: :class:`MoDConfig` and its validation;
* :mod:`.gate`: router logits, the gate and its mean, the sparsity loss, the fused gateskip seam,
  the auxiliary-loss scale and the Triton-or-torch choice;
* :mod:`.topk`: top-k token selection as route -> dispatch -> combine (:class:`TopkDispatcher`);
* :mod:`.rope`: per-token rotary embeddings of the gathered tokens (:class:`TokenRopeAttention`);
* :mod:`.layer`: :class:`MoDLayer` and the spec builder; :mod:`.stats`: its lazy statistics;
* :mod:`.kernels`: the Triton kernels (CUDA; imported only when a layer uses them).

Importing the package (or :mod:`.config`, as the presets do) loads the config only; the layer
modules (torch, megatron) load when one of their names is first asked for.
"""

import importlib

from megacpp_mcore.features.mod.config import MoDConfig

# name -> (module, attribute): the torch/megatron side, loaded on first access
_LAZY = {
    "MoDLayer": ("layer", "MoDLayer"),
    "mod_layer_class": ("layer", "mod_layer_class"),
    "mod_layer_spec": ("layer", "mod_layer_spec"),
    "transform": ("layer", "mod_layer_spec"),
    "TokenRopeAttention": ("rope", "TokenRopeAttention"),
    "TopkDispatcher": ("topk", "TopkDispatcher"),
}

__all__ = ["MoDConfig", "MoDLayer", "TokenRopeAttention", "TopkDispatcher", "mod_layer_class",
           "mod_layer_spec", "transform"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
