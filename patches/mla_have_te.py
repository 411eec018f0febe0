"""``multi_latent_attention.HAVE_TE`` is wrongly True on hosts without Transformer Engine.

In megatron-core 0.16 ``megatron.core.extensions.transformer_engine`` imports without TE by
replacing ``transformer_engine`` with a ``MagicMock``; ``multi_latent_attention`` then imports
``TELinear``/``TEColumnParallelLinear`` from it successfully and sets ``HAVE_TE = True``, so its
TE-only branches compare and ``isinstance``-check against mocks. The patch makes the module tell
the truth: ``HAVE_TE = False`` and the TE names ``None`` (what its own ``except ImportError`` sets).
"""

from __future__ import annotations

import importlib
import inspect

NAME = "mla-have-te"
TARGETS = "megatron-core >=0.16,<0.17"
DESCRIPTION = (
    "multi_latent_attention.HAVE_TE is True without Transformer Engine (TE names are MagicMocks); "
    "set it False and the TE names to None"
)

_MODULE = "megatron.core.transformer.multi_latent_attention"
_TE_NAMES = ("TEColumnParallelLinear", "TELinear", "set_save_original_input")


def _te_really_installed() -> bool:
    ext = importlib.import_module("megatron.core.extensions.transformer_engine")
    return bool(getattr(ext, "HAVE_TE", False))


def _target():
    try:
        module = importlib.import_module(_MODULE)
    except ImportError:
        return None
    if not hasattr(module, "HAVE_TE") or not all(hasattr(module, n) for n in _TE_NAMES):
        return None
    return module


def check() -> str:
    """``needed`` while the MLA module derives ``HAVE_TE`` from its own import of the TE extension
    (0.16; harmless on TE hosts, wrong without TE), ``fixed-upstream`` once it reuses the extension's
    ``HAVE_TE`` (0.17+), ``target-missing`` when the module or its names moved."""
    module = _target()
    if module is None:
        return "target-missing"
    if "transformer_engine import HAVE_TE" in inspect.getsource(module):
        return "fixed-upstream"
    return "needed"


def applied() -> bool:
    """Whether ``HAVE_TE`` was turned False here (0.16 without TE, where upstream sets it True)."""
    module = _target()
    return (module is not None and module.HAVE_TE is False and not _te_really_installed()
            and check() == "needed")


def apply() -> list[str]:
    """Sets ``HAVE_TE = False`` and the TE names to ``None`` when TE is absent; idempotent."""
    module = _target()
    if module is None or _te_really_installed() or not module.HAVE_TE:
        return []
    changed = [f"{_MODULE}.HAVE_TE = False"]
    module.HAVE_TE = False
    for name in _TE_NAMES:
        if getattr(module, name) is not None:
            setattr(module, name, None)
            changed.append(f"{_MODULE}.{name} = None")
    return changed
