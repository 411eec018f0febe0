"""hybrid_block_spec: lazy per-layer resolution, A/E layers on GPTModel, training, build-time errors."""

from __future__ import annotations


import pytest
import torch

from megacpp_mcore.train import runtime
from megacpp_mcore.spec.backends import BackendUnavailable
from megacpp_mcore.spec.block import HybridLayer, checkpoint_config_kwargs, hybrid_block_spec
from megacpp_mcore.spec.pattern import PatternError
from megacpp_mcore.testing.parity import model_from_spec, synthetic_batches

MLA_DIMS = {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_head_dim": 16, "qk_pos_emb_head_dim": 8,
            "v_head_dim": 16}


def _config(spec, num_layers=4, **overrides):
    """A hand-made config; like every model builder, it asks ``checkpoint_config_kwargs`` for the
    checkpoint layout of a mixed stack."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=num_layers, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                  normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
                  use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    kwargs.update(checkpoint_config_kwargs(spec, num_layers))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _gpt(spec, num_layers=4, vocab=128, config=None, **overrides):
    from megatron.core.models.gpt import GPTModel

    config = config or _config(spec, num_layers, **overrides)
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
    assert type(model.decoder.layers[1].mlp).__name__ == "DeviceCountsMoELayer"
    assert type(model.decoder.layers[0].self_attention).__name__ == "SelfAttention"


def test_moe_layers_take_the_process_groups_the_model_is_built_with(single_rank, caplog):
    """The trunk's E layers and the MTP block's build their MoE on the model's ``pg_collection``
    (to 0.17 upstream's TransformerLayer hands it only to its own MoE class, by identity, and warns
    "Unknown MLP type" for a subclass), and no such warning is printed."""
    import logging

    from megatron.core.models.gpt import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from megacpp_mcore.features.mtp.block import shared_block_spec

    pg = ProcessGroupCollection.use_mpu_process_groups()
    pg.ep = torch.distributed.new_group([0])  # a group of its own: not the one parallel_state holds
    spec = hybrid_block_spec("AE", backend="local")
    config = _config(spec, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                     moe_token_dispatcher_type="allgather")
    with caplog.at_level(logging.WARNING):
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=128,
                         max_sequence_length=32, position_embedding_type="rope", pg_collection=pg)
        block = build_module(shared_block_spec(config, backend="local"), config=config, pg_collection=pg)
    for moe in (model.decoder.layers[1].mlp, block.feedforward.mlp):
        assert type(moe).__name__ == "DeviceCountsMoELayer"
        assert moe.ep_group is pg.ep
    assert "Unknown MLP type" not in caplog.text


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


def test_mixed_stack_needs_per_layer_checkpoint_keys_and_building_writes_no_config(single_rank):
    """A stack of mixed layer kinds needs ``hetereogenous_dist_checkpoint``: our builders set it up
    front, so building writes nothing to their config; a config without it (stock pretrain_gpt.py,
    which has no flag for it) gets it set on that model's config, with a warning."""
    from megacpp_mcore.spec import compat

    field = compat.HETEROGENEOUS_CHECKPOINT_FIELD
    mixed, plain = hybrid_block_spec("AE", backend="local"), hybrid_block_spec("A", backend="local")
    assert checkpoint_config_kwargs(mixed, 4) == {field: True}
    assert checkpoint_config_kwargs(plain, 4) == {}
    bare = _config(mixed, **{field: False})
    with pytest.warns(UserWarning, match=f"mixes layer kinds.*{field}=True"):
        _gpt(mixed, config=bare)
    assert getattr(bare, field) is True
    for spec in (plain, mixed):
        config = _config(spec)
        before = dict(vars(config))
        _gpt(spec, config=config)
        assert [k for k, v in vars(config).items() if k not in before or before[k] is not v] == []
    assert getattr(config, field) is True and getattr(_config(plain), field) is False


