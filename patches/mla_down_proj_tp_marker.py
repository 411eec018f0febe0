"""The TE-duplicated MLA down projection is not marked ``tensor_model_parallel=False``.

MLA's q/kv down projections on TE are ``TELinear(parallel_mode="duplicated")``: every TP rank holds
the full weight. TE marks its weights ``tensor_model_parallel=True`` and megatron-core 0.16's
``TELinear`` never resets that for duplicated weights, so the grad-norm reduction
(``param_is_not_tensor_parallel_duplicate``) counts those gradients once per TP rank and the grad
norm (and clipping) grows with TP. Fixed upstream in 0.17.0 (``setattr(param,
"tensor_model_parallel", False)`` in ``TELinear.__init__``, read at tags core_v0.16.1 / core_v0.17.0).
The patch wraps ``TELinear.__init__`` to mark the parameters of non-expert duplicated instances the
same way.

:func:`check` reads ``TELinear.__init__`` from the module's source file, so it answers on a host
without Transformer Engine too (there ``TELinear`` is a mock); the registry still reports the patch
``n/a`` there (``REQUIRES``), since nothing would be applied.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
from pathlib import Path

REQUIRES = "transformer_engine"  # TELinear exists only with Transformer Engine
NAME = "mla-down-proj-tp-marker"
TARGETS = "megatron-core >=0.16,<0.17"
DESCRIPTION = (
    "TELinear(parallel_mode='duplicated') (MLA down projection) keeps tensor_model_parallel=True, "
    "inflating grad norms under TP>1; mark its params tensor_model_parallel=False"
)

_MODULE = "megatron.core.extensions.transformer_engine"
_FIX_MARKER = '"tensor_model_parallel", False'


def _target():
    try:
        module = importlib.import_module(_MODULE)
    except ImportError:
        return None
    cls = getattr(module, "TELinear", None)
    if not getattr(module, "HAVE_TE", False) or not isinstance(cls, type):
        return None
    return cls


def _upstream_init_source() -> str | None:
    """Source of ``TELinear.__init__`` as upstream wrote it (read from the module's file, so
    neither Transformer Engine nor the state of this patch matters); None when it is gone."""
    try:
        spec = importlib.util.find_spec(_MODULE)
    except ImportError:
        return None
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == "TELinear":
            init = next((f for f in node.body
                         if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
            if init is None or "parallel_mode" not in {a.arg for a in (*init.args.args, *init.args.kwonlyargs)}:
                return None
            return ast.get_source_segment(source, init)
    return None


def check() -> str:
    """``fixed-upstream`` when upstream's ``TELinear.__init__`` already marks duplicated params
    (0.17+); ``needed`` otherwise (also after apply); ``target-missing`` when ``TELinear`` or its
    ``parallel_mode`` argument is gone."""
    source = _upstream_init_source()
    if source is None:
        return "target-missing"
    return "fixed-upstream" if _FIX_MARKER in source else "needed"


def mark_duplicated(module) -> None:
    """Marks every parameter of a TP-duplicated linear as not tensor-parallel."""
    for param in module.parameters():
        setattr(param, "tensor_model_parallel", False)


def patch_class(cls) -> list[str]:
    """Wraps ``cls.__init__`` (a ``TELinear``-like class); idempotent."""
    if getattr(cls.__init__, "_megacpp_patch", None) == NAME:
        return []
    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        arguments = signature.bind(self, *args, **kwargs).arguments
        if arguments.get("parallel_mode") == "duplicated" and not arguments.get("is_expert", False):
            mark_duplicated(self)

    __init__._megacpp_patch = NAME
    __init__._megacpp_original = original
    cls.__init__ = __init__
    return [f"{cls.__module__}.{cls.__qualname__}.__init__: duplicated params marked tensor_model_parallel=False"]


def applied() -> bool | None:
    """Whether ``TELinear.__init__`` is this patch's wrapper (None without Transformer Engine)."""
    cls = _target()
    if cls is None:
        return None
    return getattr(cls.__init__, "_megacpp_patch", None) == NAME


def apply() -> list[str]:
    """Patches ``TELinear`` when the defect is present and TE is installed; returns what changed."""
    cls = _target()
    if cls is None or check() != "needed":
        return []
    return patch_class(cls)
