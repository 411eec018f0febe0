"""Triton kernels for the M2RNN scan (forward and backward), fp32 state kept on chip.

One program owns one (batch, head, block of ``BLOCK_K`` state rows). The rows of a head's ``[K, V]``
state evolve independently (``h W`` mixes only the V columns), so splitting K across programs needs
no communication; only the readout ``y_t = q_t h_t`` sums over rows, and each program writes its
partial ``y`` (summed afterwards in torch). The state stays in registers for the whole sequence, in
the layout of ``tl.dot``'s accumulator: each step's ``h W`` is one ``[BLOCK_K, V] x [V, V]`` dot
(tensor cores; ``tf32x3`` keeps fp32 accuracy), so no step moves the state through shared memory.

Forward walks the sequence in chunks of ``CHUNK`` steps, storing the state entering each chunk
(``[B, H, T/CHUNK, K, V]``). Backward walks the chunks in reverse, running two independent
sequential chains in one loop: back-propagation through time over chunk c (``dL/dh`` carried in
registers, one ``da W^T`` dot per step, ``dW`` accumulated by a ``h_prev^T da`` dot) reading the
chunk's states and tanh outputs from a per-program scratch buffer, while the same loop recomputes
chunk c - 1 from its checkpoint into the other buffer. Each chain hides the other's latency.

Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; f ``[B, T, H]``; W ``[H, V, V]``; K and V powers of
two. ``tl.dot`` needs 16 rows and columns: K and V below 16 are zero-padded (a zero key/value
column and zero W rows/columns keep the padded state at zero). Time is padded to a multiple of
``CHUNK`` (plus one step, so every step can prefetch the next one's inputs) with ``f = 1,
q = k = v = 0``, which leaves the state unchanged and adds nothing to outputs or gradients. Inputs
of step t + 1 are loaded before step t computes. The chunk count is a compile-time constant (one
specialization per padded sequence length; training uses one length; it also keeps the loops
runnable in Triton's interpreter). Runs under ``TRITON_INTERPRET=1`` on CPU tensors (the CPU tests
use that at tiny sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

CHUNK = 64  # steps per checkpoint / backward recompute window
BLOCK_K = 16  # state rows per program (tl.dot's minimum): B*H*K/16 programs
NUM_WARPS = 1  # one warp owns a [16, V] tile: no cross-warp reductions
PRECISION = "tf32x3"  # tl.dot input precision: three tf32 products, about fp32 accuracy
PRECISIONS = ("tf32x3", "ieee", "tf32")  # ieee: fp32 FMA, no tensor cores; tf32: one product
MIN_DIM = 16  # tl.dot's smallest M, N and K


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)  # saturates to +-1 without inf/inf


@triton.jit
def _live(r, t, T):
    """``t < T`` as a mask shaped like ``r`` (a scalar bool does not combine with a vector mask in
    Triton's interpreter)."""
    return (r * 0 + t) < T


@triton.jit
def _step(state, w, k_t, v_t, f_t, PREC: tl.constexpr):
    """One step of the recurrence: its tanh output and the next state."""
    u = _tanh(tl.dot(state, w, input_precision=PREC) + k_t[:, None] * v_t[None, :])
    return u, f_t * state + (1.0 - f_t) * u


@triton.jit
def _kvf(k_base, v_base, f_base, t, T, skt, svt, sft, rk, rv, kmask, vmask):
    """Step t's key row, value row and forget gate (fp32); past the end, k = v = 0 and f = 1."""
    k = tl.load(k_base + t * skt + rk, mask=kmask & _live(rk, t, T), other=0.0).to(tl.float32)
    v = tl.load(v_base + t * svt + rv, mask=vmask & _live(rv, t, T), other=0.0).to(tl.float32)
    f = tl.load(f_base + t * sft, mask=t < T, other=1.0).to(tl.float32)
    return k, v, f


@triton.jit
def _m2rnn_fwd_kernel(q_ptr, k_ptr, v_ptr, f_ptr, w_ptr, y_ptr, ckpt_ptr, T,
                      sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh,
                      NC: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      KR: tl.constexpr, VR: tl.constexpr, BLOCK_K: tl.constexpr,
                      NKB: tl.constexpr, CHUNK: tl.constexpr, PREC: tl.constexpr):
    pid_bh = tl.program_id(0)
    kb = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)  # state rows of this program
    rv = tl.arange(0, V)
    kmask, vmask = rk < KR, rv < VR  # rows/columns past the real K, V: zero padding
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    f_base = f_ptr + b * sfb + h * sfh
    w = tl.load(w_ptr + h * V * V + rv[:, None] * V + rv[None, :])  # [V, V]
    state = tl.zeros([BLOCK_K, V], dtype=tl.float32)
    # prefetch step 0; every iteration loads step t + 1
    q_t = tl.load(q_base + rk, mask=kmask, other=0.0).to(tl.float32)
    k_t, v_t, f_t = _kvf(k_base, v_base, f_base, 0, T, skt, svt, sft, rk, rv, kmask, vmask)
    for c in range(0, NC):
        tl.store(ckpt_ptr + ((pid_bh * NC + c) * K + rk[:, None]) * V + rv[None, :], state)
        for i in range(CHUNK):
            t = c * CHUNK + i
            q_n = tl.load(q_base + (t + 1) * sqt + rk, mask=kmask & _live(rk, t + 1, T),
                          other=0.0).to(tl.float32)
            k_n, v_n, f_n = _kvf(k_base, v_base, f_base, t + 1, T, skt, svt, sft, rk, rv, kmask, vmask)
            _, state = _step(state, w, k_t, v_t, f_t, PREC)
            y_part = tl.sum(q_t[:, None] * state, axis=0)  # [V], this block's rows only
            tl.store(y_ptr + (((b * T + t) * H + h) * NKB + kb) * V + rv, y_part, mask=_live(rv, t, T))
            q_t, k_t, v_t, f_t = q_n, k_n, v_n, f_n


