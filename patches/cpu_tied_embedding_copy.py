"""With tied embeddings and PP > 1 the last stage's embedding copy is moved with ``.cuda()``.

``LanguageModule.setup_embeddings_and_output_layer`` (megatron-core 0.16) runs
``weight.data = weight.data.cuda()`` on the stages of the embedding group before all-reducing the
copy, which fails on a CPU host. The patch wraps the method so that ``Tensor.cuda`` is the identity
for the duration of the call: the copy stays where it is and upstream's all-reduce runs unchanged.
``SCOPE = "cpu"``: the registry applies it only on hosts without CUDA.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch

from megacpp_mcore.patches._wrapping import is_patched, upstream, wrap

NAME = "cpu-tied-embedding-copy"
TARGETS = "megatron-core >=0.16,<0.20"  # defect read in 0.16.1, 0.17.1, 0.18.2, 0.19.2
SCOPE = "cpu"
DESCRIPTION = (
    "LanguageModule.setup_embeddings_and_output_layer moves the tied embedding copy with .cuda() "
    "under PP > 1; keep it on CPU during that call"
)

_MODULE = "megatron.core.models.common.language_module.language_module"
_METHOD = "setup_embeddings_and_output_layer"


def _target():
    try:
        module = importlib.import_module(_MODULE)
    except ImportError:
        return None
    cls = getattr(module, "LanguageModule", None)
    return cls if callable(getattr(cls, _METHOD, None)) else None


def check() -> str:
    """``needed`` while upstream's method calls ``.cuda()``, ``fixed-upstream`` once it does not,
    ``target-missing`` when the class or method moved."""
    cls = _target()
    if cls is None:
        return "target-missing"
    return "needed" if ".cuda()" in inspect.getsource(upstream(getattr(cls, _METHOD), NAME)) else "fixed-upstream"


def _cuda_is_identity(original: Callable) -> Callable:
    def setup_embeddings_and_output_layer(self):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *_, **__: tensor
        try:
            return original(self)
        finally:
            torch.Tensor.cuda = cuda

    return wrap(original, setup_embeddings_and_output_layer, NAME)


def applied() -> bool:
    cls = _target()
    return cls is not None and is_patched(cls.__dict__.get(_METHOD), NAME)


def apply() -> list[str]:
    """Wraps the method (once); returns what changed."""
    cls = _target()
    if cls is None or applied():
        return []
    setattr(cls, _METHOD, _cuda_is_identity(getattr(cls, _METHOD)))
    return [f"{_MODULE}.LanguageModule.{_METHOD}"]
