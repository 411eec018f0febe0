"""Mamba-2's SSD Triton kernels autotune from scratch in every fresh process.

``mamba_ssm``'s chunked-scan kernels (``mamba_ssm.ops.triton.ssd_*``) are ``triton.autotune``
kernels with 4-11 configurations each. The first call with a new key (the kernel's shape
arguments, e.g. chunk size, head dim, state size, and its tensors' dtypes) compiles and
benchmarks every configuration; nothing seeds the choice, so a fresh machine pays it again. On a
fresh H200 (2026-12-04) the 16 forward and backward tunings of one ``nam56r-lite`` training step
took **88 s of the 124 s** from launch to the first finished step (``scripts/h200_regression.sh
startup``: Triton's own report, ``TRITON_PRINT_AUTOTUNING=1``).

The patch seeds each autotuner's in-memory choice (``Autotuner.cache``: key -> config) with what
the autotuner itself picked on an H200 for those keys (:data:`TUNED`, copied from that report),
so those calls compile one configuration and benchmark none. Keys not in the table (other shapes,
dtypes) autotune exactly as before, and the choice is the autotuner's own ``Config`` object of
the same parameters, so a seeded run computes what a tuned one does. The table was measured on
compute capability 9.0; on other devices the patch changes nothing (their shared memory and
speeds differ). A key whose format changes in another Triton release simply never matches.
"""

from __future__ import annotations

from megacpp_mcore.patches import _tuned_configs as _tuned
from megacpp_mcore.patches._tuned_configs import parse_config, seed  # noqa: F401 (tests, callers)

NAME = "mamba-ssd-tuned-configs"
TARGETS = "mamba-ssm >=2.2,<2.4"  # staged on the H200: 2.3.2.post1 (Triton 3.6)
DESCRIPTION = (
    "mamba_ssm's Mamba-2 SSD Triton kernels benchmark every configuration on first use in each "
    "process (88 s of a fresh H200's 124 s start-up for nam56r-lite), with no way to seed the choice"
)
REQUIRES = "mamba_ssm"

_MODULES = ("mamba_ssm.ops.triton.ssd_chunk_state", "mamba_ssm.ops.triton.ssd_state_passing",
            "mamba_ssm.ops.triton.ssd_bmm", "mamba_ssm.ops.triton.ssd_chunk_scan",
            "mamba_ssm.ops.triton.ssd_combined")
CAPABILITY = (9, 0)  # where TUNED was measured (H200)

