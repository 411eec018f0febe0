"""Transformer Engine's fused MoE permutation kernels autotune from scratch in every fresh process.

With ``moe_permute_fusion`` (the default of ``megacpp-mcore train`` on a GPU), Megatron permutes
and un-permutes MoE tokens through TE's Triton kernels (``transformer_engine.common.triton.
permutation``), each a ``triton.autotune`` over seven ``BLOCK_SIZE`` values keyed by the hidden
size and the tensors' dtypes. A fresh process compiles and benchmarks all seven for each of the
four keys one ``nam56r-lite`` step meets (permute with and without probabilities, un-permute with
and without merging them): on a fresh H100 (2026-12-08, TE 2.11, Triton 3.6) **6.9 s of the
65.5 s** from launch to the first finished step (``scripts/h200_regression.sh startup``,
``TRITON_PRINT_AUTOTUNING=1``), half of it inside the step-0 evaluation, half in the first step.

The patch seeds those autotuners the way ``mamba-ssd-tuned-configs`` seeds mamba_ssm's
(:func:`~megacpp_mcore.patches.mamba_ssd_tuned_configs.seed`: the kernel's own ``Config`` object
under the exact key Triton builds, a choice this process measured is kept) with the choices Triton
made in that run (:data:`TUNED`, hidden size 2048, bf16). The kernels are memory-bound copies; any
``BLOCK_SIZE`` computes the same result. Other hidden sizes and dtypes autotune as before; on
devices other than compute capability 9.0 (where the table was measured) nothing changes.
"""

from __future__ import annotations

import ast
import importlib

from megacpp_mcore.patches.mamba_ssd_tuned_configs import _matches, parse_config, seed

NAME = "te-permute-tuned-configs"
TARGETS = "transformer-engine >=2.8,<2.19"  # staged on the GPU machine: 2.11 (Triton 3.6)
DESCRIPTION = (
    "TE's fused MoE permutation Triton kernels benchmark seven block sizes per key on first use in "
    "each process (6.9 s of a fresh H100's 65.5 s start-up for nam56r-lite), with no way to seed "
    "the choice"
)
REQUIRES = "transformer_engine"

_MODULE = "transformer_engine.common.triton.permutation"
CAPABILITY = (9, 0)  # where TUNED was measured (H100; the H200 is the same compute capability)

# kernel -> [(autotune key as Triton builds it, chosen config)], from one nam56r-lite bf16 training
# step with the step-0 evaluation on an H100 (megatron-core 0.16.1, TE 2.11, Triton 3.6): hidden
# 2048; permute(input, row_id_map[, probs], output[, permuted_probs]), unpermute(input, row_id_map
# [, merging_probs, permuted_probs], output[, unpermuted_probs])
_BF16, _I32, _F32 = "'torch.bfloat16'", "'torch.int32'", "'torch.float32'"
TUNED: dict[str, list[tuple[str, str]]] = {
    "_permute_kernel": [
        (f"(2048, {_BF16}, {_I32}, {_F32}, {_BF16}, {_F32})", "BLOCK_SIZE=4096 num_warps=4 num_stages=3"),
        (f"(2048, {_BF16}, {_I32}, {_BF16})", "BLOCK_SIZE=2048 num_warps=4 num_stages=3")],
    "_unpermute_kernel": [
        (f"(2048, {_BF16}, {_I32}, {_BF16})", "BLOCK_SIZE=4096 num_warps=4 num_stages=3"),
        (f"(2048, {_BF16}, {_I32}, {_F32}, {_BF16}, {_F32})", "BLOCK_SIZE=4096 num_warps=4 num_stages=3")],
}


def _autotuners() -> dict[str, object] | None:
    """Table kernel name -> its autotuner, or ``None`` when one is missing or not autotuned."""
    try:
        module = importlib.import_module(_MODULE)
    except ImportError:
        return None
    found = {}
    for name in TUNED:
        kernel = getattr(module, name, None)
        if kernel is None or not hasattr(kernel, "cache") or not hasattr(kernel, "configs"):
            return None
        found[name] = kernel
    return found


def check() -> str:
    kernels = _autotuners()
    if kernels is None:
        return "target-missing"
    if all(len(k.configs) <= 1 for k in kernels.values()):
        return "fixed-upstream"  # nothing is tuned at run time any more
    for name, kernel in kernels.items():  # the table's configurations must still exist
        for _, config_text in TUNED[name]:
            if not any(_matches(c, parse_config(config_text)) for c in kernel.configs):
                return "target-missing"
    return "needed"


def _on_tuned_device() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() == CAPABILITY


def apply() -> list[str]:
    kernels = _autotuners()
    if kernels is None or not _on_tuned_device():
        return []
    changed = []
    for name, kernel in kernels.items():
        added = seed(kernel, TUNED[name], patch=NAME)
        if added:
            changed.append(f"{name}: {len(added)} key(s) seeded")
    return changed


def applied() -> bool | None:
    kernels = _autotuners()
    if kernels is None or not _on_tuned_device():
        return None
    return all(ast.literal_eval(key) in kernels[name].cache
               for name, entries in TUNED.items() for key, _ in entries)
