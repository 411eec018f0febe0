"""Without Transformer Engine ``moe_utils.te_general_gemm`` is never defined: the router raises.

megatron-core 0.16 imports ``te_general_gemm`` (with TE's other fused MoE ops) inside a
``try``/``except ImportError`` that only sets ``HAVE_TE = False``; the router's gating linear then
reads ``te_general_gemm`` and raises ``NameError`` on a host without TE. The patch defines it as
``None``, which the router treats as "use torch matmul". ``SCOPE = "cpu"``: the registry applies it
only on hosts without CUDA.
"""

from __future__ import annotations

import importlib
import inspect
import re

NAME = "cpu-moe-router-gemm"
TARGETS = "megatron-core >=0.16,<0.17"
SCOPE = "cpu"
DESCRIPTION = (
    "without TE, moe_utils.te_general_gemm is never defined and the MoE router raises NameError; "
    "define it as None (torch matmul path)"
)

_MODULE = "megatron.core.transformer.moe.moe_utils"
_ATTR = "te_general_gemm"
# upstream's fix would define the fallback itself, e.g. ``te_general_gemm = None`` in its except
_FIX = re.compile(r"\bte_general_gemm\s*=\s*None\b")


def _target():
    try:
        module = importlib.import_module(_MODULE)
    except ImportError:
        return None
    return module if _ATTR in inspect.getsource(module) else None


def check() -> str:
    """``needed`` while upstream's source reads ``te_general_gemm`` without ever defining a
    fallback, ``fixed-upstream`` once it does, ``target-missing`` when the name is gone."""
    module = _target()
    if module is None:
        return "target-missing"
    return "fixed-upstream" if _FIX.search(inspect.getsource(module)) else "needed"


def applied() -> bool:
    """Whether the name is defined although TE's import failed (only the patch defines it then)."""
    module = _target()
    return module is not None and hasattr(module, _ATTR) and not getattr(module, "HAVE_TE", False)


def apply() -> list[str]:
    """Defines ``te_general_gemm = None`` where upstream left it undefined; idempotent."""
    module = _target()
    if module is None or hasattr(module, _ATTR):
        return []
    setattr(module, _ATTR, None)  # the router then uses torch matmul
    return [f"{_MODULE}.{_ATTR} = None"]
