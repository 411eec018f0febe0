"""MoDA's config and its memory bill: :class:`MoDAConfig` and :func:`depth_kv_bytes`.

Pure data and arithmetic (no module, no tensor but a dtype's element size): the planner
(:mod:`megacpp_mcore.models.plan`) and the receipts read the same numbers the buffer allocates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch

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
    # fast path's sequence kernel on CUDA: "auto" (the backend provider's choice: TE's fused
    # attention on the te backend when the K/V head dims are equal, else FA2) | "flash" (FA2) |
    # "cudnn" | "te"
    cuda_kernel: str = "auto"
    # depth part on CUDA: "auto" (the fused Triton kernels when triton imports, else "torch") |
    # "triton" (refused where triton is missing) | "torch" (batched matmuls)
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
        for name, allowed in (("kernel", KERNELS), ("cuda_kernel", CUDA_KERNELS),
                              ("depth_kernel", DEPTH_KERNELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"MoDAConfig.{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")
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

    def segments(self, num_layers: int, chunk_starts: Iterable[int] = (0,)) -> list[range]:
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
