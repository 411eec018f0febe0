"""``megacpp-mcore generate`` on checkpoints written the way Megatron-LM's ``pretrain_gpt.py`` writes them
(``--ckpt-format torch_dist``: the model's sharded tensors, the parsed arguments in the common
state, ``latest_checkpointed_iteration.txt`` after the save) for a model built from one of our
``layer_specs`` objects: through the launcher's builder (current recipe flags, shared MTP) and as
stock ``pretrain_gpt.py`` builds it with Megatron-LM's MLA defaults (no latent norms, YaRN).

Megatron-LM's training package cannot be imported on a CPU host, so each run's ``TransformerConfig``
is made here from its arguments the way Megatron-LM's does (every argument named like a config
field, plus its renamed ones), apart from the loader's own code; the loaded model must give the
saved model's logits, and the flags the loader reads must exist in both releases' parsers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megacpp_mcore import cli
from megacpp_mcore.infer import checkpoint as ckpt, megatron_lm
from megacpp_mcore.infer.engine import Engine
from megacpp_mcore.upstream import launch_pretrain as lp

MIRROR = Path("/work/.mirror/NVIDIA+Megatron-LM/repo")
ITERATION = 7


def _args(**overrides) -> argparse.Namespace:
    """A pretrain_gpt.py run of ``layer_specs.nam56r NAM56R`` at toy sizes (defaults of core_v0.16.1
    for the flags a recipe does not pass)."""
    values = dict(
        spec=["layer_specs.nam56r", "NAM56R"], num_layers=4, hidden_size=256, num_attention_heads=4,
        group_query_attention=False, num_query_groups=1, ffn_hidden_size=512, seq_length=32,
        max_position_embeddings=32, padded_vocab_size=512, vocab_size=511, num_experts=4,
        moe_router_topk=2, moe_ffn_hidden_size=64, moe_shared_expert_intermediate_size=64,
        moe_aux_loss_coeff=0.01, moe_grouped_gemm=False, moe_router_load_balancing_type="aux_loss",
        moe_router_dtype="fp32", multi_latent_attention=True, q_lora_rank=64, kv_lora_rank=64,
        qk_head_dim=64, qk_pos_emb_head_dim=64, v_head_dim=64, qk_layernorm=True, rope_type="rope",
        rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0, mamba_state_dim=128,
        mamba_head_dim=64, mamba_num_groups=8, mamba_num_heads=None,
        untie_embeddings_and_output_weights=True, normalization="RMSNorm", norm_epsilon=1e-5,
        swiglu=True, add_bias_linear=False, add_qkv_bias=False, kv_channels=None,
        apply_layernorm_1p=False, apply_residual_connection_post_layernorm=False,
        position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0, use_rope_scaling=False,
        moe_router_score_function="softmax", moe_router_topk_scaling_factor=None,
        moe_router_pre_softmax=False, moe_router_enable_expert_bias=False, moe_router_num_groups=None,
        moe_router_group_topk=None, moe_shared_expert_gate=False, tokenizer_type="NullTokenizer",
        tokenizer_model=None, ckpt_format="torch_dist", bf16=False, transformer_impl="local",
        fp16_lm_cross_entropy=False, mtp_num_layers=None, use_legacy_models=False, yaml_cfg=None,
        megacpp_mtp_depth=1, megacpp_mtp_decay=None, megacpp_mtp_loss_scale=None,
    )
    assert set(megatron_lm.MEGATRON_ARGS_READ) <= set(values)
    values.update(overrides)
    return argparse.Namespace(**values)


# Megatron-LM's own MLA settings: what stock pretrain_gpt.py (and the recipes before they passed
# --qk-layernorm --rope-type rope) trained with.
STOCK_MLA = dict(qk_layernorm=False, rope_type=None, megacpp_mtp_depth=0)


def _megatron_lm_config(args):
    """The TransformerConfig Megatron-LM makes of ``args``: each argument named like a config field,
    plus the renamed ones (written here, not taken from the loader)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    cls = MLATransformerConfig if args.multi_latent_attention else TransformerConfig
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    kwargs.update(num_query_groups=args.num_query_groups if args.group_query_attention else None,
                  num_moe_experts=args.num_experts, gated_linear_unit=args.swiglu,
                  activation_func=F.silu, layernorm_epsilon=args.norm_epsilon,
                  layernorm_zero_centered_gamma=args.apply_layernorm_1p, hidden_dropout=0.0,
                  attention_dropout=0.0, params_dtype=torch.float32, pipeline_dtype=torch.float32,
                  use_cpu_initialization=True, gradient_accumulation_fusion=False,
                  persist_layer_norm=False, masked_softmax_fusion=False)
    return cls(**kwargs)


