"""The sequence part of a depth-reading layer: causal flash attention that returns its log-sum-exp.

The depth merge needs the sequence part's softmax statistics, which TE's public attention module
does not return, so a depth-reading layer calls a kernel directly:

* on CUDA with ``cuda_kernel="te"`` TE's ``fused_attn_fwd``/``fused_attn_bwd`` (the cuDNN kernel
  TE's ``DotProductAttention`` runs on Hopper; its softmax statistics are the log-sum-exp; sbhd
  layout, GQA native, equal K/V head dims; the fastest on the H200);
* with ``"flash"`` ``aten._scaled_dot_product_flash_attention`` (FlashAttention-2; bf16/fp16, head
  dim <= 256), with ``"cudnn"`` ``aten._scaled_dot_product_cudnn_attention``;
* on CPU ``aten._scaled_dot_product_flash_attention_for_cpu``.

``"auto"`` is resolved at build time by the backend provider (``moda_cuda_kernel``). For the aten
kernels GQA groups are expanded and unequal K/V head dims (MLA) are zero-padded to one width. The
backward functions are given the MERGED output and log-sum-exp, which makes the sequence-part
gradients exact for the joint softmax (the ring-attention identity).
"""

from __future__ import annotations

import functools
import types

import torch


def sequence_kernel(q: torch.Tensor, head_dim: int, cuda_kernel: str) -> str:
    """The kernel this input runs on: ``aten-flash-cpu``, ``te-fused-cuda``, ``aten-flash-cuda`` or
    ``aten-cudnn-cuda`` (``cuda_kernel`` already resolved from ``"auto"``); raises for inputs no
    kernel takes."""
    if q.device.type == "cpu":
        return "aten-flash-cpu"
    if q.device.type == "cuda":
        if q.dtype not in (torch.bfloat16, torch.float16) or head_dim > 256 or head_dim % 8:
            raise ValueError(
                f"MoDA fast kernel on CUDA needs bf16/fp16 and a head dim <= 256 divisible by 8, got "
                f"{q.dtype} with head dim {head_dim}; use MoDAConfig(kernel='reference')"
            )
        if cuda_kernel == "te":
            te_fused()  # raises with what to install
            return "te-fused-cuda"
        if cuda_kernel not in ("flash", "cudnn"):
            raise ValueError(f"MoDA: unresolved cuda_kernel={cuda_kernel!r}; allowed: flash, cudnn, te")
        return f"aten-{cuda_kernel}-cuda"
    raise ValueError(f"MoDA fast kernel: unsupported device {q.device}; use kernel='reference'")


@functools.lru_cache(maxsize=None)
def te_fused():
    """TE's fused-attention functions (imported once), which return the softmax statistics
    (log-sum-exp) that the depth merge needs."""
    from megacpp_mcore.spec import backends

    if not backends.detect().te:
        raise backends.BackendUnavailable(
            "MoDAConfig(cuda_kernel='te') needs Transformer Engine (transformer_engine.pytorch), which "
            "is not importable here; install transformer-engine[pytorch] or use cuda_kernel='flash' "
            "or 'cudnn'"
        )
    from transformer_engine.pytorch.constants import TE_DType
    from transformer_engine.pytorch.cpp_extensions.fused_attn import (
        FusedAttnBackend,
        fused_attn_bwd,
        fused_attn_fwd,
    )

    return types.SimpleNamespace(fwd=fused_attn_fwd, bwd=fused_attn_bwd, dtypes=TE_DType,
                                 backend=FusedAttnBackend["F16_arbitrary_seqlen"])


_TE_ARGS = dict(dropout=0.0, qkv_layout="sbhd_sbhd_sbhd", attn_bias_type="no_bias", attn_mask_type="causal")


def te_forward(q, k, v, scale):
    """q ``[s, b, np, dk]``, k/v ``[s, b, g, d]`` (contiguous; GQA native) -> (out ``[s, b, np, dv]``,
    lse ``[s, b, np]`` fp32, backward state)."""
    te = te_fused()
    s, b, heads, _ = q.shape
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
    out, aux, *_ = te.fwd(True, s, s, cu, cu, q, k, v, q.dtype, te.backend, attn_scale=scale, **_TE_ARGS)
    stats = aux[0]  # [b, np, s, 1] fp32
    if stats.numel() != b * heads * s:
        raise RuntimeError(f"MoDA te kernel: softmax statistics of shape {tuple(stats.shape)}, expected "
                           f"[{b}, {heads}, {s}, 1]; use MoDAConfig(cuda_kernel='cudnn')")
    return out, stats.reshape(b, heads, s).permute(2, 0, 1), ("te-fused-cuda", cu, list(aux[1:]))


def te_backward(dout, q, k, v, out, lse, state, scale):
    """dq, dk, dv ``[s, b, *, d]`` of the sequence part given the MERGED out and lse ``[s, b, np]``."""
    te = te_fused()
    _, cu, rest = state
    s = q.shape[0]
    stats = lse.permute(1, 2, 0).contiguous().unsqueeze(-1)  # [b, np, s, 1]
    dq, dk, dv, *_ = te.bwd(s, s, cu, cu, q, k, v, out, dout, q.dtype, te.dtypes[dout.dtype],
                            [stats, *rest], te.backend, attn_scale=scale, **_TE_ARGS)
    return dq, dk, dv


def flash_forward(q, k, v, scale, kernel: str):
    """q, k, v ``[b, h, s, d]`` -> (out ``[b, h, s, d]``, lse ``[b, h, s]`` fp32, backward state)."""
    if kernel == "aten-flash-cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, True, scale=scale)
        return out, lse, (kernel,)
    if kernel == "aten-cudnn-cuda":
        cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
        out, lse, cu_q, cu_k, max_q, max_k, seed, offset, _ = cudnn(
            q, k, v, None, True, 0.0, True, False, scale=scale)
        # cuDNN's statistics are [b, h, s, 1]
        return out, lse.reshape(lse.shape[:3]), (kernel, cu_q, cu_k, max_q, max_k, seed, offset, lse.dim())
    out, lse, cu_q, cu_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, False, scale=scale)
    return out, lse, (kernel, cu_q, cu_k, max_q, max_k, seed, offset)


def flash_backward(dout, q, k, v, out, lse, state, scale):
    """Backward of the sequence kernel; ``out``/``lse`` are the MERGED ones (joint softmax)."""
    kernel, *rest = state
    if kernel == "aten-flash-cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, True, scale=scale)
    if kernel == "aten-cudnn-cuda":
        cu_q, cu_k, max_q, max_k, seed, offset, lse_dim = rest
        lse = lse.unsqueeze(-1) if lse_dim == 4 else lse
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, seed, offset, None, cu_q, cu_k, max_q, max_k, 0.0, True, scale=scale)
    cu_q, cu_k, max_q, max_k, seed, offset = rest
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, True, seed, offset, scale=scale)


def to_heads(x: torch.Tensor, r: int, width: int) -> torch.Tensor:
    """``[s, b, g, d]`` -> ``[b, g*r, s, width]`` (GQA groups expanded, head dim zero-padded)."""
    if r > 1:
        x = x.repeat_interleave(r, dim=2)
    if x.shape[-1] < width:
        x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    return x.permute(1, 2, 0, 3)
