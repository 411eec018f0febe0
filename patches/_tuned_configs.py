"""Helpers shared by the patches that seed Triton autotuners with measured choices
(``mamba-ssd-tuned-configs``, ``te-permute-tuned-configs``).

A table maps a kernel's name to ``[(key, config)]``: the autotune key as Triton builds it (the key
arguments' values, then the tensor arguments' dtype names), written as the tuple's text, and the
configuration Triton chose for it (``"BLOCK_SIZE=512 num_warps=4 num_stages=3"``). Seeding puts the
kernel's own ``Config`` object with those parameters into ``Autotuner.cache`` under that key, so the
first call with the key compiles one configuration and benchmarks none. Tables are measured on one
compute capability and applied only there.
"""

from __future__ import annotations

import ast
import importlib

Table = dict[str, list[tuple[str, str]]]


def parse_config(text: str) -> dict[str, int]:
    """``"BLOCK_SIZE_M=64 num_warps=4 num_stages=3"`` -> ``{"BLOCK_SIZE_M": 64, ...}``."""
    return {name: int(value) for name, value in (item.split("=") for item in text.split())}


def config_matches(config, wanted: dict[str, int]) -> bool:
    meta = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return {**config.kwargs, **meta} == wanted


def seed(autotuner, entries: list[tuple[str, str]], patch: str) -> list[str]:
    """Puts each ``(key, config)`` of ``entries`` into ``autotuner.cache`` (an entry the autotuner
    already holds stays: it is this process's own measurement); returns what was added. The config
    is the autotuner's own object with those parameters; one it does not list is an error (the
    table of ``patch`` no longer fits the kernel)."""
    added = []
    for key_text, config_text in entries:
        key, wanted = ast.literal_eval(key_text), parse_config(config_text)
        if key in autotuner.cache:
            continue
        config = next((c for c in autotuner.configs if config_matches(c, wanted)), None)
        if config is None:
            raise LookupError(f"{patch}: no configuration {config_text} among the kernel's "
                              f"{len(autotuner.configs)}; the table needs re-measuring")
        autotuner.cache[key] = config
        added.append(f"{key_text[:40]}... -> {config_text}")
    return added


def autotuners(modules: tuple[str, ...], table: Table) -> dict[str, object] | None:
    """Table kernel name -> its autotuner (looked up in ``modules``), or ``None`` when a module
    does not import or a kernel is missing or not autotuned."""
    try:
        loaded = [importlib.import_module(m) for m in modules]
    except ImportError:
        return None
    found = {}
    for name in table:
        kernel = next((getattr(m, name) for m in loaded if hasattr(m, name)), None)
        if kernel is None or not hasattr(kernel, "cache") or not hasattr(kernel, "configs"):
            return None
        found[name] = kernel
    return found


def check(kernels: dict[str, object] | None, table: Table) -> str:
    """The patch protocol's verdict for a table over ``kernels`` (:func:`autotuners`)."""
    if kernels is None:
        return "target-missing"
    if all(len(k.configs) <= 1 for k in kernels.values()):
        return "fixed-upstream"  # nothing is tuned at run time any more
    for name, kernel in kernels.items():  # the table's configurations must still exist
        for _, config_text in table[name]:
            if not any(config_matches(c, parse_config(config_text)) for c in kernel.configs):
                return "target-missing"
    return "needed"


def _on(capability: tuple[int, int]) -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() == capability


def apply(kernels: dict[str, object] | None, table: Table, patch: str,
          capability: tuple[int, int]) -> list[str]:
    """Seeds every kernel of the table on a device of ``capability`` (elsewhere: nothing)."""
    if kernels is None or not _on(capability):
        return []
    changed = []
    for name, kernel in kernels.items():
        added = seed(kernel, table[name], patch)
        if added:
            changed.append(f"{name}: {len(added)} key(s) seeded")
    return changed


def applied(kernels: dict[str, object] | None, table: Table,
            capability: tuple[int, int]) -> bool | None:
    if kernels is None or not _on(capability):
        return None
    return all(ast.literal_eval(key) in kernels[name].cache
               for name, entries in table.items() for key, _ in entries)
