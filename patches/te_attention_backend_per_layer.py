"""TE ``DotProductAttention`` keeps ONE backend selection for the whole process.

In Transformer Engine 2.x ``DotProductAttention.forward`` (module
``transformer_engine.pytorch.attention.dot_product_attention.dot_product_attention``) builds an
``AttentionParams`` on every call and compares it with the one stored in the module-global dict
``_attention_backends``; when they differ it re-runs ``dpa_utils.get_attention_backend`` (a long,
CPU-heavy check of the cuDNN/flash capabilities) and overwrites the dict. With MoD ``topk`` the
model alternates attention layers of two shapes (``k`` selected tokens, full sequence), so every
attention call misses the one-entry cache and pays a full selection on the host.

The patch gives every ``DotProductAttention`` instance its own dict of the same layout and makes
it the module global for the duration of that instance's ``forward``. Why this takes effect on the
real call path: Megatron's ``TEDotProductAttention.forward`` calls ``super().forward`` which
resolves ``DotProductAttention.forward`` on the class at call time (our wrapper); upstream's body
declares ``global _attention_backends`` and looks the name up in its function globals, i.e. the
module ``__dict__``, on every access, so during the call it reads and writes the instance's dict.
TE's own comparison (``attention_params != _attention_backends["attention_params"]``) still
decides when to re-select, so every change of shape, dtype, training mode, FP8 state or graph
capture re-selects exactly as upstream does, per layer instead of per process; a layer whose
shape never changes selects once. No selection result is hashed or memoised by us.
"""

from __future__ import annotations

import importlib

from megacpp_mcore.patches import _wrapping

NAME = "te-attention-backend-per-layer"
TARGETS = "transformer-engine >=2.0,<2.19"  # the global cache read in 2.11 .. 2.18 (tests)
REQUIRES = "transformer_engine"
DESCRIPTION = (
    "TE DotProductAttention caches one attention-backend selection per process, so attention "
    "layers of alternating shapes (MoD topk next to dense) re-run get_attention_backend on every "
    "call; keep one cache per DotProductAttention instance"
)

_MODULE = "transformer_engine.pytorch.attention.dot_product_attention.dot_product_attention"
_GLOBAL = "_attention_backends"
_ATTR = "_megacpp_attention_backends"


def _target():
    try:
        module = importlib.import_module(_MODULE)
    except ImportError:
        return None
    cls = getattr(module, "DotProductAttention", None)
    cache = getattr(module, _GLOBAL, None)
    if cls is None or not isinstance(cache, dict) or "attention_params" not in cache:
        return None
    return module


def _upstream_forward(module):
    return _wrapping.upstream(module.DotProductAttention.forward, NAME)


def _reads_global(fn) -> bool:
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and _GLOBAL in code.co_names:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def check() -> str:
    """``needed`` while upstream's forward reads the module-global one-entry cache,
    ``fixed-upstream`` when the module keeps the dict but forward no longer reads it (the cache
    moved), ``target-missing`` when the module, class or dict is gone."""
    module = _target()
    if module is None:
        return "target-missing"
    return "needed" if _reads_global(_upstream_forward(module)) else "fixed-upstream"


def _fresh_cache(template: dict) -> dict:
    cache = {key: None for key in template}
    cache["attention_params"] = None
    cache["backend_selection_requires_update"] = False
    return cache


def _per_instance(original, module):
    def forward(self, *args, **kwargs):
        cache = self.__dict__.get(_ATTR)
        if cache is None:
            cache = _fresh_cache(module.__dict__[_GLOBAL])
            self.__dict__[_ATTR] = cache
        shared = module.__dict__[_GLOBAL]
        module.__dict__[_GLOBAL] = cache
        try:
            return original(self, *args, **kwargs)
        finally:
            module.__dict__[_GLOBAL] = shared

    return _wrapping.wrap(original, forward, NAME)


def apply() -> list[str]:
    """Wraps ``DotProductAttention.forward`` with the per-instance cache swap; idempotent."""
    module = _target()
    if module is None or check() != "needed":
        return []
    cls = module.DotProductAttention
    if _wrapping.is_patched(cls.__dict__.get("forward"), NAME):
        return []
    cls.forward = _per_instance(cls.forward, module)
    return [f"{_MODULE}.DotProductAttention.forward"]


def applied() -> bool | None:
    """Whether ``DotProductAttention.forward`` is this patch's wrapper (None without TE)."""
    module = _target()
    if module is None:
        return None
    return _wrapping.is_patched(module.DotProductAttention.__dict__.get("forward"), NAME)
