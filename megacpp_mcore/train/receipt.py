"""Run receipts: one JSON file per training run, validated against ``receipt.schema.json``.

The receipt says what actually ran: the expanded pattern and a hash of the layer table, the
topology, every feature's state, the backend that was requested AND the one observed in the built
modules (classes of each layer's attention core, linears, norms, experts; on TE which attention
kernel TE selected), package versions, throughput, peak memory, goodput/badput seconds and the
best validation bits-per-byte.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import math
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import torch

SCHEMA_PATH = Path(__file__).with_name("receipt.schema.json")
SCHEMA_VERSION = 1

# Submodule names (inside a decoder layer) whose classes identify the backend that was built.
ROLES = (
    "self_attention", "core_attention", "linear_qkv", "linear_q_proj", "linear_q_down_proj",
    "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj",
    "input_layernorm", "pre_mlp_layernorm", "q_layernorm", "k_layernorm", "kv_layernorm",
    "mlp", "linear_fc1", "linear_fc2", "router", "experts", "shared_experts",
    "token_dispatcher", "mixer",
)
FEATURES = ("mla", "moe", "mtp", "mod", "moda")


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def validate(receipt: dict) -> None:
    """Raises ``jsonschema.ValidationError`` when ``receipt`` does not match the schema."""
    import jsonschema

    jsonschema.validate(receipt, load_schema())


def _class_name(module: torch.nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def te_attention_selection() -> dict[str, Any] | None:
    """What TE's ``DotProductAttention`` selected at its last forward (None when TE is absent or
    no TE attention has run yet): flash / fused (with the cuDNN backend enum) / unfused."""
    # TE keeps its last selection in a module-global dict; its home moved across TE 2.x releases.
    state = None
    for name in ("transformer_engine.pytorch.attention.dot_product_attention.dot_product_attention",
                 "transformer_engine.pytorch.attention.dot_product_attention.utils",
                 "transformer_engine.pytorch.dot_product_attention.dot_product_attention",
                 "transformer_engine.pytorch.attention"):
        try:
            candidate = getattr(importlib.import_module(name), "_attention_backends", None)
        except Exception:
            continue
        if isinstance(candidate, dict) and any(
                candidate.get(k) for k in ("use_flash_attention", "use_fused_attention", "use_unfused_attention")):
            state = candidate
            break
    if state is None:
        return None
    if state.get("use_flash_attention"):
        kernel = f"flash-attention ({state.get('flash_attention_backend')})"
    elif state.get("use_fused_attention"):
        kernel = f"cudnn-fused ({state.get('fused_attention_backend')})"
    else:
        kernel = "unfused (TE torch path)"
    return {
        "kernel": kernel,
        "use_flash_attention": bool(state.get("use_flash_attention")),
        "use_fused_attention": bool(state.get("use_fused_attention")),
        "use_unfused_attention": bool(state.get("use_unfused_attention")),
        "fused_attention_backend": str(state.get("fused_attention_backend")),
        "flash_attention_backend": str(state.get("flash_attention_backend")),
        "env": {k: v for k, v in os.environ.items() if k.startswith("NVTE_")},
    }


TE_MODULES = ("transformer_engine", "megatron.core.extensions.transformer_engine")


def is_te_module(module: torch.nn.Module) -> bool:
    """True when ``module``'s class is, or derives from, a Transformer Engine class (adapters such
    as an MLA core attention subclass TE's and keep their own names)."""
    return any(cls.__module__.startswith(TE_MODULES) for cls in type(module).__mro__)


def observe_backends(chunks: Iterable[torch.nn.Module]) -> dict[str, Any]:
    """The classes actually built, read from the modules (never from the request).

    Returns ``layers`` (per decoder layer: global index, layer class, ``{role: class}``),
    ``summary`` (``{role: {class: count}}`` over all layers and the embedding/head/final norm),
    ``attention`` (``te``/``local``/``mixed``/``none``) and, on TE, ``te_attention`` (the kernel TE
    selected at the last forward).
    """
    layers = []
    summary: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    core_kinds: collections.Counter = collections.Counter()  # "te"/"local" per attention core
    for chunk in chunks:
        model = _unwrap(chunk)
        decoder = getattr(model, "decoder", None)
        for layer in getattr(decoder, "layers", []):
            roles = {}
            for name, sub in layer.named_modules():
                leaf = name.rsplit(".", 1)[-1]
                if name and leaf in ROLES and name not in roles and type(sub).__name__ != "IdentityOp":
                    roles[name] = _class_name(sub)
                    summary[leaf][type(sub).__name__] += 1
                    if leaf == "core_attention":
                        core_kinds["te" if is_te_module(sub) else "local"] += 1
            index = getattr(layer, "layer_number", len(layers) + 1) - 1
            layers.append({"index": int(index), "class": _class_name(layer), "modules": roles})
        for name, sub in (("final_layernorm", getattr(decoder, "final_layernorm", None)),
                          ("output_layer", getattr(model, "output_layer", None)),
                          ("embedding", getattr(getattr(model, "embedding", None), "word_embeddings", None))):
            if isinstance(sub, torch.nn.Module):
                summary[name][type(sub).__name__] += 1
    kind = "none" if not core_kinds else next(iter(core_kinds)) if len(core_kinds) == 1 else "mixed"
    return {
        "attention": kind,
        "summary": {role: dict(counts) for role, counts in sorted(summary.items())},
        "layers": sorted(layers, key=lambda x: x["index"]),
        "te_attention": te_attention_selection() if core_kinds["te"] else None,
    }


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def package_versions() -> dict[str, str | None]:
    from megacpp_mcore.spec.backends import detect

    env = detect()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": _dist_version("megatron-core", "megatron_core"),
        "transformer_engine": env.te,
        "megacpp_mcore": _dist_version("megacpp-mcore"),
        "mamba_ssm": env.mamba_ssm,
        "triton": env.triton,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def feature_states(model) -> dict[str, dict[str, Any]]:
    """Every known feature: enabled or not, the layers it sits on, and its config."""
    table = model.layer_table()
    states: dict[str, dict[str, Any]] = {}
    configs = model.feature_configs
    for name in sorted(set(FEATURES) | set(configs)):
        if name == "moe":
            layers = [e.index for e in table if e.symbol == "E"] if model.moe else []
            states[name] = {"enabled": model.moe is not None, "layers": layers, "config": _jsonable(model.moe)}
        elif name == "mtp":
            states[name] = {"enabled": model.mtp_depth > 0, "layers": [],
                            "config": {"depth": model.mtp_depth}}
        else:
            layers = [e.index for e in table if name in e.features]
            states[name] = {"enabled": name in configs, "layers": layers,
                            "config": _jsonable(configs.get(name))}
    return states


def _finite_json(value: Any) -> Any:
    """NaN/inf (e.g. a statistic not measured yet) become ``null``: receipts are strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    return value


def write(path: str | os.PathLike, receipt: dict) -> Path:
    """Writes ``receipt`` atomically (temporary file, then rename)."""
    receipt = _finite_json(receipt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(receipt, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name] + sys.argv[1:]
