"""The CPU shims: the small, known set of changes that let megatron-core 0.16 run on CPU with gloo.

This is the only module (besides ``patches/``) that monkeypatches upstream. It is applied explicitly
by :func:`apply` (the runtime and the test harness call it), only when no CUDA device exists, and
never on a GPU host. Every shim is listed in :data:`SHIMS` with the upstream versions it targets;
:func:`apply` is idempotent and returns what it changed.

What the shims do:

* ``cuda-device-redirect``: several megatron modules allocate with ``device="cuda"`` or
  ``torch.cuda.current_device()`` (global memory buffer, rotary embedding, causal mask, pipeline
  schedules and p2p, grad buffers, clip_grads, MoE experts/router) and call
  ``torch.cuda.synchronize()``. In exactly those modules the module-global ``torch`` is replaced by a
  proxy whose tensor factories map a CUDA device to CPU and whose ``torch.cuda`` answers "cpu" and
  no-ops synchronisation. Nothing outside those modules sees the proxy.
* ``cpu-rng-tracker``: ``model_parallel_cuda_manual_seed`` asserts CUDA; the tracker is replaced by
  one that forks the CPU generator, seeded the same way (tensor-parallel, expert and data-parallel
  streams), see :func:`model_parallel_cpu_manual_seed`.
* ``clip-grads-cpu``: ``clip_grad_by_total_norm_fp32`` asserts a ``torch.cuda.FloatTensor`` grad.
* ``moe-router-gemm-name``: without TE, ``moe_utils.te_general_gemm`` is never defined and the
  router's gating linear raises ``NameError``; it is defined as ``None`` (torch matmul path).
* ``tied-embedding-cpu-copy``: with tied embeddings and PP > 1 the last stage's embedding copy is
  moved with ``.cuda()`` before its first all-reduce; on CPU it stays put.
* ``transformer-block-norm``: with neither TE nor apex, the final norm of a spec fanned out from a
  single layer class is ``WrappedTorchNorm``, which refuses sequence parallelism; it becomes
  :class:`~megacpp_mcore.layers.norms.LocalNorm`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import types
from typing import Callable

import torch

SUPPORTED_MCORE = ("0.16.",)

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


class _CudaNamespaceProxy(types.SimpleNamespace):
    """``torch.cuda`` as seen by a shimmed module on a CPU host."""

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


class _NullStream:
    def wait_stream(self, *_):
        return None

    def synchronize(self):
        return None


class _TorchProxy(types.ModuleType):
    """``torch`` as seen by a shimmed module: CUDA allocations land on CPU."""

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


# Modules whose global ``torch`` is replaced (megatron-core 0.16.x).
REDIRECTED_MODULES = (
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
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


@dataclasses.dataclass(frozen=True)
class Shim:
    name: str
    targets: str  # upstream versions
    apply: Callable[[], list[str]]


def _redirect_cuda() -> list[str]:
    changed = []
    proxy = _TorchProxy()
    for name in REDIRECTED_MODULES:
        module = importlib.import_module(name)
        if isinstance(getattr(module, "torch", None), _TorchProxy):
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = proxy
            changed.append(name)
    return changed


class CpuRNGStatesTracker:
    """A CPU stand-in for Megatron's ``CudaRNGStatesTracker`` (same interface, CPU generator)."""

    def __init__(self, *_, **__):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"rng state {name!r} or seed {seed} already added")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name!r} was not added; call model_parallel_cpu_manual_seed")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _install_cpu_rng_tracker() -> list[str]:
    from megatron.core.tensor_parallel import random as mrandom

    if isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        return []
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return ["megatron.core.tensor_parallel.random._CUDA_RNG_STATE_TRACKER"]


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU version of ``clip_grad_by_total_norm_fp32``: scale every grad by the clip coefficient."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for param in parameters:
            grad = param.decoupled_grad if use_decoupled_grad else param.grad
            if grad is not None:
                grad.detach().mul_(clip_coeff)


def _clip_grads() -> list[str]:
    changed = []
    for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        module = importlib.import_module(name)
        if getattr(module, "clip_grad_by_total_norm_fp32", None) is not _clip_grad_by_total_norm_cpu:
            module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
            changed.append(f"{name}.clip_grad_by_total_norm_fp32")
    return changed


def _block_norm() -> list[str]:
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megacpp_mcore.layers.norms import LocalNorm

    if transformer_block.LayerNormImpl is WrappedTorchNorm:
        transformer_block.LayerNormImpl = LocalNorm
        return ["megatron.core.transformer.transformer_block.LayerNormImpl"]
    return []


def _moe_gemm_name() -> list[str]:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # the router then uses torch matmul
        return ["megatron.core.transformer.moe.moe_utils.te_general_gemm = None"]
    return []


def _tied_embedding_setup() -> list[str]:
    """With tied embeddings and PP > 1, ``LanguageModule.setup_embeddings_and_output_layer`` moves
    the stage's embedding copy with ``weight.data.cuda()`` before all-reducing it over the embedding
    group; on CPU that copy stays where it is (``Tensor.cuda`` is the identity during the call)."""
    from megatron.core.models.common.language_module import language_module

    cls = language_module.LanguageModule
    original = cls.setup_embeddings_and_output_layer
    if getattr(original, "_megacpp_cpu_shim", False):
        return []

    def setup_embeddings_and_output_layer(self):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *_, **__: tensor
        try:
            return original(self)
        finally:
            torch.Tensor.cuda = cuda

    setup_embeddings_and_output_layer._megacpp_cpu_shim = True
    cls.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer
    return ["megatron.core.models.common.language_module.LanguageModule.setup_embeddings_and_output_layer"]


SHIMS = (
    Shim("cuda-device-redirect", "megatron-core 0.16.x", _redirect_cuda),
    Shim("cpu-rng-tracker", "megatron-core 0.16.x", _install_cpu_rng_tracker),
    Shim("clip-grads-cpu", "megatron-core 0.16.x", _clip_grads),
    Shim("transformer-block-norm", "megatron-core 0.16.x", _block_norm),
    Shim("moe-router-gemm-name", "megatron-core 0.16.x", _moe_gemm_name),
    Shim("tied-embedding-cpu-copy", "megatron-core 0.16.x", _tied_embedding_setup),
)


def needed() -> bool:
    """Shims apply only on a host without CUDA."""
    return not torch.cuda.is_available()


def apply() -> dict[str, list[str]]:
    """Applies every shim once (no-op on CUDA hosts); returns ``{shim: [what changed]}``."""
    if not needed():
        return {}
    import megatron.core

    version = megatron.core.__version__
    if not version.startswith(SUPPORTED_MCORE):
        raise RuntimeError(
            f"megacpp_mcore CPU shims target megatron-core {', '.join(v + 'x' for v in SUPPORTED_MCORE)}; "
            f"installed: {version}. Review megacpp_mcore/upstream/cpu_shims.py before running on CPU."
        )
    return {shim.name: shim.apply() for shim in SHIMS}


def model_parallel_cpu_manual_seed(seed: int) -> None:
    """CPU twin of ``model_parallel_cuda_manual_seed``: same stream names and seed offsets."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    apply()
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    torch.manual_seed(seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