def _save_like_pretrain_gpt(model, args, root: Path) -> None:
    from megatron.core import dist_checkpointing

    target = root / f"iter_{ITERATION:07d}"
    target.mkdir(parents=True)
    state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
             "model": model.sharded_state_dict(prefix="")}
    if args is None:
        del state["args"]
    dist_checkpointing.save(state, str(target))
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))


def _logits(model, tokens):
    from megacpp_mcore.train.runtime import device

    tokens = tokens.to(device())
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None).float()


BAD_ARGS = [
    (dict(normalization="LayerNorm"), "--normalization 'LayerNorm' (this package builds 'RMSNorm')"),
    (dict(swiglu=False), "--swiglu False (this package builds True)"),
    (dict(rotary_base=500000), "--rotary-base 500000 (this package builds 10000)"),
    (dict(mamba_num_groups=4), "--mamba-num-groups 4 (this package builds 8)"),
    (dict(spec=["megatron.core.models.gpt.gpt_layer_specs", "get_gpt_layer_local_spec"]),
     "not a layer_specs object of this package"),
    (dict(kv_lora_rank=128), "--kv-lora-rank 128 (spec: 64)"),
    (dict(multi_latent_attention=False), "--multi-latent-attention is unset"),
    (dict(tokenizer_type="GPT2BPETokenizer"), "--tokenizer-type GPT2BPETokenizer; allowed: NullTokenizer"),
    (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/nonexistent/tok"),
     "--tokenizer-model /nonexistent/tok, which holds no tokenizer.json"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two pretrain_gpt.py-style checkpoints and the logits of the saved models on one batch."""
    from megacpp_mcore.spec.block import checkpoint_config_kwargs
    from megacpp_mcore.train import runtime

    tmp = tmp_path_factory.mktemp("megatron_lm")
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {"tokens": tokens, "tmp": tmp}
    runtime.initialize(runtime.Parallelism())
    try:
        # the launcher's builder (recipe flags: the package's MLA, shared MTP depth 1)
        args = _args()
        torch.manual_seed(1)
        launcher = lp.gpt_builder(args, True, True, config=_megatron_lm_config(args)).eval()
        _save_like_pretrain_gpt(launcher, args, tmp / "launcher")
        out["launcher"] = (tmp / "launcher", _logits(launcher, tokens))
        for i, (changes, _) in enumerate(BAD_ARGS):  # the same weights, other saved arguments
            _save_like_pretrain_gpt(launcher, _args(**changes), tmp / "bad" / str(i))
        _save_like_pretrain_gpt(launcher, None, tmp / "foreign")  # neither kind: no arguments
        # stock pretrain_gpt.py: GPTModel with our spec object, Megatron-LM's MLA defaults
        args = _args(**STOCK_MLA)
        config = _megatron_lm_config(args)
        spec = lp.layer_spec_from_args(_args(spec=["layer_specs.nam56r", "NAM56R_DENSE"]))
        for field, value in checkpoint_config_kwargs(spec, config.num_layers).items():
            setattr(config, field, value)
        torch.manual_seed(2)
        stock = runtime.gpt_model(config, spec, vocab_size=args.padded_vocab_size,
                                  max_sequence_length=args.max_position_embeddings, pre_process=True,
                                  post_process=True, position_embedding_type="rope",
                                  share_embeddings_and_output_weights=False).eval()
        _save_like_pretrain_gpt(stock, _args(**STOCK_MLA, spec=["layer_specs.nam56r", "NAM56R_DENSE"]),
                                tmp / "stock")
        out["stock"] = (tmp / "stock", _logits(stock, tokens))
    finally:
        runtime.shutdown()
    return out


@pytest.mark.parametrize("run", ["launcher", "stock"])
def test_loaded_model_gives_the_saved_models_logits(runs, run):
    """Model, MTP depth and settings come from the arguments; the full forward and the incremental
    inference path give the saved model's logits (fp32, within 1e-5)."""
    from megacpp_mcore.train import runtime

    directory, expected = runs[run]
    found = ckpt.open_checkpoint(str(directory))
    assert found.step == ITERATION and found.args is not None
    model = ckpt.resolve_model(found)
    assert model.pattern == "AEMEAEMEAEMR" and model.num_layers == 4 and model.hidden_size == 256
    assert model.mla is not None and model.moe.num_experts == 4 and model.vocab_size == 512
    assert model.mtp_depth == (1 if run == "launcher" else 0) and model.seq_length == 32
    try:
        gpt = ckpt.load_model(found, model, backend="local", bf16=False)
        mla = gpt.decoder.layers[0].self_attention
        assert mla.config.qk_layernorm is (run == "launcher")
        assert mla.config.rope_type == ("rope" if run == "launcher" else "yarn")
        torch.testing.assert_close(_logits(gpt, runs["tokens"]), expected, rtol=0, atol=1e-5)
        # the inference path (caches, latent cache, recurrent states) on the loaded model
        engine = Engine(gpt)
        tokens = runs["tokens"].to(engine.device)
        session, parts = engine.session(tokens.shape[0], tokens.shape[1]), []
        for at, n in ((0, 8), (8, 1), (9, 1), (10, 2)):
            parts.append(engine.logits(session.forward(tokens[:, at:at + n])))
            session.commit(n)
        torch.testing.assert_close(torch.cat(parts, dim=1).float(), expected, rtol=0, atol=1e-5)
    finally:
        runtime.shutdown()


def test_generate_cli_on_a_pretrain_gpt_checkpoint(runs, capsys):
    """Bytes in, bytes out (NullTokenizer: the ids of prepare-data's bytes); drafting with the MTP
    block the launcher trained gives plain greedy's tokens; the stock run has none to draft with."""
    directory, _ = runs["launcher"]
    base = ["generate", "--load", str(directory), "--prompt", "int main(", "--max-new-tokens", "6",
            "--backend", "local", "--json"]
    outputs = []
    for k in ("0", "1"):
        assert cli.main([*base, "--speculative", k]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    plain, spec = outputs
    assert plain["step"] == ITERATION and plain["model"] == "NAM56R (pretrain_gpt.py)"
    assert plain["prompt_tokens"] == [1 + len("int main(")]
    assert [r["tokens"] for r in spec["rows"]] == [r["tokens"] for r in plain["rows"]]
    assert cli.main(["generate", "--load", str(runs["stock"][0]), "--prompt", "x", "--speculative",
                     "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no MTP block" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("case", range(len(BAD_ARGS)), ids=[next(iter(c)) for c, _ in BAD_ARGS])
def test_flags_the_package_cannot_reproduce_are_refused(runs, capsys, case):
    bad, message = runs["tmp"] / "bad" / str(case), BAD_ARGS[case][1]
    before = sorted(p.name for p in bad.rglob("*"))
    assert cli.main(["generate", "--load", str(bad), "--prompt", "x", "--backend", "local"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.out == "" and sorted(p.name for p in bad.rglob("*")) == before


def test_a_checkpoint_of_neither_kind_is_named(runs, capsys):
    assert cli.main(["generate", "--load", str(runs["tmp"] / "foreign"), "--prompt", "x"]) == 2
    assert "neither by `megacpp-mcore train`" in capsys.readouterr().err


@pytest.mark.skipif(not MIRROR.exists(), reason="needs the Megatron-LM git mirror at " + str(MIRROR))
@pytest.mark.parametrize("tag", ["core_v0.16.1", "core_v0.19.0"])
def test_loader_reads_only_arguments_megatron_lm_defines(tag):
    from megacpp_mcore.testing.megatron_lm import parser_dests

    dests = parser_dests(str(MIRROR), tag)
    assert sorted(set(megatron_lm.MEGATRON_ARGS_READ) - dests) == []
