"""CUDA-graph capture the way Megatron-Core does it (``full_cuda_graph.FullCudaGraphWrapper``).

TE's attention forks Megatron's RNG tracker and its fused kernels advance the Philox offset even at
dropout 0. With ``use_cudagraphable_rng=True`` the tracker's states are graph-safe generators, but a
generator used during capture must also be REGISTERED with the graph (``register_generator_state``);
otherwise PyTorch raises "Attempt to increase offset for a CUDA generator not in capture mode".
"""

from __future__ import annotations

from typing import Callable

import torch


def capture(fn: Callable[[], torch.Tensor], *, warmup: int = 3):
    """Warms ``fn`` up on a side stream, captures it and returns ``(graph, static_output)``.

    Needs ``tensor_parallel.model_parallel_cuda_manual_seed(..., use_cudagraphable_rng=True,
    force_reset_rng=True)`` before the captured modules are built.
    """
    from megatron.core.tensor_parallel.random import get_all_rng_states

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    for name, state in get_all_rng_states().items():
        if not isinstance(state, torch.Generator):
            raise RuntimeError(
                f"RNG tracker state {name!r} is not graph-safe; call tensor_parallel."
                "model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=True, "
                "force_reset_rng=True) before building the modules to capture")
        graph.register_generator_state(state)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out
