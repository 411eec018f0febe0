"""The depth part of a depth-reading layer: per-position attention over n depth keys, merged with
the sequence part through the log-sum-exp.

Two implementations of one contract:

* the fused Triton kernels (:mod:`megacpp_mcore.features.moda.kernels`; CUDA, ``depth_kernel``
  ``"auto"`` when triton imports, or ``"triton"``): ONE pass per direction. Their correctness
  against the torch path is a test (tests/test_moda.py, also under triton's CPU interpreter) and a
  one-time check of the benchmark, never a check inside a training run;
* the torch path (CPU, ``depth_kernel="torch"``, and the ``detach=False`` backward, which also needs
  depth-K/V grads): fp32-accumulating batched matmuls for the small ``[rows, r, n]`` scores
  (``torch.bmm(out_dtype=float32)`` on CUDA), then two in-place full-size passes in the output
  dtype forward (reweight the sequence output, ``baddbmm_`` the depth output into it) and one
  backward (``baddbmm_`` into dQ); no full-size fp32 temporaries.

Shapes: query ``[s, b, np, dk]``, depth K/V ``[s, b, g, n, dk|dv]`` (GQA: ``r = np // g`` query
heads per depth group); internally ``rows = s * b * g`` and ``[rows, r, *]`` / ``[rows, n, *]``.
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


@functools.cache
def _bmm_has_out_dtype() -> bool:
    """Whether this torch has ``torch.bmm(..., out_dtype=)`` (the ``aten::bmm.dtype`` overload;
    CUDA kernels for half-precision operands with an fp32 result). Capability detection: pure."""
    return "dtype" in torch.ops.aten.bmm.overloads()


def native_fp32_bmm(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a @ b`` runs as one half-precision x half-precision -> fp32 CUDA kernel."""
    return (a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16)
            and _bmm_has_out_dtype())


def bmm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched) accumulated and returned in fp32 (fp64 for fp64), without upcast copies of
    half-precision operands on CUDA (the depth K/V are read once, as stored)."""
    acc = acc_dtype(a)
    if a.dtype == b.dtype == acc:
        return torch.bmm(a, b)
    if native_fp32_bmm(a, b):
        return torch.bmm(a, b, out_dtype=acc)
    return torch.bmm(a.to(acc), b.to(acc))


def row_chunks(rows: int, bytes_per_row: int, budget: int = 256 * 2**20) -> Iterator[slice]:
    """Row slices whose fp32 temporaries stay under ``budget`` bytes (few chunks: each costs about
    ten kernel launches)."""
    step = max(1, budget // max(1, bytes_per_row))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


@functools.lru_cache(maxsize=None)
def load_kernels():
    """The Triton kernels' module, or the ImportError (triton missing); imported once."""
    try:
        from megacpp_mcore.features.moda import kernels
    except ImportError as exc:
        return exc
    return kernels


def fused_kernels(depth_kernel: str, query: torch.Tensor):
    """The :mod:`megacpp_mcore.features.moda.kernels` module when ``depth_kernel`` asks for it and it
    can run here (CUDA and triton importable), else None (``"triton"`` raises instead)."""
    if depth_kernel == "torch" or not query.is_cuda:
        return None
    module = load_kernels()
    if isinstance(module, ImportError):
        if depth_kernel == "triton":
            raise ValueError(f"MoDAConfig(depth_kernel='triton') needs triton ({module}); allowed here: "
                             "'auto' or 'torch'") from module
        return None
    return module


def _scores(q, kd, scale):
    """q ``[rows, r, dk]``, kd ``[rows, n, dk]`` -> fp32 scores ``[rows, r, n]``."""
    return bmm_acc(q, kd.transpose(1, 2)).mul_(scale)


