"""Without Transformer Engine ``moe_utils.te_general_gemm`` is never defined: the router raises.

megatron-core 0.16 imports ``te_general_gemm`` (with TE's other fused MoE ops) inside a
``try``/``except ImportError`` that only sets ``HAVE_TE = False``; the router's gating linear then
reads ``te_general_gemm`` and raises ``NameError`` on a host without TE. The patch defines it as
``None``, which the router treats as "use torch matmul". Fixed upstream in 0.17 (its no-TE branch
assigns ``None`` to every fused op, ``te_general_gemm`` included). ``SCOPE = "cpu"``: the registry
applies it only on hosts without CUDA.
"""

from __future__ import annotations

import ast
import importlib
import inspect

NAME = "cpu-moe-router-gemm"
TARGETS = "megatron-core >=0.16,<0.17"
SCOPE = "cpu"
DESCRIPTION = (
    "without TE, moe_utils.te_general_gemm is never defined and the MoE router raises NameError; "
    "define it as None (torch matmul path)"
)

_MODULE = "megatron.core.transformer.moe.moe_utils"
_ATTR = "te_general_gemm"


def _target():
    try:
        module = importlib.import_module(_MODULE)
    except ImportError:
        return None
    return module if _ATTR in inspect.getsource(module) else None


def _assigns_fallback(source: str) -> bool:
    """Whether the module's code assigns ``te_general_gemm`` itself (``= None``, or among the names
    of a tuple assignment as 0.17+ do in their no-TE branch), not only imports it from TE."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign):
            names = [t for target in node.targets for t in ast.walk(target)]
            if any(isinstance(n, ast.Name) and n.id == _ATTR for n in names):
                return True
    return False


def check() -> str:
    """``needed`` while upstream's module only imports ``te_general_gemm`` from TE (0.16: the name
    stays undefined without TE), ``fixed-upstream`` once it assigns a fallback itself (0.17+),
    ``target-missing`` when the name is gone."""
    module = _target()
    if module is None:
        return "target-missing"
    return "fixed-upstream" if _assigns_fallback(inspect.getsource(module)) else "needed"


def applied() -> bool:
    """Whether the name is defined although TE's import failed and upstream defines no fallback
    (only the patch defines it then)."""
    module = _target()
    return (module is not None and hasattr(module, _ATTR) and not getattr(module, "HAVE_TE", False)
            and check() == "needed")


def apply() -> list[str]:
    """Defines ``te_general_gemm = None`` where upstream left it undefined; idempotent."""
    module = _target()
    if module is None or hasattr(module, _ATTR):
        return []
    setattr(module, _ATTR, None)  # the router then uses torch matmul
    return [f"{_MODULE}.{_ATTR} = None"]