@triton.jit
def _m2rnn_bwd_kernel(q_ptr, k_ptr, v_ptr, f_ptr, w_ptr, dy_ptr, ckpt_ptr, scratch_ptr, uscr_ptr,
                      dq_ptr, dk_ptr, dv_ptr, df_ptr, dw_ptr, T,
                      sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sdb, sdt, sdh,
                      NC: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      KR: tl.constexpr, VR: tl.constexpr, BLOCK_K: tl.constexpr,
                      NKB: tl.constexpr, CHUNK: tl.constexpr, PREC: tl.constexpr):
    # Two independent sequential chains per loop step: back-propagation through chunk c (reading
    # buffer c % 2) and the recompute of chunk c - 1 from its checkpoint (writing the other buffer).
    pid_bh = tl.program_id(0)
    kb = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_K)
    rv = tl.arange(0, V)
    kmask, vmask = rk < KR, rv < VR
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    f_base = f_ptr + b * sfb + h * sfh
    dy_base = dy_ptr + b * sdb + h * sdh
    w = tl.load(w_ptr + h * V * V + rv[:, None] * V + rv[None, :])  # [V, V]
    wt = tl.load(w_ptr + h * V * V + rv[None, :] * V + rv[:, None])  # [V, V] = W^T
    TILE: tl.constexpr = BLOCK_K * V
    SPER: tl.constexpr = (CHUNK + 1) * BLOCK_K * V
    UPER: tl.constexpr = CHUNK * BLOCK_K * V
    scratch = scratch_ptr + (pid_bh * NKB + kb) * 2 * SPER  # two buffers of CHUNK + 1 states
    uscr = uscr_ptr + (pid_bh * NKB + kb) * 2 * UPER  # two buffers of CHUNK tanh outputs
    tile = rb[:, None] * V + rv[None, :]
    tile_t = rb[None, :] * V + rv[:, None]  # the same tile read transposed, [V, BLOCK_K]
    # prologue: recompute the last chunk into its buffer
    c = NC - 1
    sbuf = scratch + (c % 2) * SPER
    ubuf = uscr + (c % 2) * UPER
    state = tl.load(ckpt_ptr + ((pid_bh * NC + c) * K + rk[:, None]) * V + rv[None, :])
    tl.store(sbuf + tile, state)
    k_t, v_t, f_t = _kvf(k_base, v_base, f_base, c * CHUNK, T, skt, svt, sft, rk, rv, kmask, vmask)
    for i in range(CHUNK):
        k_n, v_n, f_n = _kvf(k_base, v_base, f_base, c * CHUNK + i + 1, T, skt, svt, sft, rk, rv,
                             kmask, vmask)
        u, state = _step(state, w, k_t, v_t, f_t, PREC)
        tl.store(ubuf + i * TILE + tile, u)
        tl.store(sbuf + (i + 1) * TILE + tile, state)
        k_t, v_t, f_t = k_n, v_n, f_n
    tl.debug_barrier()
    dstate = tl.zeros([BLOCK_K, V], dtype=tl.float32)  # dL/dh_t flowing back from t + 1
    dw = tl.zeros([V, V], dtype=tl.float32)  # sum over steps of h_prev^T da
    for cc in range(0, NC):
        c = NC - 1 - cc
        cp = tl.maximum(c - 1, 0)  # recomputed alongside (chunk 0 twice, into the unused buffer)
        sbuf = scratch + (c % 2) * SPER
        ubuf = uscr + (c % 2) * UPER
        rsbuf = scratch + (1 - c % 2) * SPER
        rubuf = uscr + (1 - c % 2) * UPER
        t0 = c * CHUNK
        r0 = cp * CHUNK
        rstate = tl.load(ckpt_ptr + ((pid_bh * NC + cp) * K + rk[:, None]) * V + rv[None, :])
        tl.store(rsbuf + tile, rstate)
        rk_t, rv_t, rf_t = _kvf(k_base, v_base, f_base, r0, T, skt, svt, sft, rk, rv, kmask, vmask)
        last = t0 + CHUNK - 1
        h_cur = tl.load(sbuf + CHUNK * TILE + tile)  # after the chunk's last step
        h_prev = tl.load(sbuf + (CHUNK - 1) * TILE + tile)
        h_prev_t = tl.load(sbuf + (CHUNK - 1) * TILE + tile_t)
        u_t = tl.load(ubuf + (CHUNK - 1) * TILE + tile)
        q_t = tl.load(q_base + last * sqt + rk, mask=kmask & _live(rk, last, T), other=0.0).to(tl.float32)
        k_t, v_t, f_t = _kvf(k_base, v_base, f_base, last, T, skt, svt, sft, rk, rv, kmask, vmask)
        dy_t = tl.load(dy_base + last * sdt + rv, mask=vmask & _live(rv, last, T), other=0.0).to(tl.float32)
        for ii in range(CHUNK):
            # the recompute chain: step ii of chunk cp
            rk_n, rv_n, rf_n = _kvf(k_base, v_base, f_base, r0 + ii + 1, T, skt, svt, sft, rk, rv,
                                    kmask, vmask)
            ru, rstate = _step(rstate, w, rk_t, rv_t, rf_t, PREC)
            tl.store(rubuf + ii * TILE + tile, ru)
            tl.store(rsbuf + (ii + 1) * TILE + tile, rstate)
            rk_t, rv_t, rf_t = rk_n, rv_n, rf_n
            # the back-propagation chain: step i of chunk c, prefetching step i - 1
            i = CHUNK - 1 - ii
            ip = tl.maximum(i - 1, 0)  # (re-reads step 0 on the last iteration)
            tp = t0 + ip
            h_prev_n = tl.load(sbuf + ip * TILE + tile)
            h_prev_t_n = tl.load(sbuf + ip * TILE + tile_t)
            u_n = tl.load(ubuf + ip * TILE + tile)
            q_n = tl.load(q_base + tp * sqt + rk, mask=kmask & _live(rk, tp, T), other=0.0).to(tl.float32)
            k_n, v_n, f_n = _kvf(k_base, v_base, f_base, tp, T, skt, svt, sft, rk, rv, kmask, vmask)
            dy_n = tl.load(dy_base + tp * sdt + rv, mask=vmask & _live(rv, tp, T), other=0.0).to(tl.float32)
            t = t0 + i
            cur = (b * T + t) * H + h
            g = dstate + q_t[:, None] * dy_t[None, :]  # dL/dh_t
            da = g * (1.0 - f_t) * (1.0 - u_t * u_t)  # dL/d(pre-tanh)
            tl.store(dq_ptr + cur * K + rk, tl.sum(h_cur * dy_t[None, :], axis=1), mask=_live(rk, t, T))
            tl.store(dk_ptr + cur * K + rk, tl.sum(da * v_t[None, :], axis=1), mask=_live(rk, t, T))
            tl.store(dv_ptr + (cur * NKB + kb) * V + rv, tl.sum(da * k_t[:, None], axis=0),
                     mask=_live(rv, t, T))
            tl.store(df_ptr + cur * NKB + kb, tl.sum(tl.sum(g * (h_prev - u_t), axis=1), axis=0),
                     mask=t < T)
            dw = tl.dot(h_prev_t, da, dw, input_precision=PREC)
            dstate = f_t * g + tl.dot(da, wt, input_precision=PREC)  # + da W^T
            h_cur = h_prev
            h_prev, h_prev_t, u_t, q_t, k_t, v_t, f_t, dy_t = h_prev_n, h_prev_t_n, u_n, q_n, k_n, v_n, f_n, dy_n
        tl.debug_barrier()  # this chunk's reads and the next one's writes done before it is read
    tl.store(dw_ptr + ((pid_bh * NKB + kb) * V + rv[:, None]) * V + rv[None, :], dw)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along its last dim (the kernels read rows; other strides are passed)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _check_sizes(k_dim: int, v_dim: int, block_k: int, num_warps: int, precision: str) -> None:
    for name, value in (("key dim", k_dim), ("value dim", v_dim), ("block_k", block_k),
                        ("num_warps", num_warps)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"M2RNN Triton kernel: {name}={value} must be a power of two")
    if block_k < MIN_DIM or block_k > max(k_dim, MIN_DIM):
        raise ValueError(f"M2RNN Triton kernel: block_k={block_k} must be in "
                         f"[{MIN_DIM}, max(key dim {k_dim}, {MIN_DIM})]")
    if precision not in PRECISIONS:
        raise ValueError(f"M2RNN Triton kernel: precision={precision!r}; allowed: {', '.join(PRECISIONS)}")


