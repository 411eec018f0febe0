"""Accounting: how many parameters a model has and how many FLOPs a token costs, in one place.

Pure arithmetic on a :class:`~megacpp_mcore.models.presets.ModelConfig` (no megatron import, no
model built), so the 52-layer NAM56R counts in milliseconds. Tests check every count against
instantiated modules. Users: the layer plan (:mod:`megacpp_mcore.models.plan`, ``megacpp-mcore
plan``), the run receipt (:mod:`megacpp_mcore.train.receipt`) and the benchmarks
(``scripts/bench_train.py``, ``scripts/recipe_benchmark.py``).

Parameter counts include each layer's input norm and what its layer features add (MoD's router,
FlexiDepth's norm, router and adapter; they equal ``sum(p.numel())`` of the built layer);
FLOP counts include only matmul weights (norms and the embedding lookup do no matmuls).
"""

from __future__ import annotations

# The M and R blocks are built from the same dimensions.
from megacpp_mcore.layers.mixers.dims import m2rnn_dims, mamba_dims
from megacpp_mcore.models.presets import ModelConfig
from megacpp_mcore.spec.pattern import LayerEntry


# ------------------------------------------------------------------------------------ parameters --

def attention_params(m: ModelConfig, *, mla: bool) -> int:
    """One ``A`` layer: input norm + projections (MLA's low-rank ones when ``mla``)."""
    h = m.hidden_size
    if mla:
        c = m.mla
        heads = m.num_attention_heads
        qk = c.qk_head_dim + c.qk_pos_emb_head_dim
        q = (h * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * qk) if c.q_lora_rank else h * heads * qk
        kv = h * (c.kv_lora_rank + c.qk_pos_emb_head_dim) + c.kv_lora_rank
        kv += c.kv_lora_rank * heads * (c.qk_head_dim + c.v_head_dim)
        return h + q + kv + heads * c.v_head_dim * h  # input norm + projections
    head_dim = h // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    qkv = h * (h + 2 * groups * head_dim)
    return h + qkv + h * h  # input norm + QKV + output projection


def feedforward_params(m: ModelConfig) -> int:
    """One ``E`` layer: norm + SwiGLU MLP, or norm + router + all experts + shared expert."""
    h = m.hidden_size
    if m.moe is None:
        return h + 3 * h * m.ffn_hidden_size  # norm + SwiGLU fc1 (2f) + fc2
    e = m.moe
    params = h + h * e.num_experts + e.num_experts * 3 * h * e.ffn_hidden_size  # norm, router, experts
    if e.shared_expert_size:
        params += 3 * h * e.shared_expert_size
    return params


def mamba_params(m: ModelConfig) -> int:
    """One ``M`` layer: input norm + Mamba-2 mixer."""
    return m.hidden_size + mamba_dims(m.hidden_size).num_params()


def m2rnn_params(m: ModelConfig) -> int:
    """One ``R`` layer: input norm + M2RNN mixer."""
    return m.hidden_size + m2rnn_dims(m.hidden_size, m.num_attention_heads).num_params()


def block_params(m: ModelConfig, entry: LayerEntry) -> int:
    """Parameters of the block of layer ``entry`` (its symbol's, MLA included), without what the
    layer-level features add (:func:`feature_params`)."""
    if entry.symbol == "A":
        return attention_params(m, mla="mla" in entry.features)
    if entry.symbol == "E":
        return feedforward_params(m)
    if entry.symbol == "M":
        return mamba_params(m)
    return m2rnn_params(m)


def mod_router_params(m: ModelConfig) -> int:
    """MoD's router on one layer: a replicated ``Linear(h, 1)`` with bias (weight ``[1, h]`` + bias
    ``[1]``); MoD adds nothing else."""
    return m.hidden_size + 1


def feature_params(m: ModelConfig, entry: LayerEntry) -> dict[str, int]:
    """Parameters the layer-level features of ``entry`` add to its block, by feature name: ``mod``
    (:func:`mod_router_params`) and ``flexidepth`` (norm, router and adapter:
    ``FlexiDepthConfig.added_params``). MLA reshapes the block (counted in :func:`block_params`);
    MoDA is parameter-free. Empty for a layer without such features."""
    added = {}
    if "mod" in entry.features:
        added["mod"] = mod_router_params(m)
    if "flexidepth" in entry.features:
        added["flexidepth"] = m.features["flexidepth"].added_params(m.hidden_size)
    return added


