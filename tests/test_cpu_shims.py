"""The CPU shims: registry entries of scope ``cpu`` (patches/cpu_*.py), versioned by TARGETS,
idempotent, and never applied on a CUDA host.

Tests that apply the shims skip on a CUDA host (applying them there would break the process); the
scope tests run on both kinds of host.
"""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

import megacpp_mcore.patches as patches
from megacpp_mcore.patches import cpu_rng_tracker, registry

CPU_NAMES = {"cpu-device-redirect", "cpu-rng-tracker", "cpu-clip-grads", "cpu-block-norm",
             "cpu-moe-router-gemm", "cpu-tied-embedding-copy"}

applies_cpu_shims = pytest.mark.skipif(
    torch.cuda.is_available(), reason="applies the CPU shims, which are never applied on a CUDA host")


def _cpu_modules():
    return [m for m in registry.registered() if registry.scope_of(m) == "cpu"]


# Every megatron-core release the package supports (pyproject: 0.16.1 on Python 3.11, 0.17 - 0.19).
SUPPORTED = ("0.16.1", "0.17.1", "0.18.2", "0.19.2")


def test_cpu_shims_are_registry_entries_gated_by_targets():
    """TARGETS cover every supported release up to the one that fixed the defect (FIXED_IN, read
    from each wheel), and nothing beyond: a release after 0.19 is to be verified first."""
    from test_patches import FIXED_IN

    modules = _cpu_modules()
    assert {m.NAME for m in modules} == CPU_NAMES
    assert all(m.__name__.startswith("megacpp_mcore.patches.cpu_") for m in modules)
    assert all(m.__name__ in patches.REGISTRY for m in modules)
    for module in modules:
        requirement = registry.parse_targets(module.TARGETS)
        assert requirement.name == "megatron-core"
        fixed = FIXED_IN[module.NAME]
        covered = [v for v in SUPPORTED if requirement.specifier.contains(v)]
        assert covered == [v for v in SUPPORTED if fixed is None or Version(v) < Version(fixed)], module.NAME
        assert not requirement.specifier.contains("0.20.0")


def test_scope_cpu_is_never_applied_on_a_cuda_host(monkeypatch):
    rows = {r.name: r for r in registry.status(host="cuda")}
    for name in CPU_NAMES:
        assert (rows[name].scope, rows[name].check, rows[name].action) == ("cpu", "not-applicable", "n/a")
        assert rows[name].note == "scope cpu: never applied on a cuda host"
    assert registry.apply_needed(sorted(CPU_NAMES), host="cuda") == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert registry.current_host() == "cuda"
    assert registry.apply_needed(sorted(CPU_NAMES)) == {}  # the default host is this process's


def test_status_of_cpu_shims_on_a_cpu_host():
    """The checks only read upstream's code, so the CPU status can be taken on any host."""
    import megatron.core

    from test_patches import expected_check

    rows = {r.name: r for r in registry.status(sorted(CPU_NAMES), host="cpu")}
    for name in CPU_NAMES:
        row, expected = rows[name], expected_check(name)  # cpu-moe-router-gemm: fixed in 0.17
        assert (row.scope, row.check, row.in_targets) == ("cpu", expected, expected == "needed")
        assert row.action == {"needed": "keep", "fixed-upstream": "retire"}[expected]
        assert row.installed == Version(megatron.core.__version__).public and row.note == ""


@applies_cpu_shims
def test_apply_is_idempotent_and_reports_changes():
    from test_patches import needed_here

    needed = needed_here(*CPU_NAMES)  # all six on 0.16; cpu-moe-router-gemm retires from 0.17
    registry.apply_needed(sorted(CPU_NAMES), host="cpu")
    again = registry.apply_needed(sorted(CPU_NAMES), host="cpu")
    assert again == {name: [] for name in needed}
    rows = registry.status(sorted(CPU_NAMES), host="cpu")
    assert all(row.applied == (row.name in needed) for row in rows), rows


@applies_cpu_shims
def test_redirected_allocation_lands_on_cpu():
    registry.apply_needed(["cpu-device-redirect"], host="cpu")
    from megatron.core.transformer import utils

    mask = utils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.shape == (4, 4)
    assert bool(mask[0, 1]) and not bool(mask[1, 0])


@applies_cpu_shims
def test_clip_grads_scale_cpu_grads_by_the_clip_coefficient():
    registry.apply_needed(["cpu-clip-grads"], host="cpu")
    from megatron.core.optimizer import clip_grads, optimizer

    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    for p in params:
        p.grad = torch.full((3,), 2.0)
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=4.0)
    expected = 2.0 * 1.0 / (4.0 + 1.0e-6)
    assert all(torch.allclose(p.grad, torch.full((3,), expected)) for p in params)
    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=10.0, total_norm=4.0)  # below max: kept
    assert all(torch.allclose(p.grad, torch.full((3,), expected)) for p in params)


def test_simulated_upstream_fix_retires_a_cpu_shim(monkeypatch):
    """A retired (fixed-upstream) entry is never applied, even on a CPU host."""
    from megatron.core.optimizer import clip_grads

    def fixed(parameters, max_norm, total_norm, use_decoupled_grad=False):  # no CUDA assertion
        return None

    monkeypatch.setattr(clip_grads, "clip_grad_by_total_norm_fp32", fixed)
    row = registry.status(["cpu-clip-grads"], host="cpu")[0]
    assert (row.check, row.action) == ("fixed-upstream", "retire")
    assert registry.apply_needed(["cpu-clip-grads"], host="cpu") == {}
    assert clip_grads.clip_grad_by_total_norm_fp32 is fixed


def test_missing_target_says_re_base(monkeypatch):
    from megatron.core.models.common.language_module import language_module

    monkeypatch.delattr(language_module.LanguageModule, "setup_embeddings_and_output_layer")
    row = registry.status(["cpu-tied-embedding-copy"], host="cpu")[0]
    assert (row.check, row.action) == ("target-missing", "re-base")
    assert registry.apply_needed(["cpu-tied-embedding-copy"], host="cpu") == {}


def test_seed_helper_refuses_without_the_tracker(monkeypatch):
    from megatron.core.tensor_parallel import random as mrandom

    monkeypatch.setattr(mrandom, "_CUDA_RNG_STATE_TRACKER", None)
    with pytest.raises(RuntimeError, match="needs the 'cpu-rng-tracker' patch"):
        cpu_rng_tracker.model_parallel_cpu_manual_seed(1234)


@applies_cpu_shims
def test_cpu_rng_tracker_forks_reproducibly(single_rank):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_rng_tracker.CpuRNGStatesTracker)
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    cpu_rng_tracker.model_parallel_cpu_manual_seed(1234)
    with get_cuda_rng_tracker().fork():
        again = torch.rand(3)
    assert torch.equal(first, again)