class _M2RNNScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, f, weight, chunk, block_k, num_warps, precision):
        B, T, H, k_dim = q.shape
        v_dim = v.shape[-1]
        K, V = max(k_dim, MIN_DIM), max(v_dim, MIN_DIM)  # tl.dot's minimum; the kernels zero-pad
        nkb, nc = K // block_k, triton.cdiv(T, chunk)
        q, k, v = _rows(q), _rows(k), _rows(v)
        w = F.pad(weight.float(), (0, V - v_dim, 0, V - v_dim)).contiguous()  # [H, V, V], tiny
        y_part = q.new_empty(B, T, H, nkb, V, dtype=torch.float32)
        ckpt = q.new_empty(B, H, nc, K, V, dtype=torch.float32)
        _m2rnn_fwd_kernel[(B * H, nkb)](q, k, v, f, w, y_part, ckpt, T,
                                        *_strides(q), *_strides(k), *_strides(v), *_strides(f),
                                        NC=nc, H=H, K=K, V=V, KR=k_dim, VR=v_dim, BLOCK_K=block_k,
                                        NKB=nkb, CHUNK=chunk, PREC=precision, num_warps=num_warps)
        ctx.save_for_backward(q, k, v, f, w, ckpt)
        ctx.meta = (chunk, block_k, nkb, nc, num_warps, precision)
        ctx.dtypes = [t.dtype for t in (q, k, v, f, weight)]
        return y_part[..., :v_dim].sum(3).to(q.dtype)

    @staticmethod
    def backward(ctx, dy):
        q, k, v, f, w, ckpt = ctx.saved_tensors
        chunk, block_k, nkb, nc, num_warps, precision = ctx.meta
        B, T, H, k_dim = q.shape
        v_dim = v.shape[-1]
        K, V = ckpt.shape[-2:]
        dy = _rows(dy)
        dq = q.new_empty(B, T, H, K, dtype=torch.float32)
        dk = q.new_empty(B, T, H, K, dtype=torch.float32)
        dv = q.new_empty(B, T, H, nkb, V, dtype=torch.float32)
        df = q.new_empty(B, T, H, nkb, dtype=torch.float32)
        dw = q.new_empty(B, H, nkb, V, V, dtype=torch.float32)
        scratch = q.new_empty(B * H * nkb, 2, chunk + 1, block_k, V, dtype=torch.float32)  # states
        uscr = q.new_empty(B * H * nkb, 2, chunk, block_k, V, dtype=torch.float32)  # tanh outputs
        _m2rnn_bwd_kernel[(B * H, nkb)](q, k, v, f, w, dy, ckpt, scratch, uscr, dq, dk, dv, df, dw, T,
                                        *_strides(q), *_strides(k), *_strides(v), *_strides(f),
                                        *_strides(dy),
                                        NC=nc, H=H, K=K, V=V, KR=k_dim, VR=v_dim, BLOCK_K=block_k,
                                        NKB=nkb, CHUNK=chunk, PREC=precision, num_warps=num_warps)
        grads = (dq[..., :k_dim], dk[..., :k_dim], dv[..., :v_dim].sum(3), df.sum(3),
                 dw.sum((0, 2))[:, :v_dim, :v_dim])
        return (*(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)), None, None, None, None)


