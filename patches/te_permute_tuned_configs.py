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
(``patches/_tuned_configs.py``: the kernel's own ``Config`` object under the exact key Triton
builds, a choice this process measured is kept) with the choices Triton made in that run
(:data:`TUNED`, hidden size 2048, bf16). The kernels are memory-bound copies; any ``BLOCK_SIZE``
computes the same result. Other hidden sizes and dtypes autotune as before; on
devices other than compute capability 9.0 (where the table was measured) nothing changes.
"""

from __future__ import annotations

from megacpp_mcore.patches import _tuned_configs as _tuned
from megacpp_mcore.patches._tuned_configs import parse_config, seed  # noqa: F401 (tests, callers)

NAME = "te-permute-tuned-configs"
TARGETS = "transformer-engine >=2.11,<2.19"  # read in 2.11 (staged, Triton 3.6)
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
    return _tuned.autotuners((_MODULE,), TUNED)


def check() -> str:
    return _tuned.check(_autotuners(), TUNED)


def apply() -> list[str]:
    return _tuned.apply(_autotuners(), TUNED, NAME, CAPABILITY)


def applied() -> bool | None:
    return _tuned.applied(_autotuners(), TUNED, CAPABILITY)
