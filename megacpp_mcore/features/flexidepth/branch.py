"""FlexiDepth's trainable part of one layer: the norm, the router and the adapter.

:class:`SkipBranch` reads the layer input ``x [s, b, h]`` (``[s/tp, b, h]`` shards under sequence
parallelism) through its own norm ``z = norm(x)``: the router logits ``z . w + b`` (``[s, b, 1]``,
fp32 or fp64) and the adapter's residual update ``up(act(down(z)))`` (``[s, b, h]``; ``None`` for
``adapter="none"``), the router and ``down`` in one GEMM (:meth:`SkipBranch.project`). All its parameters are
replicated over tensor parallelism (plain ``torch.nn`` modules): every token is routed on the rank
that holds it, so under sequence parallelism their gradients are partial per rank and they are
flagged ``sequence_parallel`` (Megatron's ``finalize_model_grads`` all-reduces them over TP).

:data:`TRAINABLE_PATTERN` names these parameters in a model (``...layers.<i>.flexidepth.*``): what
trains when a fine-tune freezes the backbone (:func:`is_branch_parameter`).
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.random import get_data_parallel_rng_tracker_name

from megacpp_mcore.features.flexidepth.config import FlexiDepthConfig
from megacpp_mcore.layers.norms import LocalNorm


# Parameter names of the branches in a model (the layer holds its SkipBranch as ``flexidepth``).
TRAINABLE_PATTERN = r"(^|\.)flexidepth\."


def is_branch_parameter(name: str) -> bool:
    """Whether the model parameter ``name`` belongs to a FlexiDepth branch (router, its norm,
    adapter): the parameters a frozen-backbone fine-tune trains."""
    return re.search(TRAINABLE_PATTERN, name) is not None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 router logits and scores for 16/32-bit activations, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class SkipBranch(torch.nn.Module):
    """Norm + router ``Linear(h, 1)`` + adapter ``Linear(h, r, bias=False)`` -> act ->
    ``Linear(r, h, bias=False)`` of one FlexiDepth layer (parameter names ``norm.*``,
    ``router.*``, ``down.*``, ``up.*`` under the layer's ``flexidepth.``)."""

    def __init__(self, config, fd: FlexiDepthConfig):
        super().__init__()
        h = config.hidden_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.kind = fd.adapter
        self.norm = LocalNorm(config, h, eps=config.layernorm_epsilon).to(device)
        linear = dict(device=device, dtype=config.params_dtype)
        self.router = torch.nn.Linear(h, 1, bias=True, **linear)
        if fd.adapter != "none":
            r = fd.rank(h)
            self.down = torch.nn.Linear(h, r, bias=False, **linear)
            self.up = torch.nn.Linear(r, h, bias=False, **linear)
        self._init(config, fd)
        self._joint_cache = None  # (key, joint) of _joint outside autograd
        for param in self.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
            param.sequence_parallel = bool(config.sequence_parallel)

    def _init(self, config, fd: FlexiDepthConfig) -> None:
        """Router weight ~ N(0, std), bias ``router_bias_init``; adapter ``down`` with the model's
        init method, ``up`` zero (the skip path starts as the identity ``P(x) = x``). Drawn from
        the data-parallel RNG stream when Megatron's tracker is up, so every TP rank agrees."""
        with torch.no_grad():
            self.router.bias.fill_(fd.router_bias_init)
            if self.kind != "none":
                self.up.weight.zero_()
            if not config.perform_initialization:
                return
            tracker = tensor_parallel.get_cuda_rng_tracker()
            stream = (tracker.fork(get_data_parallel_rng_tracker_name()) if tracker.is_initialized()
                      else contextlib.nullcontext())
            with stream:
                self.router.weight.normal_(0.0, fd.router_init_std)
                if self.kind != "none":
                    config.init_method(self.down.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [s, b, h]`` -> (router logits ``[s, b, 1]`` in fp32/fp64, adapter update
        ``[s, b, h]`` in ``x.dtype`` or ``None``)."""
        logits, inner = self.project(x)
        return logits, self.update(inner, x.dtype)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The router logits (``[s, b, 1]``, fp32/fp64) and the adapter's down projection
        ``down(z)`` (``[s, b, r]`` in ``x.dtype``; ``None`` for ``adapter="none"``) of ``z =
        norm(x)``, from ONE GEMM over the layer input: the router's row rides with ``down``'s
        (padded to a multiple of 8 rows, aligned output rows), so the ``[s, b, h]`` input is read
        once, not twice (a ``Linear(h, 1)`` GEMV reads all of it for one output column). With
        RMSNorm the norm folds into the GEMM as well, ``norm(x) W^T = rstd * (x (W diag(g))^T)``
        (``sqrt(h)`` rides in the weight, so ``rstd / sqrt(h) = rsqrt(|x|^2 + h eps)``):
        only the per-token ``rstd`` (one fp32 reduction) is computed, and no normed copy of the
        input is written and read back. The product's fp32 scaling and the router bias in fp32
        (fp64 for fp64 activations) give the logits; ``down(z)`` is rounded to ``x.dtype`` once."""
        h = x.shape[-1]
        acc = accumulation_dtype(x.dtype)
        weight, bias, r = self._joint(x.dtype, acc)
        if self.norm.rms:  # rstd / sqrt(h) = rsqrt(|x|^2 + h eps); sqrt(h) rides in `weight`
            square = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc).square()
            inv = torch.rsqrt(square.add_(h * self.norm.eps))
            both = F.linear(x, weight) * inv  # in acc: one kernel
        else:
            both = F.linear(self.norm(x), weight).to(acc)
        logits = both[..., r:r + 1] + bias
        return logits, (None if r == 0 else both[..., :r].to(x.dtype))

    def _joint(self, dtype: torch.dtype, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(the joint weight ``[r + 1 + pad, h]`` in ``dtype``: ``down``'s rows, the router's,
        zeros; with RMSNorm its gain and ``sqrt(h)`` folded in), the router bias in ``acc``, and
        ``r``. Outside autograd (inference) kept until a parameter changes (their version counters
        and storages are the key), so a forward launches none of these small ops."""
        down = getattr(self, "down", None)
        params = [p for p in (self.router.weight, self.router.bias, self.norm.weight,
                              None if down is None else down.weight) if p is not None]
        key = (dtype, acc, tuple((p.data_ptr(), p._version) for p in params))
        cached = self._joint_cache
        if not torch.is_grad_enabled() and cached is not None and cached[0] == key:
            return cached[1]
        h = self.router.weight.shape[-1]
        rows = [self.router.weight] if down is None else [down.weight, self.router.weight]
        r = 0 if down is None else down.weight.shape[0]
        pad = -(r + 1) % 8
        if pad:
            rows.append(self.router.weight.new_zeros(pad, h))
        weight = torch.cat(rows)  # [r + 1 + pad, h]
        if self.norm.rms:  # in fp32 at least, rounded to `dtype` once
            wide = torch.promote_types(acc, weight.dtype)
            weight = weight.to(wide) * (self.norm.weight.to(wide) * h ** 0.5)
        joint = (weight.to(dtype), self.router.bias.to(acc), r)
        if not torch.is_grad_enabled():
            self._joint_cache = (key, joint)
        return joint

    def update(self, inner: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The adapter's residual update ``up(act(inner))`` in ``dtype`` of :meth:`project`'s
        ``inner = down(z)`` (``None`` for ``adapter="none"``)."""
        if inner is None:
            return None
        return F.linear(F.gelu(inner) if self.kind == "mlp" else inner, self.up.weight.to(dtype))

    def skip_path(self, x: torch.Tensor, inner: torch.Tensor | None) -> torch.Tensor:
        """The skip path ``P(x) = x + up(act(inner))`` (``x`` itself for ``adapter="none"``):
        the update's GEMM, then the add (in fp32, rounded once), as a gathering layer's combine
        computes it (:func:`.kernels.combine_rows`), so the two agree bit for bit."""
        update = self.update(inner, x.dtype)
        return x if update is None else x + update
