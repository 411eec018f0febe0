"""Fused Triton kernels for MoDA's per-position depth attention (CUDA only; imported lazily).

The depth part of a depth-reading layer is, per query row (position x head), a softmax over n (a
handful) depth keys merged with the sequence kernel's result through the log-sum-exp. As batched
matmuls it is ``[rows, r, d] x [rows, d, n]`` products with ``rows = s * b * groups`` in the
hundred-thousands: cuBLAS runs such tiny batched GEMMs far below memory bandwidth. These kernels
do the whole thing in ONE pass per direction, each program holding a block of query rows in
registers:

* :func:`merge_forward`: reads q, the depth K/V and the sequence output (in place) once, runs the
  online softmax over the depth keys starting from the sequence log-sum-exp, writes the merged
  output (in place) and the joint log-sum-exp. fp32 math, one rounding.
* :func:`merge_backward_dq`: reads q, dO, O, lse and the depth K/V once and adds the depth part of
  dQ into the sequence kernel's dQ in place (``delta = rowsum(dO * O)`` computed in registers).

:mod:`megacpp_mcore.features.moda.depth` uses them on CUDA (``MoDAConfig.depth_kernel``
``"auto"``/``"triton"``) as they are; their agreement with its batched-matmul path is checked by
tests (tests/test_moda.py: on CUDA, and under triton's CPU interpreter) and by the benchmark's
kernel check (scripts/bench_moda.py), not inside a training run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # query rows per program: q, dO, O, dQ, k, v tiles of [16, 128] fp32 stay in registers


@triton.jit
def _merge_fwd_kernel(q_ptr, kd_ptr, vd_ptr, out_ptr, seq_lse_ptr, lse_ptr, total, scale,
                      K_ROW, K_SLOT, V_ROW, V_SLOT,
                      R: tl.constexpr, N: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      BDK: tl.constexpr, BDV: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)  # query rows (position x head), R per depth group
    row_ok = rows < total
    grp = (rows // R).to(tl.int64)
    rows64 = rows.to(tl.int64)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    dk_ok = dk < DK
    dv_ok = dv < DV
    q = tl.load(q_ptr + rows64[:, None] * DK + dk[None, :], mask=row_ok[:, None] & dk_ok[None, :],
                other=0.0).to(tl.float32)
    o_ptrs = out_ptr + rows64[:, None] * DV + dv[None, :]
    o_mask = row_ok[:, None] & dv_ok[None, :]
    acc = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    m = tl.load(seq_lse_ptr + rows64, mask=row_ok, other=0.0)  # running max: the sequence part's lse
    denom = tl.full([BLOCK], 1.0, tl.float32)  # sequence part: exp(lse_seq - m) = 1
    for j in tl.static_range(N):
        k = tl.load(kd_ptr + (grp[:, None] * K_ROW + j * K_SLOT) + dk[None, :],
                    mask=row_ok[:, None] & dk_ok[None, :], other=0.0).to(tl.float32)
        s = tl.sum(q * k, axis=1) * scale
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        denom = denom * alpha + p
        v = tl.load(vd_ptr + (grp[:, None] * V_ROW + j * V_SLOT) + dv[None, :], mask=o_mask,
                    other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + p[:, None] * v
        m = m_new
    acc = acc / denom[:, None]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    tl.store(lse_ptr + rows64, m + tl.log(denom), mask=row_ok)


@triton.jit
def _merge_bwd_dq_kernel(q_ptr, kd_ptr, vd_ptr, out_ptr, dout_ptr, lse_ptr, dq_ptr, total, scale,
                         K_ROW, K_SLOT, V_ROW, V_SLOT,
                         R: tl.constexpr, N: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                         BDK: tl.constexpr, BDV: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < total
    grp = (rows // R).to(tl.int64)
    rows64 = rows.to(tl.int64)
    dk = tl.arange(0, BDK)
    dv = tl.arange(0, BDV)
    k_mask = row_ok[:, None] & (dk < DK)[None, :]
    v_mask = row_ok[:, None] & (dv < DV)[None, :]
    q = tl.load(q_ptr + rows64[:, None] * DK + dk[None, :], mask=k_mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + rows64[:, None] * DV + dv[None, :], mask=v_mask, other=0.0).to(tl.float32)
    o = tl.load(out_ptr + rows64[:, None] * DV + dv[None, :], mask=v_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
    delta = tl.sum(do * o, axis=1)
    dq_ptrs = dq_ptr + rows64[:, None] * DK + dk[None, :]
    dq = tl.zeros([BLOCK, BDK], dtype=tl.float32)
    for j in tl.static_range(N):
        k = tl.load(kd_ptr + (grp[:, None] * K_ROW + j * K_SLOT) + dk[None, :], mask=k_mask,
                    other=0.0).to(tl.float32)
        v = tl.load(vd_ptr + (grp[:, None] * V_ROW + j * V_SLOT) + dv[None, :], mask=v_mask,
                    other=0.0).to(tl.float32)
        p = tl.exp(tl.sum(q * k, axis=1) * scale - lse)
        ds = p * (tl.sum(do * v, axis=1) - delta)
        dq += (ds * scale)[:, None] * k
    dq += tl.load(dq_ptrs, mask=k_mask, other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=k_mask)


def _dims(query, depth_key, depth_value):
    """(query rows, heads per group, n, dk, dv, depth strides): the depth K/V may be the first n
    slots of the buffer (a view); (s, b, g) must collapse to one row dim, each slot contiguous."""
    s, b, heads, dk = query.shape
    g, n, dv = depth_key.shape[2], depth_key.shape[3], depth_value.shape[-1]
    if not query.is_contiguous():
        raise ValueError(f"moda_triton: query must be contiguous (shape {tuple(query.shape)})")
    strides = []
    for name, t, d in (("depth_key", depth_key, dk), ("depth_value", depth_value, dv)):
        if t.stride(-1) != 1:
            raise ValueError(f"moda_triton: {name} needs unit stride in its head dim, got {t.stride()}")
        rows = t.view(s * b * g, n, d)  # raises when (s, b, g) do not collapse
        strides += [rows.stride(0), rows.stride(1)]
    return s * b * heads, heads // g, n, dk, dv, strides


def merge_forward(query, depth_key, depth_value, seq_out, seq_lse, scale: float):
    """Same contract as :func:`megacpp_mcore.features.moda.depth.merge_depth` (``seq_out``
    contiguous ``[s, b, np, dv]``, updated in place and returned; lse fp32 ``[s, b, np]``)."""
    total, r, n, dk, dv, strides = _dims(query, depth_key, depth_value)
    if not seq_out.is_contiguous():
        raise ValueError("moda_triton.merge_forward: seq_out must be contiguous")
    seq_lse = seq_lse.to(torch.float32).contiguous()
    lse = torch.empty(seq_out.shape[:3], dtype=torch.float32, device=seq_out.device)
    grid = (triton.cdiv(total, BLOCK_M),)
    _merge_fwd_kernel[grid](query, depth_key, depth_value, seq_out, seq_lse, lse, total, float(scale),
                            *strides, R=r, N=n, DK=dk, DV=dv, BDK=triton.next_power_of_2(dk),
                            BDV=triton.next_power_of_2(dv), BLOCK=BLOCK_M, num_warps=4)
    return seq_out, lse


def merge_backward_dq(query, depth_key, depth_value, out, lse, dout, scale: float, dquery) -> None:
    """Adds the depth part of dQ into ``dquery`` (contiguous ``[s, b, np, dk]``) in place."""
    total, r, n, dk, dv, strides = _dims(query, depth_key, depth_value)
    for name, t in (("out", out), ("dout", dout), ("dquery", dquery)):
        if not t.is_contiguous():
            raise ValueError(f"moda_triton.merge_backward_dq: {name} must be contiguous")
    lse = lse.to(torch.float32).contiguous()
    grid = (triton.cdiv(total, BLOCK_M),)
    _merge_bwd_dq_kernel[grid](query, depth_key, depth_value, out, dout, lse, dquery, total,
                               float(scale), *strides, R=r, N=n, DK=dk, DV=dv,
                               BDK=triton.next_power_of_2(dk), BDV=triton.next_power_of_2(dv),
                               BLOCK=BLOCK_M, num_warps=4)
