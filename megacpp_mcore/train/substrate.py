"""What a run's numbers stand on: the substrate that must be equal for two runs to share a table.

The ablation methodology (DESIGN.md, "Comparisons the way the ablation methodology demands") names
a number's substrate: data and tokenizer, depth, width, context, global batch, steps, topology.
Those are :data:`SUBSTRATE_FIELDS`; two runs that differ in any of them are not comparable
unlabelled. What an ablation *changes* (the pattern and its layer table, the peak learning rate,
the kernel paths, the package and upstream versions) is the run's identity
(:data:`IDENTITY_FIELDS`): shown next to every number, never a reason to refuse, or an ablation
could never be compared with its baseline.

Pure functions of a receipt dict (no torch, no megatron): the run calls :func:`corpus_fingerprint`
when it writes its receipt and ``megacpp-mcore compare`` reads the same facts back, also from
receipts written before the fingerprint existed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

SUBSTRATE_FIELDS = ("data", "tokenizer", "depth", "width", "context", "global_batch", "steps", "topology")
IDENTITY_FIELDS = ("pattern", "layer_table", "lr", "kernels", "megacpp_mcore", "megatron_core")

# receipt ``backends.kernel_paths`` (train.fast_paths.CONFIG_FIELDS) -> the word :func:`kernel_label`
# shows for a fusion that was on
_FUSIONS = (("use_mamba_mem_eff_path", "mamba"), ("bias_dropout_fusion", "residual"),
            ("apply_rope_fusion", "rope"), ("moe_permute_fusion", "permute"),
            ("moe_router_fusion", "router"), ("cross_entropy_loss_fusion", "ce"))


def corpus_fingerprint(splits: Mapping[str, Any] | None) -> str:
    """16 hex digits naming the corpus a run read: its documents and bytes per split (the manifest's
    ``splits``). Independent of where the sources lay (the same headers elsewhere are the same
    data) and of the tokenizer (a separate substrate field): byte-level and BPE encodings of one
    corpus share a fingerprint. ``"unknown"`` when the receipt has no split counts."""
    if not splits:
        return "unknown"
    # documents and bytes only: counts a tokenizer adds (tokens per split) must not change it
    counts = {name: {k: c.get(k) for k in ("documents", "bytes")} if isinstance(c, Mapping) else c
              for name, c in splits.items()}
    canonical = json.dumps(counts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def tokenizer_label(receipt: Mapping[str, Any]) -> str:
    """``bytes`` for the byte-level tokenizer (also when the receipt names none), else
    ``<kind>:<vocab size>`` with the first 8 digits of its hash where the receipt records one."""
    tok = receipt.get("tokenizer")
    if tok is None:
        tok = (receipt.get("data") or {}).get("tokenizer")
    if tok is None:
        return "bytes"
    if not isinstance(tok, Mapping):
        return str(tok)
    kind = str(tok.get("kind", "unknown"))
    if kind in ("bytes", "byte"):
        return "bytes"
    digest = next((str(tok[k]) for k in ("sha256", "fingerprint", "hash") if tok.get(k)), "")
    return f"{kind}:{tok.get('vocab_size', '?')}" + (f"@{digest[:8]}" if digest else "")


def topology_label(topology: Mapping[str, Any]) -> str:
    """``tp1 pp2 ep1 dp1`` (+ ``sp``, ``vp2`` where set)."""
    parts = [f"{k}{topology.get(k, '?')}" for k in ("tp", "pp", "ep", "dp")]
    if topology.get("sp"):
        parts.append("sp")
    if topology.get("vp"):
        parts.append(f"vp{topology['vp']}")
    return " ".join(parts)


def kernel_label(receipt: Mapping[str, Any]) -> str | None:
    """The kernel paths a run was built with, short: the fusions that were on, the MoE dispatcher,
    CUDA graphs and FP8 where used (``"fused: rope permute, alltoall, fp8 hybrid/delayed"``;
    ``"unfused"`` with none of them). ``None`` for a receipt written before they were recorded.
    The same model either way: what changes is the speed, so tokens/s is read next to it."""
    paths = (receipt.get("backends") or {}).get("kernel_paths")
    if not paths:
        return None
    on = [word for field, word in _FUSIONS if paths.get(field)]
    parts = [f"fused: {' '.join(on)}" if on else "unfused"]
    if paths.get("moe_token_dispatcher_type"):
        parts.append(str(paths["moe_token_dispatcher_type"]))
    if paths.get("cuda_graph_impl") not in (None, "none"):
        parts.append(f"graphs {paths['cuda_graph_impl']}")
    if paths.get("fp8"):
        parts.append(f"fp8 {paths['fp8']}/{paths.get('fp8_recipe')}")
    return ", ".join(parts)


def substrate(receipt: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`SUBSTRATE_FIELDS` of a receipt (``None`` for a fact the receipt lacks)."""
    model, topo = receipt.get("model") or {}, receipt.get("topology") or {}
    data = receipt.get("data") or {}
    return {
        "data": data.get("fingerprint") or corpus_fingerprint(data.get("splits")),
        "tokenizer": tokenizer_label(receipt),
        "depth": model.get("num_layers"),
        "width": model.get("hidden_size"),
        "context": topo.get("seq_length", model.get("seq_length")),
        "global_batch": topo.get("global_batch_size"),
        "steps": (receipt.get("training") or {}).get("steps"),
        "topology": topology_label(topo),
    }


def identity(receipt: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`IDENTITY_FIELDS` of a receipt: what the run is, beyond what it stands on."""
    versions = receipt.get("versions") or {}
    return {
        "pattern": receipt.get("expanded_pattern") or (receipt.get("model") or {}).get("pattern"),
        "layer_table": receipt.get("layer_table_hash"),
        "lr": (receipt.get("training") or {}).get("lr"),
        "kernels": kernel_label(receipt),
        "megacpp_mcore": versions.get("megacpp_mcore"),
        "megatron_core": versions.get("megatron_core"),
    }


def differences(first: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    """``field other vs first`` for every substrate field where ``other`` differs from ``first``."""
    return [f"{k} {other[k]} vs {first[k]}" for k in SUBSTRATE_FIELDS if other[k] != first[k]]
