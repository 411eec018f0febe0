"""Helpers shared by patch modules: mark a wrapper as ours and find upstream's original behind it."""

from __future__ import annotations

import functools
from typing import Callable

_MARK = "__megacpp_patch__"


def wrap(original: Callable, wrapper: Callable, patch_name: str) -> Callable:
    """``wrapper`` dressed as ``original`` (name, doc, ``__wrapped__``) and marked as ``patch_name``'s."""
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, _MARK, patch_name)
    return wrapper


def is_patched(fn: object, patch_name: str) -> bool:
    return getattr(fn, _MARK, None) == patch_name


def upstream(fn: Callable, patch_name: str) -> Callable:
    """The upstream callable behind ``fn`` (``fn`` itself when it is not ``patch_name``'s wrapper)."""
    while is_patched(fn, patch_name):
        fn = fn.__wrapped__
    return fn
