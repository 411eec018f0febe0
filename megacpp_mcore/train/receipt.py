"""Run receipts: one JSON file per training run, validated against ``receipt.schema.json``.

The trainer hands over what it was given and measured (:class:`RunFacts`); this module assembles
the receipt (:func:`assemble`), validates it against the schema (:func:`validate`), writes it
(:func:`write`) and formats the end-of-run summary (:func:`summary_lines`).

The receipt says what actually ran: the expanded pattern and a hash of the layer table, the
topology, every feature's state, the backend that was requested AND the one observed in the built
modules (classes of each layer's attention core, linears, norms, experts; on TE which attention
kernel TE selected), package versions, throughput, peak memory, goodput/badput seconds and the
best validation bits-per-byte.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
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

from megacpp_mcore.train.runtime import unwrap_model

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


# TE keeps its last attention selection in a module-global dict ``_attention_backends``; its home
# moved across TE 2.x releases. Searched in this order.
TE_SELECTION_MODULES = (
    "transformer_engine.pytorch.attention.dot_product_attention.dot_product_attention",
    "transformer_engine.pytorch.attention.dot_product_attention.utils",
    "transformer_engine.pytorch.dot_product_attention.dot_product_attention",
    "transformer_engine.pytorch.attention",
)


# Where the te-attention-backend-per-layer patch keeps each DotProductAttention's own selection.
TE_INSTANCE_SELECTION_ATTR = "_megacpp_attention_backends"
_SELECTED = ("use_flash_attention", "use_fused_attention", "use_unfused_attention")


def te_attention_selection(instances: Iterable[torch.nn.Module] = ()) -> dict[str, Any] | None:
    """What TE's ``DotProductAttention`` selected at its last forward (None when TE is absent or
    no TE attention has run yet): flash / fused (with the cuDNN backend enum) / unfused.

    With the per-layer patch applied each instance keeps its own selection (read from
    ``instances``, the model's TE core attentions); without it TE keeps one per process."""
    candidates = [m.__dict__.get(TE_INSTANCE_SELECTION_ATTR) for m in instances]
    for name in TE_SELECTION_MODULES:
        try:
            candidates.append(getattr(importlib.import_module(name), "_attention_backends", None))
        except Exception:
            continue
    state = next((c for c in candidates
                  if isinstance(c, dict) and any(c.get(k) for k in _SELECTED)), None)
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
    te_cores: list[torch.nn.Module] = []
    for chunk in chunks:
        model = unwrap_model(chunk)
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
                        if is_te_module(sub):
                            te_cores.append(sub)
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
        "te_attention": te_attention_selection(te_cores) if core_kinds["te"] else None,
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


# ------------------------------------------------------------------------------------- assembly --

@dataclasses.dataclass(frozen=True, kw_only=True)
class RunFacts:
    """What a training run was given and measured; :func:`assemble` turns it into the receipt.

    The trainer collects these on every rank (``observed`` has one :func:`observe_backends` per
    rank, ``peak_memory`` is the maximum over ranks) and hands them over; it writes no receipt
    field itself.
    """

    config: Any  # megacpp_mcore.train.loop.TrainConfig: what was asked for
    checked: Any  # megacpp_mcore.train.loop.CheckedRun: model, seq, dp, global batch, micro-batches
    preset: str | None
    started_at: datetime.datetime
    world_size: int
    backend: str  # the resolved backend name
    observed: list[dict]  # observe_backends() of every rank, by rank
    bf16: bool
    # the kernel-path fields of the TransformerConfig as built (train.fast_paths.CONFIG_FIELDS)
    kernel_paths: dict = dataclasses.field(default_factory=dict)
    data_prefix: str
    data_manifest: dict
    consumed_samples: int
    completed_steps: int
    losses: list[dict]  # per logged step: step, loss, grad_norm
    last_loss: float
    validation: list[dict]  # per evaluation: step, bpb
    stats: dict  # latest StatsCollector.gather()
    stats_history: list[dict]
    compute_s: float  # seconds inside training steps
    compute_steps: int
    peak_memory: dict  # kind, bytes (max over ranks)
    seconds: dict[str, float]  # wall seconds per category: step_compute (goodput) and badput
    total_s: float
    cpu_s: float  # this rank's process time, all threads
    saved: list[str]
    loaded_from: str | None
    # Start-up as the user sees it: process start to the end of this run's first training step,
    # and that step's own seconds (kernel compilation and autotuning land in it). None: no step ran.
    first_step_end_s: float | None = None
    first_step_compute_s: float | None = None
    # INVALID rules that fired (megacpp_mcore.train.invalid: rule, reason, step) and the count of
    # steps with a non-finite loss or gradients.
    invalid: list[dict] = dataclasses.field(default_factory=list)
    nonfinite_steps: int = 0
    # --load as a resume or as a fine-tune's "backbone"; the trainable parameters' name pattern
    # when the backbone was frozen (megacpp_mcore.train.dynamic_depth)
    load_mode: str | None = None
    trainable: str | None = None


def merge_observed(parts: list[dict]) -> dict:
    """Observed backends of all ranks: layers by global index, class counts summed per rank."""
    layers = {}
    summary: dict[str, dict[str, int]] = {}
    te_attention = None
    kinds = set()
    for part in parts:
        for layer in part["layers"]:
            layers.setdefault(layer["index"], layer)
        for role, counts in part["summary"].items():
            for cls, n in counts.items():
                summary.setdefault(role, {})
                summary[role][cls] = summary[role].get(cls, 0) + n
        te_attention = te_attention or part["te_attention"]
        if part["attention"] != "none":
            kinds.add(part["attention"])
    attention = "none" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"
    return {"attention": attention, "summary": dict(sorted(summary.items())),
            "layers": [layers[i] for i in sorted(layers)], "te_attention": te_attention,
            "counted_over_ranks": len(parts)}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def first_step_overhead(f: RunFacts) -> float:
    """Seconds the first step took beyond a steady step (compilation, autotuning, allocator warm-up):
    its compute time less the mean of the later steps'; 0 with fewer than two steps."""
    if f.first_step_compute_s is None or f.compute_steps < 2:
        return 0.0
    steady = (f.compute_s - f.first_step_compute_s) / (f.compute_steps - 1)
    return max(f.first_step_compute_s - steady, 0.0)


def frozen_backbone(f: RunFacts, plan: dict) -> dict[str, Any] | None:
    """What a frozen-backbone run trained (``None``: everything): the trainable names' pattern,
    the layer plan's parameter counts (FlexiDepth's branches vs the rest) and the layers carrying
    them."""
    if f.trainable is None:
        return None
    fd = plan["features"].get("flexidepth", {"layers": [], "parameters": 0})
    return {"trainable_pattern": f.trainable, "trainable_params": fd["parameters"],
            "frozen_params": plan["parameters"]["total"] - fd["parameters"], "trainable_layers": fd["layers"]}


def assemble(f: RunFacts) -> dict[str, Any]:
    """The receipt of a run (``receipt_path`` is added by the writer); see the schema.

    Throughput carries FLOPs two ways: ``model_*`` by 6 x active matmul parameters + attention
    (:func:`~megacpp_mcore.models.accounting.flops_per_token`), ``hybrid_*`` by Megatron-Bridge's
    ``hybrid_flops`` convention (:func:`~megacpp_mcore.models.accounting.hybrid_flops_per_token`),
    the count published hybrid figures use. Time: the first step's excess over a steady step is
    start-up badput (``first_step_overhead``), not goodput."""
    from megacpp_mcore.models.accounting import flops_per_token, hybrid_flops_per_token
    from megacpp_mcore.models.plan import build_plan
    from megacpp_mcore.train import dynamic_depth
    from megacpp_mcore.train.substrate import corpus_fingerprint
    from megacpp_mcore.train.tokenizer import record as tokenizer_record

    cfg, checked, model = f.config, f.checked, f.checked.model
    par, gbs, seq = cfg.parallel, checked.global_batch, checked.seq_length
    flops = flops_per_token(model, seq)
    hybrid = hybrid_flops_per_token(model, seq)["total"]
    warmup = first_step_overhead(f)
    tokens_per_s = f.compute_steps * gbs * seq / f.compute_s if f.compute_steps else 0.0
    layer_plan = build_plan(model, pp=par.pp, tp=par.tp, ep=par.ep, micro_batch=cfg.micro_batch_size,
                            backend=cfg.backend)
    trained = [v for v in f.validation if v["step"] > 0]  # "first" = first after training began
    untrained = [v for v in f.validation if v["step"] == 0]
    best = min(f.validation, key=lambda v: v["bpb"]) if f.validation else None
    return {
        "schema_version": SCHEMA_VERSION,
        "status": "completed" if f.completed_steps >= cfg.steps else "stopped",
        "command": command_line(),
        "started_at": f.started_at.isoformat(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "preset": f.preset,
        "model": {k: getattr(model, k) for k in ("name", "pattern", "num_layers", "hidden_size",
                                                 "num_attention_heads", "ffn_hidden_size",
                                                 "vocab_size", "seq_length", "mtp_depth")},
        "expanded_pattern": layer_plan["expanded_pattern"],
        "layer_table_hash": layer_plan["layer_table_hash"],
        "layer_counts": layer_plan["counts"],
        "parameters": layer_plan["parameters"]["total"],
        "features": feature_states(model),
        "topology": {"world_size": f.world_size, "tp": par.tp, "pp": par.pp, "ep": par.ep,
                     "dp": checked.dp, "sp": par.sp, "vp": par.vp,
                     "micro_batch_size": cfg.micro_batch_size, "global_batch_size": gbs,
                     "num_microbatches": checked.num_microbatches, "seq_length": seq},
        "backends": {"requested": cfg.backend, "resolved": f.backend,
                     "observed": merge_observed(f.observed), "kernel_paths": dict(f.kernel_paths)},
        "precision": "bf16" if f.bf16 else "fp32",
        "versions": package_versions(),
        # kind/vocab/hash of the data's tokenizer: substrate for `compare` (bits/byte stays comparable)
        "tokenizer": tokenizer_record(f.data_manifest.get("tokenizer")),
        "data": {"prefix": f.data_prefix, "source": f.data_manifest.get("source"),
                 "splits": f.data_manifest.get("splits"), "consumed_samples": f.consumed_samples,
                 "tokenizer": f.data_manifest.get("tokenizer"),
                 "fingerprint": corpus_fingerprint(f.data_manifest.get("splits"))},
        "training": {"steps": cfg.steps, "completed_steps": f.completed_steps, "seed": cfg.seed,
                     "lr": cfg.lr, "min_lr": cfg.min_lr, "warmup_steps": cfg.warmup_steps,
                     "lr_schedule": "cosine", "losses": f.losses, "final_loss": _finite(f.last_loss),
                     "nonfinite_steps": f.nonfinite_steps,
                     # the LM loss's path: GPTModel's output layer and cross-entropy, or the fused one
                     "lm_loss": "fused" if cfg.fused_lm_loss else "gptmodel",
                     "frozen_backbone": frozen_backbone(f, layer_plan)},
        "throughput": {"tokens_per_s": tokens_per_s,
                       "model_flops_per_token": flops["total"],
                       "active_params": flops["active_params"],
                       "model_tflops_per_s": tokens_per_s * flops["total"] / 1e12,
                       "model_tflops_per_s_per_device": tokens_per_s * flops["total"] / 1e12 / f.world_size,
                       "hybrid_flops_per_token": hybrid,
                       "hybrid_tflops_per_s_per_device": tokens_per_s * hybrid / 1e12 / f.world_size},
        "peak_memory": dict(f.peak_memory),
        "time": {"total_s": f.total_s, "cpu_s": f.cpu_s,
                 "goodput_s": max(f.seconds["step_compute"] - warmup, 0.0),
                 "startup_to_first_step_s": f.first_step_end_s,
                 "badput_s": {"first_step_overhead": warmup,
                              **{k: v for k, v in f.seconds.items() if k != "step_compute"}}},
        "validation": {"metric": "bits_per_byte", "history": f.validation,
                       "untrained_bpb": untrained[0]["bpb"] if untrained else None,
                       "first_bpb": trained[0]["bpb"] if trained else None,
                       "final_bpb": f.validation[-1]["bpb"] if f.validation else None,
                       "best_bpb": best["bpb"] if best else None,
                       "best_step": best["step"] if best else None},
        "stats": {"latest": f.stats, "history": f.stats_history,
                  "flexidepth": dynamic_depth.usage(f.stats, model)},
        "checkpoints": {"saved": f.saved, "loaded_from": f.loaded_from, "load_mode": f.load_mode},
        "invalid": [dict(item) for item in f.invalid],
    }


def format_bytes(n: float) -> str:
    """``1.50 GiB`` from 1 GiB up, else ``12 MiB`` (progress lines and the summary)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _step0_label(receipt: dict) -> str:
    """What step 0's validation measured: random weights, or the loaded backbone of a fine-tune."""
    return "loaded backbone" if receipt["checkpoints"].get("load_mode") == "backbone" else "untrained"


def summary_lines(receipt: dict) -> list[str]:
    """The end-of-run summary printed by ``megacpp-mcore train``, read from the receipt."""
    v, t, th = receipt["validation"], receipt["time"], receipt["throughput"]
    lines = ["-" * 72]
    lines.append(f"{receipt['status']}: {receipt['training']['completed_steps']}/{receipt['training']['steps']} "
                 f"steps in {t['total_s']:.1f} s, {t['cpu_s']:.0f} CPU-s (compute {t['goodput_s']:.1f} s; "
                 + ", ".join(f"{k} {s:.1f} s" for k, s in t["badput_s"].items()) + ")")
    if v["first_bpb"] is not None:
        first_step = next(h["step"] for h in v["history"] if h["step"] > 0)
        lines.append(f"validation bits/byte: first (step {first_step}) {v['first_bpb']:.4f} -> final "
                     f"{v['final_bpb']:.4f} (x{v['final_bpb'] / v['first_bpb']:.3f}); best {v['best_bpb']:.4f} "
                     f"at step {v['best_step']}"
                     + (f"; {_step0_label(receipt)} {v['untrained_bpb']:.4f}"
                        if v["untrained_bpb"] is not None else ""))
    lines.append(f"throughput {th['tokens_per_s']:,.0f} tokens/s, {th['model_tflops_per_s']:.3f} model TFLOP/s "
                 f"({th['model_flops_per_token'] / 1e6:.2f} MFLOP/token; hybrid_flops "
                 f"{th['hybrid_tflops_per_s_per_device']:.3f} TFLOP/s/device); peak memory "
                 f"{format_bytes(receipt['peak_memory']['bytes'])} ({receipt['peak_memory']['kind']})")
    if t["startup_to_first_step_s"] is not None:
        lines.append(f"start-up to the first finished step {t['startup_to_first_step_s']:.1f} s (first step "
                     f"{t['badput_s']['first_step_overhead']:.1f} s over a steady one)")
    obs = receipt["backends"]["observed"]
    lines.append(f"backend requested {receipt['backends']['requested']}, observed attention {obs['attention']}"
                 + (f" ({obs['te_attention']['kernel']})" if obs.get("te_attention") else ""))
    lines.extend(f"INVALID ({item['rule']}): {item['reason']}" for item in receipt["invalid"])
    lines.append(f"receipt: {receipt['receipt_path']}")
    return lines
