"""What a symbol builder is told about the one layer it builds."""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Hashable, Mapping

from megatron.core.transformer.transformer_config import TransformerConfig


class ChunkBuild:
    """The owner of what the layers of ONE model chunk share (e.g. MoDA's depth buffers).

    A model chunk is the layers one ``TransformerBlock`` builds (one pipeline stage, or one virtual
    stage of it). :class:`ChunkCursor` starts a ``ChunkBuild`` at the chunk's first layer and every
    layer of that chunk receives it as :attr:`LayerContext.chunk`. Objects are handed out by key and
    held weakly: the modules that use one keep it alive, so it lives exactly as long as they do, and
    two models (or two chunks) never share one.
    """

    def __init__(self) -> None:
        self._shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def shared(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The chunk's object under ``key``, made by ``make()`` when no live one exists."""
        obj = self._shared.get(key)
        if obj is None:
            obj = make()
            self._shared[key] = obj
        return obj


class ChunkCursor:
    """The :class:`ChunkBuild` of the chunk being built, for a spec whose layers Megatron builds.

    Megatron's ``TransformerBlock`` builds a chunk's layers in order with ``layer_number`` 1..n,
    local to the chunk (the pipeline and virtual-stage offsets are added by the layer): layer 1 is
    the deterministic start of a new chunk.
    """

    def __init__(self) -> None:
        self._current = ChunkBuild()

    def for_layer(self, layer_number: int) -> ChunkBuild:
        """The chunk that the layer built as ``layer_number`` belongs to (1 starts a new one)."""
        if layer_number == 1:
            self._current = ChunkBuild()
        return self._current


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerContext:
    """One layer's build inputs: config, backend provider, position and attached features.

    ``feature_configs`` maps a feature name to its validated config object (or a bare placement);
    builders read them through :meth:`feature`.
    """

    config: TransformerConfig
    backend: Any  # a BackendSpecProvider (megacpp_mcore.spec.backends.LocalBackend / TEBackend)
    index: int  # 0-based global layer index
    symbol: str
    features: frozenset[str]
    feature_configs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    chunk: ChunkBuild | None = None  # the owner of state this layer shares with its chunk
    # the compiled table of the whole model (every stage; LayerEntry rows), when the builder has
    # one: e.g. how many layers carry a feature (MoD averages its logged statistics over them)
    model_table: tuple = ()

    def has(self, feature: str) -> bool:
        return feature in self.features

    def feature(self, name: str) -> Any:
        return self.feature_configs.get(name)

    @property
    def backend_name(self) -> str:
        return self.backend.name
