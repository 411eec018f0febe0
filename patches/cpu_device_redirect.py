"""Megatron modules allocate on ``"cuda"`` and synchronise CUDA: on a CPU host they cannot run.

Several megatron-core 0.16 modules allocate with ``device="cuda"`` or
``torch.cuda.current_device()`` (global memory buffer, rotary embedding, causal mask, pipeline
schedules and p2p, grad buffers, clip_grads, MoE experts/router) and call
``torch.cuda.synchronize()``. In exactly the modules of :data:`REDIRECTED_MODULES` the module-global
``torch`` is replaced by a proxy whose tensor factories map a CUDA device to CPU and whose
``torch.cuda`` answers "cpu" and no-ops synchronisation. Nothing outside those modules sees the
proxy. ``SCOPE = "cpu"``: the registry applies it only on hosts without CUDA.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types

import torch

NAME = "cpu-device-redirect"
TARGETS = "megatron-core >=0.16,<0.20"  # defect read in 0.16.1, 0.17.1, 0.18.2, 0.19.2
SCOPE = "cpu"
DESCRIPTION = (
    "megatron modules allocate with device='cuda' / torch.cuda.current_device() and call "
    "torch.cuda.synchronize(); in those modules, map CUDA allocations to CPU"
)

# Modules whose global ``torch`` is replaced (megatron-core 0.16.x - 0.19.x: the same list).
REDIRECTED_MODULES = (
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",  # MLA's default RoPE
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.multi_token_prediction",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.exchange_utils",
)

_CUDA_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "as_tensor",
)


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


class _NullStream:
    def wait_stream(self, *_):
        return None

    def synchronize(self):
        return None


class _CudaNamespaceProxy(types.SimpleNamespace):
    """``torch.cuda`` as seen by a redirected module on a CPU host."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_, **__):
        return None

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    def is_available():
        return False

    @staticmethod
    def current_stream(*_, **__):
        return _NullStream()

    @staticmethod
    def default_stream(*_, **__):
        return _NullStream()

    @staticmethod
    def stream(*_, **__):
        return contextlib.nullcontext()


class _TorchProxy(types.ModuleType):
    """``torch`` as seen by a redirected module: CUDA allocations land on CPU."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaNamespaceProxy()
        for name in _CUDA_FACTORIES:
            setattr(self, name, self._factory(getattr(torch, name)))

    @staticmethod
    def _factory(fn):
        def wrapped(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        wrapped.__name__ = fn.__name__
        return wrapped

    def autocast(self, device_type, *args, **kwargs):
        return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


def _modules() -> list[types.ModuleType] | None:
    """The redirected modules, or None when one of them is gone (the list must be re-based)."""
    try:
        return [importlib.import_module(name) for name in REDIRECTED_MODULES]
    except ImportError:
        return None


def check() -> str:
    """``target-missing`` when a listed module is gone or has no module-global ``torch``;
    ``fixed-upstream`` when none of their sources mentions ``cuda`` any more; else ``needed``."""
    modules = _modules()
    if modules is None or not all(hasattr(m, "torch") for m in modules):
        return "target-missing"
    mentions_cuda = any("cuda" in inspect.getsource(m) for m in modules)
    return "needed" if mentions_cuda else "fixed-upstream"


def applied() -> bool:
    """Whether every listed module sees the proxy."""
    modules = _modules()
    return modules is not None and all(isinstance(m.torch, _TorchProxy) for m in modules)


def apply() -> list[str]:
    """Gives every listed module that still sees the real ``torch`` the proxy; returns those."""
    changed = []
    proxy = _TorchProxy()
    for module in _modules() or ():
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
            changed.append(module.__name__)
    return changed
