"""The one place for megatron-core names and signatures that differ across versions.

CI pins megatron-core 0.16.x; users upgrade. What changes after 0.16 and how the package absorbs it:

* Layer constructors gain keyword arguments (``TransformerLayer`` in 0.17: ``is_mtp_layer``,
  ``add_layer_offset``, ``pp_layer_offset``; 0.18: ``name``). Our adapters (``HybridLayer``, norms,
  mixers) accept ``**kwargs``; :func:`layer_kwargs` forwards to a module what its constructor
  takes, drops later-version kwargs it does not take while they carry their neutral meaning, and
  refuses the rest with a message naming them. :func:`global_layer_index` honours
  ``add_layer_offset``/``is_mtp_layer`` the way upstream layers do.
* Backend providers gain keyword arguments (``layer_norm(..., has_residual=)`` in 0.18): provider
  methods of :mod:`megacpp_mcore.spec.backends` accept them too.
* Config field names with upstream's spelling live here (:data:`HETEROGENEOUS_CHECKPOINT_FIELD`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

from packaging.version import Version

# Upstream's spelling of the TransformerConfig flag for per-layer checkpoint keys (0.16 .. 0.19).
HETEROGENEOUS_CHECKPOINT_FIELD = "hetereogenous_dist_checkpoint"

_ANY = object()  # "any value is neutral": the kwarg only carries information the module re-derives

# Layer-constructor kwargs added after 0.16: name -> (first version, neutral value). A kwarg at its
# neutral value may be dropped for a module that does not take it without changing the model.
LATER_LAYER_KWARGS: dict[str, tuple[str, Any]] = {
    "is_mtp_layer": ("0.17", False),
    "add_layer_offset": ("0.17", True),
    "pp_layer_offset": ("0.17", _ANY),  # upstream layers re-derive the offset from the config
    "name": ("0.18", _ANY),  # module instance name, informational
}


@functools.cache
def mcore_version() -> Version:
    """The installed megatron-core version."""
    import megatron.core

    return Version(megatron.core.__version__)


def _accepts(target: Callable) -> tuple[set[str], bool]:
    """(keyword names ``target`` takes, whether it takes ``**kwargs``)."""
    if inspect.isclass(target):  # a spec-time dispatcher (e.g. HybridLayer) builds in __new__
        target = target.__new__ if target.__new__ is not object.__new__ else target.__init__
    params = inspect.signature(target).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def layer_kwargs(target: Callable, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of upstream's layer-construction ``kwargs`` to pass on to ``target``.

    ``target`` takes ``**kwargs`` or names the kwarg: forwarded. A later-version kwarg ``target``
    does not name, at its neutral value: dropped. Anything else: ``TypeError`` naming the kwarg,
    its value and the module (building would otherwise silently change the layer's meaning).
    """
    names, var_kw = _accepts(target)
    forwarded: dict[str, Any] = {}
    for key, value in kwargs.items():
        if var_kw or key in names:
            forwarded[key] = value
            continue
        since, neutral = LATER_LAYER_KWARGS.get(key, (None, None))
        if since is not None and (neutral is _ANY or value == neutral):
            continue
        what = f"added to megatron-core layers in {since}" if since else "unknown to megacpp_mcore"
        raise TypeError(
            f"{getattr(target, '__qualname__', target)} does not take {key}={value!r} ({what}); "
            f"it takes: {', '.join(sorted(names))}"
        )
    return forwarded


def global_layer_index(
    config,
    layer_number: int,
    *,
    vp_stage: int | None,
    pp_rank: int,
    is_mtp_layer: bool = False,
    add_layer_offset: bool = True,
    **_later: Any,
) -> int:
    """0-based index in the whole model of the layer built as ``layer_number`` (1-based).

    Like upstream's ``TransformerLayer``: ``layer_number`` is local to the pipeline stage and gets
    the stage offset added, unless the caller says it is global already (``add_layer_offset=False``
    or ``is_mtp_layer=True``, megatron-core >= 0.17).
    """
    if is_mtp_layer or not add_layer_offset:
        return layer_number - 1
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(config, vp_stage, pp_rank) + layer_number - 1
