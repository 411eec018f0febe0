"""hybrid_block_spec: lazy per-layer resolution, A/E layers on GPTModel, training, build-time errors."""

from __future__ import annotations


import pytest
import torch

from megacpp_mcore.train import runtime
from megacpp_mcore.spec.backends import BackendUnavailable
from megacpp_mcore.spec.block import HybridLayer, hybrid_block_spec
from megacpp_mcore.spec.pattern import PatternError
from megacpp_mcore.testing.parity import model_from_spec, synthetic_batches


def _gpt(spec, num_layers=4, vocab=128, **overrides):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=num_layers, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                  normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
                  use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab,
                    max_sequence_length=32, position_embedding_type="rope")


def _kinds(model):
    out = []
    for layer in model.decoder.layers:
        attn = type(layer.self_attention).__name__
        mlp = type(layer.mlp).__name__
        out.append("A" if attn != "IdentityOp" and mlp == "IdentityOp" else
                   "E" if attn == "IdentityOp" and mlp != "IdentityOp" else "?")
    return "".join(out)


def test_spec_resolves_lazily_from_the_config_depth(single_rank):
    spec = hybrid_block_spec("AEE", backend="local")
    assert spec.module is HybridLayer
    assert _kinds(_gpt(spec, num_layers=4)) == "AEEA"
    assert _kinds(_gpt(spec, num_layers=6)) == "AEEAEE"


def test_parameter_names_follow_upstream_layers(single_rank):
    names = {n for n, _ in _gpt(hybrid_block_spec("AE", backend="local")).named_parameters()}
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in names
    assert "decoder.layers.0.input_layernorm.weight" in names
    assert "decoder.layers.1.mlp.linear_fc1.weight" in names
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in names
    assert not any(n.startswith("decoder.layers.0.mlp") for n in names)


def test_moe_e_layers_when_config_has_experts(single_rank):
    model = _gpt(hybrid_block_spec("AE", backend="local"), num_moe_experts=4, moe_router_topk=2,
                 moe_ffn_hidden_size=32, moe_token_dispatcher_type="allgather")
    assert type(model.decoder.layers[1].mlp).__name__ == "MoELayer"
    assert type(model.decoder.layers[0].self_attention).__name__ == "SelfAttention"


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_ae_model_trains_on_cpu(moe, tiny_dense, tiny_moe, single_rank):
    model = model_from_spec(tiny_moe if moe else tiny_dense)
    par = runtime.Parallelism()
    chunks = runtime.build_model(model, runtime.transformer_config(model, par), backend="local")
    optimizer = runtime.build_optimizer(chunks, lr=3e-3)
    losses = []
    for step in range(6):
        micro = synthetic_batches(seed=0, step=step % 2, global_batch=4, seq_length=model.seq_length,
                                  vocab=model.vocab_size, dp_rank=0, dp=1, micro_batch_size=2)
        out = runtime.train_step(chunks, optimizer, iter(micro), num_microbatches=2,
                                 micro_batch_size=2, seq_length=model.seq_length)
        losses.append(out["loss"])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3, losses


def test_layer_specs_objects_load_through_megatron_import_module(single_rank):
    from megatron.core.transformer.spec_utils import import_module

    spec = import_module(("layer_specs.nam56r", "AE"))
    assert _kinds(_gpt(spec, num_layers=4)) == "AEAE"
    for attr in ("NAM56R", "NAM56R_DENSE_ATTENTION"):
        obj = import_module(("layer_specs.nam56r", attr))
        assert obj.module is HybridLayer and obj.submodules.pattern == "AEMEAEMEAEMR"


def test_unknown_feature_is_refused():
    with pytest.raises(ValueError, match="unknown feature 'wings'"):
        hybrid_block_spec("AE", wings=object())


def test_bad_pattern_is_refused_when_the_spec_is_made():
    with pytest.raises(PatternError, match="'x' at position 1"):
        hybrid_block_spec("Ax")


def test_declared_depth_must_match_the_config(single_rank):
    spec = hybrid_block_spec("AE", backend="local", num_layers=6)
    with pytest.raises(PatternError, match="declared for 6 layers but the model config has num_layers=4"):
        _gpt(spec, num_layers=4)


def test_segments_must_match_the_pipeline(single_rank):
    with pytest.raises(PatternError, match="defines 2 pipeline stages, but the model runs with "
                                           "pipeline_model_parallel_size=1"):
        _gpt(hybrid_block_spec("AE|AE", backend="local"), num_layers=4)


def test_unavailable_backend_fails_at_build_not_forward(single_rank):
    from megacpp_mcore.spec.backends import override_detection

    with override_detection(te=None, cuda=False):
        with pytest.raises(BackendUnavailable, match="backend 'te' is not usable here"):
            _gpt(hybrid_block_spec("AE", backend="te"))


def test_pipeline_split_kwargs_follow_segments():
    from megacpp_mcore.spec.block import pipeline_split_kwargs

    assert pipeline_split_kwargs("AE", 8) == {}
    assert pipeline_split_kwargs("AEA|EAE|AE", 8) == {
        "pipeline_model_parallel_size": 3, "num_layers_in_last_pipeline_stage": 2}
    assert pipeline_split_kwargs("A|EAE", 4) == {
        "pipeline_model_parallel_size": 2, "num_layers_in_first_pipeline_stage": 1,
        "num_layers_in_last_pipeline_stage": 3}
    with pytest.raises(PatternError, match="middle stages"):
        pipeline_split_kwargs("A|EA|E|A", 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with Transformer Engine")
def test_te_backend_builds_te_modules_and_trains(single_rank):
    spec = hybrid_block_spec("AE", backend="te")
    model = _gpt(spec, num_layers=4, use_cpu_initialization=False, bf16=True,
                 params_dtype=torch.bfloat16).cuda()
    layer_a, layer_e = model.decoder.layers[0], model.decoder.layers[1]
    assert type(layer_a.self_attention.linear_qkv).__name__ == "TELayerNormColumnParallelLinear"
    assert type(layer_a.self_attention.core_attention).__name__ == "TEDotProductAttention"
    assert type(layer_e.mlp.linear_fc1).__name__ == "TELayerNormColumnParallelLinear"
    tokens = torch.randint(0, 128, (2, 32), device="cuda")
    pos = torch.arange(32, device="cuda").unsqueeze(0).expand(2, -1)
    loss = model(tokens, pos, None, labels=tokens)
    loss.float().mean().backward()
    assert torch.isfinite(loss.float()).all()
