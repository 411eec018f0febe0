"""Triton kernels for the M2RNN scan (forward and backward), fp32 state kept on chip.

One program owns one (batch, head, block of ``BLOCK_K`` state rows). The rows of a head's ``[K, V]``
state evolve independently (``h W`` mixes only the V columns), so splitting K across programs needs
no communication; only the readout ``y_t = q_t h_t`` sums over rows, and each program writes its
partial ``y`` (summed afterwards in torch). The state stays in registers for the whole sequence.

Forward walks the sequence in chunks of ``CHUNK`` steps, storing the state entering each chunk
(``[B, H, T/CHUNK, K, V]``). Backward walks the chunks in reverse: it recomputes the chunk's states
from its checkpoint into a small per-program scratch (L2-resident), then runs back-propagation
through time over the chunk, carrying ``dL/dh`` in registers and accumulating ``dW`` in registers.

Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; f ``[B, T, H]``; W ``[H, V, V]``; K and V powers of
two. Time is padded to a multiple of ``CHUNK`` (plus one step, so every step can prefetch the next
one's inputs) with ``f = 1, q = k = v = 0``, which leaves the state unchanged and adds nothing to
outputs or gradients. Inputs of step t + 1 are loaded before step t computes, hiding load latency
behind the sequential dependency chain. The chunk count is a compile-time constant (one
specialization per padded sequence length; training uses one length; it also keeps the loops
runnable in Triton's interpreter). Runs under ``TRITON_INTERPRET=1`` on CPU tensors (the CPU tests
use that at tiny sizes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64  # steps per checkpoint / backward recompute window
BLOCK_K = 8  # state rows per program: B*H*K/8 programs (128 at B=2, H=8, K=64: about one per SM)
NUM_WARPS = 2  # small tiles ([BLOCK_K, V, V] products): few warps keep the reductions cheap


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)  # saturates to +-1 without inf/inf


@triton.jit
def _m2rnn_fwd_kernel(q_ptr, k_ptr, v_ptr, f_ptr, w_ptr, y_ptr, ckpt_ptr, TA,
                      NC: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BLOCK_K: tl.constexpr, NKB: tl.constexpr, CHUNK: tl.constexpr):
    pid_bh = tl.program_id(0)
    kb = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)  # state rows of this program
    rv = tl.arange(0, V)
    w = tl.load(w_ptr + h * V * V + rv[:, None] * V + rv[None, :])  # [V, V]
    state = tl.zeros([BLOCK_K, V], dtype=tl.float32)
    # prefetch step 0; every iteration loads step t + 1 (the padded tail makes it in-bounds)
    row = (b * TA) * H + h
    q_t = tl.load(q_ptr + row * K + rk)
    k_t = tl.load(k_ptr + row * K + rk)
    v_t = tl.load(v_ptr + row * V + rv)
    f_t = tl.load(f_ptr + row)
    for c in range(0, NC):
        tl.store(ckpt_ptr + ((pid_bh * NC + c) * K + rk[:, None]) * V + rv[None, :], state)
        for i in range(CHUNK):
            t = c * CHUNK + i
            nxt = (b * TA + t + 1) * H + h
            q_n = tl.load(q_ptr + nxt * K + rk)
            k_n = tl.load(k_ptr + nxt * K + rk)
            v_n = tl.load(v_ptr + nxt * V + rv)
            f_n = tl.load(f_ptr + nxt)
            hw = tl.sum(state[:, :, None] * w[None, :, :], axis=1)  # [BLOCK_K, V] = h W
            u = _tanh(hw + k_t[:, None] * v_t[None, :])
            state = f_t * state + (1.0 - f_t) * u
            y_part = tl.sum(q_t[:, None] * state, axis=0)  # [V], this block's rows only
            cur = (b * TA + t) * H + h
            tl.store(y_ptr + (cur * NKB + kb) * V + rv, y_part)
            q_t, k_t, v_t, f_t = q_n, k_n, v_n, f_n


@triton.jit
def _m2rnn_bwd_kernel(q_ptr, k_ptr, v_ptr, f_ptr, w_ptr, dy_ptr, ckpt_ptr, scratch_ptr,
                      dq_ptr, dk_ptr, dv_ptr, df_ptr, dw_ptr, TA,
                      NC: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BLOCK_K: tl.constexpr, NKB: tl.constexpr, CHUNK: tl.constexpr):
    pid_bh = tl.program_id(0)
    kb = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_K)
    rv = tl.arange(0, V)
    w = tl.load(w_ptr + h * V * V + rv[:, None] * V + rv[None, :])  # [V, V]
    # scratch[i] holds the state before step i of the current chunk, i = 0..CHUNK
    scratch = scratch_ptr + (pid_bh * NKB + kb) * (CHUNK + 1) * BLOCK_K * V
    tile = rb[:, None] * V + rv[None, :]
    dstate = tl.zeros([BLOCK_K, V], dtype=tl.float32)  # dL/dh_t flowing back from t + 1
    dw = tl.zeros([V, V], dtype=tl.float32)
    for cc in range(0, NC):
        c = NC - 1 - cc
        t0 = b * TA + c * CHUNK  # time row of the chunk's first step
        # 1) recompute this chunk's states from its checkpoint (inputs prefetched one step ahead)
        state = tl.load(ckpt_ptr + ((pid_bh * NC + c) * K + rk[:, None]) * V + rv[None, :])
        tl.store(scratch + tile, state)
        k_t = tl.load(k_ptr + (t0 * H + h) * K + rk)
        v_t = tl.load(v_ptr + (t0 * H + h) * V + rv)
        f_t = tl.load(f_ptr + t0 * H + h)
        for i in range(CHUNK):
            nxt = (t0 + i + 1) * H + h
            k_n = tl.load(k_ptr + nxt * K + rk)
            v_n = tl.load(v_ptr + nxt * V + rv)
            f_n = tl.load(f_ptr + nxt)
            hw = tl.sum(state[:, :, None] * w[None, :, :], axis=1)
            state = f_t * state + (1.0 - f_t) * _tanh(hw + k_t[:, None] * v_t[None, :])
            tl.store(scratch + (i + 1) * BLOCK_K * V + tile, state)
            k_t, v_t, f_t = k_n, v_n, f_n
        tl.debug_barrier()  # scratch written by all threads before any thread reads it back
        # 2) back-propagate through the chunk, step CHUNK-1 down to 0, prefetching step i - 1
        h_cur = state  # after the chunk's last step
        last = (t0 + CHUNK - 1) * H + h
        h_prev = tl.load(scratch + (CHUNK - 1) * BLOCK_K * V + tile)
        q_t = tl.load(q_ptr + last * K + rk)
        k_t = tl.load(k_ptr + last * K + rk)
        v_t = tl.load(v_ptr + last * V + rv)
        f_t = tl.load(f_ptr + last)
        dy_t = tl.load(dy_ptr + last * V + rv)
        for ii in range(CHUNK):
            i = CHUNK - 1 - ii
            ip = tl.maximum(i - 1, 0)  # prefetch index (re-reads step 0 on the last iteration)
            nxt = (t0 + ip) * H + h
            h_prev_n = tl.load(scratch + ip * BLOCK_K * V + tile)
            q_n = tl.load(q_ptr + nxt * K + rk)
            k_n = tl.load(k_ptr + nxt * K + rk)
            v_n = tl.load(v_ptr + nxt * V + rv)
            f_n = tl.load(f_ptr + nxt)
            dy_n = tl.load(dy_ptr + nxt * V + rv)

            cur = (t0 + i) * H + h
            hw = tl.sum(h_prev[:, :, None] * w[None, :, :], axis=1)
            u = _tanh(hw + k_t[:, None] * v_t[None, :])
            g = dstate + q_t[:, None] * dy_t[None, :]  # dL/dh_t
            da = g * (1.0 - f_t) * (1.0 - u * u)  # dL/d(pre-tanh)
            tl.store(dq_ptr + cur * K + rk, tl.sum(h_cur * dy_t[None, :], axis=1))
            tl.store(dk_ptr + cur * K + rk, tl.sum(da * v_t[None, :], axis=1))
            tl.store(dv_ptr + (cur * NKB + kb) * V + rv, tl.sum(da * k_t[:, None], axis=0))
            tl.store(df_ptr + cur * NKB + kb, tl.sum(tl.sum(g * (h_prev - u), axis=1), axis=0))
            dw += tl.sum(h_prev[:, :, None] * da[:, None, :], axis=0)  # h_prev^T da
            dstate = f_t * g + tl.sum(da[:, None, :] * w[None, :, :], axis=2)  # + da W^T

            h_cur = h_prev
            h_prev, q_t, k_t, v_t, f_t, dy_t = h_prev_n, q_n, k_n, v_n, f_n, dy_n
        tl.debug_barrier()  # all reads of this chunk's scratch done before the next overwrite
    tl.store(dw_ptr + ((pid_bh * NKB + kb) * V + rv[:, None]) * V + rv[None, :], dw)


def _pad_time(x: torch.Tensor, total: int, value: float) -> torch.Tensor:
    """fp32 contiguous copy of ``x`` ([B, T, ...]) padded along time to ``total`` steps."""
    pad = x.new_full((x.shape[0], total - x.shape[1], *x.shape[2:]), value, dtype=torch.float32)
    return torch.cat([x.float(), pad], dim=1).contiguous()


def _check_sizes(k_dim: int, v_dim: int, block_k: int, num_warps: int) -> None:
    for name, value in (("key dim", k_dim), ("value dim", v_dim), ("block_k", block_k),
                        ("num_warps", num_warps)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"M2RNN Triton kernel: {name}={value} must be a power of two")
    if block_k > k_dim:
        raise ValueError(f"M2RNN Triton kernel: block_k={block_k} exceeds the key dim {k_dim}")


class _M2RNNScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, f, weight, chunk, block_k, num_warps):
        B, T, H, K = q.shape
        V = v.shape[-1]
        _check_sizes(K, V, block_k, num_warps)
        nkb, nc = K // block_k, triton.cdiv(T, chunk)
        ta = nc * chunk + 1  # padded steps (+1: the forward prefetches one step ahead)
        qp, kp, vp = (_pad_time(x, ta, 0.0) for x in (q, k, v))
        fp = _pad_time(f, ta, 1.0)
        w = weight.float().contiguous()
        y_part = q.new_empty(B, ta, H, nkb, V, dtype=torch.float32)
        ckpt = q.new_empty(B, H, nc, K, V, dtype=torch.float32)
        _m2rnn_fwd_kernel[(B * H, nkb)](qp, kp, vp, fp, w, y_part, ckpt, ta,
                                        NC=nc, H=H, K=K, V=V, BLOCK_K=block_k, NKB=nkb, CHUNK=chunk,
                                        num_warps=num_warps)
        ctx.save_for_backward(qp, kp, vp, fp, w, ckpt)
        ctx.meta = (T, chunk, block_k, nkb, nc, ta, num_warps)
        ctx.dtypes = [t.dtype for t in (q, k, v, f, weight)]
        return y_part[:, :T].sum(3).to(q.dtype)

    @staticmethod
    def backward(ctx, dy):
        qp, kp, vp, fp, w, ckpt = ctx.saved_tensors
        T, chunk, block_k, nkb, nc, ta, num_warps = ctx.meta
        B, _, H, K = qp.shape
        V = vp.shape[-1]
        dyp = _pad_time(dy, ta, 0.0)
        dq = torch.zeros_like(qp)
        dk = torch.zeros_like(kp)
        dv = qp.new_zeros(B, ta, H, nkb, V)
        df = qp.new_zeros(B, ta, H, nkb)
        dw = qp.new_empty(B, H, nkb, V, V)
        scratch = qp.new_empty(B * H * nkb, chunk + 1, block_k, V)
        _m2rnn_bwd_kernel[(B * H, nkb)](qp, kp, vp, fp, w, dyp, ckpt, scratch, dq, dk, dv, df, dw,
                                        ta, NC=nc, H=H, K=K, V=V, BLOCK_K=block_k, NKB=nkb, CHUNK=chunk,
                                        num_warps=num_warps)
        grads = (dq[:, :T], dk[:, :T], dv[:, :T].sum(3), df[:, :T].sum(3), dw.sum((0, 2)))
        return (*(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)), None, None, None)


def m2rnn_scan_triton(q, k, v, f, weight, chunk: int = CHUNK, block_k: int = BLOCK_K,
                      num_warps: int = NUM_WARPS):
    """The M2RNN scan on the Triton kernels; same contract as ``m2rnn.m2rnn_scan_torch``.

    ``block_k`` state rows per program (programs = batch x heads x K / block_k) and ``num_warps``
    trade parallelism against per-step latency; scripts/bench_mixers.py sweeps them."""
    if q.shape != k.shape or v.shape[:3] != q.shape[:3] or f.shape != q.shape[:3]:
        raise ValueError(
            f"M2RNN scan: shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} "
            f"f{tuple(f.shape)} do not match [B, T, H, K], [B, T, H, V], [B, T, H]"
        )
    if weight.shape != (q.shape[2], v.shape[-1], v.shape[-1]):
        raise ValueError(f"M2RNN scan: weight{tuple(weight.shape)} must be [H, V, V] = "
                         f"{[q.shape[2], v.shape[-1], v.shape[-1]]}")
    return _M2RNNScan.apply(q, k, v, f, weight, chunk, min(block_k, q.shape[-1]), num_warps)
