"""A checkpoint of Megatron-LM's ``pretrain_gpt.py`` with one of our ``layer_specs`` objects (through
``python -m megacpp_mcore.launch_pretrain``, the recipes, or stock ``pretrain_gpt.py --spec``) as an
inference model.

Megatron-LM writes ``--ckpt-format torch_dist`` (its default) as ``<save>/iter_<N:07d>/``: the
model's sharded tensors under ``model`` (one chunk; ``model0``, ``model1``, ... under virtual
pipeline stages) and, in the common state, the run's parsed arguments (``args``), and it updates
``latest_checkpointed_iteration.txt`` once the save is complete. The architecture is read from
``args``: ``--spec`` names the ``layer_specs`` object (pattern and features: MLA, MoD, ...), the
flags give the sizes, ``--megacpp-mtp-depth`` the shared MTP block, and ``--tokenizer-type`` what the
ids mean (``NullTokenizer``: the bytes of ``megacpp-mcore prepare-data``; ``HuggingFaceTokenizer``
with its ``--tokenizer-model`` directory: a ``prepare-data --tokenizer bpe:N`` BPE).

Everything else the flags may say is either carried into the model's ``TransformerConfig``
(:data:`CARRIED`: the MLA latent norms and RoPE kind, which Megatron-LM's defaults set otherwise
than the package) or must equal what the package builds (:data:`MUST_MATCH`, compared against the
``TransformerConfig`` of ``train.runtime.transformer_config`` and the GPTModel defaults): a
checkpoint that differs there is refused naming the flag, instead of loading into a model that
computes something else.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from megacpp_mcore.models.presets import MoEConfig, ModelConfig

# Flags whose values the inference model takes over (Megatron-LM argument name -> TransformerConfig
# field). MLA's latent norms and RoPE kind: ``preset_args`` passes the package's values, but a run of
# stock ``pretrain_gpt.py`` or of a recipe before they were added has Megatron-LM's defaults.
CARRIED = {"qk_layernorm": "qk_layernorm", "rope_type": "rope_type",
           "rotary_scaling_factor": "rotary_scaling_factor", "mscale": "mscale",
           "mscale_all_dim": "mscale_all_dim"}
CARRIED_MLA_ONLY = ("rope_type", "rotary_scaling_factor", "mscale", "mscale_all_dim")

# Flags that must equal the package's model (Megatron-LM argument name -> TransformerConfig field);
# None in the arguments means "Megatron-LM's default", which the config then computes as ours does.
MUST_MATCH = {
    "normalization": "normalization", "norm_epsilon": "layernorm_epsilon",
    "swiglu": "gated_linear_unit", "add_bias_linear": "add_bias_linear",
    "add_qkv_bias": "add_qkv_bias", "kv_channels": "kv_channels",
    "apply_layernorm_1p": "layernorm_zero_centered_gamma",
    "apply_residual_connection_post_layernorm": "apply_residual_connection_post_layernorm",
    "mamba_head_dim": "mamba_head_dim", "mamba_num_groups": "mamba_num_groups",
    "mamba_num_heads": "mamba_num_heads",
    "moe_router_score_function": "moe_router_score_function",
    "moe_router_topk_scaling_factor": "moe_router_topk_scaling_factor",
    "moe_router_pre_softmax": "moe_router_pre_softmax",
    "moe_router_enable_expert_bias": "moe_router_enable_expert_bias",
    "moe_router_num_groups": "moe_router_num_groups", "moe_router_group_topk": "moe_router_group_topk",
    "moe_shared_expert_gate": "moe_shared_expert_gate",
}
# GPTModel constructor arguments Megatron-LM's builder passes from flags; the package builds with
# GPTModel's defaults for these (and RoPE positions).
GPT_DEFAULTS = ("rotary_base", "rotary_percent")

# Every Megatron-LM argument read here (tests check each release's parser defines them).
MEGATRON_ARGS_READ = (
    "spec", "num_layers", "hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "ffn_hidden_size", "seq_length", "padded_vocab_size", "num_experts",
    "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "moe_grouped_gemm", "multi_latent_attention", "mamba_state_dim",
    "untie_embeddings_and_output_weights", "position_embedding_type", "use_rope_scaling",
    "tokenizer_type", "tokenizer_model", *CARRIED, *MUST_MATCH, *GPT_DEFAULTS,
)


def is_megatron_lm(common: Any) -> bool:
    """Whether a checkpoint's common state is Megatron-LM's (its parsed arguments, no model
    signature of ``megacpp-mcore train``)."""
    return isinstance(common, dict) and "args" in common and "model_signature" not in common


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _spec_submodules(args, where: str):
    """The ``--spec`` object's :class:`~megacpp_mcore.spec.block.HybridLayerSubmodules`."""
    from megacpp_mcore.spec.block import HybridLayerSubmodules

    spec_name = getattr(args, "spec", None)
    if not spec_name:
        raise ValueError(f"--load: {where} was written by pretrain_gpt.py without --spec; allowed: a "
                         "run with one of this package's layer_specs objects")
    try:
        from megatron.core.transformer.spec_utils import import_module

        spec = import_module(list(spec_name))
    except (ImportError, AttributeError, ValueError) as exc:
        spec, reason = None, f" ({exc})"
    else:
        reason = ""
    sub = getattr(spec, "submodules", None)
    if not isinstance(sub, HybridLayerSubmodules):
        raise ValueError(f"--load: {where} was trained with --spec {' '.join(spec_name)}, which is not "
                         f"a layer_specs object of this package{reason}; allowed: the objects of "
                         "layer_specs/ (e.g. layer_specs.nam56r_lite NAM56R_LITE)")
    return sub


