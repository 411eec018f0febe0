"""Shared fixtures: a one-rank gloo world with Megatron parallel state, and tiny model specs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def single_rank():
    """A 1-rank world (gloo on CPU) with TP=PP=EP=1 and seed 1234; torn down afterwards."""
    from megacpp_mcore import runtime

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