def test_composer_applies_features_at_their_seam_in_table_order(monkeypatch):
    from megacpp_mcore.features import Feature
    from megacpp_mcore.spec import compose
    from megacpp_mcore.spec.context import LayerContext

    calls = []

    def transform(tag):
        return lambda spec, ctx: spec + [tag]

    monkeypatch.setattr(compose, "FEATURES", (
        Feature("moda", seam="self_attention", config_type=object, transform=transform("moda")),
        Feature("mod", seam="layer", config_type=object, transform=transform("mod")),
        Feature("mla", seam="self_attention", config_type=object, transform=transform("mla"),
                check=lambda ctx: calls.append(ctx.index)),
    ))

    def ctx(index, symbol, *features):
        return LayerContext(config=None, backend=None, index=index, symbol=symbol,
                            features=frozenset(features))

    assert compose.at_seam("self_attention", [], ctx(0, "A", "mla", "moda", "mod")) == ["moda", "mla"]
    assert compose.at_seam("layer", [], ctx(0, "A", "mla", "moda", "mod")) == ["mod"]
    assert compose.at_seam("self_attention", [], ctx(1, "A")) == []
    assert compose.at_seam("self_attention", [], ctx(2, "E", "mod")) == []
    assert calls == [0, 1]  # the guard ran on both A layers, carrying the feature or not; not on E
    with pytest.raises(ValueError, match="unknown seam 'mlp'"):
        compose.at_seam("mlp", [], ctx(0, "A"))


def test_mla_moda_and_mod_compose_on_one_attention_layer():
    """MLA replaces the self-attention, MoDA wraps MLA's core attention (written once, for standard
    and MLA attention alike), MoD wraps the layer."""
    from megacpp_mcore.features.mod import MoDConfig
    from megacpp_mcore.features.moda import MoDAConfig
    from megacpp_mcore.layers import mla
    from megacpp_mcore.spec.pattern import FeaturePlacement

    model = model_from_spec({"pattern": "AE", "num_layers": 4, "hidden_size": 64,
                             "num_attention_heads": 4, "ffn_hidden_size": 128, "vocab_size": 128,
                             "seq_length": 32, "moe": None, "mla": MLA_DIMS})
    config = runtime.transformer_config(model, runtime.Parallelism())
    on_a = FeaturePlacement(symbols="A")
    spec = hybrid_block_spec("AE", backend="local", num_layers=4, mla=model.mla,
                             moda=MoDAConfig(placement=on_a), mod=MoDConfig(placement=on_a))
    layer = spec.submodules.layer_spec(config, 2)
    assert layer.module.__name__.startswith("MoD")
    attention = layer.submodules.self_attention
    assert attention.module is mla.LatentSelfAttention
    core = attention.submodules.core_attention
    assert core.module.__name__ == "DepthAwareAttention"
    assert core.params["sequence_attention"] is mla.LatentDotProductAttention
    plain = hybrid_block_spec("AE", backend="local", num_layers=4, moda=MoDAConfig(placement=on_a))
    plain_config = runtime.transformer_config(model.replace(mla=None), runtime.Parallelism())
    core = plain.submodules.layer_spec(plain_config, 0).submodules.self_attention.submodules.core_attention
    assert core.module.__name__ == "DepthAwareAttention"
    assert core.params["sequence_attention"].__name__ == "DotProductAttention"


def test_unknown_feature_is_refused():
    with pytest.raises(ValueError, match="unknown feature 'wings'"):
        hybrid_block_spec("AE", wings=object())


def test_feature_value_must_be_a_placement_or_the_features_config():
    from types import SimpleNamespace

    from megacpp_mcore.spec.pattern import FeaturePlacement

    duck = SimpleNamespace(placement=FeaturePlacement(symbols="E"))
    with pytest.raises(ValueError, match="feature 'mod': expected a FeaturePlacement or a MoDConfig"):
        hybrid_block_spec("AE", num_layers=4, mod=duck)
    hybrid_block_spec("AE", num_layers=4, mod=FeaturePlacement(symbols="E"))


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


