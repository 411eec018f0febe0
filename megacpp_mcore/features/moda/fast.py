"""The fast path: the sequence kernel (:mod:`.sequence`) merged with the depth part (:mod:`.depth`)
through the log-sum-exp, as one autograd Function with a hand-written backward.

Memory: a depth-reading layer holds for backward exactly what TE's attention holds (contiguous q,
k, v, the output, the fp32 log-sum-exp; views of Megatron's fused QKV output are copied, as TE does,
so they do not pin the whole projection), so the MoDA memory bill is the buffer, ``depth_kv_bytes``.
"""

from __future__ import annotations

import torch

from megacpp_mcore.features.moda import depth, sequence


class DepthFlashAttention(torch.autograd.Function):
    """Sequence flash attention merged with depth attention through the log-sum-exp.

    Inputs: query ``[s, b, np, dk]``, key ``[s, b, g, dk]``, value ``[s, b, g, dv]``, depth_key
    ``[s, b, g, n, dk]``, depth_value, scale, the sequence kernel (:func:`.sequence.sequence_kernel`),
    ``MoDAConfig.depth_kernel``, then (attached mode) the pushed ``k_0, v_0, ...`` that receive the
    depth-K/V gradients. Output ``[s, b, np, dv]``.
    """

    @staticmethod
    def forward(ctx, query, key, value, depth_key, depth_value, scale, kernel, depth_kernel, *attached):
        # Megatron hands over views of its fused QKV projection (``value`` always, ``query`` and
        # ``key`` without RoPE); saving such a view would pin the whole [s, b, g, (r + 2) d] tensor
        # until backward. Like TE's attention (which copies layouts it cannot take), save contiguous
        # copies instead: one copy, two fewer [s, b, np, d] units held per layer.
        query, key, value = (x if x.is_contiguous() else x.contiguous() for x in (query, key, value))
        s, b, heads, dk = query.shape
        g, dv = key.shape[2], value.shape[-1]
        r, width = heads // g, max(dk, dv)
        if kernel == "te-fused-cuda":  # sbhd in, sbhd out, GQA native
            if dk != dv:
                raise ValueError(f"MoDA te kernel: K head dim {dk} != V head dim {dv} (MLA); use "
                                 "MoDAConfig(cuda_kernel='cudnn' or 'flash')")
            out, lse, state = sequence.te_forward(query, key, value, scale)
        else:
            qh = sequence.to_heads(query, 1, width)
            kh, vh = sequence.to_heads(key, r, width), sequence.to_heads(value, r, width)
            # out_h [b, np, s, width], lse_h [b, np, s]
            out_h, lse_h, state = sequence.flash_forward(qh, kh, vh, scale, kernel)
            out = out_h[..., :dv].permute(2, 0, 1, 3)  # [s, b, np, dv]
            lse = lse_h.permute(2, 0, 1)  # [s, b, np]
        out = out.contiguous()  # te: already; aten: the [b, np, s, d] kernel layout, copied once
        if depth_key is not None:
            out, lse = depth.merge_depth(query, depth_key, depth_value, out, lse, scale,
                                         depth_kernel=depth_kernel)
        lse = lse.contiguous()
        ctx.save_for_backward(query, key, value, out, lse)
        # The buffer keeps receiving later layers' slots (in place, disjoint from the ones read
        # here); saving these views through save_for_backward would trip the version check.
        ctx.depth = (depth_key, depth_value)
        ctx.state, ctx.scale, ctx.n_attached = state, scale, len(attached)
        ctx.depth_kernel = depth_kernel
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out, lse = ctx.saved_tensors
        s, b, heads, dk = query.shape
        g, dv = key.shape[2], value.shape[-1]
        r, width = heads // g, max(dk, dv)
        dout = dout.contiguous()
        if ctx.state[0] == "te-fused-cuda":
            dquery, dkey, dvalue = sequence.te_backward(dout, query, key, value, out, lse, ctx.state,
                                                        ctx.scale)
        else:
            heads_of = sequence.to_heads
            dq_h, dk_h, dv_h = sequence.flash_backward(
                heads_of(dout, 1, width), heads_of(query, 1, width), heads_of(key, r, width),
                heads_of(value, r, width), heads_of(out, 1, width), lse.permute(1, 2, 0).contiguous(),
                ctx.state, ctx.scale)
            dquery = dq_h[..., :dk].permute(2, 0, 1, 3)  # [s, b, np, dk]
            dkey = dk_h[..., :dk].permute(2, 0, 1, 3)  # [s, b, np, dk]: summed over each GQA group
            dvalue = dv_h[..., :dv].permute(2, 0, 1, 3)
            if r > 1:
                dkey = dkey.reshape(s, b, g, r, dk).sum(3)
                dvalue = dvalue.reshape(s, b, g, r, dv).sum(3)
        grads_attached = []
        depth_key, depth_value = ctx.depth
        if depth_key is not None:  # the depth part of dQ (and the depth-K/V grads when attached)
            dquery = dquery.contiguous()
            ddk, ddv = depth.depth_backward(query, depth_key, depth_value, out, lse, dout, ctx.scale,
                                            dquery, want_kv=ctx.n_attached > 0,
                                            depth_kernel=ctx.depth_kernel)
            for j in range(ctx.n_attached // 2):
                grads_attached += [ddk[:, :, :, j].to(key.dtype), ddv[:, :, :, j].to(value.dtype)]
        return (dquery.to(query.dtype), dkey.to(key.dtype), dvalue.to(value.dtype), None, None, None,
                None, None, *grads_attached)


def resolve_cuda_kernel(cuda_kernel: str, query: torch.Tensor, *, equal_dims: bool) -> str:
    """``MoDAConfig.cuda_kernel`` with ``"auto"`` resolved as the ``auto`` backend's provider would
    (a MoDA layer resolves it through its own backend at build time)."""
    if cuda_kernel != "auto" or not query.is_cuda:
        return cuda_kernel
    from megacpp_mcore.spec import backends

    return backends.get_backend("auto").moda_cuda_kernel("auto", equal_dims=equal_dims)


def fast_depth_attention(query, key, value, depth_key=None, depth_value=None, *, scale: float,
                         attached: list[torch.Tensor] | tuple = (), cuda_kernel: str = "auto",
                         depth_kernel: str = "auto"):
    """Same contract as :func:`.reference.reference_depth_attention`; ``attached`` are the pushed
    ``k_0, v_0, k_1, v_1, ...`` that receive depth-K/V gradients (empty: detached)."""
    cuda_kernel = resolve_cuda_kernel(cuda_kernel, query, equal_dims=query.shape[-1] == value.shape[-1])
    kernel = sequence.sequence_kernel(query, max(query.shape[-1], value.shape[-1]), cuda_kernel)
    return DepthFlashAttention.apply(query, key, value, depth_key, depth_value, scale, kernel,
                                     depth_kernel, *attached)
