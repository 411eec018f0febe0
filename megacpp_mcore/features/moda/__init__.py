"""MoDA: depth-KV attention. Attention layers read the K/V that earlier attention layers wrote at the
same position (off by default; attach with ``hybrid_block_spec(..., moda=MoDAConfig())``).

At position ``t`` of layer ``l`` the softmax runs over the causal sequence keys ``k_l[0..t]`` AND the
depth keys ``k_j[t]`` of the contributing layers ``j < l`` of the same buffer segment:

    out_l[t] = softmax([q_l[t] . k_l[0..t], q_l[t] . K_depth[:, t]] * scale) @ [v_l[0..t], V_depth[:, t]]

The package reads the way data flows:

* :mod:`.config`: :class:`MoDAConfig` (placement on ``A`` layers only, ``detach``,
  ``contributing_layers``, ``boundaries``, kernels) and :func:`depth_kv_bytes`, the memory bill;
* :mod:`.buffer`: the depth K/V buffer of one segment, owned by the model chunk being built
  (``LayerContext.chunk``) and held by that chunk's MoDA modules; no process-global state;
* :mod:`.attention`: :class:`DepthAwareAttention`, the ``core_attention`` of Megatron's
  ``SelfAttention`` / ``MLASelfAttention``, and :func:`transform`, MoDA's entry at the composer's
  ``core_attention`` seam (:mod:`megacpp_mcore.features`);
* :mod:`.reference` (explicit keys, plain autograd) and :mod:`.fast` (a flash kernel's
  log-sum-exp merged with the depth part, hand-written backward) agree to fp32 round-off; the fast
  path's pieces are :mod:`.sequence` (the sequence kernels), :mod:`.depth` (the depth math) and
  :mod:`.kernels` (its fused Triton form, CUDA).

Detach (default): the buffer holds copies without autograd history, so no gradient reaches an earlier
layer through its depth K/V (the buffer costs its bytes, nothing more). ``detach=False`` (the
published variant) routes the depth-K/V gradients back to the contributing layers' K/V.

Pipeline parallelism: the buffer spans only the layers of one pipeline stage and virtual chunk (a
"segment"); it restarts at every chunk's first layer and at every layer listed in
``MoDAConfig.boundaries``. A model therefore means the same thing on one rank as on ``pp`` ranks when
its ``boundaries`` list the pipeline chunk starts (tests prove PP=2 equals that single-rank run).
K/V never cross a pipeline send.
"""

from megacpp_mcore.features.moda.attention import DepthAwareAttention, transform
from megacpp_mcore.features.moda.config import MoDAConfig, depth_kv_bytes

__all__ = ["DepthAwareAttention", "MoDAConfig", "depth_kv_bytes", "transform"]
