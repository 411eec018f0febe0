"""``R``: the M2RNN mixer, a multi-head matrix-memory recurrent network.

Per head, with key/query dim K and value dim V, state ``h_t`` is a ``[K, V]`` matrix:

    h_t = f_t * h_{t-1} + (1 - f_t) * tanh(h_{t-1} W + k_t v_t^T)      W: [V, V] per head
    y_t = q_t h_t                                                       y_t: [V]

``f_t = sigmoid(gate_t + forget_bias)`` is one scalar per head and token. ``q, k, v`` come from the
input projection through a short causal depthwise convolution and SiLU; ``q`` and ``k`` are
L2-normalized so the tanh argument stays bounded. The per-head outputs go through the output
projection.

Layout: the input projection's output is head-major, ``[head][q (K) | k (K) | v (V) | gate (1)]``, and
the conv channels are ``[head][q | k | v]``. A column-parallel split of the fused projection is then a
split of whole heads, so the global weights mean the same at every TP size and Megatron's default
dim-0 checkpoint sharding is correct. Under SP the column-parallel input projection all-gathers the
sequence and the row-parallel output projection reduce-scatters it, exactly as in MambaMixer.

Scan kernels: :func:`m2rnn_scan_torch` (portable, a loop over time) and, when Triton and CUDA are
present, the Triton kernel in :mod:`megacpp_mcore.layers.mixers.m2rnn_triton`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, sharded_state_dict_default

from megacpp_mcore.spec import backends
from megacpp_mcore.layers.mixers.common import (
    check_slot_call,
    mark_tensor_parallel,
    param_device,
    sharded_own_params,
)
from megacpp_mcore.layers.mixers.dims import M2RNNDims, m2rnn_dims

SCAN_IMPLS = ("auto", "torch", "triton")


def m2rnn_scan_torch(q, k, v, f, weight):
    """The M2RNN recurrence from a zero state, one time step at a time (fp32).

    Args: q, k ``[b, s, h, K]``; v ``[b, s, h, V]``; f ``[b, s, h]`` in (0, 1); weight ``[h, V, V]``.
    Returns: y ``[b, s, h, V]``.
    """
    b, s, nh, kd = k.shape
    state = k.new_zeros(b, nh, kd, v.shape[-1])  # [b, h, K, V]
    ys = []
    for t in range(s):
        f_t = f[:, t, :, None, None]  # [b, h, 1, 1]
        update = torch.tanh(state @ weight + k[:, t, :, :, None] * v[:, t, :, None, :])
        state = f_t * state + (1 - f_t) * update
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(ys, dim=1)


def resolve_scan_impl(impl: str, on_cuda: bool) -> str:
    """``torch`` or ``triton`` for a requested ``impl``: ``auto`` takes Triton for CUDA tensors when
    Triton is installed; an explicit ``triton`` without Triton raises with what to install."""
    if impl not in SCAN_IMPLS:
        raise ValueError(f"unknown M2RNN scan impl {impl!r}; allowed: {', '.join(SCAN_IMPLS)}")
    if impl == "triton":
        backends.require("triton", "the M2RNN Triton scan kernel")
        return "triton"
    return "triton" if impl == "auto" and on_cuda and backends.detect().triton is not None else "torch"


def m2rnn_scan(q, k, v, f, weight, impl: str = "auto"):
    """The scan on the kernel :func:`resolve_scan_impl` picks for these tensors."""
    if resolve_scan_impl(impl, q.is_cuda) == "triton":
        from megacpp_mcore.layers.mixers.m2rnn_triton import m2rnn_scan_triton

        return m2rnn_scan_triton(q, k, v, f, weight)
    return m2rnn_scan_torch(q, k, v, f, weight)


@dataclasses.dataclass
class M2RNNSubmodules:
    """The input (column-parallel) and output (row-parallel) projections."""

    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None


class M2RNNMixer(MegatronModule):
    """The M2RNN mixer in TransformerLayer's self-attention slot: ``[s, b, h] -> ([s, b, h], bias)``."""

    def __init__(
        self,
        config,
        submodules: M2RNNSubmodules,
        layer_number: int | None = None,
        pg_collection=None,
        dims: M2RNNDims | None = None,
        scan_impl: str = "auto",
        **kwargs,  # upstream slot kwargs (cp_comm_type, ...) that do not apply to a recurrence
    ):
        super().__init__(config)
        if pg_collection is None:
            raise ValueError("M2RNNMixer needs pg_collection (TransformerLayer passes it)")
        resolve_scan_impl(scan_impl, on_cuda=False)  # validates the request at build time
        self.dims = dims or m2rnn_dims(config.hidden_size, config.num_attention_heads)
        self.layer_number = layer_number
        self.scan_impl = scan_impl
        self.observed_scan_impl: str | None = None  # kernel the last forward ran ("torch"/"triton")
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        self.dims.check_tp(tp)
        d = self.dims
        self.nheads_local = d.nheads // tp

        self.in_proj = build_module(
            submodules.in_proj, d.d_model, d.nheads * d.head_proj_dim,
            config=config, init_method=config.init_method, gather_output=False, bias=False,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1", tp_group=self.tp_group,
        )
        channels = self.nheads_local * d.qkv_dim
        device, dtype = param_device(config), config.params_dtype
        self.conv1d = torch.nn.Conv1d(
            channels, channels, kernel_size=d.d_conv, groups=channels, padding=d.d_conv - 1,
            bias=True, device=device, dtype=dtype,
        )
        # Recurrent weight per head [V, V]; forget-gate bias per head, spread so that heads start
        # with memories of different lengths (sigmoid(1)=0.73 ... sigmoid(4)=0.98).
        self.recurrent_weight = torch.nn.Parameter(
            torch.empty(self.nheads_local, d.v_dim, d.v_dim, device=device, dtype=torch.float32)
        )
        rank = self.tp_group.rank()
        heads = torch.linspace(1.0, 4.0, d.nheads)[rank * self.nheads_local:(rank + 1) * self.nheads_local]
        self.forget_bias = torch.nn.Parameter(heads.to(device=device, dtype=torch.float32))
        if config.perform_initialization:
            with get_cuda_rng_tracker().fork():
                torch.nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
                torch.nn.init.zeros_(self.conv1d.bias)
                torch.nn.init.normal_(self.recurrent_weight, std=0.5 / math.sqrt(d.v_dim))
        mark_tensor_parallel(self.conv1d.weight, self.conv1d.bias, self.recurrent_weight,
                             self.forget_bias)

        self.out_proj = build_module(
            submodules.out_proj, d.nheads * d.v_dim, d.d_model,
            config=config, init_method=config.output_layer_init_method, bias=False,
            input_is_parallel=True, skip_bias_add=True, is_expert=False,
            tp_comm_buffer_name="fc2", tp_group=self.tp_group,
        )

    def forward(self, hidden_states, attention_mask=None, inference_context=None,
                rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        """``hidden_states`` ``[s(/tp under SP), b, h]``; the mask and rotary inputs are unused
        (the recurrence is causal by construction)."""
        check_slot_call("M2RNNMixer", inference_context, packed_seq_params)
        d, nh = self.dims, self.nheads_local
        proj, _ = self.in_proj(hidden_states)  # [s, b, nh * (2K + V + 1)], sequence gathered
        s, b = proj.shape[:2]
        proj = proj.reshape(s, b, nh, d.head_proj_dim)
        gate = proj[..., -1]  # [s, b, nh]
        qkv = proj[..., :-1].reshape(s, b, nh * d.qkv_dim).permute(1, 2, 0)  # [b, C, s]
        qkv = F.silu(self.conv1d(qkv)[..., :s])  # causal: keep the first s outputs
        qkv = qkv.permute(0, 2, 1).reshape(b, s, nh, d.qkv_dim).float()
        q, k, v = torch.split(qkv, [d.k_dim, d.k_dim, d.v_dim], dim=-1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        f = torch.sigmoid(gate.float().transpose(0, 1) + self.forget_bias)  # [b, s, nh]
        self.observed_scan_impl = resolve_scan_impl(self.scan_impl, q.is_cuda)
        y = m2rnn_scan(q, k, v, f, self.recurrent_weight, self.observed_scan_impl)  # [b, s, nh, V]
        y = y.to(hidden_states.dtype).transpose(0, 1).reshape(s, b, nh * d.v_dim)
        return self.out_proj(y)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Own parameters and the depthwise conv are split by heads (dim 0); projections shard
        themselves (their head-major layout makes the default dim-0 split a head split)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = sharded_own_params(self, prefix, {"recurrent_weight": 0, "forget_bias": 0},
                                 sharded_offsets, metadata, self.tp_group)
        for name, module in self.named_children():
            if name == "conv1d":
                out.update(sharded_own_params(module, f"{prefix}{name}.", {"weight": 0, "bias": 0},
                                              sharded_offsets, metadata, self.tp_group))
            else:
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets,
                                                      metadata, tp_group=self.tp_group))
        return out
