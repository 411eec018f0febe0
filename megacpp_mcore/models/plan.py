"""The layer plan of a model: every layer, its block, backend, features and parameter count, the
pipeline split, and a memory estimate, as ``megacpp-mcore plan`` prints it. Analytic (no model is
built): the counts come from :mod:`megacpp_mcore.models.accounting`.

Names, one concept each (the word "plan" meant three things before):

* **layer table**: the compiled per-layer list (``ModelConfig.layer_table()``, one
  :class:`~megacpp_mcore.spec.pattern.LayerEntry` per layer: index, symbol, features, stage);
* **layer plan** (this module, :func:`build_plan`; the ``plan`` command prints it): the layer table
  plus blocks, backends, parameter counts, pipeline stages and the memory estimate;
* **checked run** (:class:`megacpp_mcore.train.loop.CheckedRun`): what ``train`` derives from its
  inputs before anything starts (batch sizes, data-parallel size, checkpoint to load).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from megacpp_mcore.models.accounting import (embedding_params, feature_params, flops_per_token,
                                              hybrid_flops_per_token, layer_params)
from megacpp_mcore.models.presets import ModelConfig
from megacpp_mcore.spec.pattern import LayerEntry, symbol_counts

BLOCK_NAMES = {
    "A": "self-attention",
    "E": "feed-forward",
    "M": "mamba2-mixer",
    "R": "m2rnn-mixer",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes per GPU of the heaviest pipeline stage (bf16 weights, fp32 grads + Adam state; the
    fp32 master weights and Adam moments sharded over data-parallel ranks by the distributed
    optimizer when ``dp`` > 1)."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    moda_depth_kv: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.moda_depth_kv


def check_split(m: ModelConfig, *, tp: int, ep: int) -> None:
    """Refuses a tensor- or expert-parallel size ``m`` cannot be split by, naming the sizes that
    would do (Megatron refuses them at launch): ``plan``'s check and the builder's
    (:meth:`~megacpp_mcore.train.runtime.Parallelism.check_model`)."""
    def divisors(n: int) -> str:
        return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)

    if m.num_attention_heads % tp:
        raise ValueError(f"--tp {tp} does not divide the {m.num_attention_heads} attention heads; "
                         f"allowed: {divisors(m.num_attention_heads)}")
    if m.moe is None and ep > 1:
        raise ValueError(f"--ep {ep}: the model has no experts; allowed: 1")
    if m.moe is not None and m.moe.num_experts % ep:
        raise ValueError(f"--ep {ep} does not divide the {m.moe.num_experts} experts; "
                         f"allowed: {divisors(m.moe.num_experts)}")


def _sbh_bytes(m: ModelConfig, micro_batch: int) -> int:
    """One bf16 ``[s, b, h]`` tensor: the unit of the activation estimates."""
    return m.seq_length * micro_batch * m.hidden_size * 2


def activation_bytes(m: ModelConfig, entry: LayerEntry, micro_batch: int, tp: int) -> int:
    """Rough bf16 activation memory kept for backward by one layer (flash attention, no recompute)."""
    sbh = _sbh_bytes(m, micro_batch)
    factor = {"A": 10, "E": 6, "M": 12, "R": 10}[entry.symbol]
    if entry.symbol == "E":
        inner = m.moe.topk * m.moe.ffn_hidden_size + (m.moe.shared_expert_size or 0) if m.moe else m.ffn_hidden_size
        factor += 5 * inner / m.hidden_size
    return int(factor * sbh / tp)


def mtp_activation_bytes(m: ModelConfig, micro_batch: int, tp: int) -> int:
    """Rough bf16 activation memory kept for backward by ONE depth of the shared MTP block (no
    recompute): its A and E layers as on the trunk, plus its input mixing (the two normed inputs,
    their ``[s, b, 2h]`` concatenation into the projection) and the final norm before the head."""
    sbh = _sbh_bytes(m, micro_batch)
    layers = sum(activation_bytes(m, LayerEntry(index=m.num_layers, symbol=s, features=frozenset(), stage=0),
                                  micro_batch, tp) for s in "AE")
    return layers + int(5 * sbh / tp)


def mtp_activations(m: ModelConfig, micro_batch: int, tp: int, *, recompute: bool = False) -> int:
    """Rough activation memory of the MTP block at the peak (the start of backward, every depth's
    forward done). Without recompute each depth keeps :func:`mtp_activation_bytes`; recomputed
    (``--megacpp-mtp-recompute on``) each depth keeps its checkpointed inputs and what lies outside
    the block (the rolled-in embedding, the block's output, the final norm's output: 3 s x b x h),
    and the backward rebuilds one depth's activations at a time on top of them."""
    if not m.mtp_depth:
        return 0
    per_depth = mtp_activation_bytes(m, micro_batch, tp)
    if not recompute:
        return m.mtp_depth * per_depth
    sbh = _sbh_bytes(m, micro_batch)
    return m.mtp_depth * int(3 * sbh / tp) + per_depth