def feature_matmul_params(m: ModelConfig, entry: LayerEntry) -> int:
    """Matmul weights of :func:`feature_params` that every token passes through (routers run on
    every token; soft FlexiDepth runs the adapter on every token): the counts less the biases
    (one per router) and FlexiDepth's norm (``h``)."""
    added = feature_params(m, entry)
    return sum(added.values()) - len(added) - (m.hidden_size if "flexidepth" in added else 0)


def layer_params(m: ModelConfig, entry: LayerEntry) -> int:
    """Parameters of the layer ``entry`` of ``m``'s layer table: its block plus what its features
    add (equals ``sum(p.numel())`` of the built layer)."""
    return block_params(m, entry) + sum(feature_params(m, entry).values())


def mtp_block_params(m: ModelConfig) -> int:
    """The shared MTP block: one A + one E, two input norms and the [2h -> h] mixing projection."""
    h = m.hidden_size
    return attention_params(m, mla=m.mla is not None) + feedforward_params(m) + 2 * h + 2 * h * h


def embedding_params(m: ModelConfig) -> dict[str, int]:
    """Parameters outside the decoder layers: embedding, output layer, final norm, MTP block."""
    h, v = m.hidden_size, m.vocab_size
    out = {"embedding": v * h, "output_layer": 0 if m.tie_embeddings else v * h, "final_norm": h}
    if m.mtp_depth:
        out["mtp_shared_block"] = mtp_block_params(m)
    return out


# ----------------------------------------------------------------------------------------- FLOPs --

def active_feedforward_params(m: ModelConfig) -> int:
    """Matmul weights of one ``E`` layer that a token passes through (MoE: the router, its top-k
    routed experts and the shared expert); no norm."""
    h = m.hidden_size
    if m.moe is None:
        return 3 * h * m.ffn_hidden_size
    e = m.moe
    return h * e.num_experts + e.topk * 3 * h * e.ffn_hidden_size + 3 * h * (e.shared_expert_size or 0)


def _attention_flops(m: ModelConfig, seq: int, *, mla: bool, causal: bool) -> float:
    """Scores and values of one attention layer per token, forward + backward: ``2 * s * heads *
    (d_qk + d_v)`` forward, x3 for training; half when ``causal`` (a query sees s/2 keys on average)."""
    if mla:
        qk, v = m.mla.qk_head_dim + m.mla.qk_pos_emb_head_dim, m.mla.v_head_dim
    else:
        qk = v = m.hidden_size // m.num_attention_heads
    flops = 6.0 * seq * m.num_attention_heads * (qk + v)
    return flops / 2 if causal else flops


def flops_per_token(m: ModelConfig, seq_length: int | None = None, *, causal: bool = False) -> dict[str, float]:
    """Training FLOPs per token (forward + backward): ``6 * N_active + attention``.

    ``N_active`` counts the matmul weights a token passes through: every layer (MoE: router + top-k
    routed experts + shared expert; the MoD/FlexiDepth routers and FlexiDepth's adapter on every
    token, as training runs them), the output head and, per MTP depth, the shared MTP block, its
    [2h -> h] projection and the output head again; not the embedding lookup or norms. The attention
    term is ``6 * s * heads * (d_qk + d_v)`` per attention layer (QK^T and AV, forward and backward),
    i.e. ``12 * s * h`` for standard attention (receipts, ``scripts/bench_train.py``);
    ``causal=True`` halves it, a query seeing s/2 keys on average (``scripts/recipe_benchmark.py``,
    whose TFLOP/s are compared with published causal-discounted figures). Mamba/M2RNN scans are not
    counted (their projections are, through ``N_active``).

    Returns ``active_params``, ``dense`` (``6 * N_active``), ``attention`` and ``total``.
    """
    s = seq_length or m.seq_length
    h = m.hidden_size
    active = h * m.vocab_size  # output head
    attention = 0.0
    for entry in m.layer_table():
        if entry.symbol == "E":
            active += active_feedforward_params(m)
        else:
            active += block_params(m, entry) - h  # minus the input norm
        active += feature_matmul_params(m, entry)
        if entry.symbol == "A":
            attention += _attention_flops(m, s, mla="mla" in entry.features, causal=causal)
    if m.mtp_depth:
        block = attention_params(m, mla=m.mla is not None) - h + active_feedforward_params(m) + 2 * h * h
        active += m.mtp_depth * (block + h * m.vocab_size)
        attention += m.mtp_depth * _attention_flops(m, s, mla=m.mla is not None, causal=causal)
    dense = 6.0 * active
    return {"active_params": float(active), "dense": dense, "attention": attention,
            "total": dense + attention}
