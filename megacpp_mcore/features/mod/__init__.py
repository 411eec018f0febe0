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
"""

from megacpp_mcore.features.mod.config import MoDConfig
from megacpp_mcore.features.mod.layer import MoDLayer, mod_layer_class, mod_layer_spec
from megacpp_mcore.features.mod.rope import TokenRopeAttention
from megacpp_mcore.features.mod.topk import TopkDispatcher

transform = mod_layer_spec

__all__ = ["MoDConfig", "MoDLayer", "TokenRopeAttention", "TopkDispatcher", "mod_layer_class",
           "mod_layer_spec", "transform"]
