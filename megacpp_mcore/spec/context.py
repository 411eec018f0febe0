"""What a symbol builder is told about the one layer it builds."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from megatron.core.transformer.transformer_config import TransformerConfig


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

    def has(self, feature: str) -> bool:
        return feature in self.features

    def feature(self, name: str) -> Any:
        return self.feature_configs.get(name)

    @property
    def backend_name(self) -> str:
        return self.backend.name