def model_from_args(args, where: str) -> ModelConfig:
    """The :class:`ModelConfig` a ``pretrain_gpt.py`` run built: pattern and features from its
    ``--spec`` object, sizes from its flags, MTP depth from ``--megacpp-mtp-depth``."""
    from megacpp_mcore.upstream.launch_pretrain import mla_size_mismatches

    sub = _spec_submodules(args, where)
    features = dict(sub.features)
    mla = features.pop("mla", None)
    if bool(getattr(args, "multi_latent_attention", False)) != (mla is not None):
        raise ValueError(f"--load: {where}: --multi-latent-attention is "
                         f"{'set' if mla is None else 'unset'} but --spec {' '.join(args.spec)} "
                         f"{'has no' if mla is None else 'puts'} MLA on its A layers")
    if mla is not None:
        wrong = mla_size_mismatches(args, mla)
        if wrong:
            raise ValueError(f"--load: {where}: MLA flags disagree with the spec's MLA: " + "; ".join(wrong))
    moe = None
    if getattr(args, "num_experts", None):
        moe = MoEConfig(num_experts=args.num_experts, topk=args.moe_router_topk,
                        ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
                        shared_expert_size=args.moe_shared_expert_intermediate_size,
                        grouped_gemm=bool(getattr(args, "moe_grouped_gemm", False)))
    try:
        return ModelConfig(
            name=f"{args.spec[-1]} (pretrain_gpt.py)", pattern=sub.pattern, num_layers=args.num_layers,
            hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
            num_query_groups=args.num_query_groups if getattr(args, "group_query_attention", False) else None,
            ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.padded_vocab_size,
            seq_length=args.seq_length, moe=moe, mla=mla,
            mamba_state_dim=getattr(args, "mamba_state_dim", None) or ModelConfig.mamba_state_dim,
            mtp_depth=int(getattr(args, "megacpp_mtp_depth", 0) or 0),
            tie_embeddings=not args.untie_embeddings_and_output_weights, features=features)
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f"--load: {where}: its pretrain_gpt.py arguments give no model this package "
                         f"builds ({exc})") from None


def config_overrides(args, model: ModelConfig) -> dict[str, Any]:
    """The :data:`CARRIED` settings of the run, as ``TransformerConfig`` fields (MLA's RoPE settings
    only for an MLA model; ``rope_type`` unset means the config class's default)."""
    out = {}
    for arg, field in CARRIED.items():
        if arg in CARRIED_MLA_ONLY and model.mla is None:
            continue
        value = getattr(args, arg, None)
        if value is not None:
            out[field] = value
    if model.mla is not None and getattr(args, "rope_type", None) is None:
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        out["rope_type"] = MLATransformerConfig.rope_type  # what Megatron-LM built: the class default
    return out


def check_args(args, config, where: str) -> None:
    """``ValueError`` naming every flag of the run that the package's model (``config``, built with
    :func:`config_overrides`) would not reproduce."""
    from megatron.core.models.gpt import GPTModel

    wrong = []
    for arg, field in MUST_MATCH.items():
        value = getattr(args, arg, None)
        if value is not None and hasattr(config, field) and value != getattr(config, field):
            wrong.append(f"{_flag(arg)} {value!r} (this package builds {getattr(config, field)!r})")
    defaults = inspect.signature(GPTModel.__init__).parameters
    for arg in GPT_DEFAULTS:
        value = getattr(args, arg, None)
        if value is not None and value != defaults[arg].default:
            wrong.append(f"{_flag(arg)} {value!r} (this package builds {defaults[arg].default!r})")
    if getattr(args, "position_embedding_type", "rope") != "rope":
        wrong.append(f"--position-embedding-type {args.position_embedding_type} (this package builds rope)")
    if getattr(args, "use_rope_scaling", False):
        wrong.append("--use-rope-scaling (this package builds RoPE without scaling)")
    if wrong:
        raise ValueError(f"--load: {where} was trained with flags this package's model does not "
                         "reproduce: " + "; ".join(wrong))


def tokenizer_from_args(args, where: str):
    """What the run's ids mean: bytes (``NullTokenizer`` over ``prepare-data`` bytes) or the
    ``prepare-data`` BPE its ``--tokenizer-model`` names."""
    from megacpp_mcore.train.tokenizer import BPETokenizer, ByteTokenizer

    kind = getattr(args, "tokenizer_type", None)
    if kind == "NullTokenizer":
        return ByteTokenizer()
    if kind == "HuggingFaceTokenizer":
        directory = Path(str(getattr(args, "tokenizer_model", "")))
        if not (directory / "tokenizer.json").is_file():
            raise ValueError(f"--load: {where} was trained with --tokenizer-model {directory}, which "
                             "holds no tokenizer.json on this machine; allowed: the directory "
                             "`megacpp-mcore prepare-data --tokenizer bpe:N` wrote")
        return BPETokenizer(directory)
    raise ValueError(f"--load: {where} was trained with --tokenizer-type {kind}; allowed: "
                     "NullTokenizer (the bytes of megacpp-mcore prepare-data) or HuggingFaceTokenizer "
                     "(a prepare-data BPE)")