# kernel -> [(autotune key as Triton builds it, chosen config)], from one nam56r-lite bf16
# training step on an H200 (megatron-core 0.16.1, mamba_ssm 2.3.2.post1, Triton 3.6): chunk 128,
# head dim 64, d_state 128, 64 heads
_BF16, _F32 = "'torch.bfloat16'", "'torch.float32'"
TUNED: dict[str, list[tuple[str, str]]] = {
    "_chunk_cumsum_fwd_kernel": [
        (f"(128, 64, {_BF16}, {_F32}, {_F32}, {_F32}, {_F32})", "BLOCK_SIZE_H=8 num_warps=4 num_stages=3")],
    "_chunk_state_fwd_kernel": [
        (f"(64, 128, 128, {_BF16}, {_BF16}, {_F32}, {_F32}, {_F32})",
         "BLOCK_SIZE_M=64 BLOCK_SIZE_N=128 BLOCK_SIZE_K=32 num_warps=4 num_stages=4")],
    "_state_passing_fwd_kernel": [
        (f"(8192, {_F32}, {_BF16}, {_F32}, {_F32})", "BLOCK_SIZE=1024 num_warps=4 num_stages=3"),
        (f"(8192, {_F32}, {_F32}, {_F32}, {_F32})", "BLOCK_SIZE=512 num_warps=4 num_stages=3")],
    "_bmm_chunk_fwd_kernel": [
        (f"(128, 128, False, {_BF16}, {_BF16}, {_F32})",
         "BLOCK_SIZE_M=128 BLOCK_SIZE_N=64 BLOCK_SIZE_K=32 num_warps=4 num_stages=4")],
    "_chunk_scan_fwd_kernel": [
        (f"(128, 64, 128, True, {_F32}, {_BF16}, {_BF16}, {_BF16}, {_BF16}, {_F32}, {_F32}, {_BF16}, "
         f"{_BF16}, {_F32})", "BLOCK_SIZE_M=32 BLOCK_SIZE_N=64 BLOCK_SIZE_K=32 num_warps=2 num_stages=5")],
    "_chunk_scan_bwd_dz_kernel": [
        (f"(128, 64, {_BF16}, {_BF16}, {_BF16}, {_BF16}, {_F32}, {_BF16}, {_BF16}, {_F32})",
         "BLOCK_SIZE_M=32 num_warps=4 num_stages=3")],
    "_chunk_scan_bwd_dstates_kernel": [
        (f"(64, 128, 128, {_BF16}, {_BF16}, {_F32}, {_F32})",
         "BLOCK_SIZE_M=64 BLOCK_SIZE_N=128 BLOCK_SIZE_K=32 num_warps=4 num_stages=4")],
    "_state_passing_bwd_kernel": [
        (f"(8192, {_F32}, {_F32}, {_F32}, {_BF16}, {_F32}, {_BF16})", "BLOCK_SIZE=512 num_warps=4 num_stages=3")],
    "_chunk_scan_chunk_state_bwd_dx_kernel": [
        (f"(128, 64, 128, {_BF16}, {_F32}, {_BF16}, {_F32}, {_F32}, {_F32}, {_BF16}, {_BF16}, {_BF16}, "
         f"{_F32}, {_F32})", "BLOCK_SIZE_M=32 BLOCK_SIZE_N=64 BLOCK_SIZE_K=32 num_warps=4 num_stages=5")],
    "_chunk_state_bwd_db_kernel": [
        (f"(128, 128, 64, {_BF16}, {_BF16}, {_BF16}, {_F32}, {_F32}, {_F32}, {_F32})",
         "BLOCK_SIZE_M=64 BLOCK_SIZE_N=128 num_warps=4 num_stages=3")],
    "_chunk_scan_bwd_dc_kernel": [
        (f"(128, 128, 64, {_BF16}, {_BF16}, {_BF16}, {_F32}, {_F32}, {_F32})",
         "BLOCK_SIZE_M=64 BLOCK_SIZE_N=128 num_warps=4 num_stages=3")],
    "_chunk_scan_bwd_dcb_kernel": [
        (f"(128, 64, {_BF16}, {_BF16}, {_F32}, {_F32}, {_F32})", "BLOCK_SIZE_M=32 BLOCK_SIZE_N=32 num_warps=4 num_stages=3")],
    "_bmm_chunk_bwd_kernel": [
        (f"(128, 128, {_BF16}, {_F32}, {_BF16}, {_F32})",
         "BLOCK_SIZE_M=64 BLOCK_SIZE_N=128 BLOCK_SIZE_CS=32 num_warps=4 num_stages=4")],
    "_chunk_scan_bwd_ddAcs_stable_kernel": [
        (f"(128, 64, {_BF16}, {_BF16}, {_F32}, {_F32}, {_F32}, {_F32})",
         "BLOCK_SIZE_M=64 BLOCK_SIZE_N=32 num_warps=4 num_stages=3")],
    "_chunk_cumsum_bwd_kernel": [
        (f"(128, 64, {_F32}, {_F32}, {_BF16}, {_F32}, {_F32}, {_BF16}, {_F32}, {_F32})",
         "BLOCK_SIZE_H=8 num_warps=4 num_stages=3")],
}


def _autotuners() -> dict[str, object] | None:
    return _tuned.autotuners(_MODULES, TUNED)


def check() -> str:
    return _tuned.check(_autotuners(), TUNED)


def apply() -> list[str]:
    return _tuned.apply(_autotuners(), TUNED, NAME, CAPABILITY)


def applied() -> bool | None:
    return _tuned.applied(_autotuners(), TUNED, CAPABILITY)
