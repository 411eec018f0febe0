"""The depth K/V buffer and who owns it.

A *segment* is a run of layers that share one buffer: the layers of one pipeline chunk (stage x
virtual stage), split further at ``MoDAConfig.boundaries``. Its :class:`DepthKVBuffer` belongs to the
chunk being built: :func:`claim_slot` fetches it from the chunk's owner object
(:class:`megacpp_mcore.spec.context.ChunkBuild`, handed to every layer of the chunk through
``LayerContext.chunk``), which keeps it only as long as the chunk's MoDA modules hold it. No process
state: two models, or two chunks of one model, never share a buffer.

Each MoDA layer claims its place once, when its spec is made (layers of a chunk are built in order):
the depth keys it reads (the slots filled before it), its own slot (None when it does not
contribute) and whether it starts each micro-batch (the segment's first MoDA layer).
"""

from __future__ import annotations

import dataclasses

import torch

from megacpp_mcore.features.moda.config import MoDAConfig


class DepthKVBuffer:
    """The depth K/V of one buffer segment for the current micro-batch.

    Built empty; every MoDA layer of the segment registers once, in layer order. ``begin()`` (called
    by the segment's first MoDA layer) drops the previous micro-batch's tensors, so micro-batches in
    flight in a pipeline schedule each keep their own pair until their backward; the first ``push``
    allocates ``key`` ``[s, b, g, slots, dk]`` and ``value`` ``[s, b, g, slots, dv]``, exactly
    :func:`megacpp_mcore.features.moda.config.depth_kv_bytes` bytes.
    """

    def __init__(self, *, segment: range, detach: bool):
        self.segment = segment
        self.detach = detach
        self.slots = 0
        self.layers: list[int] = []  # registered layer indices, in order
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.filled = 0
        self.attached: list[torch.Tensor] = []  # detach=False: [k_0, v_0, k_1, v_1, ...] with history

    def _where(self) -> str:
        return f"MoDA depth buffer (layers {self.segment.start}..{self.segment.stop - 1})"

    def register(self, index: int, contributes: bool) -> "DepthSlot":
        """Layer ``index``'s place: the depth keys it reads and its slot (None: it only reads)."""
        if self.layers and index <= self.layers[-1]:
            raise RuntimeError(
                f"{self._where()}: layer {index} registered after layer {self.layers[-1]}; each layer "
                "of a chunk claims its slot once, in layer order (build a new chunk for a new model)"
            )
        reads = self.slots
        slot = reads if contributes else None
        self.slots += bool(contributes)
        self.layers.append(index)
        return DepthSlot(buffer=self, index=index, reads=reads, slot=slot,
                         starts_micro_batch=len(self.layers) == 1)

    def begin(self) -> None:
        """A new micro-batch: forget the previous one's tensors (its autograd graph keeps them)."""
        self.key = self.value = None
        self.filled = 0
        self.attached = []

    def push(self, slot: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Copies ``key`` ``[s, b, g, dk]`` and ``value`` ``[s, b, g, dv]`` into ``slot``."""
        if slot != self.filled:
            raise RuntimeError(
                f"{self._where()}: slot {slot} pushed after {self.filled} slots; layers ran out of "
                "order (activation recomputation and partial forwards are not supported)"
            )
        s, b, g, dk = key.shape
        if self.key is None:
            self.key = torch.empty((s, b, g, self.slots, dk), dtype=key.dtype, device=key.device)
            self.value = torch.empty((s, b, g, self.slots, value.shape[-1]), dtype=value.dtype,
                                     device=value.device)
        expected = (self.key.shape[:3] + self.key.shape[4:], self.value.shape[:3] + self.value.shape[4:])
        if (key.shape, value.shape) != expected or key.dtype != self.key.dtype:
            raise ValueError(
                f"{self._where()} holds K/V of shapes {tuple(expected[0])}/{tuple(expected[1])} "
                f"{self.key.dtype}, but slot {slot} pushes {tuple(key.shape)}/{tuple(value.shape)} "
                f"{key.dtype}; every contributing layer of a segment must see all positions with the "
                "same K/V shape (MoD top-k dropping tokens, or MLA mixed with standard attention, "
                "breaks this)"
            )
        with torch.no_grad():
            self.key[:, :, :, slot].copy_(key)
            self.value[:, :, :, slot].copy_(value)
        if not self.detach:  # contiguous: a view would pin Megatron's fused QKV output
            self.attached += [x if x.is_contiguous() else x.contiguous() for x in (key, value)]
        self.filled += 1

    def read(self, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor]]:
        """The first ``n`` slots: ``key`` ``[s, b, g, n, dk]``, ``value``, and (attached) the pushed
        tensors with autograd history."""
        if n == 0:
            return None, None, []
        if self.filled < n:
            raise RuntimeError(
                f"{self._where()} has {self.filled} slots filled, a layer needs {n}; earlier layers "
                "did not run this micro-batch"
            )
        return self.key[:, :, :, :n], self.value[:, :, :, :n], self.attached[: 2 * n]

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the current micro-batch's K/V pair (0 before the first push)."""
        if self.key is None:
            return 0
        return self.key.nbytes + self.value.nbytes


@dataclasses.dataclass(frozen=True)
class DepthSlot:
    """One MoDA layer's place in its segment's buffer (see :meth:`DepthKVBuffer.register`)."""

    buffer: DepthKVBuffer
    index: int  # 0-based global layer index
    reads: int  # depth keys the layer attends: the slots filled before it
    slot: int | None  # where it pushes its K/V; None: it does not contribute
    starts_micro_batch: bool  # the segment's first MoDA layer: calls buffer.begin() each forward


def chunk_starts(config) -> list[int]:
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


def claim_slot(chunk, config, moda: MoDAConfig, index: int) -> DepthSlot:
    """Registers MoDA layer ``index`` (global) in its segment's buffer, owned by ``chunk`` (the
    :class:`~megacpp_mcore.spec.context.ChunkBuild` of the chunk being built)."""
    if chunk is None:
        raise ValueError(
            f"MoDA layer {index}: LayerContext.chunk is None; the depth buffer belongs to the model "
            "chunk being built (hybrid_block_spec passes it; to build layers by hand, give every "
            "layer of one chunk the same megacpp_mcore.spec.context.ChunkBuild())"
        )
    segment = next(s for s in moda.segments(config.num_layers, chunk_starts(config)) if index in s)
    buffer = chunk.shared(("moda", segment.start),
                          lambda: DepthKVBuffer(segment=segment, detach=moda.detach))
    return buffer.register(index, moda.contributes(index))
