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


TINY_DENSE = {
    "pattern": "AE", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
    "ffn_hidden_size": 128, "vocab_size": 128, "seq_length": 32, "moe": None,
}
TINY_MOE = dict(TINY_DENSE, moe={"num_experts": 4, "topk": 2, "ffn_hidden_size": 64,
                                 "shared_expert_size": 64})


@pytest.fixture
def tiny_dense():
    return dict(TINY_DENSE)


@pytest.fixture
def tiny_moe():
    return dict(TINY_MOE)
