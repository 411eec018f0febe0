"""The shared MTP block under a Megatron-LM training loop: each depth's cross entropy reaches the
MoE metrics tracker that ``training_log`` reports (with the registry's patch on 0.18+), as MoD's
and FlexiDepth's statistics do (tests/test_mod_shipped.py, tests/test_flexidepth_megatron.py)."""

from __future__ import annotations

import types

import pytest

from megacpp_mcore.models.presets import custom_model
from test_mod_shipped import (  # noqa: F401  (fixtures)
    _BASE,
    _moe,
    _tracked_names,
    megatron_args,
    megatron_schedule,
    restore_metrics_patch,
    shown_in_training_log,
)


def _run(n: int, megatron_args, *, loop_driven: bool = False) -> dict[str, float]:
    """An AE x 2 MoE model with shared MTP depth 2, ``n`` micro-batches of Megatron-LM's iteration
    3 through Megatron's schedule; the block's own per-depth means."""
    from megacpp_mcore.spec import compat
    from megacpp_mcore.train import runtime

    compat.reset_moe_metrics()
    megatron_args.args = types.SimpleNamespace(curr_iteration=3, train_iters=10)
    model = custom_model(**{**_BASE, "mtp_depth": 2}, moe=_moe())
    (chunk,) = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                   backend="local", wrap_ddp=False)
    if loop_driven:
        chunk.mtp_block.megacpp_set_step(0)
    megatron_schedule(chunk, n)
    return chunk.mtp_block.megacpp_stats()


def test_mtp_depth_losses_reach_training_log(single_rank, restore_metrics_patch, megatron_args):
    from megacpp_mcore.patches import layer_metrics_in_moe_report as patch

    patch.apply()
    expected = _run(2, megatron_args)
    shown, _, _ = shown_in_training_log(num_layers=4, num_microbatches=2)
    assert set(expected) == {"loss", "loss_depth1", "loss_depth2"}
    assert expected["loss_depth1"] > 1.0  # an untrained model's CE over 128 ids (~ln 128)
    assert shown["mtp_depth1_loss"] == pytest.approx(expected["loss_depth1"], rel=1e-5)
    assert shown["mtp_depth2_loss"] == pytest.approx(expected["loss_depth2"], rel=1e-5)
    assert "mtp_depth3_loss" not in shown


def test_our_loop_keeps_mtp_out_of_the_tracker(single_rank, megatron_args):
    """Our own loop reads the block's hooks; its forwards record nothing in Megatron's tracker."""
    assert _run(1, megatron_args, loop_driven=True)["loss_depth1"] > 0
    assert not any(name.startswith("mtp_") for name in _tracked_names())
