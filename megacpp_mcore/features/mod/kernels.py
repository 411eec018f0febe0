"""Triton kernels of MoD's fused gateskip residual and top-k routing (CUDA tensors only; imported
when a layer is built with them, see ``gate.triton_kernels``, which also checks :data:`MAX_HIDDEN`).

A gateskip layer computes, at its residual seam, ``logit = x . w + b``, ``g = sigmoid(logit)`` and
``y = x + g * out`` (``x``: the layer input, which is both the residual and the router's input;
``out``: the block output; ``w``, ``b``: the ``Linear(h, 1)`` router). Unfused that is a GEMV, a
few ``[N]`` ops and an ``addcmul`` forward, and in backward an outer-product GEMM for the router's
input gradient, its accumulation into ``dx``, ``addcmul``'s scaled copies and a product + row sum
for ``dg``: about fifteen passes over ``[N, h]``. Fused:

* ``gate_forward``: one program per ``ROWS`` rows reads ``x`` and ``out`` once and writes ``y`` and
  ``g`` (fp32): the two reads and one write the plain residual add costs anyway;
* ``gate_backward``: reads ``dy``, ``out``, ``x``; writes ``dout = dy * g`` and
  ``dx = dy + dlogit * w`` (the router's input gradient folded into the residual gradient), ``dlogit``
  and per-program partial sums of ``dlogit * x`` for the router weight's gradient, where
  ``dlogit = (sum_h(dy * out) + extra) * g * (1 - g)`` and ``extra`` is the per-token gradient of the
  sparsity loss (a one-element device tensor: no host synchronisation).

Everything accumulates in fp32 whatever the activation dtype; shapes are static (graph-capturable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 16  # rows per program: amortises the router-weight load and bounds the dW partial buffer
MAX_HIDDEN = 16384  # one row in registers; wider layers take the torch formulation


@triton.jit
def _router_fwd_kernel(x_ptr, out_ptr, w_ptr, b_ptr, y_ptr, res_ptr, n_rows, hidden, batch,
                       GATED: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row ``logit = x . w + b``. ``GATED``: stores ``g = sigmoid(logit)`` in ``res[row]`` and
    ``y = x + g * out``; otherwise stores the logit of row ``i * batch + j`` (an ``[s, b]`` layout)
    at ``res[j * s + i]`` (``[b, s]``: per-sequence top-k and sort then run along the contiguous
    dim; ``out``/``y`` unused)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < hidden
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr).to(tl.float32)
    for r in range(ROWS):
        row = pid * ROWS + r
        valid = row < n_rows
        mask = cmask & (tl.full([BLOCK], 0, tl.int32) + row < n_rows)
        offs = row.to(tl.int64) * hidden + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        res = tl.sum(x * w, axis=0) + b
        if GATED:
            res = 1.0 / (1.0 + tl.exp(-res))
            o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + offs, (x + res * o).to(y_ptr.dtype.element_ty), mask=mask)
        if valid:
            if GATED:
                tl.store(res_ptr + row, res)
            else:
                tl.store(res_ptr + (row % batch) * (n_rows // batch) + row // batch, res)


@triton.jit
def _gate_bwd_kernel(dy_ptr, x_ptr, out_ptr, w_ptr, g_ptr, extra_ptr, dx_ptr, dout_ptr,
                     dlogit_ptr, dw_part_ptr, n_rows, hidden, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < hidden
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    extra = tl.load(extra_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK], tl.float32)
    for r in range(ROWS):
        row = pid * ROWS + r
        valid = row < n_rows
        mask = cmask & (tl.full([BLOCK], 0, tl.int32) + row < n_rows)
        offs = row.to(tl.int64) * hidden + cols
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + tl.minimum(row, n_rows - 1))  # in bounds; invalid rows: dlogit := 0
        dlogit = (tl.sum(dy * o, axis=0) + extra) * g * (1.0 - g)
        dlogit = tl.where(valid, dlogit, 0.0)
        tl.store(dout_ptr + offs, (dy * g).to(dout_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + offs, (dy + dlogit * w).to(dx_ptr.dtype.element_ty), mask=mask)
        if valid:
            tl.store(dlogit_ptr + row, dlogit)
        acc += dlogit * x
    tl.store(dw_part_ptr + pid.to(tl.int64) * hidden + cols, acc, mask=cmask)


def _launch(hidden: int):
    block = triton.next_power_of_2(hidden)
    return block, (4 if block <= 2048 else 8)


def gate_forward(x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """``x``, ``out``: contiguous ``[N, h]``; ``weight``: ``[h]``; ``bias``: ``[1]``.
    Returns ``y`` (``x.dtype``) and ``g`` (``[N]`` fp32)."""
    n_rows, hidden = x.shape
    y = torch.empty_like(x)
    g = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    block, warps = _launch(hidden)
    grid = (triton.cdiv(n_rows, ROWS),)
    _router_fwd_kernel[grid](x, out, weight, bias, y, g, n_rows, hidden, 1, GATED=True, ROWS=ROWS,
                             BLOCK=block, num_warps=warps)
    return y, g


def gate_backward(dy: torch.Tensor, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor,
                  g: torch.Tensor, extra: torch.Tensor):
    """Returns ``dx``, ``dout`` (activation dtype), ``dweight`` (``[h]`` fp32), ``dbias`` (0-d fp32)."""
    n_rows, hidden = x.shape
    dx = torch.empty_like(x)
    dout = torch.empty_like(out)
    dlogit = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    programs = triton.cdiv(n_rows, ROWS)
    dw_part = torch.empty(programs, hidden, device=x.device, dtype=torch.float32)
    block, warps = _launch(hidden)
    _gate_bwd_kernel[(programs,)](dy, x, out, weight, g, extra, dx, dout, dlogit, dw_part,
                                  n_rows, hidden, ROWS=ROWS, BLOCK=block, num_warps=warps)
    return dx, dout, dw_part.sum(0), dlogit.sum()


# ------------------------------------------------------------------------------------ top-k route
@triton.jit
def _topk_bwd_kernel(dy_ptr, dsel_ptr, dgate_ptr, pos_ptr, x_ptr, w_ptr, logit_ptr, coef_ptr, coef,
                     dlogit_ptr, dx_ptr, dw_part_ptr, n_rows, hidden, batch, HAS_DY: tl.constexpr,
                     HAS_DSEL: tl.constexpr, HAS_DGATE: tl.constexpr, COEF_PTR: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < hidden
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if COEF_PTR:  # the BCE coefficient as a one-element device tensor (tensor loss scale): no sync
        c = tl.load(coef_ptr).to(tl.float32)
    else:
        c = coef
    acc = tl.zeros([BLOCK], tl.float32)
    for r in range(ROWS):
        row = pid * ROWS + r
        valid = row < n_rows
        mask = cmask & (tl.full([BLOCK], 0, tl.int32) + row < n_rows)
        safe = tl.minimum(row, n_rows - 1)
        pos = tl.load(pos_ptr + safe)  # row of dsel / dgate for a selected token, -1 otherwise
        pos_v = tl.full([BLOCK], 0, tl.int32) + pos
        g = 1.0 / (1.0 + tl.exp(-tl.load(logit_ptr + (safe % batch) * (n_rows // batch) + safe // batch)))
        # dlogit: c * g everywhere (the BCE), plus dgate * g * (1 - g) - c on the selected rows
        sel = -c
        if HAS_DGATE:
            dg = tl.load(dgate_ptr + tl.maximum(pos, 0)).to(tl.float32)
            sel += dg * g * (1.0 - g)
        dlogit = c * g + tl.where(pos >= 0, sel, 0.0)
        dlogit = tl.where(valid, dlogit, 0.0)
        offs = row.to(tl.int64) * hidden + cols
        grad = tl.zeros([BLOCK], tl.float32)
        if HAS_DSEL:
            sel_offs = tl.maximum(pos, 0).to(tl.int64) * hidden + cols
            grad += tl.load(dsel_ptr + sel_offs, mask=mask & (pos_v >= 0), other=0.0).to(tl.float32)
        if HAS_DY:  # the scatter's pass-through, on the rows that were not selected
            grad += tl.load(dy_ptr + offs, mask=mask & (pos_v < 0), other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, (grad + dlogit * w).to(dx_ptr.dtype.element_ty), mask=mask)
        if valid:
            tl.store(dlogit_ptr + row, dlogit)
        acc += dlogit * x
    tl.store(dw_part_ptr + pid.to(tl.int64) * hidden + cols, acc, mask=cmask)


def router_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, batch: int) -> torch.Tensor:
    """``x``: contiguous ``[s * b, h]`` (``[s, b, h]`` flattened, ``b = batch``) ->
    ``x . weight + bias`` as ``[b, s]`` fp32 (transposed: one contiguous row per sequence)."""
    n_rows, hidden = x.shape
    logits = torch.empty(batch, n_rows // batch, device=x.device, dtype=torch.float32)
    block, warps = _launch(hidden)
    _router_fwd_kernel[(triton.cdiv(n_rows, ROWS),)](x, x, weight, bias, x, logits, n_rows, hidden,
                                                     batch, GATED=False, ROWS=ROWS, BLOCK=block,
                                                     num_warps=warps)
    return logits


def topk_backward(dy, dselected, dgate, pos: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                  logits: torch.Tensor, coef):
    """Input gradient of a top-k routed layer, in one pass over ``[N, h]``:
    ``dx = (dselected[pos] if pos >= 0 else dy) + dlogit * w`` where
    ``dlogit = coef * g + (dgate[pos] * g * (1 - g) - coef if pos >= 0 else 0)``, ``g = sigmoid(logits)``
    (``logits``: ``[b, s]`` contiguous, as :func:`router_logits` writes them; rows are ``[s, b]``)
    (the gate's gradient on the selected rows and the router BCE's everywhere; ``coef``: a float
    or a one-element device tensor; ``dy``/``dselected``/``dgate`` may be None: zero). Also returns the
    router's ``dweight`` (``[h]`` fp32) and ``dbias`` (0-d fp32)."""
    n_rows, hidden = x.shape
    dx = torch.empty_like(x)
    programs = triton.cdiv(n_rows, ROWS)
    dw_part = torch.empty(programs, hidden, device=x.device, dtype=torch.float32)
    dlogit = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    block, warps = _launch(hidden)
    coef_ptr = isinstance(coef, torch.Tensor)
    _topk_bwd_kernel[(programs,)](dy if dy is not None else x, dselected if dselected is not None else x,
                                  dgate if dgate is not None else logits, pos, x, weight, logits,
                                  coef if coef_ptr else logits, 0.0 if coef_ptr else float(coef),
                                  dlogit, dx, dw_part, n_rows, hidden, logits.shape[0],
                                  HAS_DY=dy is not None, HAS_DSEL=dselected is not None,
                                  HAS_DGATE=dgate is not None, COEF_PTR=coef_ptr,
                                  ROWS=ROWS, BLOCK=block, num_warps=warps)
    return dx, dw_part.sum(0), dlogit.sum()
