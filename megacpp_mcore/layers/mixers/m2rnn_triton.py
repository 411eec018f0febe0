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
def _m2rnn_fwd_kernel(q_ptr, k_ptr, v_ptr, f_ptr, w_ptr, y_ptr, ckpt_ptr, TA,
                      NC: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BLOCK_K: tl.constexpr, NKB: tl.constexpr, CHUNK: tl.constexpr,
                      PREC: tl.constexpr):
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
            hw = tl.dot(state, w, input_precision=PREC)  # [BLOCK_K, V] = h W
            u = _tanh(hw + k_t[:, None] * v_t[None, :])
            state = f_t * state + (1.0 - f_t) * u
            y_part = tl.sum(q_t[:, None] * state, axis=0)  # [V], this block's rows only
            cur = (b * TA + t) * H + h
            tl.store(y_ptr + (cur * NKB + kb) * V + rv, y_part)
            q_t, k_t, v_t, f_t = q_n, k_n, v_n, f_n


@triton.jit
def _m2rnn_bwd_kernel(q_ptr, k_ptr, v_ptr, f_ptr, w_ptr, dy_ptr, ckpt_ptr, scratch_ptr, uscr_ptr,
                      dq_ptr, dk_ptr, dv_ptr, df_ptr, dw_ptr, TA,
                      NC: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                      BLOCK_K: tl.constexpr, NKB: tl.constexpr, CHUNK: tl.constexpr,
                      PREC: tl.constexpr):
    # Two independent sequential chains per loop step: back-propagation through chunk c (reading
    # buffer c % 2) and the recompute of chunk c - 1 from its checkpoint (writing the other buffer).
    pid_bh = tl.program_id(0)
    kb = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    rb = tl.arange(0, BLOCK_K)
    rv = tl.arange(0, V)
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
    t0 = b * TA + c * CHUNK
    state = tl.load(ckpt_ptr + ((pid_bh * NC + c) * K + rk[:, None]) * V + rv[None, :])
    tl.store(sbuf + tile, state)
    k_t = tl.load(k_ptr + (t0 * H + h) * K + rk)
    v_t = tl.load(v_ptr + (t0 * H + h) * V + rv)
    f_t = tl.load(f_ptr + t0 * H + h)
    for i in range(CHUNK):
        nxt = (t0 + i + 1) * H + h
        k_n = tl.load(k_ptr + nxt * K + rk)
        v_n = tl.load(v_ptr + nxt * V + rv)
        f_n = tl.load(f_ptr + nxt)
        u = _tanh(tl.dot(state, w, input_precision=PREC) + k_t[:, None] * v_t[None, :])
        state = f_t * state + (1.0 - f_t) * u
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
        t0 = b * TA + c * CHUNK
        r0 = b * TA + cp * CHUNK
        rstate = tl.load(ckpt_ptr + ((pid_bh * NC + cp) * K + rk[:, None]) * V + rv[None, :])
        tl.store(rsbuf + tile, rstate)
        rk_t = tl.load(k_ptr + (r0 * H + h) * K + rk)
        rv_t = tl.load(v_ptr + (r0 * H + h) * V + rv)
        rf_t = tl.load(f_ptr + r0 * H + h)
        last = (t0 + CHUNK - 1) * H + h
        h_cur = tl.load(sbuf + CHUNK * TILE + tile)  # after the chunk's last step
        h_prev = tl.load(sbuf + (CHUNK - 1) * TILE + tile)
        h_prev_t = tl.load(sbuf + (CHUNK - 1) * TILE + tile_t)
        u_t = tl.load(ubuf + (CHUNK - 1) * TILE + tile)
        q_t = tl.load(q_ptr + last * K + rk)
        k_t = tl.load(k_ptr + last * K + rk)
        v_t = tl.load(v_ptr + last * V + rv)
        f_t = tl.load(f_ptr + last)
        dy_t = tl.load(dy_ptr + last * V + rv)
        for ii in range(CHUNK):
            # the recompute chain: step ii of chunk cp
            rn = (r0 + ii + 1) * H + h
            rk_n = tl.load(k_ptr + rn * K + rk)
            rv_n = tl.load(v_ptr + rn * V + rv)
            rf_n = tl.load(f_ptr + rn)
            ru = _tanh(tl.dot(rstate, w, input_precision=PREC) + rk_t[:, None] * rv_t[None, :])
            rstate = rf_t * rstate + (1.0 - rf_t) * ru
            tl.store(rubuf + ii * TILE + tile, ru)
            tl.store(rsbuf + (ii + 1) * TILE + tile, rstate)
            rk_t, rv_t, rf_t = rk_n, rv_n, rf_n
            # the back-propagation chain: step i of chunk c, prefetching step i - 1
            i = CHUNK - 1 - ii
            ip = tl.maximum(i - 1, 0)
            nxt = (t0 + ip) * H + h
            h_prev_n = tl.load(sbuf + ip * TILE + tile)
            h_prev_t_n = tl.load(sbuf + ip * TILE + tile_t)
            u_n = tl.load(ubuf + ip * TILE + tile)
            q_n = tl.load(q_ptr + nxt * K + rk)
            k_n = tl.load(k_ptr + nxt * K + rk)
            v_n = tl.load(v_ptr + nxt * V + rv)
            f_n = tl.load(f_ptr + nxt)
            dy_n = tl.load(dy_ptr + nxt * V + rv)
            cur = (t0 + i) * H + h
            g = dstate + q_t[:, None] * dy_t[None, :]  # dL/dh_t
            da = g * (1.0 - f_t) * (1.0 - u_t * u_t)  # dL/d(pre-tanh)
            tl.store(dq_ptr + cur * K + rk, tl.sum(h_cur * dy_t[None, :], axis=1))
            tl.store(dk_ptr + cur * K + rk, tl.sum(da * v_t[None, :], axis=1))
            tl.store(dv_ptr + (cur * NKB + kb) * V + rv, tl.sum(da * k_t[:, None], axis=0))
            tl.store(df_ptr + cur * NKB + kb, tl.sum(tl.sum(g * (h_prev - u_t), axis=1), axis=0))
            dw = tl.dot(h_prev_t, da, dw, input_precision=PREC)
            dstate = f_t * g + tl.dot(da, wt, input_precision=PREC)  # + da W^T
            h_cur = h_prev
            h_prev, h_prev_t, u_t, q_t, k_t, v_t, f_t, dy_t = h_prev_n, h_prev_t_n, u_n, q_n, k_n, v_n, f_n, dy_n
        tl.debug_barrier()  # this chunk's reads and the next one's writes done before it is read
    tl.store(dw_ptr + ((pid_bh * NKB + kb) * V + rv[:, None]) * V + rv[None, :], dw)


