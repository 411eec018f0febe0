"""FlexiDepth (arXiv 2503.23798): dynamic depth attached to a pretrained or partly frozen stack.

Per wrapped layer a router chooses, per token, between the full block and a light adapter path;
the backbone can stay frozen while router and adapter train; training keeps static shapes (both
branches on every token, mixed by the router score); hard inference really skips the block for
the tokens routed to the adapter. Its bookkeeping is its own: per-layer skip rate and router score,
the squared total-usage penalty, mean layers used.

The feature protocol: :class:`FlexiDepthConfig` and :func:`transform`, FlexiDepth's transform at
the ``layer`` seam (``transform(layer_spec, ctx) -> ModuleSpec``: the layer's spec wrapped into a
:class:`FlexiDepthLayer`). Modules, in the order data flows through a FlexiDepth layer:

* :mod:`.config`: :class:`FlexiDepthConfig` and its validation;
* :mod:`.branch`: the trainable norm, router and adapter (:class:`SkipBranch`);
* :mod:`.usage`: the usage penalty riding on the router score's backward, the per-layer statistics
  and :func:`usage_summary` (mean layers used, overall skip rate);
* :mod:`.dispatch`: hard-skip inference as route -> dispatch -> combine (:class:`SkipDispatcher`);
* :mod:`.layer`: :class:`FlexiDepthLayer` and :func:`transform`.
"""

from megacpp_mcore.features.flexidepth.branch import SkipBranch
from megacpp_mcore.features.flexidepth.config import FlexiDepthConfig
from megacpp_mcore.features.flexidepth.dispatch import SkipDispatcher
from megacpp_mcore.features.flexidepth.layer import FlexiDepthLayer, flexidepth_layer_class, transform
from megacpp_mcore.features.flexidepth.usage import usage_summary

__all__ = ["FlexiDepthConfig", "FlexiDepthLayer", "SkipBranch", "SkipDispatcher",
           "flexidepth_layer_class", "transform", "usage_summary"]