def m2rnn_scan_triton(q, k, v, f, weight, chunk: int = CHUNK, block_k: int = BLOCK_K,
                      num_warps: int = NUM_WARPS, precision: str = PRECISION):
    """The M2RNN scan on the Triton kernels; same contract as ``m2rnn.m2rnn_scan_torch``.

    ``block_k`` state rows per program (programs = batch x heads x max(K, 16) / block_k; at least
    16), ``num_warps`` and ``precision`` (``tl.dot``'s input precision: ``tf32x3``, ``ieee`` or
    ``tf32``) trade parallelism, per-step latency and accuracy; scripts/bench_mixers.py sweeps them."""
    if q.shape != k.shape or v.shape[:3] != q.shape[:3] or f.shape != q.shape[:3]:
        raise ValueError(
            f"M2RNN scan: shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} "
            f"f{tuple(f.shape)} do not match [B, T, H, K], [B, T, H, V], [B, T, H]"
        )
    if weight.shape != (q.shape[2], v.shape[-1], v.shape[-1]):
        raise ValueError(f"M2RNN scan: weight{tuple(weight.shape)} must be [H, V, V] = "
                         f"{[q.shape[2], v.shape[-1], v.shape[-1]]}")
    if q.shape[1] < 1:
        raise ValueError(f"M2RNN scan: sequence length {q.shape[1]} must be at least 1")
    block_k = min(block_k, max(q.shape[-1], MIN_DIM))
    _check_sizes(q.shape[-1], v.shape[-1], block_k, num_warps, precision)
    return _M2RNNScan.apply(q, k, v, f, weight, chunk, block_k, num_warps, precision)
