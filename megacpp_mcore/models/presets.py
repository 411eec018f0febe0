"""Model presets as small validated dataclasses, and their mapping to Megatron's TransformerConfig."""

from __future__ import annotations

import dataclasses
from typing import Any

from megacpp_mcore.features.mod.config import MoDConfig
from megacpp_mcore.spec.pattern import FeaturePlacement, compile_layers, validate_pattern


def _positive(owner: str, **values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name} must be an int >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Routed experts (top-k) with an optional always-on shared expert."""

    num_experts: int
    topk: int
    ffn_hidden_size: int
    shared_expert_size: int | None = None
    aux_loss_coeff: float = 1e-2
    grouped_gemm: bool = True  # TE grouped GEMM; the local backend uses SequentialMLP regardless

    def __post_init__(self):
        _positive("MoEConfig", num_experts=self.num_experts, topk=self.topk,
                  ffn_hidden_size=self.ffn_hidden_size)
        if self.shared_expert_size is not None:
            _positive("MoEConfig", shared_expert_size=self.shared_expert_size)
        if self.topk > self.num_experts:
            raise ValueError(
                f"MoEConfig.topk={self.topk} exceeds num_experts={self.num_experts}; "
                f"allowed: 1..{self.num_experts}"
            )
        if self.aux_loss_coeff < 0:
            raise ValueError(f"MoEConfig.aux_loss_coeff must be >= 0, got {self.aux_loss_coeff}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Multi-latent attention dimensions (DeepSeek-V2 style) and which layers use it."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_head_dim: int
    qk_pos_emb_head_dim: int
    v_head_dim: int
    placement: FeaturePlacement = FeaturePlacement(symbols="A")

    def __post_init__(self):
        _positive("MLAConfig", kv_lora_rank=self.kv_lora_rank, qk_head_dim=self.qk_head_dim,
                  qk_pos_emb_head_dim=self.qk_pos_emb_head_dim, v_head_dim=self.v_head_dim)
        if self.q_lora_rank is not None:
            _positive("MLAConfig", q_lora_rank=self.q_lora_rank)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a hybrid model: pattern, dimensions, and the features it carries."""

    name: str
    pattern: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None
    ffn_hidden_size: int  # dense ``E`` layers (when ``moe`` is None)
    vocab_size: int
    seq_length: int
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    # SSM state size of the ``M`` (Mamba-2) mixers; megatron-core's default (mamba_state_dim)
    mamba_state_dim: int = 128
    mtp_depth: int = 0
    tie_embeddings: bool = False  # share the input embedding and output weights
    # Feature configs from later modules (MoD, MoDA) keyed by feature name.
    features: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _positive(f"ModelConfig({self.name})", num_layers=self.num_layers,
                  hidden_size=self.hidden_size, num_attention_heads=self.num_attention_heads,
                  ffn_hidden_size=self.ffn_hidden_size, vocab_size=self.vocab_size,
                  seq_length=self.seq_length, mamba_state_dim=self.mamba_state_dim)
        validate_pattern(self.pattern)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ModelConfig({self.name}): hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        groups = self.num_query_groups
        if groups is not None and (groups < 1 or self.num_attention_heads % groups):
            raise ValueError(
                f"ModelConfig({self.name}): num_query_groups={groups} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if isinstance(self.mtp_depth, bool) or not isinstance(self.mtp_depth, int) or not 0 <= self.mtp_depth <= 8:
            raise ValueError(f"ModelConfig({self.name}).mtp_depth must be an int in 0..8, got {self.mtp_depth!r}")
        self.layer_table()  # validates pattern, depth and feature placements

    @property
    def feature_configs(self) -> dict[str, Any]:
        """Every attached feature (name -> config), as ``hybrid_block_spec`` takes them."""
        configs = dict(self.features)
        if self.mla is not None:
            configs["mla"] = self.mla
        return configs

    def layer_table(self, pp: int | None = None):
        """The compiled layers; ``pp`` defaults to the pattern's own ``|`` stage count."""
        pp = pp or len(validate_pattern(self.pattern))
        placements = {
            name: value if isinstance(value, FeaturePlacement) else value.placement
            for name, value in self.feature_configs.items()
        }
        return compile_layers(self.pattern, self.num_layers, placements, pp=pp)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def shipped_mod(skip_first: int) -> MoDConfig:
    """MoD as the NAM56R presets ship it (DESIGN.md "Dynamic depth as shipped"): ``gateskip`` on
    the ``A`` and ``E`` layers from index ``skip_first`` on (never ``M``/``R``: MoD's placement
    guard), token budget decaying 1.0 -> 0.8 over the whole run."""
    return MoDConfig(mode="gateskip", budget_start=1.0, budget_end=0.8, budget_steps=None,
                     placement=FeaturePlacement(symbols="AE", skip_first=skip_first))


# MoD placement. The public NAM56R stack skips its first 4 layers (skip_first_n=4: the first A,
# the E on each side of the first M), so MoD routes 32 of its 35 A/E layers and every token passes
# the first attention and feed-forward layers at full weight. At depth 12 the same 4 would leave a
# third of the stack unrouted (MoD on 5 of 8 A/E layers); nam56r-lite and nam56r-tiny skip the
# first 2 (the first A and its E, the same protection) and route 6 of their 8 A/E layers
# (3, 4, 5, 7, 8, 9), the closest to the public stack's share.
PRESETS: dict[str, ModelConfig] = {
    # The public NAM56R configuration (the cppmega stack whose 8 x H200 figure is 289 TFLOP/s/GPU by
    # Megatron-Bridge's hybrid_flops count): hidden 4096, 32 heads, MLA with q/kv latents 64/64 and
    # qk 64 + rope 64, v 64; MoE 16 experts of 896, top-4, + a 1024 shared expert; Mamba-2 with
    # d_state 128 on M; M2RNN with k 64, v 16 on R (layers/mixers/dims.py); MTP depth 2; vocab
    # 131072; seq 4096; 52 layers AEMEAEMEAEMR (13 A, 22 E, 13 M, 4 R).
    # Where our blocks cannot match theirs: the public stack's Mamba-3 mixers are Mamba-2 (SSD,
    # megatron-core's MambaMixer) here, and its sparse-attention layers are dense causal MLA here.
    # The parameter count is that of this Mamba-2 / dense-MLA NAM56R; FLOP figures use the same
    # hybrid_flops convention as the public number (models/accounting.py), which counts every A
    # as dense attention and every mixer as Mamba with d_inner = 2h whatever the block.
    "nam56r": ModelConfig(
        name="nam56r",
        pattern="AEMEAEMEAEMR",
        num_layers=52,
        hidden_size=4096,
        num_attention_heads=32,
        ffn_hidden_size=11008,  # dense E layers only; unused while MoE is on
        vocab_size=131072,
        seq_length=4096,
        moe=MoEConfig(num_experts=16, topk=4, ffn_hidden_size=896, shared_expert_size=1024),
        mla=MLAConfig(q_lora_rank=64, kv_lora_rank=64, qk_head_dim=64,
                      qk_pos_emb_head_dim=64, v_head_dim=64),
        mamba_state_dim=128,
        mtp_depth=2,
        features={"mod": shipped_mod(skip_first=4)},
    ),
    "nam56r-lite": ModelConfig(
        name="nam56r-lite",
        pattern="AEMEAEMEAEMR",
        num_layers=12,
        hidden_size=2048,
        num_attention_heads=16,
        ffn_hidden_size=5632,
        vocab_size=32768,
        seq_length=4096,
        moe=MoEConfig(num_experts=8, topk=2, ffn_hidden_size=1024, shared_expert_size=1024),
        mla=MLAConfig(q_lora_rank=768, kv_lora_rank=256, qk_head_dim=128,
                      qk_pos_emb_head_dim=64, v_head_dim=128),
        mtp_depth=1,
        features={"mod": shipped_mod(skip_first=2)},
    ),
    "nam56r-tiny": ModelConfig(
        name="nam56r-tiny",
        pattern="AEMEAEMEAEMR",
        num_layers=12,
        hidden_size=128,
        num_attention_heads=4,
        ffn_hidden_size=384,
        vocab_size=512,
        seq_length=256,
        moe=MoEConfig(num_experts=4, topk=2, ffn_hidden_size=128, shared_expert_size=128),
        mla=MLAConfig(q_lora_rank=None, kv_lora_rank=32, qk_head_dim=32,
                      qk_pos_emb_head_dim=16, v_head_dim=32),
        mtp_depth=1,
        features={"mod": shipped_mod(skip_first=2)},
    ),
    # The A/E skeleton of nam56r-tiny (no M/R/MLA/MTP): the CPU smoke run of A and E blocks alone.
    "ae-tiny": ModelConfig(
        name="ae-tiny",
        pattern="AE",
        num_layers=8,
        hidden_size=128,
        num_attention_heads=4,
        ffn_hidden_size=384,
        vocab_size=512,
        seq_length=256,
        moe=MoEConfig(num_experts=4, topk=2, ffn_hidden_size=128, shared_expert_size=128),
    ),
    # The package's earlier NAM56R dimensions (wider MLA, 896 shared expert): kept for comparison
    # with the measurements taken before the public configuration was adopted.
    "nam56r-wide": ModelConfig(
        name="nam56r-wide",
        pattern="AEMEAEMEAEMR",
        num_layers=52,
        hidden_size=4096,
        num_attention_heads=32,
        ffn_hidden_size=11008,
        vocab_size=131072,
        seq_length=4096,
        moe=MoEConfig(num_experts=16, topk=4, ffn_hidden_size=896, shared_expert_size=896),
        mla=MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128,
                      qk_pos_emb_head_dim=64, v_head_dim=128),
        mtp_depth=2,
    ),
}


def dense_variant(m: ModelConfig) -> ModelConfig:
    """``m`` without MoD, named ``<name>-dense``: every token through every layer at full weight,
    the ablation baseline of the shipped MoD (``--preset nam56r-tiny-dense``; ``layer_specs``'
    ``*_DENSE`` objects)."""
    return m.replace(name=f"{m.name}-dense",
                     features={k: v for k, v in m.features.items() if k != "mod"})


# The presets that ship MoD, each with its dense variant.
MOD_PRESETS = ("nam56r", "nam56r-lite", "nam56r-tiny")
PRESETS.update({f"{name}-dense": dense_variant(PRESETS[name]) for name in MOD_PRESETS})


def get_preset(name: str) -> ModelConfig:
    """The preset called ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def custom_model(*, pattern: str, num_layers: int, base: str = "nam56r-tiny-dense",
                 **overrides) -> ModelConfig:
    """A model from ``--pattern/--num-layers`` on top of preset ``base``'s dimensions and
    features (the default base has nam56r-tiny's dimensions and no MoD)."""
    try:
        return get_preset(base).replace(name=f"custom({pattern})", pattern=pattern,
                                        num_layers=num_layers, **overrides)
    except TypeError as exc:
        raise ValueError(f"bad model override: {exc}") from None
