"""`megacpp-mcore plan`: table and JSON, analytic parameter counts equal to built modules, bad input."""

from __future__ import annotations

import json

import pytest

from megacpp_mcore.train import runtime
from megacpp_mcore.cli import main
from megacpp_mcore.models.accounting import feedforward_params
from megacpp_mcore.models.plan import build_plan
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
    assert plan["parameters"]["total"] > 1e9 and plan["memory"]["total"] > 0


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
