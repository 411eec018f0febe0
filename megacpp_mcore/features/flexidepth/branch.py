"""FlexiDepth's trainable part of one layer: the norm, the router and the adapter.

:class:`SkipBranch` reads the layer input ``x [s, b, h]`` (``[s/tp, b, h]`` shards under sequence
parallelism) once through its own norm ``z = norm(x)`` and returns the router logits
``z . w + b`` (``[s, b, 1]``, fp32 or fp64) and the adapter's residual update
``up(act(down(z)))`` (``[s, b, h]``; ``None`` for ``adapter="none"``). All its parameters are
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
        z, logits = self.gate(x)
        return logits, self.adapter(z, x.dtype)

    def gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normed input ``z`` and the router logits (the first half of :meth:`forward`)."""
        z = self.norm(x)
        acc = accumulation_dtype(x.dtype)
        # the GEMV in the activation dtype (fp32 accumulation), the logits in fp32
        return z, F.linear(z, self.router.weight.to(z.dtype), self.router.bias.to(z.dtype)).to(acc)

    def skip_path(self, x: torch.Tensor, z: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The skip path ``P(x) = x + up(act(down(z)))`` (``x`` itself for ``adapter="none"``), in
        ``out`` when given (``[s, b, h]``, e.g. the first rows of a hard layer's combine buffer).
        The residual add rides in the up projection's GEMM (``addmm`` with ``x`` as its input
        matrix): one pass over ``[s, b, h]`` less than a separate add, the sum rounded once."""
        up = getattr(self, "up", None)
        if self.kind == "none" or x.dtype != up.weight.dtype:  # no adapter; or mixed dtypes
            update = self.adapter(z, x.dtype)
            result = x if update is None else x + update
            return result if out is None else out.copy_(result)
        inner = self.down(z.to(self.down.weight.dtype))
        if self.kind == "mlp":
            inner = F.gelu(inner)
        flat = (x.reshape(-1, x.shape[-1]), inner.reshape(-1, inner.shape[-1]), up.weight.t())
        if out is None:
            return torch.addmm(*flat).view(x.shape)
        if torch.is_grad_enabled():  # out= is not differentiable: the sum, then a copy
            return out.copy_(torch.addmm(*flat).view(x.shape))
        torch.addmm(*flat, out=out.view(-1, x.shape[-1]))
        return out

    def adapter(self, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The adapter's update of the normed input ``z`` in ``dtype`` (the second half)."""
        if self.kind == "none":
            return None
        inner = self.down(z.to(self.down.weight.dtype))
        if self.kind == "mlp":
            inner = F.gelu(inner)
        return self.up(inner).to(dtype)