def build_plan(m: ModelConfig, *, pp: int | None = None, tp: int = 1, ep: int = 1, micro_batch: int = 1,
               backend: str = "auto", dp: int = 1, mtp_recompute: bool = False) -> dict[str, Any]:
    """The plan as a JSON-able dict: ``layers`` (each with its ``features`` and the
    ``feature_parameters`` they add, included in its ``parameters``), ``counts``, ``features``
    (name -> carrying layers and added parameters), ``stages``, ``parameters`` (``features``: the
    part of ``layers`` the features add), ``flops_per_token`` (training FLOPs per token two ways:
    ``ours``, 6 x active matmul parameters + causal attention, and ``hybrid_flops``, Megatron-Bridge's
    convention, :func:`~megacpp_mcore.models.accounting.hybrid_flops_per_token`), ``memory``
    (``dp`` > 1: distributed-optimizer state sharded over ``dp`` data-parallel ranks;
    ``mtp_recompute``: the MTP block recomputed in backward, :func:`mtp_activations`)."""
    from megacpp_mcore.spec.backends import resolve_backend_name

    table = m.layer_table(pp=pp)
    pp = 1 + max(e.stage for e in table)
    resolved = resolve_backend_name(backend)
    layers = []
    for entry in table:
        added = feature_params(m, entry)  # {"mod": router, "flexidepth": norm + router + adapter}
        layers.append({
            "index": entry.index,
            "symbol": entry.symbol,
            "block": BLOCK_NAMES[entry.symbol],
            "backend": resolved,
            "features": sorted(entry.features),
            "stage": entry.stage,
            "parameters": layer_params(m, entry),  # the whole built layer, features included
            "feature_parameters": added,
        })
    # per feature: the layers carrying it, the parameters it adds over them (MoD: its routers) and
    # its configuration in one line, when its config describes itself (MoD: mode and budget)
    features = {name: {"layers": [x["index"] for x in layers if name in x["features"]],
                       "parameters": sum(x["feature_parameters"].get(name, 0) for x in layers),
                       "config": _describe(m.feature_configs.get(name))}
                for name in sorted({f for x in layers for f in x["features"]})}
    extra = embedding_params(m)
    stages = []
    for s in range(pp):
        members = [layer for layer in layers if layer["stage"] == s]
        params = sum(layer["parameters"] for layer in members)
        if s == 0:
            params += extra["embedding"]
        if s == pp - 1:
            params += extra["output_layer"] + extra["final_norm"] + extra.get("mtp_shared_block", 0)
            if pp > 1 and m.tie_embeddings:
                params += extra["embedding"]  # the last stage's copy of the tied embedding
        stages.append({"stage": s, "layers": [layer["index"] for layer in members],
                       "pattern": "".join(layer["symbol"] for layer in members), "parameters": params})
    total = sum(layer["parameters"] for layer in layers) + sum(extra.values())
    memory = _memory(m, table, stages, tp=tp, ep=ep, micro_batch=micro_batch, dp=dp, mtp_recompute=mtp_recompute)
    layer_hash = hashlib.sha256(
        json.dumps([[x["index"], x["symbol"], x["features"]] for x in layers]).encode()
    ).hexdigest()[:16]
    return {
        "model": m.name,
        "pattern": m.pattern,
        "num_layers": m.num_layers,
        "expanded_pattern": "".join(e.symbol for e in table),
        "layer_table_hash": layer_hash,
        "backend": {"requested": backend, "resolved": resolved},
        "parallel": {"tp": tp, "pp": pp, "ep": ep, "dp": dp, "micro_batch": micro_batch,
                     "mtp_recompute": bool(mtp_recompute and m.mtp_depth)},
        "layers": layers,
        "counts": symbol_counts(e.symbol for e in table),
        "features": features,
        "stages": stages,
        "parameters": {"total": total, **extra,
                       "layers": sum(layer["parameters"] for layer in layers),
                       "features": sum(f["parameters"] for f in features.values())},
        "flops_per_token": {"ours": flops_per_token(m, causal=True)["total"],
                            "hybrid_flops": hybrid_flops_per_token(m)["total"]},
        "memory": dataclasses.asdict(memory) | {"total": memory.total},
    }


def _describe(config: Any) -> str | None:
    describe = getattr(config, "describe", None)
    return describe() if callable(describe) else None


