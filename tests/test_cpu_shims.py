"""The CPU shims: idempotent, listed, and never applied on a CUDA host."""

from __future__ import annotations

import torch

from megacpp_mcore.upstream import cpu_shims


def test_apply_is_idempotent_and_reports_changes():
    cpu_shims.apply()
    again = cpu_shims.apply()
    assert set(again) == {shim.name for shim in cpu_shims.SHIMS}
    assert all(changes == [] for changes in again.values())


def test_not_applied_on_cuda_host(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_shims.apply() == {}


def test_redirected_allocation_lands_on_cpu():
    cpu_shims.apply()
    from megatron.core.transformer import utils

    mask = utils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.shape == (4, 4)
    assert bool(mask[0, 1]) and not bool(mask[1, 0])


def test_cpu_rng_tracker_forks_reproducibly(single_rank):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    cpu_shims.model_parallel_cpu_manual_seed(1234)
    with get_cuda_rng_tracker().fork():
        again = torch.rand(3)
    assert torch.equal(first, again)
