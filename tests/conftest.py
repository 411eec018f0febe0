"""Shared fixtures: a one-rank gloo world with Megatron parallel state, and tiny model specs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """GPU hosts whose mamba_ssm lacks the Mamba-1 CUDA extension still import the Mamba-2
    kernels (see megacpp_mcore.testing.stub_mamba1_extension); before any backend detection."""
    import torch

    if torch.cuda.is_available():
        from megacpp_mcore.testing import stub_mamba1_extension

        stub_mamba1_extension()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``triton`` skip where triton is not installed (torch's CPU wheel lacks it)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        skip = pytest.mark.skip(reason="triton is not installed here (the kernel runs under TRITON_INTERPRET=1 when it is)")
        for item in items:
            if item.get_closest_marker("triton") is not None:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_upstream_aux_loss_scale():
    """Megatron keeps the MoE aux-loss backward scale in class attributes: a backward outside
    a schedule stores a 0-d tensor there and a later schedule's ``copy_`` of a [1] tensor fails.
    Each test starts from upstream's initial state (``None``)."""
    yield
    import sys

    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None


@pytest.fixture
def single_rank():
    """A 1-rank world (gloo on CPU) with TP=PP=EP=1 and seed 1234; torn down afterwards."""
    from megacpp_mcore.train import runtime

    runtime.initialize(runtime.Parallelism(), seed=1234)
    yield
    runtime.shutdown()


from megacpp_mcore.testing.parity import TINY_DENSE, TINY_MOE  # noqa: E402


@pytest.fixture
def tiny_dense():
    return dict(TINY_DENSE)


@pytest.fixture
def tiny_moe():
    return dict(TINY_MOE)
