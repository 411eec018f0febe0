"""FlexiDepth under a Megatron-LM training loop: its statistics reach the MoE metrics tracker that
``training_log`` reports (with the registry's patch on 0.18+), as MoD's do (tests/test_mod_shipped.py)."""

from __future__ import annotations

import types

import pytest
import torch

from megacpp_mcore.features.flexidepth import FlexiDepthConfig
from megacpp_mcore.models.presets import custom_model
from megacpp_mcore.spec.pattern import FeaturePlacement
from test_mod_shipped import (  # noqa: F401  (fixtures)
    _BASE,
    _moe,
    megatron_args,
    megatron_schedule,
    restore_metrics_patch,
    shown_in_training_log,
)


def _run(n: int, megatron_args, *, loop_driven: bool = False):
    """FlexiDepth on every layer of an AE x 2 MoE model, ``n`` micro-batches of Megatron-LM's
    iteration 3 through Megatron's schedule; the layers' own means."""
    from megacpp_mcore.spec import compat
    from megacpp_mcore.train import runtime

    compat.reset_moe_metrics()
    megatron_args.args = types.SimpleNamespace(curr_iteration=3, train_iters=10)
    fd = FlexiDepthConfig(usage_loss_weight=0.5, placement=FeaturePlacement(symbols="AE"))
    model = custom_model(**_BASE, moe=_moe(), features={"flexidepth": fd})
    (chunk,) = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                   backend="local", wrap_ddp=False)
    layers = [m for m in chunk.decoder.layers if hasattr(m, "force_route")]
    assert len(layers) == 4
    for i, layer in enumerate(layers):  # router scores around 0.5: some tokens skip
        for p in layer.flexidepth.router.parameters():
            with torch.no_grad():
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(i))
        layer.megacpp_set_step(0) if loop_driven else None
    megatron_schedule(chunk, n)
    per_layer = [layer.megacpp_stats() for layer in layers]
    return {"skip_rate": sum(s["skip_rate"] for s in per_layer) / len(per_layer),
            "score_mean": sum(s["score_mean"] for s in per_layer) / len(per_layer),
            "loss_usage": sum(s.get("loss_usage", 0.0) for s in per_layer)}


def test_flexidepth_stats_reach_training_log(single_rank, restore_metrics_patch, megatron_args):
    from megacpp_mcore.patches import layer_metrics_in_moe_report as patch

    patch.apply()
    expected = _run(2, megatron_args)
    shown, _, _ = shown_in_training_log(num_layers=4, num_microbatches=2)
    assert 0 < expected["skip_rate"] < 1 and expected["loss_usage"] > 0
    assert shown["flexidepth_skip_rate"] == pytest.approx(expected["skip_rate"], rel=1e-5)
    assert shown["flexidepth_score_mean"] == pytest.approx(expected["score_mean"], rel=1e-5)
    assert shown["flexidepth_usage_loss"] == pytest.approx(expected["loss_usage"], rel=1e-5)


def test_our_loop_keeps_flexidepth_out_of_the_tracker(single_rank, megatron_args):
    """Our own loop reads the layers' hooks; its forwards record nothing in Megatron's tracker."""
    _run(1, megatron_args, loop_driven=True)
    from test_mod_shipped import _tracked_names

    assert not any(name.startswith("flexidepth_") for name in _tracked_names())
