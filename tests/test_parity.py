"""TP=2 (+SP), EP=2 and PP=2 (1F1B and interleaved) against one rank: same weights, same batches,
losses and grad norms equal within 1e-5 (2-process gloo runs on CPU)."""

from __future__ import annotations

import pytest

from megacpp_mcore.testing.parity import TINY_DENSE, TINY_MOE, compare_parallel

CASES = {
    "dense-tp2-sp": (TINY_DENSE, {"tp": 2, "sp": True}),
    "moe-tp2-sp": (TINY_MOE, {"tp": 2, "sp": True}),
    "moe-ep2": (TINY_MOE, {"ep": 2}),
    "dense-pp2": (TINY_DENSE, {"pp": 2}),
    "moe-pp2-interleaved": (TINY_MOE, {"pp": 2, "vp": 2}),
}


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_parallel_matches_single_rank(case):
    model, parallel = CASES[case]
    ref, runs = compare_parallel(model, parallel, steps=3, global_batch=4, micro_batch_size=1)
    for run in runs:
        assert run["losses"] == pytest.approx(ref["losses"], abs=1e-5, rel=0)
        assert run["grad_norms"] == pytest.approx(ref["grad_norms"], abs=1e-5, rel=0)
    assert ref["losses"][-1] < ref["losses"][0]
    if "pp" in parallel:  # each stage holds only its own layers
        assert {r["pp_rank"] for r in runs} == {0, 1}
        assert sum(r["local_params"] for r in runs) <= ref["local_params"] + 2 * 128 * 64
