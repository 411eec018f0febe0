"""The TE-duplicated MLA down projection is not marked ``tensor_model_parallel=False``.

MLA's q/kv down projections on TE are ``TELinear(parallel_mode="duplicated")``: every TP rank holds
the full weight. TE marks its weights ``tensor_model_parallel=True`` and megatron-core 0.16's
``TELinear`` never resets that for duplicated weights, so the grad-norm reduction
(``param_is_not_tensor_parallel_duplicate``) counts those gradients once per TP rank and the grad
norm (and clipping) grows with TP. Fixed upstream in 0.18 (``setattr(param,
"tensor_model_parallel", False)`` in ``TELinear.__init__``). The patch wraps ``TELinear.__init__`` to
mark the parameters of non-expert duplicated instances the same way.
"""

from __future__ import annotations

import functools
import importlib
import inspect

REQUIRES = "transformer_engine"  # TELinear exists only with Transformer Engine
NAME = "mla-down-proj-tp-marker"
TARGETS = "megatron-core >=0.16,<0.18"
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


def _original_init(cls):
    return getattr(cls.__init__, "_megacpp_original", cls.__init__)


def check() -> str:
    """``target-missing`` without a real TE ``TELinear``; ``fixed-upstream`` when its constructor
    already marks duplicated params; ``needed`` otherwise (also after apply)."""
    cls = _target()
    if cls is None:
        return "target-missing"
    init = _original_init(cls)
    if "parallel_mode" not in inspect.signature(init).parameters:
        return "target-missing"
    return "fixed-upstream" if _FIX_MARKER in inspect.getsource(init) else "needed"


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
    """Patches ``TELinear`` when the defect is present; returns what changed."""
    if check() != "needed":
        return []
    return patch_class(_target())
