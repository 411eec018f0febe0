"""Triton kernel of the M2RNN mixer's cached step: the recurrence over ``s`` new positions from the
session's state in one kernel.

The torch form (:func:`megacpp_mcore.infer.mixers.m2rnn_recurrence`) launches about eleven small
kernels per position (``h W``, the outer product, tanh, the gated mix, the padding select, the
readout) plus the normalisations and the sigmoid gate before the loop and the output's copies after
it; at decode sizes each is a launch of almost no work. Here one program owns one (row, head): it
reads the conv output and the gate of its head where the mixer's step leaves them (strided, in
their own dtype), normalises ``q``/``k``, computes ``f = sigmoid(gate + forget_bias)``, keeps the
``[K, V]`` state in registers across the positions, and writes the readout straight in the layout
and dtype the output projection takes (``[s, b, heads * V]``) and the state after every position
(``keep``: for a speculative step's commit) or after the last.

``K`` and ``V`` must be powers of two of at least 16 (``h W`` is a ``tl.dot`` in IEEE fp32) and
``s`` at most :data:`MAX_POSITIONS` (:func:`supported`: the positions are unrolled, one compilation
per ``s``; decode steps and verifications of K + 1 positions, not a prefill). Runs under ``TRITON_INTERPRET=1`` on CPU tensors (the CPU test).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)  # saturates to +-1 without inf/inf


@triton.jit
def _m2rnn_step_kernel(x_ptr, gate_ptr, bias_ptr, w_ptr, h0_ptr, valid_ptr, y_ptr, state_ptr, B,
                       stride_xb, stride_xc, stride_xt, stride_gs, stride_gb, stride_gh,
                       S: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       KEEP: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    rk = tl.arange(0, K)
    rv = tl.arange(0, V)
    w = tl.load(w_ptr + h * V * V + rv[:, None] * V + rv[None, :])  # [V, V]
    state = tl.load(h0_ptr + ((b * H + h) * K + rk[:, None]) * V + rv[None, :])  # [K, V] fp32
    forget_bias = tl.load(bias_ptr + h)
    x = x_ptr + b * stride_xb + h * (2 * K + V) * stride_xc  # this head's q, k, v channels
    for t in tl.static_range(S):
        q = tl.load(x + rk * stride_xc + t * stride_xt).to(tl.float32)
        k = tl.load(x + (K + rk) * stride_xc + t * stride_xt).to(tl.float32)
        v = tl.load(x + (2 * K + rv) * stride_xc + t * stride_xt).to(tl.float32)
        q = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=0)), 1e-12)  # F.normalize
        k = k / tl.maximum(tl.sqrt(tl.sum(k * k, axis=0)), 1e-12)
        gate = tl.load(gate_ptr + t * stride_gs + b * stride_gb + h * stride_gh).to(tl.float32)
        f = 1.0 / (1.0 + tl.exp(-(gate + forget_bias)))
        # [K, V] = h W, in full fp32 (as a broadcast product summed over V it compiled to ~1e-4
        # relative error on an H100, TF32-like: 3e-4 off the fp64 recurrence, torch fp32 3e-7)
        hw = tl.dot(state, w, input_precision="ieee")
        update = _tanh(hw + k[:, None] * v[None, :])
        valid = tl.load(valid_ptr + b * S + t) != 0  # a padded slot leaves the state as it is
        state = tl.where(valid, f * state + (1.0 - f) * update, state)
        y = tl.sum(q[:, None] * state, axis=0)  # [V]
        tl.store(y_ptr + ((t * B + b) * H + h) * V + rv, y.to(y_ptr.dtype.element_ty))
        if KEEP:
            tl.store(state_ptr + (((t * B + b) * H + h) * K + rk[:, None]) * V + rv[None, :], state)
    if not KEEP:
        tl.store(state_ptr + ((b * H + h) * K + rk[:, None]) * V + rv[None, :], state)


MAX_POSITIONS = 16  # a decode step or a verification; a prefill keeps the torch recurrence


def supported(k_dim: int, v_dim: int, s: int) -> bool:
    """Whether the kernel takes these head sizes (powers of two, ``tl.arange``'s rule, and at
    least 16, ``tl.dot``'s tile) and ``s`` positions."""
    return 1 <= s <= MAX_POSITIONS and all(n >= 16 and n & (n - 1) == 0 for n in (k_dim, v_dim))


def m2rnn_step(x: torch.Tensor, gate: torch.Tensor, forget_bias: torch.Tensor, weight: torch.Tensor,
               h0: torch.Tensor, valid: torch.Tensor, keep: bool, out_dtype: torch.dtype):
    """The recurrence over ``s`` positions from ``h0``.

    x: the conv output ``[b, heads * (2K + V), s]`` (after SiLU; any strides and float dtype;
    per head ``q``, ``k``, ``v`` channels); gate ``[s, b, heads]`` (any strides); forget_bias
    ``[heads]``; weight ``[heads, V, V]``; h0 ``[b, heads, K, V]`` fp32; valid ``[b, s]`` bool.
    Returns the readout ``[s, b, heads * V]`` in ``out_dtype`` and the fp32 states, ``[s, b,
    heads, K, V]`` after every position (``keep``) or ``[b, heads, K, V]`` after the last."""
    b, heads, k_dim, v_dim = h0.shape
    s = x.shape[-1]
    if not supported(k_dim, v_dim, s):
        raise ValueError(f"M2RNN step kernel: K={k_dim}, V={v_dim} must be powers of two >= 16 and "
                         f"s={s} at most {MAX_POSITIONS}")
    if x.shape[1] != heads * (2 * k_dim + v_dim) or gate.shape != (s, b, heads) or valid.shape != (b, s):
        raise ValueError(f"M2RNN step kernel: x{tuple(x.shape)} gate{tuple(gate.shape)} "
                         f"valid{tuple(valid.shape)} do not match b={b}, heads={heads}, K={k_dim}, "
                         f"V={v_dim}, s={s}")
    y = torch.empty(s, b, heads * v_dim, dtype=out_dtype, device=x.device)
    states = torch.empty((s, *h0.shape) if keep else h0.shape, dtype=torch.float32, device=x.device)
    _m2rnn_step_kernel[(b * heads,)](
        x, gate, forget_bias.float().contiguous(), weight.float().contiguous(), h0.contiguous(),
        valid.contiguous(), y, states, b, *x.stride(), *gate.stride(),
        S=s, H=heads, K=k_dim, V=v_dim, KEEP=keep, num_warps=4)
    return y, states
