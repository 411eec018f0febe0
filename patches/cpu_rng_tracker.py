"""Megatron's RNG tracker (``CudaRNGStatesTracker``) forks CUDA generators: it fails without CUDA.

``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.add`` use ``torch.cuda``'s
generator. On a CPU host the process-wide tracker is replaced by :class:`CpuRNGStatesTracker`
(same interface, forks the CPU generator), seeded the same way by
:func:`model_parallel_cpu_manual_seed` (tensor-parallel, expert and data-parallel streams).
``SCOPE = "cpu"``: the registry applies it only on hosts without CUDA.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect

import torch

NAME = "cpu-rng-tracker"
TARGETS = "megatron-core >=0.16,<0.20"  # defect read in 0.16.1, 0.17.1, 0.18.2, 0.19.2
SCOPE = "cpu"
DESCRIPTION = (
    "Megatron's RNG tracker forks torch.cuda generators (model_parallel_cuda_manual_seed needs "
    "CUDA); install a tracker that forks the CPU generator"
)

_MODULE = "megatron.core.tensor_parallel.random"


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


def _target():
    try:
        module = importlib.import_module(_MODULE)
    except ImportError:
        return None
    cls = getattr(module, "CudaRNGStatesTracker", None)
    if not hasattr(module, "_CUDA_RNG_STATE_TRACKER") or not callable(getattr(cls, "add", None)):
        return None
    return module


def check() -> str:
    """``needed`` while upstream's ``CudaRNGStatesTracker.add`` seeds through ``torch.cuda``,
    ``fixed-upstream`` once it no longer does, ``target-missing`` when the tracker moved."""
    module = _target()
    if module is None:
        return "target-missing"
    return "needed" if "torch.cuda" in inspect.getsource(module.CudaRNGStatesTracker.add) else "fixed-upstream"


def applied() -> bool:
    """Whether the process-wide tracker is a :class:`CpuRNGStatesTracker`."""
    module = _target()
    return module is not None and isinstance(module._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker)


def apply() -> list[str]:
    """Installs a :class:`CpuRNGStatesTracker` as the process-wide tracker (once)."""
    module = _target()
    if module is None or applied():
        return []
    module._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    module._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return [f"{_MODULE}._CUDA_RNG_STATE_TRACKER"]


def model_parallel_cpu_manual_seed(seed: int) -> None:
    """CPU twin of ``model_parallel_cuda_manual_seed``: same stream names and seed offsets.

    Needs the tracker this patch installs (``registry.apply_needed`` on a CPU host) and Megatron's
    parallel state (the TP/EP ranks pick the streams).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    if not applied():
        raise RuntimeError(
            f"model_parallel_cpu_manual_seed needs the {NAME!r} patch: call "
            "megacpp_mcore.patches.registry.apply_needed() on this CPU host first"
        )
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    torch.manual_seed(seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