def _memory(m: ModelConfig, table, stages, *, tp: int, ep: int, micro_batch: int, dp: int,
            mtp_recompute: bool = False) -> MemoryEstimate:
    heaviest = max(stages, key=lambda s: s["parameters"])
    expert_share = 0
    if m.moe is not None:
        per_layer = m.moe.num_experts * 3 * m.hidden_size * m.moe.ffn_hidden_size
        n_e = sum(1 for i in heaviest["layers"] if table[i].symbol == "E")
        if m.mtp_depth and heaviest["stage"] == len(stages) - 1:
            n_e += 1  # the MTP shared block's E, on the last stage
        expert_share = per_layer * n_e
    dense = heaviest["parameters"] - expert_share
    dense_per_gpu, experts_per_gpu = dense // tp, expert_share // (ep * tp)
    params_per_gpu = dense_per_gpu + experts_per_gpu
    # fp32 master + Adam m, v (12 B/param): dense state over dp ranks, expert state over the
    # expert-data-parallel ranks (dp * tp / ep); one copy each when dp == 1
    expert_dp = max(1, dp * tp // ep)
    optimizer = 12 * (dense_per_gpu // dp + experts_per_gpu // expert_dp)
    acts = sum(activation_bytes(m, table[i], micro_batch, tp) for i in heaviest["layers"])
    if m.mtp_depth and heaviest["stage"] == len(stages) - 1:  # the MTP block, on the last stage
        acts += mtp_activations(m, micro_batch, tp, recompute=mtp_recompute)
    moda = 0
    moda_cfg = m.features.get("moda")
    if moda_cfg is not None and hasattr(moda_cfg, "buffer_bytes"):
        moda = moda_cfg.buffer_bytes(m, micro_batch, tp=tp, pp=len(stages))
    return MemoryEstimate(
        weights=params_per_gpu * 2,
        grads=params_per_gpu * 4,
        optimizer=optimizer,
        activations=acts,
        moda_depth_kv=moda,
    )


def _fmt_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_plan(plan: dict[str, Any]) -> str:
    """The human-readable table printed by ``megacpp-mcore plan``."""
    lines = [
        f"model {plan['model']}: pattern {plan['pattern']!r} x {plan['num_layers']} layers, "
        f"backend {plan['backend']['resolved']} (requested {plan['backend']['requested']})",
        "",
        f"{'idx':>4}  sym  {'block':<15} {'backend':<7} {'stage':>5}  {'params':>9}  features",
    ]
    for layer in plan["layers"]:
        # a feature that adds parameters shows them: "mla,mod(+4.10K)"
        added = layer["feature_parameters"]
        features = ",".join(f + (f"(+{_fmt_count(added[f])})" if added.get(f) else "")
                            for f in layer["features"])
        lines.append(
            f"{layer['index']:>4}  {layer['symbol']:^3}  {layer['block']:<15} {layer['backend']:<7} "
            f"{layer['stage']:>5}  {_fmt_count(layer['parameters']):>9}  {features or '-'}"
        )
    counts = "  ".join(f"{s}={n}" for s, n in plan["counts"].items())
    lines += ["", f"counts: {counts}", "features:" if plan["features"] else "features: none"]
    for name, f in plan["features"].items():
        lines.append(f"  {name}: {len(f['layers'])} layers ({','.join(map(str, f['layers']))})"
                     + (f", +{_fmt_count(f['parameters'])} params" if f["parameters"] else "")
                     + (f"; {f['config']}" if f.get("config") else ""))
    lines.append("pipeline stages:")
    for st in plan["stages"]:
        lines.append(f"  stage {st['stage']}: layers {st['layers'][0]}..{st['layers'][-1]} "
                     f"{st['pattern']}  {_fmt_count(st['parameters'])} params")
    p = plan["parameters"]
    lines.append(
        f"parameters: total {_fmt_count(p['total'])} (layers {_fmt_count(p['layers'])} incl. "
        f"features {_fmt_count(p['features'])}, "
        f"embedding {_fmt_count(p['embedding'])}, output {_fmt_count(p['output_layer'])}"
        + (f", MTP shared block {_fmt_count(p['mtp_shared_block'])}" if "mtp_shared_block" in p else "")
        + ")"
    )
    mem = plan["memory"]
    par = plan["parallel"]
    fl = plan["flops_per_token"]
    lines.append(f"training FLOPs per token: ours {fl['ours'] / 1e9:.2f} G (6 x active matmul params + "
                 f"causal attention), hybrid_flops {fl['hybrid_flops'] / 1e9:.2f} G (Megatron-Bridge)")
    lines.append(
        f"memory estimate per GPU, heaviest stage (tp={par['tp']} ep={par['ep']} dp={par['dp']} "
        f"micro-batch={par['micro_batch']}{' mtp-recompute' if par.get('mtp_recompute') else ''}): "
        f"weights {_fmt_bytes(mem['weights'])}, grads "
        f"{_fmt_bytes(mem['grads'])}, optimizer {_fmt_bytes(mem['optimizer'])}, activations "
        f"{_fmt_bytes(mem['activations'])}, MoDA depth-KV {_fmt_bytes(mem['moda_depth_kv'])}; "
        f"total {_fmt_bytes(mem['total'])}"
    )
    return "\n".join(lines)
