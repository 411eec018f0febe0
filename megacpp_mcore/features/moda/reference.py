"""The reference: depth-aware causal attention with every key materialized (plain autograd).

The contract every fast path is tested against (tests/test_moda.py): at position ``t`` the softmax
runs over the causal sequence keys ``k[0..t]`` AND the depth keys ``K_depth[t, :]`` of the earlier
contributing layers of the segment.
"""

from __future__ import annotations

import torch

from megacpp_mcore.features.moda.depth import acc_dtype


def reference_depth_attention(query, key, value, depth_key=None, depth_value=None, *, scale: float):
    """Depth-aware causal attention with every key materialized (fp32 math).

    query ``[s, b, np, dk]``, key ``[s, b, g, dk]``, value ``[s, b, g, dv]``, depth_key
    ``[s, b, g, n, dk]``, depth_value ``[s, b, g, n, dv]`` (or None: no depth keys).
    Returns ``[s, b, np, dv]`` in the query's dtype.
    """
    s, _, heads, _ = query.shape
    r = heads // key.shape[2]
    acc = acc_dtype(query)
    q = query.to(acc)
    k = key.to(acc).repeat_interleave(r, dim=2)
    v = value.to(acc).repeat_interleave(r, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale  # [b, np, s, s]
    future = torch.ones(s, s, dtype=torch.bool, device=query.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    n = 0 if depth_key is None else depth_key.shape[3]
    if n:
        kd = depth_key.to(acc).repeat_interleave(r, dim=2)  # [s, b, np, n, dk]
        vd = depth_value.to(acc).repeat_interleave(r, dim=2)
        scores = torch.cat([scores, torch.einsum("sbhd,sbhnd->bhsn", q, kd) * scale], dim=-1)
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhst,tbhd->sbhd", probs[..., :s], v)
    if n:
        out = out + torch.einsum("bhsn,sbhnd->sbhd", probs[..., s:], vd)
    return out.to(query.dtype)
