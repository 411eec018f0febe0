"""Every Triton kernel of the package compiles for the H100/H200 (sm_90) here, with no GPU.

The other CPU tests run the kernels under Triton's interpreter, which checks what they compute but
not what the GPU compiler accepts (the interpreter runs any Python, the compiler a subset; layout
conversions, lowering to PTX and ptxas never happen there); several kernels (MoD's gate and top-k
route, the MTP CE epilogue, the MoDA merge) had no CPU check at all. Here each kernel's launcher is
called as the package calls it, with the kernel swapped for a recorder, and every recorded launch
is compiled for sm_90 down to a cubin (``megacpp_mcore.testing.kernel_compile``), so a kernel that
would fail to compile on the GPU machine fails here first.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":  # kernels are interpreter objects then
    pytest.skip("compiles real kernels: run without TRITON_INTERPRET", allow_module_level=True)

import triton.language as tl  # noqa: E402
from triton.backends import backends as _triton_backends  # noqa: E402

if "nvidia" not in _triton_backends:  # every PyPI wheel ships it (with ptxas); a custom build may not
    pytest.skip("this Triton has no NVIDIA backend to compile for", allow_module_level=True)

from megacpp_mcore.testing.kernel_compile import Launch, compile_sm90, recorded, resources  # noqa: E402


def _compile_all(log: list[Launch], expected: set[str]) -> None:
    assert {launch.name for launch in log} == expected, [launch.name for launch in log]
    for launch in log:
        compiled = compile_sm90(launch)
        assert compiled.asm.get("cubin"), launch.name  # ptxas ran: sm_90 machine code exists


# ------------------------------------------------------------------------------------------ cases
def _m2rnn_scan(monkeypatch):
    from megacpp_mcore.layers.mixers import m2rnn_triton as mod

    with recorded(mod, "_m2rnn_fwd_kernel", "_m2rnn_bwd_kernel") as log:
        for b, t, h, k, v, dtype in ((1, 4096, 4, 64, 16, torch.bfloat16), (2, 100, 2, 16, 16, torch.float32)):
            q, kk = torch.randn(b, t, h, k, dtype=dtype), torch.randn(b, t, h, k, dtype=dtype)
            vv, f = torch.randn(b, t, h, v, dtype=dtype), torch.rand(b, t, h, dtype=dtype)
            w = torch.randn(h, v, v)
            ins = [x.requires_grad_() for x in (q, kk, vv, f, w)]
            y = mod.m2rnn_scan_triton(*ins)
            torch.autograd.grad(y, ins, torch.ones_like(y))
    return log


def _m2rnn_step(monkeypatch):
    from megacpp_mcore.infer import m2rnn_triton as mod

    b, heads, k, v = 2, 4, 64, 16
    with recorded(mod, "_m2rnn_step_kernel") as log:
        for s, keep in ((1, False), (7, True)):
            x = torch.randn(b, heads * (2 * k + v), s, dtype=torch.bfloat16)
            gate = torch.randn(s, b, heads, dtype=torch.bfloat16)
            h0 = torch.zeros(b, heads, k, v)
            mod.m2rnn_step(x, gate, torch.ones(heads), torch.randn(heads, v, v), h0,
                           torch.ones(b, s, dtype=torch.bool), keep, torch.bfloat16)
    return log


def _mod_gate_and_route(monkeypatch):
    from megacpp_mcore.features.mod import kernels as mod

    n, h, batch = 64, 4096, 2
    x, out = torch.randn(n, h, dtype=torch.bfloat16), torch.randn(n, h, dtype=torch.bfloat16)
    weight, bias = torch.randn(h, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16)
    with recorded(mod, "_router_fwd_kernel", "_gate_bwd_kernel", "_topk_bwd_kernel") as log:
        y, g = mod.gate_forward(x, out, weight, bias)
        mod.gate_backward(x, x, out, weight, g, torch.zeros(n))
        logits = mod.router_logits(x, weight, bias, batch)
        pos = torch.full((n,), -1, dtype=torch.int32)
        sel = torch.randn(n // 4, h, dtype=torch.bfloat16)
        mod.topk_backward(x, sel, torch.randn(n // 4), pos, x, weight, logits, 0.01)
        mod.topk_backward(None, sel, None, pos, x, weight, logits, torch.tensor([0.01]))
    return log


def _mtp_ce(monkeypatch):
    from megacpp_mcore.features.mtp import _triton_ce as mod

    monkeypatch.setattr(mod, "_check", lambda logits: None)  # it asks for CUDA tensors
    c, vocab = 8, 131072
    logits = torch.randn(c, vocab, dtype=torch.bfloat16)
    labels, in_shard = torch.zeros(c, dtype=torch.int64), torch.ones(c, dtype=torch.bool)
    with recorded(mod, "_row_stats_kernel", "_row_grad_kernel") as log:
        mod.row_stats(logits, labels, in_shard)
        mod.row_grad(logits, torch.zeros(c), labels, in_shard, torch.ones(1))
    return log


def _flexidepth(monkeypatch):
    from megacpp_mcore.features.flexidepth import combine_triton, route_triton

    s, b, h, k = 4096, 2, 4096, 2048
    with recorded(route_triton, "_route_kernel") as log:
        route_triton.route(torch.ones(s, b, dtype=torch.bool), s, k, 0, s)
    with recorded(combine_triton, "_combine_kernel") as log2:
        x = torch.randn(8, b, h, dtype=torch.bfloat16)
        src = torch.zeros(8, b, dtype=torch.long)
        processed = torch.randn(4 * b, h, dtype=torch.bfloat16)
        combine_triton.combine(src, processed, x, None)
        combine_triton.combine(src, processed, x, torch.randn_like(x))
    return log + log2


def _moda(monkeypatch):
    from megacpp_mcore.features.moda import kernels as mod

    s, b, heads, g, n, dk, dv = 16, 2, 8, 2, 4, 192, 128  # MLA's q/k 128 + 64 rope, v 128
    q = torch.randn(s, b, heads, dk, dtype=torch.bfloat16)
    kd = torch.randn(s, b, g, n, dk, dtype=torch.bfloat16)
    vd = torch.randn(s, b, g, n, dv, dtype=torch.bfloat16)
    out = torch.randn(s, b, heads, dv, dtype=torch.bfloat16)
    with recorded(mod, "_merge_fwd_kernel", "_merge_bwd_dq_kernel") as log:
        mod.merge_forward(q, kd, vd, out, torch.zeros(s, b, heads), dk ** -0.5)
        mod.merge_backward_dq(q, kd, vd, out, torch.zeros(s, b, heads), out, dk ** -0.5,
                              torch.zeros_like(q))
    return log


def _expert_gemm(monkeypatch):
    from megacpp_mcore.infer import moe_triton as mod

    e, k, n = 4, 1024, 896
    with recorded(mod, "_expert_gemm_kernel") as log:
        for tokens, dtype in ((1, torch.bfloat16), (3, torch.float32), (1, torch.float32), (40, torch.float32)):
            mod.expert_gemm(torch.randn(e, tokens, k, dtype=dtype), torch.randn(e, k, n, dtype=dtype),
                            torch.ones(e, dtype=torch.bool))
    return log


CASES = {  # name: (the launches, the kernels they must name)
    "m2rnn_scan": (_m2rnn_scan, {"_m2rnn_fwd_kernel", "_m2rnn_bwd_kernel"}),
    "m2rnn_step": (_m2rnn_step, {"_m2rnn_step_kernel"}),
    "mod_gate_and_route": (_mod_gate_and_route, {"_router_fwd_kernel", "_gate_bwd_kernel", "_topk_bwd_kernel"}),
    "mtp_ce": (_mtp_ce, {"_row_stats_kernel", "_row_grad_kernel"}),
    "flexidepth": (_flexidepth, {"_route_kernel", "_combine_kernel"}),
    "moda_merge": (_moda, {"_merge_fwd_kernel", "_merge_bwd_dq_kernel"}),
    "expert_gemm": (_expert_gemm, {"_expert_gemm_kernel"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernels_compile_for_sm90(case, monkeypatch):
    launches, expected = CASES[case]
    _compile_all(launches(monkeypatch), expected)


def test_every_package_kernel_has_a_compile_case():
    """A new ``@triton.jit`` kernel in the package gets a case above (helpers called from kernels,
    not launched, are compiled with them)."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "megacpp_mcore"
    launched = set()
    for path in root.rglob("*.py"):
        launched |= set(re.findall(r"^\s*(_\w+_kernel)\[", path.read_text(), flags=re.M))
    covered = set().union(*(kernels for _, kernels in CASES.values()))
    assert launched == covered, sorted(launched ^ covered)


@triton.jit
def _early_exit_kernel(a_ptr, out_ptr, N: tl.constexpr, EXIT: tl.constexpr):
    acc = tl.zeros([16], tl.float32)
    for i in range(N):
        if EXIT and i == 3:
            break  # Python the interpreter runs, the compiler does not take
        acc += tl.load(a_ptr + i * 16 + tl.arange(0, 16))
    tl.store(out_ptr + tl.arange(0, 16), acc)


def test_a_kernel_the_gpu_compiler_rejects_fails_here():
    """The check has teeth: a kernel the interpreter runs (an early ``break``) but the compiler
    rejects raises here; the same kernel without it compiles."""
    a = torch.zeros(8, 16)
    compiled = compile_sm90(Launch(_early_exit_kernel, (a, a), {"N": 8, "EXIT": False}))
    assert resources(compiled)["registers"] > 0  # ptxas's report read back
    with pytest.raises(triton.compiler.CompilationError):
        compile_sm90(Launch(_early_exit_kernel, (a, a), {"N": 8, "EXIT": True}))
