"""`megacpp-mcore plan`: table and JSON, analytic parameter counts equal to built modules, bad input."""

from __future__ import annotations

import json

import pytest

from megacpp_mcore.train import runtime
from megacpp_mcore.cli import main
from megacpp_mcore.models.accounting import feedforward_params, flops_per_token, hybrid_flops_per_token
from megacpp_mcore.models.plan import build_plan, format_plan
from megacpp_mcore.models.presets import PRESETS, get_preset
from megacpp_mcore.testing.parity import TINY_DENSE, TINY_MOE, model_from_spec


def test_plan_json_for_nam56r(capsys):
    assert main(["plan", "--preset", "nam56r", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["counts"] == {"A": 13, "E": 22, "M": 13, "R": 4}
    assert len(plan["layers"]) == 52
    assert [layer["index"] for layer in plan["layers"]] == list(range(52))
    assert plan["layers"][0]["symbol"] == "A" and "mla" in plan["layers"][0]["features"]
    assert plan["layers"][2]["features"] == []  # MLA never lands on an M layer
    assert plan["features"]["mla"]["layers"] == [x["index"] for x in plan["layers"] if x["symbol"] == "A"]
    assert plan["parameters"]["features"] == sum(sum(x["feature_parameters"].values()) for x in plan["layers"])
    assert plan["parameters"]["total"] > 1e9 and plan["memory"]["total"] > 0
    # FLOPs per token both ways (tests/test_accounting.py checks them by hand)
    assert plan["flops_per_token"] == {"ours": flops_per_token(get_preset("nam56r"), causal=True)["total"],
                                       "hybrid_flops": hybrid_flops_per_token(get_preset("nam56r"))["total"]}


def test_mtp_block_activations_are_counted_once_per_depth():
    """NAM56R at micro-batch 4: each MTP depth keeps its A and E layers' activations (factors 10
    and 6 + 5 x (4 x 896 + 1024) / 4096 of s x b x h bf16) and its input mixing and final norm
    (5 s x b x h): 26.625 x 128 MiB per depth."""
    m = get_preset("nam56r")
    sbh = 4096 * 4 * 4096 * 2
    per_depth = (10 + 6 + 5 * (4 * 896 + 1024) / 4096 + 5) * sbh
    with_mtp, without = (build_plan(x, micro_batch=4)["memory"] for x in (m, m.replace(mtp_depth=0)))
    assert with_mtp["activations"] - without["activations"] == pytest.approx(2 * per_depth, abs=4)
    # recomputed in backward: each depth keeps 3 s x b x h (its rolled-in embedding, the block's
    # output, the final norm's output) and one depth's activations are rebuilt at a time
    recomputed = build_plan(m, micro_batch=4, mtp_recompute=True)
    assert recomputed["memory"]["activations"] - without["activations"] == pytest.approx(2 * 3 * sbh + per_depth, abs=4)
    assert recomputed["parallel"]["mtp_recompute"] and not build_plan(m)["parallel"]["mtp_recompute"]
    # without MTP the switch changes nothing
    assert build_plan(m.replace(mtp_depth=0), micro_batch=4, mtp_recompute=True)["memory"] == without


def test_plan_cli_mtp_recompute(capsys):
    assert main(["plan", "--preset", "nam56r", "--micro-batch-size", "4", "--dp", "8", "--mtp-recompute"]) == 0
    assert "micro-batch=4 mtp-recompute)" in capsys.readouterr().out.splitlines()[-1]


def test_distributed_optimizer_shards_the_state_over_data_parallel_ranks(capsys):
    """dp > 1: fp32 master + Adam state (12 B/param) of the dense part over dp ranks, of the
    experts over the expert-data-parallel ranks (dp * tp / ep = 1 at dp 8, ep 8): weights and
    grads stay whole."""
    m = get_preset("nam56r")
    one, eight = build_plan(m, ep=8)["memory"], build_plan(m, ep=8, dp=8)["memory"]
    assert (eight["weights"], eight["grads"]) == (one["weights"], one["grads"])
    experts = 23 * 16 * 3 * 4096 * 896 // 8  # 22 E layers + the MTP block's E, 2 of 16 experts per GPU
    dense = one["weights"] // 2 - experts
    assert one["optimizer"] == 12 * (dense + experts) and eight["optimizer"] == 12 * (dense // 8 + experts)
    assert main(["plan", "--preset", "nam56r", "--ep", "8", "--dp", "8"]) == 0
    out = capsys.readouterr().out
    assert "ep=8 dp=8" in out and "training FLOPs per token: ours 29.29 G" in out and "hybrid_flops 35.23 G" in out


def test_plan_table_shows_stages(capsys):
    assert main(["plan", "--preset", "nam56r", "--pp", "4"]) == 0
    out = capsys.readouterr().out
    assert "counts: A=13  E=22  M=13  R=4" in out
    assert "stage 3: layers 39..51" in out


def test_pipeline_split_from_segments(capsys):
    assert main(["plan", "--preset", "nam56r-tiny", "--pattern", "AEME|AEMR", "--num-layers", "8",
                 "--pp", "2", "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert [s["pattern"] for s in stages] == ["AEME", "AEMR"]


@pytest.mark.parametrize("argv,fragment", [
    (["plan", "--preset", "gpt5"], "unknown preset 'gpt5'; known presets: nam56r, nam56r-lite"),
    (["plan", "--pattern", "AEQ"], "unknown symbol 'Q' at position 2"),
    (["plan", "--pattern", "AE|", "--num-layers", "2"], "segment 1 is empty"),
    (["plan", "--preset", "nam56r", "--pp", "5"], "not divisible by pipeline size 5"),
    (["plan", "--pp", "0"], "--pp must be >= 1"),
    (["plan", "--preset", "nam56r", "--ep", "3"], "--ep 3 does not divide the 16 experts; allowed: 1, 2, 4, 8, 16"),
    (["plan", "--preset", "nam56r", "--tp", "5"], "--tp 5 does not divide the 32 attention heads; allowed: 1, 2, 4"),
])
def test_bad_input_is_one_line_and_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_presets_are_valid_and_tiny_is_small():
    assert set(PRESETS) >= {"nam56r", "nam56r-lite", "nam56r-tiny"}
    nam = get_preset("nam56r")
    assert (nam.num_layers, nam.hidden_size, nam.num_attention_heads, nam.vocab_size) == (52, 4096, 32, 131072)
    assert (nam.moe.num_experts, nam.moe.topk, nam.mtp_depth) == (16, 4, 2) and nam.mla is not None
    assert build_plan(get_preset("nam56r-tiny"))["parameters"]["total"] < 10e6


@pytest.mark.parametrize("spec", [TINY_DENSE, TINY_MOE], ids=["dense", "moe"])
def test_analytic_counts_equal_built_modules(spec, single_rank):
    model = model_from_spec(spec)
    plan = build_plan(model, backend="local")
    (chunk,) = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                   backend="local", wrap_ddp=False)
    for layer, built in zip(plan["layers"], chunk.decoder.layers):
        assert layer["parameters"] == sum(p.numel() for p in built.parameters()), layer
    assert plan["parameters"]["total"] == sum(p.numel() for p in chunk.parameters())
    if model.moe is not None:
        assert plan["layers"][1]["parameters"] == feedforward_params(model)


def _featured_model():
    """TINY_MOE (``AE`` x 6, h=64) with MoD on layers 1, 2 and FlexiDepth (rank 8) on 4, 5."""
    from megacpp_mcore.features.flexidepth import FlexiDepthConfig
    from megacpp_mcore.features.mod import MoDConfig
    from megacpp_mcore.spec.pattern import FeaturePlacement

    return model_from_spec(TINY_MOE).replace(num_layers=6, features={
        "mod": MoDConfig(placement=FeaturePlacement(layers=(1, 2))),
        "flexidepth": FlexiDepthConfig(placement=FeaturePlacement(layers=(4, 5)), adapter_rank=8),
    })


def test_plan_names_the_feature_layers_and_their_parameters():
    model = _featured_model()
    plan = build_plan(model, backend="local")
    h = model.hidden_size
    # MoD's router Linear(h, 1): weight [1, h] + bias [1]; FlexiDepth: norm h, router h + 1,
    # adapter down [8, h] + up [h, 8]
    mod, flexi = h + 1, h + (h + 1) + 2 * h * 8
    assert [layer["features"] for layer in plan["layers"]] == [[], ["mod"], ["mod"], [], ["flexidepth"], ["flexidepth"]]
    assert [layer["feature_parameters"] for layer in plan["layers"]] == [
        {}, {"mod": mod}, {"mod": mod}, {}, {"flexidepth": flexi}, {"flexidepth": flexi}]
    assert plan["features"] == {
        "flexidepth": {"layers": [4, 5], "parameters": 2 * flexi, "config": None},
        "mod": {"layers": [1, 2], "parameters": 2 * mod,
                "config": "gateskip, budget 1.0 -> 0.8 over 1000 steps"}}
    dense = build_plan(model.replace(features={}), backend="local")
    assert plan["parameters"]["features"] == 2 * mod + 2 * flexi and dense["parameters"]["features"] == 0
    assert plan["parameters"]["total"] - dense["parameters"]["total"] == 2 * mod + 2 * flexi
    assert plan["stages"][0]["parameters"] - dense["stages"][0]["parameters"] == 2 * mod + 2 * flexi
    rows = format_plan(plan).splitlines()
    assert [r.split()[-1] for r in rows[3:9]] == ["-", f"mod(+{mod})", f"mod(+{mod})", "-",
                                                  "flexidepth(+1.15K)", "flexidepth(+1.15K)"]
    assert "  mod: 2 layers (1,2), +130 params; gateskip, budget 1.0 -> 0.8 over 1000 steps" in rows and "  flexidepth: 2 layers (4,5), +2.31K params" in rows


def test_feature_counts_equal_the_built_model(single_rank):
    """Every layer's count (MoD router, FlexiDepth norm/router/adapter included), the total, and the
    FLOPs' matmul weights (routers and adapters: every token passes them) equal the built modules."""
    from megacpp_mcore.models.accounting import flops_per_token

    model = _featured_model()
    plan = build_plan(model, backend="local")
    (chunk,) = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                   backend="local", wrap_ddp=False)
    for layer, built in zip(plan["layers"], chunk.decoder.layers, strict=True):
        assert layer["parameters"] == sum(p.numel() for p in built.parameters()), layer
    assert plan["parameters"]["total"] == sum(p.numel() for p in chunk.parameters())
    router = chunk.decoder.layers[1].mod_router  # the MoD router, by hand: [1, 64] weight + [1] bias
    assert (router.weight.shape, router.bias.shape) == ((1, 64), (1,))
    assert plan["layers"][1]["feature_parameters"] == {"mod": 65}
    active = tuple(f"local_experts.{i}." for i in range(model.moe.topk))
    matmul = sum(p.numel() for n, p in chunk.named_parameters()
                 if p.dim() == 2 and "embedding" not in n
                 and ("local_experts." not in n or any(a in n for a in active)))
    assert flops_per_token(model)["active_params"] == matmul