def _pad(x: torch.Tensor, total: int, value: float, last: int | None = None) -> torch.Tensor:
    """fp32 contiguous copy of ``x`` ([B, T, ...]) padded along time to ``total`` steps with
    ``value``, and with zeros along the last dim to ``last``."""
    x = x.float()
    if last is not None and last > x.shape[-1]:
        x = torch.nn.functional.pad(x, (0, last - x.shape[-1]))
    pad = x.new_full((x.shape[0], total - x.shape[1], *x.shape[2:]), value)
    return torch.cat([x, pad], dim=1).contiguous()


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
        K, V = max(k_dim, MIN_DIM), max(v_dim, MIN_DIM)  # tl.dot's minimum; zero-padded
        nkb, nc = K // block_k, triton.cdiv(T, chunk)
        ta = nc * chunk + 1  # padded steps (+1: the forward prefetches one step ahead)
        qp, kp = (_pad(x, ta, 0.0, K) for x in (q, k))
        vp = _pad(v, ta, 0.0, V)
        fp = _pad(f, ta, 1.0)
        w = torch.nn.functional.pad(weight.float(), (0, V - v_dim, 0, V - v_dim)).contiguous()
        y_part = q.new_empty(B, ta, H, nkb, V, dtype=torch.float32)
        ckpt = q.new_empty(B, H, nc, K, V, dtype=torch.float32)
        _m2rnn_fwd_kernel[(B * H, nkb)](qp, kp, vp, fp, w, y_part, ckpt, ta,
                                        NC=nc, H=H, K=K, V=V, BLOCK_K=block_k, NKB=nkb, CHUNK=chunk,
                                        PREC=precision, num_warps=num_warps)
        ctx.save_for_backward(qp, kp, vp, fp, w, ckpt)
        ctx.meta = (T, k_dim, v_dim, chunk, block_k, nkb, nc, ta, num_warps, precision)
        ctx.dtypes = [t.dtype for t in (q, k, v, f, weight)]
        return y_part[:, :T, :, :, :v_dim].sum(3).to(q.dtype)

    @staticmethod
    def backward(ctx, dy):
        qp, kp, vp, fp, w, ckpt = ctx.saved_tensors
        T, k_dim, v_dim, chunk, block_k, nkb, nc, ta, num_warps, precision = ctx.meta
        B, _, H, K = qp.shape
        V = vp.shape[-1]
        dyp = _pad(dy, ta, 0.0, V)
        dq = torch.zeros_like(qp)
        dk = torch.zeros_like(kp)
        dv = qp.new_zeros(B, ta, H, nkb, V)
        df = qp.new_zeros(B, ta, H, nkb)
        dw = qp.new_empty(B, H, nkb, V, V)
        scratch = qp.new_empty(B * H * nkb, 2, chunk + 1, block_k, V)  # two buffers of states
        uscr = qp.new_empty(B * H * nkb, 2, chunk, block_k, V)  # two buffers of tanh outputs
        _m2rnn_bwd_kernel[(B * H, nkb)](qp, kp, vp, fp, w, dyp, ckpt, scratch, uscr, dq, dk, dv, df, dw,
                                        ta, NC=nc, H=H, K=K, V=V, BLOCK_K=block_k, NKB=nkb, CHUNK=chunk,
                                        PREC=precision, num_warps=num_warps)
        grads = (dq[:, :T, :, :k_dim], dk[:, :T, :, :k_dim], dv[:, :T, :, :, :v_dim].sum(3),
                 df[:, :T].sum(3), dw.sum((0, 2))[:, :v_dim, :v_dim])
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
    block_k = min(block_k, max(q.shape[-1], MIN_DIM))
    _check_sizes(q.shape[-1], v.shape[-1], block_k, num_warps, precision)
    return _M2RNNScan.apply(q, k, v, f, weight, chunk, block_k, num_warps, precision)
