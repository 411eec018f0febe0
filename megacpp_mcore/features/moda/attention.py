"""MoDA: depth-KV attention. Attention layers read the K/V that earlier attention layers wrote at the
same position (off by default; attach with ``hybrid_block_spec(..., moda=MoDAConfig())``).

At position ``t`` of layer ``l`` the softmax runs over the causal sequence keys ``k_l[0..t]`` AND the
depth keys ``k_j[t]`` of the contributing layers ``j < l`` of the same buffer segment (see below):

    out_l[t] = softmax([q_l[t] . k_l[0..t], q_l[t] . K_depth[:, t]] * scale) @ [v_l[0..t], V_depth[:, t]]

Pieces (all in this module):

* :class:`MoDAConfig`: placement (``A`` layers only, refused elsewhere by the pattern compiler),
  ``detach`` (default True), ``contributing_layers`` (which MoDA layers push; default all),
  ``boundaries`` (extra layers where the buffer restarts) and ``kernel`` (``fast`` | ``reference``).
* :class:`DepthKVBuffer`: one per buffer segment. Contributing layers copy their K/V (after the
  projections they already compute, i.e. what the core attention receives) into a preallocated
  ``[s, b, g, slots, d]`` pair of tensors. A fresh pair is allocated for every micro-batch (the first
  MoDA layer of the segment starts it), so micro-batches in flight in a pipeline schedule each keep
  their own buffer until their backward. Its allocated bytes equal :func:`depth_kv_bytes` exactly.
* :func:`reference_depth_attention` (explicit keys and mask, plain autograd) and
  :func:`fast_depth_attention` (a causal flash-attention kernel that returns its log-sum-exp, merged
  with the small per-position depth attention through the log-sum-exp, with a hand-written
  backward). They agree to fp32 round-off (tests/test_moda.py).
* :class:`DepthAwareAttention`: the ``core_attention`` of Megatron's ``SelfAttention`` (and of
  ``MLASelfAttention``: ``k_channels`` may differ from ``v_channels``) on both backends.

Sequence kernel: a layer that reads no depth keys (the first MoDA layer of a segment) runs the
backend's own core attention (``TEDotProductAttention`` / ``DotProductAttention``) and only pushes.
Layers that read depth keys need the sequence part's log-sum-exp for the merge, and TE's public
attention module does not return softmax statistics, so they run one of: on CUDA with
``MoDAConfig(cuda_kernel="te")`` TE's ``fused_attn_fwd``/``fused_attn_bwd`` (the cuDNN kernel TE's
``DotProductAttention`` runs on Hopper; its softmax statistics are the log-sum-exp; sbhd layout, GQA
native, equal K/V head dims; the fastest on the H200), with ``cuda_kernel="flash"``
``aten._scaled_dot_product_flash_attention`` (FlashAttention-2; bf16/fp16, head dim <= 256), with
``cuda_kernel="cudnn"`` ``aten._scaled_dot_product_cudnn_attention``; the default ``"auto"`` is
``te`` when TE is importable and the K/V head dims are equal, else ``flash``. On CPU
``aten._scaled_dot_product_flash_attention_for_cpu``. For the aten kernels GQA groups are expanded
and unequal K/V head dims (MLA) are zero-padded to one width. The kernels' backward ops are given the
MERGED output and log-sum-exp, which makes the sequence-part gradients exact for the joint softmax
(the ring-attention identity). The kernel used is recorded in
:attr:`DepthAwareAttention.observed_kernel`.

Memory: a depth-reading layer holds for backward exactly what TE's attention holds (contiguous q, k,
v, the output, the fp32 log-sum-exp; views of Megatron's fused QKV output are copied, as TE does, so
they do not pin the whole projection), so the MoDA memory bill is the buffer, ``depth_kv_bytes``.
Depth part (per depth-reading layer): on CUDA the fused Triton kernels of
:mod:`megacpp_mcore.features.moda.kernels` (``MoDAConfig.depth_kernel="auto"``, the default, when triton
imports): forward ONE pass (read q, depth K/V, the sequence output; write the merged output in place
and the joint lse), backward ONE pass (read q, dO, O, depth K/V; add into the sequence kernel's dQ in
place). Their first forward and backward in a process are checked against the torch path below
(disagreement: a warning and the torch path; ``depth_kernel="triton"`` raises instead). The torch
path (CPU, ``depth_kernel="torch"``, and ``detach=False`` backward, which also needs depth-K/V
grads): fp32-accumulating batched matmuls for the [rows, r, n] scores (``torch.bmm(out_dtype=
float32)`` on CUDA), then two in-place full-size passes in the output dtype forward (reweight the
sequence output, ``baddbmm_`` the depth output into it) and one backward (``baddbmm_`` into dQ); no
full-size fp32 temporaries (tests/test_moda.py::test_depth_path_full_size_passes).

Detach (default): the buffer holds copies without autograd history, so no gradient reaches an earlier
layer through its depth K/V (the buffer costs its bytes, nothing more). ``detach=False`` (the
published variant) routes the depth-K/V gradients back to the contributing layers' K/V.

Pipeline parallelism: the buffer spans only the layers of one pipeline stage and virtual chunk (a
"segment"); it restarts at every chunk's first layer and at every layer listed in
``MoDAConfig.boundaries``. A model therefore means the same thing on one rank as on ``pp`` ranks when
its ``boundaries`` list the pipeline chunk starts (tests prove PP=2 equals that single-rank run).
K/V never cross a pipeline send.

Mixture-of-Depths: MoDA pushes happen inside the core attention, for the positions the attention
sees. MoD's ``gateskip`` and ``threshold`` modes keep every position on the path, so every position
pushes. A token-dropping (``topk``) wrapper that hands the attention a shorter sequence is refused at
the push with a shape error; such a wrapper must run the attention on all positions.

Not supported (refused at build time with a ValueError): recomputing the core attention (full
recompute, or selective with ``core_attn``: it would replay pushes), context parallelism, attention
dropout, non-vanilla softmax, sliding windows; at run time: packed (``thd``) sequences and KV-cache
inference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import weakref
from typing import Any, Iterator

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megacpp_mcore.spec.pattern import FeaturePlacement, stage_lengths

KERNELS = ("fast", "reference")
CUDA_KERNELS = ("auto", "flash", "cudnn", "te")
DEPTH_KERNELS = ("auto", "triton", "torch")


def depth_kv_bytes(batch: int, seq: int, layers: int, n_kv_heads: int, head_dim: int,
                   dtype: torch.dtype, *, v_head_dim: int | None = None) -> int:
    """Bytes of one micro-batch's depth buffer: ``batch*seq*layers*n_kv_heads*head_dim*bytes*2``.

    ``v_head_dim`` (MLA: K and V head dims differ) replaces the ``head_dim * 2`` by
    ``head_dim + v_head_dim``.
    """
    for name, value in (("batch", batch), ("seq", seq), ("layers", layers),
                        ("n_kv_heads", n_kv_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"depth_kv_bytes: {name} must be an int >= 0, got {value!r}")
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"depth_kv_bytes: dtype must be a torch.dtype, got {dtype!r}")
    elem = torch.empty((), dtype=dtype).element_size()
    channels = head_dim * 2 if v_head_dim is None else head_dim + v_head_dim
    return batch * seq * layers * n_kv_heads * channels * elem


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoDAConfig:
    """Which ``A`` layers are depth-aware and how their depth buffer behaves."""

    placement: FeaturePlacement = FeaturePlacement(symbols="A")
    detach: bool = True  # no gradient flows through the buffer (memory); False: published variant
    contributing_layers: tuple[int, ...] | None = None  # MoDA layers that push; None: all of them
    boundaries: tuple[int, ...] = ()  # extra layer indices where the buffer restarts
    kernel: str = "fast"  # "fast" (flash + log-sum-exp merge) | "reference" (explicit keys)
    # fast path's sequence kernel on CUDA: "auto" (TE's fused attention when TE is importable and
    # the K/V head dims are equal, else FA2) | "flash" (FA2) | "cudnn" | "te"
    cuda_kernel: str = "auto"
    # depth part on CUDA: "auto" (fused Triton kernels when triton imports, checked once against
    # "torch"; else "torch") | "triton" | "torch" (batched matmuls)
    depth_kernel: str = "auto"

    def __post_init__(self):
        if not isinstance(self.placement, FeaturePlacement):
            raise ValueError(f"MoDAConfig.placement must be a FeaturePlacement, got {self.placement!r}")
        if set(self.placement.symbols) - {"A"} or self.placement.allow_on:
            raise ValueError(
                f"MoDAConfig.placement={self.placement!r}: MoDA attaches to attention layers only; "
                "allowed symbols: 'A' (no allow_on)"
            )
        if not isinstance(self.detach, bool):
            raise ValueError(f"MoDAConfig.detach must be a bool, got {self.detach!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"MoDAConfig.kernel={self.kernel!r}; allowed: {', '.join(KERNELS)}")
        if self.cuda_kernel not in CUDA_KERNELS:
            raise ValueError(
                f"MoDAConfig.cuda_kernel={self.cuda_kernel!r}; allowed: {', '.join(CUDA_KERNELS)}")
        if self.depth_kernel not in DEPTH_KERNELS:
            raise ValueError(
                f"MoDAConfig.depth_kernel={self.depth_kernel!r}; allowed: {', '.join(DEPTH_KERNELS)}")
        for name in ("contributing_layers", "boundaries"):
            value = getattr(self, name)
            if value is None and name == "contributing_layers":
                continue
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"MoDAConfig.{name} must be a sequence of layer indices, got {value!r}")
            value = tuple(value)
            bad = [i for i in value if isinstance(i, bool) or not isinstance(i, int) or i < 0]
            if bad:
                raise ValueError(f"MoDAConfig.{name}: {bad[0]!r} is not a layer index (0-based int >= 0)")
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoDAConfig":
        """From a JSON-able dict (``placement`` as a dict of FeaturePlacement fields)."""
        data = dict(data)
        if isinstance(data.get("placement"), dict):
            data["placement"] = FeaturePlacement(**data["placement"])
        return cls(**data)

    def contributes(self, index: int) -> bool:
        """Whether MoDA layer ``index`` pushes its K/V."""
        return self.contributing_layers is None or index in self.contributing_layers

    def segments(self, num_layers: int, chunk_starts: Iterator[int] = (0,)) -> list[range]:
        """Buffer segments: layer ranges split at pipeline chunk starts and ``boundaries``."""
        starts = sorted({0, *chunk_starts, *(b for b in self.boundaries if b < num_layers)})
        return [range(a, b) for a, b in zip(starts, starts[1:] + [num_layers])]

    def buffer_bytes(self, model, micro_batch: int, *, tp: int = 1, pp: int = 1,
                     dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of the largest segment's depth buffer per GPU for ``model`` (a ModelConfig).

        One micro-batch; with pipeline parallelism each in-flight micro-batch holds its own buffer
        until its backward, like its activations.
        """
        table = model.layer_table()
        moda_layers = [e for e in table if "moda" in e.features]
        bad = [i for i in self.contributing_layers or ()
               if i >= len(table) or "moda" not in table[i].features]
        if bad:
            raise ValueError(
                f"MoDAConfig.contributing_layers names layer {bad[0]}, which is not a MoDA layer; "
                f"MoDA layers: {[e.index for e in moda_layers]}"
            )
        if not moda_layers:
            return 0
        mla_flags = {"mla" in e.features for e in moda_layers}
        if len(mla_flags) > 1:
            raise ValueError(
                "MoDA layers mix MLA and standard attention; a depth buffer needs one K/V shape: "
                f"MLA on {[e.index for e in moda_layers if 'mla' in e.features]}, standard on "
                f"{[e.index for e in moda_layers if 'mla' not in e.features]}"
            )
        if mla_flags.pop():
            heads = model.num_attention_heads
            k_dim = model.mla.qk_head_dim + model.mla.qk_pos_emb_head_dim
            v_dim = model.mla.v_head_dim
        else:
            heads = model.num_query_groups or model.num_attention_heads
            k_dim = v_dim = model.hidden_size // model.num_attention_heads
        if heads % tp and tp % heads:
            raise ValueError(f"tp={tp} and the {heads} K/V heads of the MoDA layers do not divide")
        per_rank = max(1, heads // tp)  # fewer K/V groups than TP ranks: one replicated group each
        lengths = stage_lengths(model.pattern, model.num_layers, pp)
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        slots = max(
            sum(1 for e in moda_layers if e.index in seg and self.contributes(e.index))
            for seg in self.segments(model.num_layers, starts)
        )
        return depth_kv_bytes(micro_batch, model.seq_length, slots, per_rank, k_dim, dtype,
                              v_head_dim=v_dim)


class DepthKVBuffer:
    """The depth K/V of one buffer segment for the current micro-batch.

    Built empty; every contributing layer registers a slot when it is constructed (layers of a chunk
    are built in order). ``begin()`` (called by the segment's first MoDA layer) drops the previous
    micro-batch's tensors; the first ``push`` allocates ``key`` ``[s, b, g, slots, dk]`` and ``value``
    ``[s, b, g, slots, dv]``.
    """

    def __init__(self, *, segment: range, detach: bool):
        self.segment = segment
        self.detach = detach
        self.slots = 0
        self.last_index = -1
        self.first_index: int | None = None
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.filled = 0
        self.attached: list[torch.Tensor] = []  # detach=False: [k_0, v_0, k_1, v_1, ...] with history

    def register(self, index: int, contributes: bool) -> tuple[int, int | None]:
        """(depth keys layer ``index`` reads, its slot or None)."""
        if index == self.last_index:  # built again (MLASelfAttention rebuilds its core attention)
            return self._last
        reads = self.slots
        self.last_index = index
        if self.first_index is None:
            self.first_index = index
        if contributes:
            self.slots += 1
        self._last = (reads, reads if contributes else None)
        return self._last

    def begin(self) -> None:
        self.key = self.value = None
        self.filled = 0
        self.attached = []

    def push(self, slot: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Copies ``key`` ``[s, b, g, dk]`` and ``value`` ``[s, b, g, dv]`` into ``slot``."""
        if slot != self.filled:
            raise RuntimeError(
                f"MoDA depth buffer (layers {self.segment.start}..{self.segment.stop - 1}): slot {slot} "
                f"pushed after {self.filled} slots; layers ran out of order (activation recomputation "
                "and partial forwards are not supported)"
            )
        s, b, g, dk = key.shape
        if self.key is None:
            self.key = torch.empty((s, b, g, self.slots, dk), dtype=key.dtype, device=key.device)
            self.value = torch.empty((s, b, g, self.slots, value.shape[-1]), dtype=value.dtype,
                                     device=value.device)
        expected = (self.key.shape[:3] + self.key.shape[4:], self.value.shape[:3] + self.value.shape[4:])
        if (key.shape, value.shape) != expected or key.dtype != self.key.dtype:
            raise ValueError(
                f"MoDA depth buffer (layers {self.segment.start}..{self.segment.stop - 1}) holds K/V of "
                f"shapes {tuple(expected[0])}/{tuple(expected[1])} {self.key.dtype}, but slot {slot} pushes "
                f"{tuple(key.shape)}/{tuple(value.shape)} {key.dtype}; every contributing layer of a "
                "segment must see all positions with the same K/V shape (MoD top-k dropping tokens, or "
                "MLA mixed with standard attention, breaks this)"
            )
        with torch.no_grad():
            self.key[:, :, :, slot].copy_(key)
            self.value[:, :, :, slot].copy_(value)
        if not self.detach:  # contiguous: a view would pin the fused QKV tensor (see above)
            self.attached += [x if x.is_contiguous() else x.contiguous() for x in (key, value)]
        self.filled += 1

    def read(self, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor]]:
        """The first ``n`` slots: ``key`` ``[s, b, g, n, dk]``, ``value``, and (attached) the pushed
        tensors with autograd history."""
        if n == 0:
            return None, None, []
        if self.filled < n:
            raise RuntimeError(
                f"MoDA depth buffer (layers {self.segment.start}..{self.segment.stop - 1}) has "
                f"{self.filled} slots filled, a layer needs {n}; earlier layers did not run this micro-batch"
            )
        return self.key[:, :, :, :n], self.value[:, :, :, :n], self.attached[: 2 * n]

    @property
    def allocated_bytes(self) -> int:
        if self.key is None:
            return 0
        return self.key.nbytes + self.value.nbytes


# Buffers being built: (id(MoDAConfig), segment start) -> (config, weakref to buffer). The config
# object is kept so a recycled id cannot alias; the buffer is weak so a dropped model frees its
# tensors; a layer index not above the last registered one means a new build.
_BUILDING: dict[tuple[int, int], tuple[MoDAConfig, "weakref.ref[DepthKVBuffer]"]] = {}


def _chunk_starts(config) -> list[int]:
    """First global layer index of every pipeline chunk (stage x virtual stage)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pp = config.pipeline_model_parallel_size
    if pp == 1:
        return [0]
    if config.pipeline_model_parallel_layout is not None:
        raise ValueError(
            "MoDA does not support pipeline_model_parallel_layout; split stages with '|' segments "
            "or num_layers_in_first/last_pipeline_stage"
        )
    vp = config.virtual_pipeline_model_parallel_size
    return sorted({
        get_transformer_layer_offset(config, stage if vp else None, rank)
        for rank in range(pp) for stage in range(vp or 1)
    })


def _register(config, moda: MoDAConfig, index: int) -> tuple[DepthKVBuffer, int, int | None, bool]:
    """(buffer, depth keys read, slot or None, whether this layer starts each micro-batch)."""
    segment = next(s for s in moda.segments(config.num_layers, _chunk_starts(config)) if index in s)
    key = (id(moda), segment.start)
    entry = _BUILDING.get(key)
    buffer = entry[1]() if entry is not None and entry[0] is moda else None
    if buffer is not None and index == buffer.last_index:
        # The same layer built again (MLASelfAttention rebuilds its core attention): same buffer.
        first = index == buffer.first_index
    else:
        first = buffer is None or index < buffer.last_index
        if first:
            buffer = DepthKVBuffer(segment=segment, detach=moda.detach)
            _BUILDING[key] = (moda, weakref.ref(buffer))
    reads, slot = buffer.register(index, moda.contributes(index))
    return buffer, reads, slot, first


def _refuse_unsupported(config, attn_mask_type, attention_dropout, index: int) -> None:
    where = f"MoDA layer {index}"
    checks = [
        (config.recompute_granularity == "full"
         or config.recompute_granularity == "selective" and "core_attn" in (config.recompute_modules or ()),
         f"recompute_granularity={config.recompute_granularity!r} recomputing the core attention "
         "(recomputation replays K/V pushes); allowed: None, or 'selective' without 'core_attn'"),
        (config.context_parallel_size != 1,
         f"context_parallel_size={config.context_parallel_size}; allowed: 1"),
        ((config.attention_dropout if attention_dropout is None else attention_dropout) != 0.0,
         "attention dropout > 0; allowed: 0.0"),
        (getattr(config, "softmax_type", "vanilla") != "vanilla",
         f"softmax_type={getattr(config, 'softmax_type', None)!r}; allowed: 'vanilla'"),
        (config.window_size is not None, f"window_size={config.window_size!r}; allowed: None"),
        (attn_mask_type != AttnMaskType.causal, f"attn_mask_type={attn_mask_type}; allowed: causal"),
        (config.apply_query_key_layer_scaling, "apply_query_key_layer_scaling=True; allowed: False"),
    ]
    for failed, message in checks:
        if failed:
            raise ValueError(f"{where}: unsupported {message}")


# ----------------------------------------------------------------------------------------------
# Reference: explicit keys and mask, plain autograd.


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def reference_depth_attention(query, key, value, depth_key=None, depth_value=None, *, scale: float):
    """Depth-aware causal attention with every key materialized (fp32 math).

    query ``[s, b, np, dk]``, key ``[s, b, g, dk]``, value ``[s, b, g, dv]``, depth_key
    ``[s, b, g, n, dk]``, depth_value ``[s, b, g, n, dv]`` (or None: no depth keys).
    Returns ``[s, b, np, dv]`` in the query's dtype.
    """
    s, _, heads, _ = query.shape
    r = heads // key.shape[2]
    acc = _acc(query)
    q = query.to(acc)
    k = key.to(acc).repeat_interleave(r, dim=2)
    v = value.to(acc).repeat_interleave(r, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale  # [b, np, s, s]
    future = torch.ones(s, s, dtype=torch.bool, device=query.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    n = 0 if depth_key is None else depth_key.shape[3]
    if n:
        kd = depth_key.to(acc).repeat_interleave(r, dim=2)  # [s, b, np, n, dk]
        vd = depth_value.to(acc).repeat_interleave(r, dim=2)
        scores = torch.cat([scores, torch.einsum("sbhd,sbhnd->bhsn", q, kd) * scale], dim=-1)
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhst,tbhd->sbhd", probs[..., :s], v)
    if n:
        out = out + torch.einsum("bhsn,sbhnd->sbhd", probs[..., s:], vd)
    return out.to(query.dtype)


# ----------------------------------------------------------------------------------------------
# Fast path: flash attention with log-sum-exp, merged with the depth attention.


def _flash_check(q: torch.Tensor, head_dim: int, cuda_kernel: str = "auto", *,
                 equal_dims: bool = True) -> str:
    """The sequence kernel this input runs on: ``aten-flash-cpu``, ``aten-flash-cuda`` or
    ``aten-cudnn-cuda``; raises for inputs no kernel takes."""
    if q.device.type == "cpu":
        return "aten-flash-cpu"
    if q.device.type == "cuda":
        if q.dtype not in (torch.bfloat16, torch.float16) or head_dim > 256 or head_dim % 8:
            raise ValueError(
                f"MoDA fast kernel on CUDA needs bf16/fp16 and a head dim <= 256 divisible by 8, got "
                f"{q.dtype} with head dim {head_dim}; use MoDAConfig(kernel='reference')"
            )
        if cuda_kernel == "auto":
            from megacpp_mcore.spec import backends

            cuda_kernel = "te" if backends.detect().te and equal_dims else "flash"
        if cuda_kernel == "te":
            _te_fused()  # raises with what to install
            return "te-fused-cuda"
        return f"aten-{cuda_kernel}-cuda"
    raise ValueError(f"MoDA fast kernel: unsupported device {q.device}; use kernel='reference'")


@functools.lru_cache(maxsize=None)
def _te_fused():
    """TE's fused-attention functions (the cuDNN kernel its ``DotProductAttention`` runs on Hopper),
    which return the softmax statistics (log-sum-exp) that the depth merge needs."""
    from megacpp_mcore.spec import backends

    if not backends.detect().te:
        raise backends.BackendUnavailable(
            "MoDAConfig(cuda_kernel='te') needs Transformer Engine (transformer_engine.pytorch), which "
            "is not importable here; install transformer-engine[pytorch] or use cuda_kernel='flash' "
            "or 'cudnn'"
        )
    from transformer_engine.pytorch.constants import TE_DType
    from transformer_engine.pytorch.cpp_extensions.fused_attn import (
        FusedAttnBackend,
        fused_attn_bwd,
        fused_attn_fwd,
    )

    return types.SimpleNamespace(fwd=fused_attn_fwd, bwd=fused_attn_bwd, dtypes=TE_DType,
                                 backend=FusedAttnBackend["F16_arbitrary_seqlen"])


_TE_ARGS = dict(dropout=0.0, qkv_layout="sbhd_sbhd_sbhd", attn_bias_type="no_bias", attn_mask_type="causal")


def _te_forward(q, k, v, scale):
    """q ``[s, b, np, dk]``, k/v ``[s, b, g, d]`` (contiguous; GQA native) -> (out ``[s, b, np, dv]``,
    lse ``[s, b, np]`` fp32, backward state)."""
    te = _te_fused()
    s, b, heads, _ = q.shape
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
    out, aux, *_ = te.fwd(True, s, s, cu, cu, q, k, v, q.dtype, te.backend, attn_scale=scale, **_TE_ARGS)
    stats = aux[0]  # [b, np, s, 1] fp32
    if stats.numel() != b * heads * s:
        raise RuntimeError(f"MoDA te kernel: softmax statistics of shape {tuple(stats.shape)}, expected "
                           f"[{b}, {heads}, {s}, 1]; use MoDAConfig(cuda_kernel='cudnn')")
    return out, stats.reshape(b, heads, s).permute(2, 0, 1), ("te-fused-cuda", cu, list(aux[1:]))


def _te_backward(dout, q, k, v, out, lse, state, scale):
    """dq, dk, dv ``[s, b, *, d]`` of the sequence part given the MERGED out and lse ``[s, b, np]``."""
    te = _te_fused()
    _, cu, rest = state
    s = q.shape[0]
    stats = lse.permute(1, 2, 0).contiguous().unsqueeze(-1)  # [b, np, s, 1]
    dq, dk, dv, *_ = te.bwd(s, s, cu, cu, q, k, v, out, dout, q.dtype, te.dtypes[dout.dtype],
                            [stats, *rest], te.backend, attn_scale=scale, **_TE_ARGS)
    return dq, dk, dv


def _flash_forward(q, k, v, scale, kernel: str):
    """q, k, v ``[b, h, s, d]`` -> (out ``[b, h, s, d]``, lse ``[b, h, s]`` fp32, backward state)."""
    if kernel == "aten-flash-cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, True, scale=scale)
        return out, lse, (kernel,)
    if kernel == "aten-cudnn-cuda":
        cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
        out, lse, cu_q, cu_k, max_q, max_k, seed, offset, _ = cudnn(
            q, k, v, None, True, 0.0, True, False, scale=scale)
        # cuDNN's statistics are [b, h, s, 1]
        return out, lse.reshape(lse.shape[:3]), (kernel, cu_q, cu_k, max_q, max_k, seed, offset, lse.dim())
    out, lse, cu_q, cu_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, False, scale=scale)
    return out, lse, (kernel, cu_q, cu_k, max_q, max_k, seed, offset)


def _flash_backward(dout, q, k, v, out, lse, state, scale):
    """Backward of the sequence kernel; ``out``/``lse`` are the MERGED ones (joint softmax)."""
    kernel, *rest = state
    if kernel == "aten-flash-cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, True, scale=scale)
    if kernel == "aten-cudnn-cuda":
        cu_q, cu_k, max_q, max_k, seed, offset, lse_dim = rest
        lse = lse.unsqueeze(-1) if lse_dim == 4 else lse
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, seed, offset, None, cu_q, cu_k, max_q, max_k, 0.0, True, scale=scale)
    cu_q, cu_k, max_q, max_k, seed, offset = rest
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, True, seed, offset, scale=scale)


def _to_heads(x: torch.Tensor, r: int, width: int) -> torch.Tensor:
    """``[s, b, g, d]`` -> ``[b, g*r, s, width]`` (GQA groups expanded, head dim zero-padded)."""
    if r > 1:
        x = x.repeat_interleave(r, dim=2)
    if x.shape[-1] < width:
        x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    return x.permute(1, 2, 0, 3)


def _row_chunks(rows: int, bytes_per_row: int, budget: int = 256 * 2**20) -> Iterator[slice]:
    """Row slices whose fp32 temporaries stay under ``budget`` bytes (few chunks: each costs about
    ten kernel launches)."""
    step = max(1, budget // max(1, bytes_per_row))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


# Whether ``torch.bmm(..., out_dtype=torch.float32)`` (half-precision operands, fp32 accumulation and
# result, CUDA only) works here; switched off at its first failure.
_NATIVE_FP32_BMM = [True]


def _bmm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched) accumulated and returned in fp32 (fp64 for fp64), without upcast copies of
    half-precision operands on CUDA (the depth K/V are read once, as stored)."""
    acc = _acc(a)
    if a.dtype == b.dtype == acc:
        return torch.bmm(a, b)
    if a.is_cuda and a.dtype == b.dtype and _NATIVE_FP32_BMM[0]:
        try:
            return torch.bmm(a, b, out_dtype=acc)
        except (RuntimeError, TypeError):  # older torch or an unsupported dtype: upcast instead
            _NATIVE_FP32_BMM[0] = False
    return torch.bmm(a.to(acc), b.to(acc))


class _DepthFlashAttention(torch.autograd.Function):
    """Sequence flash attention merged with depth attention through the log-sum-exp.

    Inputs: query ``[s, b, np, dk]``, key ``[s, b, g, dk]``, value ``[s, b, g, dv]``, depth_key
    ``[s, b, g, n, dk]``, depth_value, scale, then (attached mode) the pushed ``k_0, v_0, ...``
    that receive the depth-K/V gradients. Output ``[s, b, np, dv]``.
    """

    @staticmethod
    def forward(ctx, query, key, value, depth_key, depth_value, scale, kernel, depth_kernel, *attached):
        # Megatron hands over views of its fused QKV projection (``value`` always, ``query`` and
        # ``key`` without RoPE); saving such a view would pin the whole [s, b, g, (r + 2) d] tensor
        # until backward. Like TE's attention (which copies layouts it cannot take), save contiguous
        # copies instead: one copy, two fewer [s, b, np, d] units held per layer.
        query, key, value = (x if x.is_contiguous() else x.contiguous() for x in (query, key, value))
        s, b, heads, dk = query.shape
        g, dv = key.shape[2], value.shape[-1]
        r, width = heads // g, max(dk, dv)
        if kernel == "te-fused-cuda":  # sbhd in, sbhd out, GQA native
            if dk != dv:
                raise ValueError(f"MoDA te kernel: K head dim {dk} != V head dim {dv} (MLA); use "
                                 "MoDAConfig(cuda_kernel='cudnn' or 'flash')")
            out, lse, state = _te_forward(query, key, value, scale)
        else:
            qh, kh, vh = _to_heads(query, 1, width), _to_heads(key, r, width), _to_heads(value, r, width)
            out_h, lse_h, state = _flash_forward(qh, kh, vh, scale, kernel)  # [b, np, s, width], [b, np, s]
            out = out_h[..., :dv].permute(2, 0, 1, 3)  # [s, b, np, dv]
            lse = lse_h.permute(2, 0, 1)  # [s, b, np]
        out = out.contiguous()  # te: already; aten: the [b, np, s, d] kernel layout, copied once
        if depth_key is not None:
            out, lse = _merge_depth(query, depth_key, depth_value, out, lse, scale,
                                    depth_kernel=depth_kernel)
        lse = lse.contiguous()
        ctx.save_for_backward(query, key, value, out, lse)
        # The buffer keeps receiving later layers' slots (in place, disjoint from the ones read
        # here); saving these views through save_for_backward would trip the version check.
        ctx.depth = (depth_key, depth_value)
        ctx.state, ctx.scale, ctx.n_attached = state, scale, len(attached)
        ctx.depth_kernel = depth_kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out, lse = ctx.saved_tensors
        depth_key, depth_value = ctx.depth
        s, b, heads, dk = query.shape
        g, dv = key.shape[2], value.shape[-1]
        r, width = heads // g, max(dk, dv)
        dout = dout.contiguous()
        if ctx.state[0] == "te-fused-cuda":
            dquery, dkey, dvalue = _te_backward(dout, query, key, value, out, lse, ctx.state, ctx.scale)
            return _DepthFlashAttention._finish_backward(ctx, query, key, value, out, lse, dout,
                                                         depth_key, depth_value, dquery, dkey, dvalue)
        dq_h, dk_h, dv_h = _flash_backward(
            _to_heads(dout, 1, width), _to_heads(query, 1, width), _to_heads(key, r, width),
            _to_heads(value, r, width), _to_heads(out, 1, width), lse.permute(1, 2, 0).contiguous(),
            ctx.state, ctx.scale)
        dquery = dq_h[..., :dk].permute(2, 0, 1, 3)  # [s, b, np, dk]
        dkey = dk_h[..., :dk].permute(2, 0, 1, 3)  # [s, b, np, dk]: summed over each GQA group
        dvalue = dv_h[..., :dv].permute(2, 0, 1, 3)
        if r > 1:
            dkey = dkey.reshape(s, b, g, r, dk).sum(3)
            dvalue = dvalue.reshape(s, b, g, r, dv).sum(3)
        return _DepthFlashAttention._finish_backward(ctx, query, key, value, out, lse, dout,
                                                     depth_key, depth_value, dquery, dkey, dvalue)

    @staticmethod
    def _finish_backward(ctx, query, key, value, out, lse, dout, depth_key, depth_value, dquery, dkey,
                         dvalue):
        """Adds the depth part to dq (and the depth-K/V grads when attached); the Function's grads."""
        grads_attached = []
        if depth_key is not None:
            dquery = dquery.contiguous()
            ddk, ddv = _depth_backward(query, depth_key, depth_value, out, lse, dout, ctx.scale, dquery,
                                       want_kv=ctx.n_attached > 0, depth_kernel=ctx.depth_kernel)
            for j in range(ctx.n_attached // 2):
                grads_attached += [ddk[:, :, :, j].to(key.dtype), ddv[:, :, :, j].to(value.dtype)]
        return (dquery.to(query.dtype), dkey.to(key.dtype), dvalue.to(value.dtype), None, None, None,
                None, None, *grads_attached)


# Fused Triton depth kernels: None = not yet checked in this process, True = agree with the
# batched-matmul path, False = disagreed or failed (the torch path runs instead).
_TRITON_CHECKED: dict[str, bool | None] = {"fwd": None, "bwd": None}


def _triton_depth(depth_kernel: str, query: torch.Tensor):
    """The :mod:`megacpp_mcore.features.moda.kernels` module when ``depth_kernel`` asks for it and it can run
    here (CUDA and triton importable), else None (``"triton"`` raises instead)."""
    if depth_kernel == "torch" or not query.is_cuda:
        return None
    module = _load_moda_triton()
    if isinstance(module, ImportError):
        if depth_kernel == "triton":
            raise ValueError(f"MoDAConfig(depth_kernel='triton') needs triton ({module}); allowed here: "
                             "'auto' or 'torch'") from module
        return None
    return module


@functools.lru_cache(maxsize=None)
def _load_moda_triton():
    """The kernels' module, or the ImportError (triton missing), tried once per process."""
    try:
        from megacpp_mcore.features.moda import kernels as moda_triton
    except ImportError as exc:
        return exc
    return moda_triton


def _check_triton(direction: str, depth_kernel: str, got, ref) -> bool:
    """Compares the fused kernel's first result with the batched-matmul path's (once per process)."""
    try:
        if isinstance(got, Exception):
            raise got
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
        _TRITON_CHECKED[direction] = True
    except Exception as exc:  # noqa: BLE001 - any failure of the fused kernel falls back (auto)
        _TRITON_CHECKED[direction] = False
        if depth_kernel == "triton":
            raise RuntimeError(f"MoDA fused Triton depth kernel ({direction}) disagrees with the torch "
                               f"path: {exc}") from exc
        import warnings

        warnings.warn(f"MoDA: fused Triton depth kernel ({direction}) disagrees with the torch path; "
                      f"using the torch path: {str(exc)[:300]}")
    return bool(_TRITON_CHECKED[direction])


def _depth_scores(q, kd, scale):
    """q ``[rows, r, dk]``, kd ``[rows, n, dk]`` -> fp32 scores ``[rows, r, n]``."""
    return _bmm_acc(q, kd.transpose(1, 2)).mul_(scale)


def _merge_depth(query, depth_key, depth_value, seq_out, seq_lse, scale, *, depth_kernel="torch"):
    """Merges the sequence result (``[s, b, np, dv]``, lse ``[s, b, np]``) with depth attention.

    Two full-size passes, both in the output dtype and both IN PLACE on ``seq_out`` (contiguous; the
    kernel's fresh output): ``out *= exp(lse_seq - lse)`` and ``out += P_depth @ V_depth`` (a
    ``baddbmm_``: fp32 accumulation, one rounding). The scores/weights ``[rows, r, n]`` are fp32 and
    small (n depth keys, a handful); q and the depth K/V are read once by the score product.
    Returns ``(out, lse)`` with ``out`` aliasing ``seq_out``. On CUDA ``depth_kernel`` ``"auto"`` /
    ``"triton"`` runs :func:`megacpp_mcore.features.moda.kernels.merge_forward` instead (one fused pass).
    """
    fused = _triton_depth(depth_kernel, query)
    if fused is not None:
        if _TRITON_CHECKED["fwd"] is None:
            ref = _merge_depth(query, depth_key, depth_value, seq_out.clone(), seq_lse.clone(), scale)
            try:
                got = fused.merge_forward(query, depth_key, depth_value, seq_out.clone(), seq_lse, scale)
            except Exception as exc:  # noqa: BLE001 - compile/launch failure: reported, torch path
                got = exc
            if _check_triton("fwd", depth_kernel, got, ref):
                return fused.merge_forward(query, depth_key, depth_value, seq_out, seq_lse, scale)
            return ref
        if _TRITON_CHECKED["fwd"]:
            return fused.merge_forward(query, depth_key, depth_value, seq_out, seq_lse, scale)
    s, b, heads, dk = query.shape
    g, n, dv = depth_key.shape[2], depth_key.shape[3], depth_value.shape[-1]
    r, rows = heads // g, s * b * g
    acc = _acc(query)
    q = query.reshape(rows, r, dk)
    kd = depth_key.reshape(rows, n, dk)
    vd = depth_value.reshape(rows, n, dv)
    out = seq_out.view(rows, r, dv)
    sl = seq_lse.reshape(rows, r)
    lse = torch.empty((rows, r), dtype=acc, device=query.device)
    for c in _row_chunks(rows, 4 * (r * (4 * n + 4))):
        scores = _depth_scores(q[c], kd[c], scale)  # [rows, r, n] fp32
        seq_l = sl[c].to(acc)
        total = torch.logaddexp(seq_l, scores.logsumexp(-1))  # joint log-sum-exp [rows, r]
        probs = scores.sub_(total[..., None]).exp_()  # joint softmax weights of the depth keys
        out[c].mul_((seq_l - total).exp_()[..., None])  # sequence part, reweighted (in place)
        out[c].baddbmm_(probs.to(vd.dtype), vd[c])  # + depth part (in place, fp32 accumulation)
        lse[c] = total
    return seq_out, lse.reshape(s, b, heads)


def _depth_backward(query, depth_key, depth_value, out, lse, dout, scale, dquery, *, want_kv: bool,
                    depth_kernel: str = "torch"):
    """Depth part of the joint-softmax backward: adds into ``dquery`` (contiguous
    ``[s, b, np, dk]``) in place; returns (dK_depth, dV_depth), None unless ``want_kv``. On CUDA
    without ``want_kv``, ``depth_kernel`` ``"auto"``/``"triton"`` runs the fused Triton kernel."""
    fused = None if want_kv else _triton_depth(depth_kernel, query)
    if fused is not None and _TRITON_CHECKED["bwd"] is not False:
        if _TRITON_CHECKED["bwd"] is None:
            ref = dquery.clone()
            _depth_backward(query, depth_key, depth_value, out, lse, dout, scale, ref, want_kv=False)
            got = dquery.clone()
            try:
                fused.merge_backward_dq(query, depth_key, depth_value, out, lse, dout, scale, got)
                got = (got,)
            except Exception as exc:  # noqa: BLE001 - compile/launch failure: reported, torch path
                got = exc
            if not _check_triton("bwd", depth_kernel, got, (ref,)):
                dquery.copy_(ref)
                return None, None
        fused.merge_backward_dq(query, depth_key, depth_value, out, lse, dout, scale, dquery)
        return None, None
    s, b, heads, dk = query.shape
    g, n, dv = depth_key.shape[2], depth_key.shape[3], depth_value.shape[-1]
    r, rows = heads // g, s * b * g
    acc = _acc(query)
    q = query.reshape(rows, r, dk)
    kd = depth_key.reshape(rows, n, dk)
    vd = depth_value.reshape(rows, n, dv)
    o, do, total = out.reshape(rows, r, dv), dout.reshape(rows, r, dv), lse.reshape(rows, r)
    dq = dquery.view(rows, r, dk)
    dkd = torch.empty((rows, n, dk), dtype=acc, device=query.device) if want_kv else None
    dvd = torch.empty((rows, n, dv), dtype=acc, device=query.device) if want_kv else None
    per_row = 4 * (r * (6 * n + 2)) + (4 * n * (dk + dv) * 2 if want_kv else 0)
    for c in _row_chunks(rows, per_row):
        cr = (c.stop - c.start) * r
        probs = _depth_scores(q[c], kd[c], scale).sub_(total[c].to(acc)[..., None]).exp_()
        # rowsum(dO * O) as a batched dot product: no fp32 copies of dO and O
        row_dot = _bmm_acc(do[c].reshape(cr, 1, dv), o[c].reshape(cr, dv, 1)).view(-1, r, 1)
        dp = _bmm_acc(do[c], vd[c].transpose(1, 2))  # [rows, r, n]
        ds = dp.sub_(row_dot).mul_(probs)
        ds = ds.mul_(scale)
        dq[c].baddbmm_(ds.to(kd.dtype), kd[c])  # in place: fp32 accumulation, one rounding
        if want_kv:
            dkd[c] = _bmm_acc(ds.transpose(1, 2).to(q.dtype), q[c])
            dvd[c] = _bmm_acc(probs.transpose(1, 2).to(do.dtype), do[c])
    if want_kv:
        dkd, dvd = dkd.reshape(s, b, g, n, dk), dvd.reshape(s, b, g, n, dv)
    return dkd, dvd


def fast_depth_attention(query, key, value, depth_key=None, depth_value=None, *, scale: float,
                         attached: list[torch.Tensor] | tuple = (), cuda_kernel: str = "auto",
                         depth_kernel: str = "auto"):
    """Same contract as :func:`reference_depth_attention`; ``attached`` are the pushed
    ``k_0, v_0, k_1, v_1, ...`` that receive depth-K/V gradients (empty: detached)."""
    kernel = _flash_check(query, max(query.shape[-1], value.shape[-1]), cuda_kernel,
                          equal_dims=query.shape[-1] == value.shape[-1])
    return _DepthFlashAttention.apply(query, key, value, depth_key, depth_value, scale, kernel,
                                      depth_kernel, *attached)


# ----------------------------------------------------------------------------------------------
# The core-attention module and its spec hook.


class DepthAwareAttention(MegatronModule):
    """``core_attention`` for ``SelfAttention`` / ``MLASelfAttention`` with a MoDA depth buffer.

    Takes the upstream core-attention constructor arguments (``k_channels``/``v_channels`` for MLA)
    plus ``moda``, ``layer_index`` and ``sequence_attention`` (the backend's own core-attention class;
    bound by :func:`core_attention`). Forward has the upstream signature: query ``[s, b, np, dk]``,
    key ``[s, b, g, dk]``, value ``[s, b, g, dv]`` -> ``[s, b, np * dv]``. Parameter-free.

    With ``kernel="fast"``, a layer that reads no depth keys (the first of its segment) composes ``sequence_attention`` (``TEDotProductAttention`` on ``te``, ``DotProductAttention`` on
    ``local``) and only pushes; with MLA shapes (``k_channels`` given) it uses the fast path instead,
    since the local class rejects ``k_channels`` in megatron-core 0.16.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, *, moda: MoDAConfig,
                 layer_index: int, sequence_attention=None,
                 **kwargs):  # upstream kwargs added later (num_splits, ...)
        super().__init__(config=config)
        _refuse_unsupported(config, attn_mask_type, attention_dropout, layer_index)
        self.layer_number = layer_number
        self.layer_index = layer_index
        self.moda = moda
        self.k_channels = k_channels or config.kv_channels
        self.v_channels = v_channels or config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(self.k_channels) if softmax_scale is None else softmax_scale
        self.buffer, self.reads, self.slot, self.starts_micro_batch = _register(config, moda, layer_index)
        self.observed_kernel: str | None = None
        self.sequence_attention = None
        if (self.reads == 0 and moda.kernel == "fast" and sequence_attention is not None
                and k_channels is None and v_channels is None):
            self.sequence_attention = sequence_attention(
                config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                attention_type=attention_type, attention_dropout=attention_dropout,
                softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, **kwargs):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError(f"MoDA layer {self.layer_index}: packed sequences and attention_bias "
                             "are not supported")
        if query.shape[0] != key.shape[0]:
            raise ValueError(
                f"MoDA layer {self.layer_index}: query length {query.shape[0]} != key length "
                f"{key.shape[0]}; KV-cache inference is not supported"
            )
        # attention_mask: the layer is causal (checked at build), as with TE's causal mask type.
        if self.starts_micro_batch:
            self.buffer.begin()
        depth_key, depth_value, attached = self.buffer.read(self.reads)
        if self.sequence_attention is not None:  # no depth keys: the backend's own attention
            self.observed_kernel = f"backend:{type(self.sequence_attention).__name__}"
            out = self.sequence_attention(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                          attention_bias=None, packed_seq_params=None)
            if self.slot is not None:
                self.buffer.push(self.slot, key, value)
            return out
        if self.moda.kernel == "reference":
            self.observed_kernel = "reference"
            if attached:
                depth_key = torch.stack(attached[0::2], dim=3)
                depth_value = torch.stack(attached[1::2], dim=3)
            elif depth_key is not None:  # autograd would save views that later pushes bump
                depth_key, depth_value = depth_key.clone(), depth_value.clone()
            out = reference_depth_attention(query, key, value, depth_key, depth_value,
                                            scale=self.softmax_scale)
        else:
            self.observed_kernel = _flash_check(query, max(query.shape[-1], value.shape[-1]),
                                                self.moda.cuda_kernel,
                                                equal_dims=query.shape[-1] == value.shape[-1])
            out = _DepthFlashAttention.apply(query, key, value, depth_key, depth_value,
                                             self.softmax_scale, self.observed_kernel,
                                             self.moda.depth_kernel, *attached)
        if self.slot is not None:
            self.buffer.push(self.slot, key, value)
        s, b, heads, dv = out.shape
        return out.reshape(s, b, heads * dv)

    def megacpp_stats(self) -> dict[str, float]:
        """Depth keys read by this layer; the segment's first layer also reports the buffer bytes."""
        stats = {"moda_depth_keys": float(self.reads)}
        if self.starts_micro_batch:
            stats["moda_buffer_bytes"] = float(self.buffer.allocated_bytes)
        return stats


@functools.lru_cache(maxsize=None)
def _default_config(placement: FeaturePlacement) -> MoDAConfig:
    """One MoDAConfig per bare placement, so all layers of a model share their segment buffers."""
    return MoDAConfig(placement=placement)


def core_attention(ctx, sequence_attention: type | None = None):
    """The ``core_attention`` builder of a MoDA ``A`` layer (both backends, standard and MLA).

    Attention specs swap their backend's core attention for this when ``ctx.has("moda")``; MLA
    passes ``k_channels``/``v_channels`` through its usual build call and its own core attention
    class as ``sequence_attention`` (used by the first layer of a buffer, which has no depth keys).
    """
    moda = ctx.feature("moda")
    if isinstance(moda, FeaturePlacement) or moda is None:
        moda = _default_config(moda or FeaturePlacement(symbols="A"))
    from megatron.core.transformer.spec_utils import ModuleSpec

    # A ModuleSpec (not a partial): MLA's attention builds its core attention with build_module.
    return ModuleSpec(module=DepthAwareAttention, params=dict(
        moda=moda, layer_index=ctx.index,
        sequence_attention=sequence_attention or ctx.backend.core_attention()))