def test_segmented_pattern_compiles_against_its_own_stages():
    spec = hybrid_block_spec("AE|AEA", backend="local", num_layers=5)
    assert [(e.symbol, e.stage) for e in spec.submodules.table(5)] == [
        ("A", 0), ("E", 0), ("A", 1), ("E", 1), ("A", 1)]
    assert checkpoint_config_kwargs(spec, 5) == {"hetereogenous_dist_checkpoint": True}


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


# ------------------------------------------------------------ two models in one process, interleaved
STEPS = 3


def _two_models():
    """AEMR at depth 8 with MLA on A and top-k MoD on A and E, next to a plain AE
    at depth 6 with MoE ``E`` layers: different depths, symbols, features and config classes."""
    from megacpp_mcore.features.mod import MoDConfig
    from megacpp_mcore.spec.pattern import FeaturePlacement

    hybrid = model_from_spec({"pattern": "AEMR", "num_layers": 8, "hidden_size": 64,
                              "num_attention_heads": 4, "ffn_hidden_size": 128, "vocab_size": 128,
                              "seq_length": 32, "moe": None, "mla": MLA_DIMS})
    # top-k on E only: a gather on MLA's A layers is refused (MLA takes no per-token RoPE)
    hybrid = hybrid.replace(features={"mod": MoDConfig(mode="topk", capacity=0.5,
                                                       placement=FeaturePlacement(symbols="E"))})
    plain = model_from_spec({"pattern": "AE", "num_layers": 6, "hidden_size": 64,
                             "num_attention_heads": 4, "ffn_hidden_size": 128, "vocab_size": 128,
                             "seq_length": 32, "moe": {"num_experts": 4, "topk": 2,
                                                       "ffn_hidden_size": 64}})
    return {"hybrid": hybrid, "plain": plain}


class _Run:
    """One model's own config, chunks and optimizer, built from a fixed seed."""

    def __init__(self, model, seed: int):
        from megacpp_mcore.patches import cpu_rng_tracker

        cpu_rng_tracker.model_parallel_cpu_manual_seed(seed)  # same initial weights every build
        self.model, self.seed = model, seed
        self.chunks = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                          backend="local")
        self.optimizer = runtime.build_optimizer(self.chunks, lr=3e-3)

    def step(self, step: int) -> float:
        micro = synthetic_batches(seed=self.seed, step=step, global_batch=4,
                                  seq_length=self.model.seq_length, vocab=self.model.vocab_size,
                                  dp_rank=0, dp=1, micro_batch_size=2)
        return runtime.train_step(self.chunks, self.optimizer, micro, num_microbatches=2,
                                  micro_batch_size=2, seq_length=self.model.seq_length)["loss"]


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="bit-exact comparison on the CPU; GPU kernels may reorder reductions")
def test_two_models_trained_interleaved_match_each_alone(single_rank):
    """Nothing process-global couples two models: built in one process and trained with
    alternating optimizer steps, each gives exactly the losses it gives alone."""
    models = _two_models()
    seeds = {"hybrid": 11, "plain": 22}
    alone = {}
    for name, model in models.items():
        run = _Run(model, seeds[name])
        alone[name] = [run.step(s) for s in range(STEPS)]
    runs = {name: _Run(model, seeds[name]) for name, model in models.items()}
    together = {name: [] for name in models}
    for s in range(STEPS):
        for name, run in runs.items():
            together[name].append(run.step(s))
    assert together == alone
    assert alone["hybrid"] != alone["plain"]  # two different models, really
    layers = {name: run.chunks[0].module.decoder.layers for name, run in runs.items()}
    assert (len(layers["hybrid"]), len(layers["plain"])) == (8, 6)
    assert type(layers["hybrid"][0].self_attention).__name__ == "LatentSelfAttention"
    assert type(layers["hybrid"][1]).__name__.startswith("MoD")
    assert type(layers["plain"][1].mlp).__name__ == "DeviceCountsMoELayer"
