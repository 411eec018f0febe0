"""``spec_utils.import_module`` swallows ImportError and returns ``None``.

With ``pretrain_gpt.py --spec MODULE ATTR`` a typo in MODULE (or an import error inside it) makes
megatron-core 0.16 log one line and hand ``None`` to ``GPTModel`` as the layer spec, which fails much
later with an unrelated ``AttributeError``; a wrong ATTR raises a bare ``KeyError: 'ATTR'``. The
patch wraps ``import_module`` so that both raise an ``ImportError`` naming the module, the attribute
and the cause, and so that a ``--spec`` with the wrong number of words is a ``ValueError`` showing
the expected form. Successful imports go through upstream's function unchanged.

Upstream still has the defect in 0.16, 0.17, 0.18 and 0.19 (``return None`` after
``logger.error``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import sys
from typing import Any, Callable, Iterator

from megacpp_mcore.patches._wrapping import is_patched, upstream, wrap

NAME = "spec-import-errors"
TARGETS = "megatron-core >=0.16,<0.20"
DESCRIPTION = (
    "spec_utils.import_module returns None on ImportError (and KeyError on a missing attribute), so "
    "a bad `--spec MODULE ATTR` fails far from its cause; make it raise ImportError naming both"
)

_TARGET_MODULE = "megatron.core.transformer.spec_utils"
_PROBE_MODULE = "megacpp_mcore_patch_probe_module_that_does_not_exist"


def _spec_utils():
    try:
        return importlib.import_module(_TARGET_MODULE)
    except ImportError:
        return None


@contextlib.contextmanager
def _quiet(module) -> Iterator[None]:
    """Silences upstream's ``logger.error`` while probing with a module that does not exist."""
    logger = getattr(module, "logger", None) or logging.getLogger(_TARGET_MODULE)
    previous = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = previous


def check() -> str:
    """``needed`` while upstream's ``import_module`` returns ``None`` for a missing module."""
    module = _spec_utils()
    target = getattr(module, "import_module", None) if module is not None else None
    if not callable(target):
        return "target-missing"
    original = upstream(target, NAME)
    with _quiet(module):
        try:
            result = original((_PROBE_MODULE, "SPEC"))
        except ImportError:
            return "fixed-upstream"
        except TypeError:  # the signature changed: the patch must be re-based
            return "target-missing"
    return "needed" if result is None else "fixed-upstream"


def _split(module_path: Any) -> tuple[str, str]:
    if (
        isinstance(module_path, (str, bytes))
        or not hasattr(module_path, "__len__")
        or len(module_path) != 2
        or not all(isinstance(part, str) for part in module_path)
    ):
        raise ValueError(
            f"a spec path is two words, MODULE ATTR (e.g. `--spec layer_specs.nam56r NAM56R`); "
            f"got {module_path!r}"
        )
    return module_path[0], module_path[1]


def _exports(module, base: str) -> list[str]:
    """The module's ``__all__``, else its public names that are not imports."""
    if module is None:
        return []
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            k for k, v in vars(module).items()
            if not k.startswith("_") and not inspect.ismodule(v)
            and not ((inspect.isclass(v) or inspect.isfunction(v)) and v.__module__ != base)
        ]
    return sorted(names)


def _make_wrapper(original: Callable) -> Callable:
    def import_module(module_path):
        base, name = _split(module_path)
        try:
            obj = original(module_path)
        except KeyError:
            raise ImportError(
                f"spec {base}.{name}: module {base!r} has no attribute {name!r}; it defines: "
                f"{', '.join(_exports(sys.modules.get(base), base)) or 'nothing public'}"
            ) from None
        if obj is None and base not in sys.modules:
            # upstream swallowed the ImportError: import again to raise it with its cause
            try:
                importlib.import_module(base)
            except ImportError as exc:
                raise ImportError(f"spec {base}.{name}: cannot import module {base!r}: {exc}") from exc
        return obj

    return wrap(original, import_module, NAME)


def applied() -> bool:
    module = _spec_utils()
    return module is not None and is_patched(getattr(module, "import_module", None), NAME)


def apply() -> list[str]:
    """Wraps ``spec_utils.import_module`` and rebinds modules that imported it by name (e.g.
    Megatron-LM's ``gpt_builders``). Idempotent."""
    module = _spec_utils()
    if module is None or not callable(getattr(module, "import_module", None)):
        return []
    changed = []
    current = module.import_module
    original = upstream(current, NAME)
    wrapper = current
    if not is_patched(current, NAME):
        wrapper = _make_wrapper(original)
        module.import_module = wrapper
        changed.append(f"{_TARGET_MODULE}.import_module")
    for name, other in list(sys.modules.items()):
        if other is None or other is module:
            continue
        if vars(other).get("import_module") is original:
            other.import_module = wrapper
            changed.append(f"{name}.import_module")
    return changed
