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
* :mod:`.branch`: the trainable norm, router and adapter (:class:`SkipBranch`: the router and the
  adapter's down projection in one GEMM, the norm folded into it) and their names in a model (:func:`is_branch_parameter`: what a frozen-backbone fine-tune trains);
* :mod:`.usage`: the usage penalty riding on the router score's backward, the per-layer statistics,
  :func:`usage_summary` (mean layers used, overall skip rate) and :func:`usage_report` (plus the
  per-layer skip rates and the penalty: the training loop's lines and receipt);
* :mod:`.dispatch`: hard-skip inference as route -> dispatch -> combine (:class:`SkipDispatcher`);
* :mod:`.kernels`: the combine's one pass (block rows where kept, the skip path elsewhere), its
  Triton kernel in :mod:`.combine_triton`;
* :mod:`.route_triton`: a capacity route (mask, gather index, source rows) as one Triton kernel
  (off until run on a GPU: ``dispatch.ROUTE_KERNEL``);
* :mod:`.layer`: :class:`FlexiDepthLayer` and :func:`transform`.
"""

from megacpp_mcore.features.flexidepth.branch import TRAINABLE_PATTERN, SkipBranch, is_branch_parameter
from megacpp_mcore.features.flexidepth.config import FlexiDepthConfig
from megacpp_mcore.features.flexidepth.dispatch import SkipDispatcher
from megacpp_mcore.features.flexidepth.layer import FlexiDepthLayer, flexidepth_layer_class, transform
from megacpp_mcore.features.flexidepth.usage import format_usage, usage_report, usage_summary

__all__ = ["FlexiDepthConfig", "FlexiDepthLayer", "SkipBranch", "SkipDispatcher", "TRAINABLE_PATTERN",
           "flexidepth_layer_class", "format_usage", "is_branch_parameter", "transform",
           "usage_report", "usage_summary"]