def merge_depth(query, depth_key, depth_value, seq_out, seq_lse, scale, *, depth_kernel="torch"):
    """Merges the sequence result (``[s, b, np, dv]``, lse ``[s, b, np]``) with depth attention.

    Both full-size passes are IN PLACE on ``seq_out`` (contiguous; the kernel's fresh output), in
    its dtype: ``out *= exp(lse_seq - lse)`` and ``out += P_depth @ V_depth`` (a ``baddbmm_``: fp32
    accumulation, one rounding). The scores/weights ``[rows, r, n]`` are fp32 and small (n depth
    keys, a handful); q and the depth K/V are read once by the score product. Returns
    ``(out, lse)`` with ``out`` aliasing ``seq_out``.
    """
    fused = fused_kernels(depth_kernel, query)
    if fused is not None:
        return fused.merge_forward(query, depth_key, depth_value, seq_out, seq_lse, scale)
    s, b, heads, dk = query.shape
    g, n, dv = depth_key.shape[2], depth_key.shape[3], depth_value.shape[-1]
    r, rows = heads // g, s * b * g
    acc = acc_dtype(query)
    q = query.reshape(rows, r, dk)
    kd = depth_key.reshape(rows, n, dk)
    vd = depth_value.reshape(rows, n, dv)
    out = seq_out.view(rows, r, dv)
    sl = seq_lse.reshape(rows, r)
    lse = torch.empty((rows, r), dtype=acc, device=query.device)
    for c in row_chunks(rows, 4 * (r * (4 * n + 4))):
        scores = _scores(q[c], kd[c], scale)  # [rows, r, n] fp32
        seq_l = sl[c].to(acc)
        total = torch.logaddexp(seq_l, scores.logsumexp(-1))  # joint log-sum-exp [rows, r]
        probs = scores.sub_(total[..., None]).exp_()  # joint softmax weights of the depth keys
        out[c].mul_((seq_l - total).exp_()[..., None])  # sequence part, reweighted (in place)
        out[c].baddbmm_(probs.to(vd.dtype), vd[c])  # + depth part (in place, fp32 accumulation)
        lse[c] = total
    return seq_out, lse.reshape(s, b, heads)


def depth_backward(query, depth_key, depth_value, out, lse, dout, scale, dquery, *, want_kv: bool,
                   depth_kernel: str = "torch"):
    """Depth part of the joint-softmax backward: adds into ``dquery`` (contiguous
    ``[s, b, np, dk]``) in place; returns (dK_depth, dV_depth), None unless ``want_kv``. The fused
    kernel computes dQ only, so ``want_kv`` always takes the torch path."""
    fused = None if want_kv else fused_kernels(depth_kernel, query)
    if fused is not None:
        fused.merge_backward_dq(query, depth_key, depth_value, out, lse, dout, scale, dquery)
        return None, None
    s, b, heads, dk = query.shape
    g, n, dv = depth_key.shape[2], depth_key.shape[3], depth_value.shape[-1]
    r, rows = heads // g, s * b * g
    acc = acc_dtype(query)
    q = query.reshape(rows, r, dk)
    kd = depth_key.reshape(rows, n, dk)
    vd = depth_value.reshape(rows, n, dv)
    o, do, total = out.reshape(rows, r, dv), dout.reshape(rows, r, dv), lse.reshape(rows, r)
    dq = dquery.view(rows, r, dk)
    dkd = torch.empty((rows, n, dk), dtype=acc, device=query.device) if want_kv else None
    dvd = torch.empty((rows, n, dv), dtype=acc, device=query.device) if want_kv else None
    per_row = 4 * (r * (6 * n + 2)) + (4 * n * (dk + dv) * 2 if want_kv else 0)
    for c in row_chunks(rows, per_row):
        cr = (c.stop - c.start) * r
        probs = _scores(q[c], kd[c], scale).sub_(total[c].to(acc)[..., None]).exp_()
        # rowsum(dO * O) as a batched dot product: no fp32 copies of dO and O
        row_dot = bmm_acc(do[c].reshape(cr, 1, dv), o[c].reshape(cr, dv, 1)).view(-1, r, 1)
        dp = bmm_acc(do[c], vd[c].transpose(1, 2))  # [rows, r, n]
        ds = dp.sub_(row_dot).mul_(probs)
        ds = ds.mul_(scale)
        dq[c].baddbmm_(ds.to(kd.dtype), kd[c])  # in place: fp32 accumulation, one rounding
        if want_kv:
            dkd[c] = bmm_acc(ds.transpose(1, 2).to(q.dtype), q[c])
            dvd[c] = bmm_acc(probs.transpose(1, 2).to(do.dtype), do[c])
    if want_kv:
        dkd, dvd = dkd.reshape(s, b, g, n, dk), dvd.reshape(s, b, g, n, dv)
    return dkd, dvd
