"""``M``: the Mamba-2 (SSD) mixer in TransformerLayer's self-attention slot.

Two implementations with ONE parameter and state layout, so weights load across both:

* fast (``te`` backend): Megatron-Core's ``MambaMixer`` (mamba_ssm Triton kernels), adapted to the
  slot's construction kwargs and call signature by :func:`fast_mixer_class`;
* portable (``local`` backend, and the parity reference): :class:`TorchMambaMixer`, a plain-torch
  chunked SSD scan with MambaMixer's parameters (``in_proj`` [z|x|B|C|dt], depthwise ``conv1d`` over
  [x|B|C], ``dt_bias``, ``A_log``, ``D``, gated group ``norm``, ``out_proj``) and checkpoint keys.

Both use Megatron column/row-parallel linears for ``in_proj``/``out_proj``: TP splits heads and
groups, and under SP ``in_proj`` all-gathers the sequence and ``out_proj`` reduce-scatters it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Union

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, sharded_state_dict_default

from megacpp_mcore.spec import compat
from megacpp_mcore.layers.mixers.common import (
    check_slot_call,
    mark_tensor_parallel,
    param_device,
    sharded_own_params,
)
from megacpp_mcore.layers.mixers.dims import MambaDims, mamba_dims_from_config

SSD_CHUNK = 64  # chunk length of the torch SSD scan (intra-chunk quadratic, inter-chunk recurrent)


def ssd_scan_torch(x, dt, A, B, C, chunk_size: int = SSD_CHUNK):
    """Mamba-2 SSD, chunked, from a zero state: per head ``S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T``,
    ``y_t = S_t C_t``.

    Args: x ``[b, s, h, p]``; dt ``[b, s, h]`` (after softplus); A ``[h]`` (negative);
        B, C ``[b, s, g, n]`` with ``h`` divisible by ``g`` (head ``i`` reads group ``i // (h/g)``).
    Returns: y ``[b, s, h, p]`` (no D skip, no gate).
    """
    b, s, h, p = x.shape
    g = B.shape[2]
    B = B.repeat_interleave(h // g, dim=2)  # [b, s, h, n]
    C = C.repeat_interleave(h // g, dim=2)
    pad = (-s) % chunk_size  # dt = 0 on padding: no decay, no input; outputs are dropped
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    nc, L = (s + pad) // chunk_size, chunk_size
    xdt = (x * dt[..., None]).view(b, nc, L, h, p)
    B, C = B.view(b, nc, L, h, -1), C.view(b, nc, L, h, -1)
    a_cum = (dt * A).view(b, nc, L, h).permute(0, 3, 1, 2).cumsum(-1)  # [b, h, nc, L]

    # Within a chunk: y_i = sum_{j<=i} exp(a_cum_i - a_cum_j) (C_i . B_j) xdt_j
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    seg = (a_cum[..., :, None] - a_cum[..., None, :]).masked_fill(~causal, float("-inf"))
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * torch.exp(seg)  # [b, h, nc, L, L]
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # Each chunk's contribution to the state at its end, then the recurrence across chunks.
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # [b, h, nc, L]
    chunk_states = torch.einsum("bcshn,bhcs,bcshp->bchpn", B, to_end, xdt)  # [b, nc, h, p, n]
    chunk_decay = torch.exp(a_cum[..., -1])  # [b, h, nc]
    state = x.new_zeros(b, h, p, B.shape[-1])
    entering = []
    for c in range(nc):
        entering.append(state)
        state = state * chunk_decay[:, :, c, None, None] + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # [b, nc, h, p, n]: state before chunk c
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(a_cum))
    return y.reshape(b, nc * L, h, p)[:, :s]


class GatedGroupRMSNorm(torch.nn.Module):
    """``rmsnorm(y * silu(z))`` per group of ``group_size`` channels (mamba_ssm's gated RMSNorm with
    ``norm_before_gate=False``); parameter ``weight`` as upstream, split across TP along dim 0."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, y, z):  # [..., d] fp32 -> [..., d]
        y = y * F.silu(z)
        grouped = y.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return grouped.flatten(-2) * self.weight.float()


@dataclasses.dataclass
class MambaSubmodules:
    """Input (column-parallel, z|x|B|C|dt) and output (row-parallel) projections, as MambaMixerSubmodules."""

    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None


class TorchMambaMixer(MegatronModule):
    """Portable Mamba-2 mixer with MambaMixer's parameters: ``[s, b, h] -> ([s, b, h], bias)``.

    Sizes come from the config's ``mamba_*`` fields (as MambaMixer reads them), expand 2, conv 4,
    D per head, gated RMSNorm, no projection biases.
    """

    def __init__(self, config, submodules: MambaSubmodules, d_model: int | None = None,
                 layer_number: int | None = None, pg_collection=None,
                 A_init_range=(1, 16), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 chunk_size: int = SSD_CHUNK, **kwargs):
        super().__init__(config)
        if pg_collection is None:
            raise ValueError("TorchMambaMixer needs pg_collection (TransformerLayer passes it)")
        dims = mamba_dims_from_config(config)
        if d_model is not None and d_model != dims.d_model:
            raise ValueError(f"TorchMambaMixer: d_model={d_model} differs from hidden_size={dims.d_model}")
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        dims.check_tp(tp)
        self.dims, self.layer_number, self.chunk_size = dims, layer_number, chunk_size
        # The attribute names below are MambaMixer's (its checkpoint code and ours read them).
        self.d_state, self.headdim, self.d_conv = dims.d_state, dims.head_dim, dims.d_conv
        self.nheads_local_tp = dims.nheads // tp
        self.ngroups_local_tp = dims.ngroups // tp
        self.d_inner_local_tp = dims.d_inner // tp

        self.in_proj = build_module(
            submodules.in_proj, dims.d_model, dims.in_proj_dim,
            config=config, init_method=config.init_method, gather_output=False, bias=False,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1", tp_group=self.tp_group,
        )
        conv_dim = self.d_inner_local_tp + 2 * self.ngroups_local_tp * self.d_state
        device, dtype = param_device(config), config.params_dtype
        self.conv1d = torch.nn.Conv1d(conv_dim, conv_dim, kernel_size=self.d_conv, groups=conv_dim,
                                      padding=self.d_conv - 1, bias=True, device=device, dtype=dtype)
        nh = self.nheads_local_tp
        self.dt_bias = torch.nn.Parameter(torch.empty(nh, device=device, dtype=dtype))
        self.A_log = torch.nn.Parameter(torch.empty(nh, device=device, dtype=torch.float32))
        self.D = torch.nn.Parameter(torch.ones(nh, device=device, dtype=torch.float32))
        with get_cuda_rng_tracker().fork():
            if config.perform_initialization:
                torch.nn.init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
            # softplus(dt_bias) log-uniform in [dt_min, dt_max]; A uniform in A_init_range.
            dt = torch.exp(torch.rand(nh, device=device) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=dt_init_floor)
            with torch.no_grad():
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                A = torch.empty(nh, device=device).uniform_(*A_init_range)
                self.A_log.copy_(torch.log(A))
        self.norm = GatedGroupRMSNorm(self.d_inner_local_tp, self.d_inner_local_tp // self.ngroups_local_tp,
                                      device=device, dtype=dtype)
        mark_tensor_parallel(self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log, self.D,
                             self.norm.weight)
        self.out_proj = build_module(
            submodules.out_proj, dims.d_inner, dims.d_model,
            config=config, init_method=config.output_layer_init_method, bias=False,
            input_is_parallel=True, skip_bias_add=True, is_expert=False,
            tp_comm_buffer_name="fc2", tp_group=self.tp_group,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Also takes a megatron-core 0.19 ``MambaMixer`` state dict, whose conv parameters are
        ``conv1d_weight``/``conv1d_bias`` (a ``conv1d`` module's ``weight``/``bias`` here and in
        every release's distributed checkpoint): :data:`compat.MAMBA_CONV_PARAMETERS`."""
        for name, module_name in compat.MAMBA_CONV_PARAMETERS.items():
            if prefix + name in state_dict and prefix + module_name not in state_dict:
                state_dict[prefix + module_name] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, hidden_states, attention_mask=None, inference_context=None,
                rotary_pos_emb=None, packed_seq_params=None, **kwargs):
        """``hidden_states`` ``[s(/tp under SP), b, h]``; mask and rotary inputs are unused (causal scan)."""
        check_slot_call("TorchMambaMixer", inference_context, packed_seq_params)
        zxBCdt, _ = self.in_proj(hidden_states)  # [s, b, in_proj_dim / tp], sequence gathered
        s, b = zxBCdt.shape[:2]
        di, gn, nh = self.d_inner_local_tp, self.ngroups_local_tp * self.d_state, self.nheads_local_tp
        z, xBC, dt = torch.split(zxBCdt.transpose(0, 1), [di, di + 2 * gn, nh], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :s]).transpose(1, 2)  # causal conv
        x, B, C = torch.split(xBC.float(), [di, gn, gn], dim=-1)
        x = x.unflatten(-1, (nh, self.headdim))  # [b, s, nh, p]
        dt = F.softplus(dt.float() + self.dt_bias.float())  # [b, s, nh]
        A = -torch.exp(self.A_log.float())
        y = ssd_scan_torch(x, dt, A, B.unflatten(-1, (-1, self.d_state)),
                           C.unflatten(-1, (-1, self.d_state)), self.chunk_size)
        y = (y + x * self.D.float()[:, None]).flatten(-2)  # [b, s, d_inner / tp]
        y = self.norm(y, z.float()).to(hidden_states.dtype).transpose(0, 1).contiguous()
        return self.out_proj(y)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """MambaMixer's checkpoint layout: TP dim-0 shards, with the fused ``in_proj``/``conv1d``
        tensors stored per part (``in_proj.weight.{z,x,B,C,dt}``, ``conv1d.*.{x,B,C}``), so that
        TP re-sharding keeps every part whole and checkpoints load across both implementations."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = sharded_own_params(self, prefix, {"A_log": 0, "dt_bias": 0, "D": 0},
                                 sharded_offsets, metadata, self.tp_group)
        for name, module in self.named_children():
            if name in ("conv1d", "norm"):
                axes = {"weight": 0, "bias": 0} if name == "conv1d" else {"weight": 0}
                out.update(sharded_own_params(module, f"{prefix}{name}.", axes, sharded_offsets,
                                              metadata, self.tp_group))
            else:
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets,
                                                      metadata, tp_group=self.tp_group))
        di, gn, nh = self.d_inner_local_tp, self.ngroups_local_tp * self.d_state, self.nheads_local_tp
        out[f"{prefix}in_proj.weight"] = _split_parts(
            out[f"{prefix}in_proj.weight"], {"z": di, "x": di, "B": gn, "C": gn, "dt": nh})
        for key in ("conv1d.weight", "conv1d.bias"):
            out[f"{prefix}{key}"] = _split_parts(out[f"{prefix}{key}"], {"x": di, "B": gn, "C": gn})
        return out


def _split_parts(sh_ten: ShardedTensor, parts: dict[str, int]) -> ShardedTensorFactory:
    """Stores a dim-0 fused tensor as one ShardedTensor per named part (``<key>.<part>``)."""
    if sum(parts.values()) != sh_ten.local_shape[0]:
        raise ValueError(f"{sh_ten.key}: parts {parts} do not cover dim 0 of {tuple(sh_ten.local_shape)}")
    template = sh_ten.without_data()

    def build(key, data, replica_id, flattened_range):
        whole = dataclasses.replace(template, key=key, data=data, dtype=data.dtype,
                                    replica_id=replica_id, flattened_range=flattened_range)
        pieces, start = [], 0
        for part, size in parts.items():
            for piece in whole.narrow(0, start, size):
                piece.key = f"{piece.key}.{part}"
                pieces.append(piece)
            start += size
        return pieces

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, lambda loaded: torch.cat(loaded),
                                sh_ten.replica_id)


@functools.cache
def fast_mixer_class() -> type:
    """``MambaMixer`` adapted to the self-attention slot (import deferred: it needs mamba_ssm/triton;
    the TE provider's ``mamba_mixer`` checks that first)."""
    from megatron.core.ssm.mamba_mixer import MambaMixer

    accepted = set(inspect.signature(MambaMixer.__init__).parameters)

    class MambaSlotMixer(MambaMixer):
        """MambaMixer taking TransformerLayer's slot kwargs and call signature."""

        def __init__(self, config, submodules, d_model, layer_number=None, pg_collection=None, **kwargs):
            # Slot kwargs MambaMixer does not know (cp_comm_type, ...) do not apply to a scan.
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
            super().__init__(config, submodules, d_model, layer_number=layer_number,
                             pg_collection=pg_collection, **kwargs)

        def forward(self, hidden_states, attention_mask=None, inference_context=None,
                    rotary_pos_emb=None, packed_seq_params=None, **kwargs):
            return super().forward(hidden_states, inference_context,
                                   packed_seq_params=packed_seq_params)

    return MambaSlotMixer


def mixer_spec(config, backend) -> ModuleSpec:
    """The ``M`` mixer spec for ``backend``: the provider's ``mamba_mixer`` (MambaMixer on ``te``,
    :class:`TorchMambaMixer` on ``local``) with the backend's projections."""
    dims: MambaDims = mamba_dims_from_config(config)
    dims.check_tp(config.tensor_model_parallel_size)
    fused = backend.fuse_layernorm_and_linear()
    in_proj = backend.column_parallel_layer_norm_linear() if fused else backend.column_parallel_linear()
    module, submodules = backend.mamba_mixer(config)
    return ModuleSpec(module=module, params={"d_model": config.hidden_size},
                      submodules=submodules(in_proj=in_proj, out_proj=backend.row_parallel_linear()))
