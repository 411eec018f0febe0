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
    return m.hidden_size + mamba_dims(m.hidden_size, d_state=m.mamba_state_dim).num_params()


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


def attention_matmul_params(m: ModelConfig, *, mla: bool) -> int:
    """Matmul weights of one ``A`` layer: :func:`attention_params` less the input norm and, for MLA,
    the norms of the q/kv latents."""
    norms = m.hidden_size
    if mla:
        norms += (m.mla.q_lora_rank or 0) + m.mla.kv_lora_rank
    return attention_params(m, mla=mla) - norms


def block_matmul_params(m: ModelConfig, entry: LayerEntry) -> int:
    """Matmul weights of the block of ``entry`` that a token passes through: attention projections,
    MoE's router + top-k routed + shared expert (or the dense MLP), the mixers' projections (and
    M2RNN's recurrent weight); no norms, convolutions or per-head vectors."""
    if entry.symbol == "A":
        return attention_matmul_params(m, mla="mla" in entry.features)
    if entry.symbol == "E":
        return active_feedforward_params(m)
    if entry.symbol == "M":
        return mamba_dims(m.hidden_size, d_state=m.mamba_state_dim).matmul_params()
    return m2rnn_dims(m.hidden_size, m.num_attention_heads).matmul_params()


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

    ``N_active`` counts the matmul weights a token passes through (:func:`block_matmul_params`):
    every layer (MoE: router + top-k routed experts + shared expert; M/R: the mixers' projections
    and M2RNN's recurrent weight, not their convolutions; the MoD/FlexiDepth routers and
    FlexiDepth's adapter on every token, as training runs them), the output head and, per MTP depth, the shared MTP block, its
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
        active += block_matmul_params(m, entry) + feature_matmul_params(m, entry)
        if entry.symbol == "A":
            attention += _attention_flops(m, s, mla="mla" in entry.features, causal=causal)
    if m.mtp_depth:
        block = attention_matmul_params(m, mla=m.mla is not None) + active_feedforward_params(m) + 2 * h * h
        active += m.mtp_depth * (block + h * m.vocab_size)
        attention += m.mtp_depth * _attention_flops(m, s, mla=m.mla is not None, causal=causal)
    dense = 6.0 * active
    return {"active_params": float(active), "dense": dense, "attention": attention,
            "total": dense + attention}


# -------------------------------------------------------- FLOPs, Megatron-Bridge's hybrid convention --

def _hybrid_attention_fwd(m: ModelConfig, s: float) -> float:
    """One ``A`` layer's forward FLOPs per token as Bridge's ``attn_layer_flops`` counts it: dense
    attention whatever the block (MLA included), ``4 h (h + h g / n + s / 2)``: Q and O (``4 h^2``),
    K and V over ``g`` query groups (``4 h^2 g / n``), QK^T and AV at seq/2 keys (``2 h s``).
    (Bridge's ``kv_channels * n / h`` factor is 1 here: our head dim is ``h / n``.)"""
    h, n = m.hidden_size, m.num_attention_heads
    g = m.num_query_groups or n
    return 4.0 * h * (h + h * g / n + s / 2)


def _hybrid_feedforward_fwd(m: ModelConfig) -> float:
    """One ``E`` layer's forward FLOPs per token (SwiGLU: 3 matmuls of ``h x f``, ``6 h f``): MoE as
    top-k routed experts + the shared expert (no router), or the dense MLP."""
    h = m.hidden_size
    if m.moe is None:
        return 6.0 * h * m.ffn_hidden_size
    return 6.0 * h * (m.moe.topk * m.moe.ffn_hidden_size + (m.moe.shared_expert_size or 0))


def _hybrid_mamba_fwd(m: ModelConfig) -> float:
    """One Mamba layer's forward FLOPs per token with ``d_inner = 2h``: in_proj ``2 h (2 d_in + 2
    groups d_state + heads)``, the scan ``7 d_in d_state``, out_proj ``2 d_in h``."""
    h = m.hidden_size
    dims = mamba_dims(h, d_state=m.mamba_state_dim)
    d_in = 2 * h
    return (2.0 * h * (2 * d_in + 2 * dims.ngroups * dims.d_state + dims.nheads)
            + 7.0 * d_in * dims.d_state + 2.0 * d_in * h)


def hybrid_flops_per_token(m: ModelConfig, seq_length: int | None = None) -> dict[str, float]:
    """Training FLOPs per token by Megatron-Bridge's ``hybrid_flops`` convention (its
    ``training/utils/flop_utils.py``), the count behind published hybrid figures such as the public
    NAM56R's 289 TFLOP/s/GPU; read there, re-derived here for our layer table.

    Forward FLOPs per token, summed over the layers, times 3 (forward + backward):

    * ``A``: dense causal attention, ``4 h (h + h g / n + s / 2)`` (MLA layers are counted as dense
      attention too: the convention knows no MLA in a hybrid stack);
    * ``E``: ``6 h (topk f + f_shared)`` for MoE (top-k routed + shared expert, router not counted),
      ``6 h f`` for a dense SwiGLU MLP;
    * ``M``: Mamba with ``d_inner = 2h``, ``2 h (2 d_in + 2 G N + heads) + 7 d_in N + 2 d_in h``
      (G groups, N = d_state); ``R`` (M2RNN) has no symbol in the convention and is counted as
      an ``M`` layer, the layer upstream's hybrid runs in its place (``scripts/bench_stage.py``);
    * logits: ``2 h V (1 + mtp_depth)``; the MTP blocks themselves are not counted (the
      convention counts MTP layers only when the hybrid pattern spells them out).

    Norms, embeddings and features (MoD/FlexiDepth routers) are not counted. Returns per-token
    training FLOPs per part (``attention``, ``feedforward``, ``mamba``, ``logits``) and ``total``.
    """
    s = seq_length or m.seq_length
    symbols = [entry.symbol for entry in m.layer_table()]
    parts = {
        "attention": symbols.count("A") * _hybrid_attention_fwd(m, s),
        "feedforward": symbols.count("E") * _hybrid_feedforward_fwd(m),
        "mamba": (symbols.count("M") + symbols.count("R")) * _hybrid_mamba_fwd(m),
        "logits": 2.0 * m.hidden_size * m.vocab_size * (1 + m.mtp_depth),
    }
    out = {name: 3.0 * value for name, value in parts.items()}  # forward + backward (2x)
    out["total"] = sum(out.values())
    return out


def flop_counts(m: ModelConfig, seq_length: int | None = None) -> dict[str, float]:
    """Training FLOPs per token both ways, for figures printed side by side: ``ours`` (6 x active
    matmul parameters + causal attention, :func:`flops_per_token` with ``causal=True``) and
    ``hybrid`` (:func:`hybrid_flops_per_token`)."""
    return {"ours": flops_per_token(m, seq_length, causal=True)["total"],
            "hybrid": hybrid_flops_per_token(m, seq_length)["total"]}
