"""TE's attention-backend selection is cached for ONE configuration only.

``DotProductAttention.forward`` (Transformer Engine 2.x) compares this call's ``AttentionParams``
with the last call's and, when they differ, re-runs ``get_attention_backend``: a long, CPU-heavy
Python analysis (TE's own open PR #1381 says so; it proposes a multi-entry cache). A model whose
attention layers alternate between two shapes re-selects on EVERY attention call: MoD top-k layers
attend over ``k`` gathered tokens, the dense layers between them over the full sequence, so each
forward of the MoD benchmark re-ran the analysis 8 times. The patch memoises
``get_attention_backend`` per configuration (the parameters plus the ``NVTE_*`` environment that
steers the selection); configurations it cannot key (FP8 metadata, inference caches) fall through
to upstream's function unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os

from patches import _wrapping

NAME = "te-attention-backend-cache"
TARGETS = "transformer-engine >=2.0,<2.12"
REQUIRES = "transformer_engine"
DESCRIPTION = (
    "TE DotProductAttention re-runs the CPU-heavy get_attention_backend whenever the attention "
    "shape differs from the previous call (one-entry cache); memoise it per configuration"
)

_UTILS = "transformer_engine.pytorch.attention.dot_product_attention.utils"
_DPA = "transformer_engine.pytorch.attention.dot_product_attention.dot_product_attention"
_SINGLE_ENTRY = 'attention_params != _attention_backends["attention_params"]'
_MAX_ENTRIES = 256


def _modules():
    try:
        utils = importlib.import_module(_UTILS)
        dpa = importlib.import_module(_DPA)
    except ImportError:
        return None
    if not callable(getattr(utils, "get_attention_backend", None)) or not hasattr(dpa, "DotProductAttention"):
        return None
    return utils, dpa


def _key(params):
    """A hashable key for ``params`` plus the selection environment, or None (do not cache)."""
    if not dataclasses.is_dataclass(params):
        return None
    values = []
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if field.name in ("fp8_meta", "inference_params") and value is not None:
            return None  # mutable state that the selection reads: never reuse an answer for it
        values.append(value)
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("NVTE_")))
    key = (type(params), tuple(values), env)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _memoised(original):
    cache: dict = {}

    def get_attention_backend(attention_params, *args, **kwargs):
        key = None if args or kwargs else _key(attention_params)
        if key is None:
            return original(attention_params, *args, **kwargs)
        hit = cache.get(key)
        if hit is None:
            if len(cache) >= _MAX_ENTRIES:
                cache.clear()
            hit = cache[key] = original(attention_params)
        return hit

    get_attention_backend.cache = cache
    return _wrapping.wrap(original, get_attention_backend, NAME)


def check() -> str:
    """``needed`` while DotProductAttention keeps the one-entry comparison and the selection
    function is not memoised upstream; ``fixed-upstream`` when either changed; ``target-missing``
    when the modules or the function moved."""
    found = _modules()
    if found is None:
        return "target-missing"
    utils, dpa = found
    upstream_fn = _wrapping.upstream(utils.get_attention_backend, NAME)
    if hasattr(upstream_fn, "cache_info"):  # functools.lru_cache upstream
        return "fixed-upstream"
    try:  # the method (decorators unwrapped), else the whole module
        source = inspect.getsource(dpa.DotProductAttention.forward)
    except (OSError, TypeError):
        try:
            source = inspect.getsource(dpa)
        except (OSError, TypeError):
            return "target-missing"
    return "needed" if _SINGLE_ENTRY in source else "fixed-upstream"


def apply() -> list[str]:
    """Wraps ``utils.get_attention_backend`` (and the name DotProductAttention's module imported,
    where it did) with the per-configuration memo; idempotent."""
    found = _modules()
    if found is None:
        return []
    changed = []
    for module in found:
        fn = getattr(module, "get_attention_backend", None)
        if fn is None or _wrapping.is_patched(fn, NAME):
            continue
        module.get_attention_backend = _memoised(fn)
        changed.append(f"{module.__name__}.get_attention_backend")
    return changed
