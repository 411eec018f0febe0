"""Thin launcher around a stock Megatron-LM checkout's ``pretrain_gpt.py``.

    python -m megacpp_mcore.upstream.launch_pretrain --megatron-lm PATH <pretrain_gpt.py arguments>

What it adds to ``pretrain_gpt.py``, without editing the checkout:

1. applies the needed runtime patches of ``patches/`` (explicitly, and says which): among them
   ``aux-loss-scale-without-moe`` (MoD's loss scale on models without experts) and
   ``layer-metrics-in-moe-report`` (MoD's ``mod_*`` statistics in ``training_log``'s line and
   tensorboard on every release, summed over pipeline stages; docs/upstream.md, "MoD under
   pretrain_gpt.py");
2. builds the model with the package's one GPTModel builder (``megacpp_mcore.train.runtime.gpt_model``,
   the one ``megacpp-mcore train`` uses): ``--spec MODULE ATTR`` (one of ``layer_specs``), with the
   spec's ``auto`` backend resolved from ``--transformer-impl``, and the package's shared-block MTP
   on the last pipeline stage when ``--megacpp-mtp-depth K`` > 0 (``megacpp_mcore.features.mtp.MTPGPTModel``).
   Megatron-LM 0.16.1's builder cannot do this: it builds its per-depth MTP from the config, ignores
   ``--spec`` for it and raises ``UnboundLocalError`` when ``--spec`` meets ``--mtp-num-layers``
   (still so at core_v0.19.0);
3. refuses, before any process group starts, flags that would silently build something else
   (``--mtp-num-layers``, legacy models, YAML configs, a missing ``--spec``), and MLA flags that
   disagree with the spec's MLA configuration;
4. ``--check-flags``: Megatron's parser (with the package's flags) on the arguments, nothing started;
   the recipes run it once before torchrun (and under ``--dry-run``), so a bad flag is one line and
   exit 2 (no output directory, no per-rank tracebacks); exit 3 and one line where the checkout's
   parser does not import on this host (a dry run then prints its command unchecked).

Everything else (data, optimizer, checkpoints, logging) is ``pretrain_gpt.py``'s own: the launcher
imports that file as a module and calls Megatron's ``pretrain`` with its dataset provider, forward
step and embedding-rank function, as its ``__main__`` block does, but with our builder. Checkouts
at tags ``core_v0.16.1`` through ``core_v0.19.0`` work: ``pretrain``'s signature differs between
them and :func:`megacpp_mcore.spec.compat.call_pretrain` calls each one in its own form. The
checkout's ``megatron`` package comes first on ``sys.path``, so its ``megatron/core`` is the one
that runs; :func:`checkout_release` reads its version.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from megacpp_mcore.models.presets import ModelConfig, get_preset

# Files of a Megatron-LM checkout (tags core_v0.16.1 .. core_v0.19.0) the launcher runs.
CHECKOUT_FILES = ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py", "megatron/training")

# ``--transformer-impl`` -> our backend name (resolves a spec's ``auto``).
TRANSFORMER_IMPL_BACKENDS = {"transformer_engine": "te", "local": "local"}

# Megatron-LM arguments the builder reads (besides ``padded_vocab_size``, which Megatron derives
# from the tokenizer); tests check that each tag's parser defines every one of them, except those
# compat.REMOVED_MEGATRON_ARGS lists for that release (read through compat.megatron_arg).
MEGATRON_ARGS_READ = (
    "spec", "transformer_impl", "max_position_embeddings", "fp16_lm_cross_entropy",
    "untie_embeddings_and_output_weights", "position_embedding_type", "rotary_percent",
    "rotary_base", "use_rope_scaling", "mtp_num_layers", "use_legacy_models", "yaml_cfg",
    "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
    "v_head_dim", "qk_layernorm", "rope_type", "rotary_scaling_factor",
)

# Megatron-LM flags the launcher refuses, with what to use instead.
REFUSED_FLAGS = {
    "--mtp-num-layers": "use --megacpp-mtp-depth K (the package's shared-block MTP); megatron-core "
                        "0.16.1 builds its own per-depth MTP from the config and ignores --spec",
    "--use-legacy-models": "the launcher builds megatron-core GPTModels only (the flag is gone "
                           "from Megatron-LM core_v0.18)",
    "--yaml-cfg": "pass the model as pretrain_gpt.py flags (see megacpp_mcore.upstream.launch_pretrain.preset_args)",
}

MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")


def mla_settings(mla) -> dict[str, Any]:
    """What the package's MLA is built with beyond its sizes, by Megatron-LM argument name: RMSNorm
    on the q/kv latents (``layers.mla.transformer_config_kwargs``). Megatron-LM's default
    (``--qk-layernorm`` off) builds MLA without them, so :func:`preset_args` passes the flag and the
    launcher refuses a run without it. RoPE needs no flag: Megatron-LM's default for MLA, YaRN at
    ``--rotary-scaling-factor 1``, computes plain RoPE (and is what its fused MLA RoPE kernels take)."""
    from megacpp_mcore.layers.mla import transformer_config_kwargs

    return {"qk_layernorm": transformer_config_kwargs(mla)["qk_layernorm"]}


def mla_size_mismatches(args, mla) -> list[str]:
    """The MLA size flags of ``args`` that differ from the spec's ``mla`` config, each as
    ``--flag value (spec: value)`` (the launcher refuses them; ``generate`` refuses a checkpoint
    whose saved arguments have them)."""
    return [f"--{f.replace('_', '-')} {getattr(args, f, None)} (spec: {getattr(mla, f)})"
            for f in MLA_FIELDS if getattr(args, f, None) != getattr(mla, f)]


def _flag(name: str, value: Any) -> list[Any]:
    """``--name value`` (``--name`` alone for True)."""
    flag = f"--{name.replace('_', '-')}"
    return [flag] if value is True else [flag, value]


class LaunchError(ValueError):
    """Bad launcher input; printed as one line, exit status 2."""


def add_megacpp_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The package's flags, registered with Megatron's own parser (``extra_args_provider``)."""
    group = parser.add_argument_group("megacpp_mcore")
    group.add_argument("--megacpp-mtp-depth", type=int, default=0,
                       help="shared-block MTP depth K on the last pipeline stage (0: no MTP)")
    group.add_argument("--megacpp-mtp-decay", type=float, default=None,
                       help="MTP step-weight decay (default: megacpp_mcore.features.mtp.MTPConfig's)")
    group.add_argument("--megacpp-mtp-loss-scale", type=float, default=None,
                       help="factor on the total MTP loss (default: MTPConfig's)")
    group.add_argument("--megacpp-mtp-recompute", choices=("on", "off"), default="off",
                       help="on: recompute the MTP shared block in backward (each depth keeps only its "
                            "inputs; one extra block forward per depth); default off")
    group.add_argument("--megacpp-fused-lm-loss", choices=("on", "off"), default="on",
                       help="on (default): the LM loss through the package's fused linear "
                            "cross-entropy, the [tokens x vocab] logits never built "
                            "(FusedLossGPTModel; faster and smaller: docs/benchmarks.md); off: "
                            "GPTModel's output layer and cross-entropy")
    group.add_argument("--megacpp-moe-device-counts", choices=("on", "off"), default="on",
                       help="on (default): MoE layers whose experts are all on the rank keep the "
                            "per-expert token counts on the device (no host wait per MoE forward; "
                            "megacpp_mcore.layers.moe); off: Megatron's dispatcher throughout")
    return parser


def preset_args(preset: str | ModelConfig) -> list[str]:
    """``pretrain_gpt.py`` flags that give Megatron a preset's architecture (recipes pass these)."""
    m = get_preset(preset) if isinstance(preset, str) else preset
    flags: list[Any] = [
        "--num-layers", m.num_layers, "--hidden-size", m.hidden_size,
        "--num-attention-heads", m.num_attention_heads, "--ffn-hidden-size", m.ffn_hidden_size,
        "--seq-length", m.seq_length, "--max-position-embeddings", m.seq_length,
    ]
    if m.num_query_groups:
        flags += ["--group-query-attention", "--num-query-groups", m.num_query_groups]
    if m.moe is not None:
        flags += ["--num-experts", m.moe.num_experts, "--moe-router-topk", m.moe.topk,
                  "--moe-ffn-hidden-size", m.moe.ffn_hidden_size,
                  "--moe-aux-loss-coeff", m.moe.aux_loss_coeff]
        if m.moe.shared_expert_size:
            flags += ["--moe-shared-expert-intermediate-size", m.moe.shared_expert_size]
    if m.mla is not None:
        flags.append("--multi-latent-attention")
        for field in MLA_FIELDS:
            value = getattr(m.mla, field)
            if value is not None:
                flags += _flag(field, value)
        for field, value in mla_settings(m.mla).items():
            flags += _flag(field, value)
    if m.mtp_depth:
        flags += ["--megacpp-mtp-depth", m.mtp_depth]
    return [str(f) for f in flags]


# megatron-core release line -> the Megatron-LM tag that goes with it (README, docs/upstream.md).
CHECKOUT_TAGS = {"0.16": "core_v0.16.1", "0.17": "core_v0.17.1", "0.18": "core_v0.18.2",
                 "0.19": "core_v0.19.0"}
CLONE_HINT = ("git clone --branch core_v0.19.0 https://github.com/NVIDIA/Megatron-LM (megatron-core "
              "0.19.x, Python >= 3.12) or --branch core_v0.16.1 (0.16.1, Python 3.11)")


def check_checkout(path: str | os.PathLike) -> Path:
    """The Megatron-LM checkout at ``path``; ``LaunchError`` naming what is missing."""
    root = Path(path).expanduser().resolve()
    missing = [f for f in CHECKOUT_FILES if not (root / f).exists()]
    if missing:
        raise LaunchError(
            f"--megatron-lm {path}: not a Megatron-LM checkout (missing {', '.join(missing)}); get "
            f"one with `{CLONE_HINT}` (docs/upstream.md)"
        )
    return root


def checkout_release(root: str | os.PathLike) -> str | None:
    """The megatron-core version a checkout carries (``megatron/core/package_info.py``'s MAJOR,
    MINOR, PATCH), e.g. ``"0.19.1"``; None when the file or its fields are missing."""
    import ast

    info = Path(root, "megatron", "core", "package_info.py")
    try:
        tree = ast.parse(info.read_text())
    except (OSError, SyntaxError):
        return None
    fields = {t.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
              for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)}
    parts = [fields.get(k) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(map(str, parts)) if all(isinstance(p, int) for p in parts) else None


def describe_checkout(root: str | os.PathLike) -> str:
    """One line: which checkout was found and which Megatron-LM tag line it belongs to."""
    version = checkout_release(root)
    if version is None:
        return f"Megatron-LM checkout {root}: version unknown (no megatron/core/package_info.py)"
    line = ".".join(version.split(".")[:2])
    tag = CHECKOUT_TAGS.get(line)
    pairs = (f"tag line {tag}, pairs with megatron-core {line}.x" if tag else
             f"not a supported release line ({', '.join(CHECKOUT_TAGS)}); use {CLONE_HINT}")
    return f"Megatron-LM checkout {root}: megatron-core {version} ({pairs})"


def split_argv(argv: list[str]) -> tuple[Path, list[str]]:
    """(checkout, the arguments for Megatron); refuses flags the launcher cannot honour."""
    parser = argparse.ArgumentParser(prog="python -m megacpp_mcore.upstream.launch_pretrain", add_help=False,
                                     allow_abbrev=False)
    parser.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"))
    ours, megatron_argv = parser.parse_known_args(argv)
    if not ours.megatron_lm:
        raise LaunchError("--megatron-lm PATH (or MEGATRON_LM) is required: a Megatron-LM "
                          "checkout at tag core_v0.16.1 or core_v0.19.0")
    for flag in megatron_argv:
        name = flag.split("=", 1)[0]
        if name in REFUSED_FLAGS:
            raise LaunchError(f"{name} is not supported by the launcher: {REFUSED_FLAGS[name]}")
    if "--spec" not in megatron_argv:
        raise LaunchError("--spec MODULE ATTR is required, e.g. --spec layer_specs.nam56r_lite "
                          "NAM56R_LITE (see layer_specs/)")
    return check_checkout(ours.megatron_lm), megatron_argv


def layer_spec_from_args(args: argparse.Namespace):
    """The ``--spec`` object, its ``auto`` backend resolved from ``--transformer-impl``."""
    from megatron.core.transformer.spec_utils import import_module

    from megacpp_mcore.spec.block import HybridLayerSubmodules

    spec = import_module(args.spec)  # patched: a bad --spec raises ImportError/ValueError
    sub = getattr(spec, "submodules", None)
    if not isinstance(sub, HybridLayerSubmodules):
        return spec
    _check_mla(args, sub)
    if sub.backend != "auto":
        return spec
    backend = TRANSFORMER_IMPL_BACKENDS.get(args.transformer_impl)
    if backend is None:
        raise LaunchError(
            f"--transformer-impl {args.transformer_impl} has no megacpp_mcore backend; allowed: "
            f"{', '.join(TRANSFORMER_IMPL_BACKENDS)}"
        )
    return dataclasses.replace(spec, submodules=dataclasses.replace(sub, backend=backend))


def _check_mla(args: argparse.Namespace, sub) -> None:
    """MLA flags must describe the spec's MLA: Megatron builds its MLA config from the flags."""
    mla = sub.features.get("mla")
    if mla is None:
        if args.multi_latent_attention:
            raise LaunchError(f"--multi-latent-attention is set but spec {' '.join(args.spec)} has "
                              "no MLA feature; drop the flag or use a spec with MLA")
        return
    if not args.multi_latent_attention:
        raise LaunchError(f"spec {' '.join(args.spec)} puts MLA on its A layers; add "
                          "--multi-latent-attention and the MLA sizes (preset_args lists them)")
    wrong = mla_size_mismatches(args, mla)
    wrong += [f"--{f.replace('_', '-')} {getattr(args, f, None)!r} (the package's MLA: {value!r}; pass "
              f"{' '.join(map(str, _flag(f, value)))})"
              for f, value in mla_settings(mla).items() if getattr(args, f, None) != value]
    if getattr(args, "rope_type", None) != "rope" and getattr(args, "rotary_scaling_factor", 1.0) != 1.0:
        wrong.append(f"--rotary-scaling-factor {args.rotary_scaling_factor} (YaRN; the package's MLA: "
                     "plain RoPE, i.e. YaRN at 1.0 or --rope-type rope)")
    if wrong:
        raise LaunchError("MLA flags disagree with the spec's MLA: " + "; ".join(wrong))


def _refuse_unsupported(args: argparse.Namespace) -> None:
    """The argv check again, on parsed args (``--use-checkpoint-args`` can bring these back)."""
    from megacpp_mcore.spec.compat import megatron_arg

    for dest in ("mtp_num_layers", "use_legacy_models", "yaml_cfg"):
        value = megatron_arg(args, dest)  # use_legacy_models: gone from core_v0.18's parser
        if value:
            flag = f"--{dest.replace('_', '-')}"
            raise LaunchError(f"{flag}={value!r} is not supported by the launcher: "
                              f"{REFUSED_FLAGS[flag]}")


def mtp_from_args(args: argparse.Namespace):
    """The package's ``MTPConfig`` for ``--megacpp-mtp-depth K`` > 0, else None (no MTP)."""
    if not args.megacpp_mtp_depth:
        return None
    from megacpp_mcore.features.mtp import MTPConfig

    options = {"depth": args.megacpp_mtp_depth, "decay": args.megacpp_mtp_decay,
               "loss_scale": args.megacpp_mtp_loss_scale,
               # arguments saved before the flag existed (a checkpoint's) read as its default, off
               "recompute": getattr(args, "megacpp_mtp_recompute", "off") == "on"}
    return MTPConfig(**{k: v for k, v in options.items() if v is not None})


def fused_lm_loss_from_args(args: argparse.Namespace) -> bool:
    """``--megacpp-fused-lm-loss``; arguments saved before the flag existed (a checkpoint's) read as
    off, GPTModel's loss, which those runs trained with."""
    return getattr(args, "megacpp_fused_lm_loss", "off") == "on"


def moe_device_counts_from_args(args: argparse.Namespace) -> bool:
    """``--megacpp-moe-device-counts``; arguments saved before the flag existed read as its default,
    on (the path changes no parameter or checkpoint key)."""
    return getattr(args, "megacpp_moe_device_counts", "on") == "on"


def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
    """Megatron-LM's ``gpt_builder`` contract: a GPTModel (or MTPGPTModel) from ``args``, built by
    the package's one builder (:func:`megacpp_mcore.train.runtime.gpt_model`)."""
    from megacpp_mcore.layers import moe
    from megacpp_mcore.train.runtime import gpt_model

    _refuse_unsupported(args)
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    mtp = mtp_from_args(args)
    moe.DEVICE_COUNTS = moe_device_counts_from_args(args)
    spec = layer_spec_from_args(args)
    _mamba_conv_path(config, spec)
    # A mixed stack checkpoints per-layer keys; the builder owns the config (no 0.16.1 flag for it).
    from megacpp_mcore.spec.block import checkpoint_config_kwargs

    for field, value in checkpoint_config_kwargs(spec, config.num_layers).items():
        setattr(config, field, value)
    model = gpt_model(
        config,
        spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        mtp=mtp,
        fused_lm_loss=fused_lm_loss_from_args(args),
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        pg_collection=pg_collection,
    )
    _report(args, spec, type(model), post_process)
    return model


def _mamba_conv_path(config, spec) -> None:
    """Megatron-LM has no flag for ``use_mamba_mem_eff_path`` (default True), whose fused path needs
    causal_conv1d. Without it, ``M`` layers take MambaMixer's unfused conv path; said on rank 0."""
    from megacpp_mcore.spec.backends import fused_conv_available

    pattern = getattr(getattr(spec, "submodules", None), "pattern", "")
    if "M" in pattern and config.use_mamba_mem_eff_path and not fused_conv_available():
        config.use_mamba_mem_eff_path = False
        if int(os.environ.get("RANK", "0")) == 0:
            print("[megacpp_mcore] causal_conv1d is not installed: M layers use MambaMixer's unfused "
                  "conv path (use_mamba_mem_eff_path=False)", flush=True)


def _report(args, spec, model_cls, post_process) -> None:
    """One line per built stage on global rank 0: what was asked for and what gets built."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    sub = getattr(spec, "submodules", None)
    backend = getattr(sub, "backend", "?")
    mtp = f"MTP depth {args.megacpp_mtp_depth}" if args.megacpp_mtp_depth and post_process else "no MTP"
    loss = f"fused LM loss {'on' if fused_lm_loss_from_args(args) else 'off'}" if post_process else "no LM loss"
    print(f"[megacpp_mcore] model {model_cls.__name__} from --spec {' '.join(args.spec)}: pattern "
          f"{getattr(sub, 'pattern', '?')!r}, backend {backend} (--transformer-impl "
          f"{args.transformer_impl}), features {sorted(getattr(sub, 'features', {}))}, {mtp}, {loss}"
          f", MoE device counts {'on' if moe_device_counts_from_args(args) else 'off'}", flush=True)


def _extra_args_provider(upstream: Callable | None) -> Callable:
    def provider(parser):
        parser = upstream(parser) if upstream is not None else parser
        return add_megacpp_arguments(parser)

    return provider


def _apply_patches() -> None:
    from megacpp_mcore.patches import registry

    changed = registry.apply_needed()
    if int(os.environ.get("RANK", "0")) == 0:
        for name, what in changed.items():
            print(f"[megacpp_mcore] patch {name}: {'; '.join(what) or 'already applied'}", flush=True)


def _enter_checkout(checkout: Path, megatron_argv: list[str]) -> None:
    """The checkout's packages first on ``sys.path`` and ``sys.argv`` as ``pretrain_gpt.py``'s own
    (Megatron's parser reads it), for :func:`run` and :func:`check_flags` alike."""
    sys.path.insert(0, str(checkout))
    sys.argv = [str(checkout / "pretrain_gpt.py"), *megatron_argv]


def run(checkout: Path, megatron_argv: list[str]) -> None:
    """Imports the checkout's ``pretrain_gpt`` and calls Megatron's ``pretrain`` with our builder
    (in the form the checkout's ``pretrain`` signature takes: :func:`compat.call_pretrain`)."""
    from megacpp_mcore.spec import compat

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[megacpp_mcore] {describe_checkout(checkout)}", flush=True)
    _enter_checkout(checkout, megatron_argv)
    _apply_patches()
    import pretrain_gpt  # noqa: E402  (the checkout's module; its __main__ block does not run)
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart
    from model_provider import model_provider

    if hasattr(pretrain_gpt, "set_startup_timestamps"):  # startup timing report, as __main__ does
        pretrain_gpt.set_startup_timestamps(
            program_start=getattr(pretrain_gpt, "_PROGRAM_START_TIME", None), main_entry=time.time())
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain_gpt.pretrain)
    compat.call_pretrain(
        pretrain,
        signature_of=pretrain_gpt.pretrain,
        dataset_provider=pretrain_gpt.train_valid_test_datasets_provider,
        model_provider=partial(model_provider, gpt_builder),
        model_type=ModelType.encoder_or_decoder,
        forward_step=pretrain_gpt.forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=_extra_args_provider(
            pretrain_gpt.add_modelopt_args if getattr(pretrain_gpt, "has_nvidia_modelopt", False)
            else None),
        store=store,
        get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
    )


def check_flags(checkout: Path, megatron_argv: list[str]) -> int:
    """Megatron's parser on ``megatron_argv`` with the flags :func:`run` adds (the package's, and
    ModelOpt's where the checkout's ``pretrain_gpt`` would add them), without starting anything:
    0, or 2 with argparse's last line (the bad flag) instead of every rank's usage and traceback;
    3 with one line when the parser does not import here (no megatron-core of the checkout's line,
    a checkout without ``megatron/training``): the flags are then unchecked, which a recipe's
    ``--dry-run`` accepts and a launch does not. Imports only ``megatron.training.arguments`` (no
    CUDA needed)."""
    import contextlib
    import io
    import warnings

    _enter_checkout(checkout, megatron_argv)
    with warnings.catch_warnings():  # import-time notices (no TE/Apex on this host): not the answer
        warnings.simplefilter("ignore")
        try:
            from megatron.training.arguments import parse_args
        except Exception as exc:  # noqa: BLE001 (any import failure is the same answer: unchecked)
            print(f"launch_pretrain: flags not checked: Megatron-LM's parser does not import from {checkout} "
                  f"here ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 3

        try:
            from megatron.post_training.arguments import add_modelopt_args
        except ImportError:  # as pretrain_gpt: ModelOpt's flags only where it imports
            add_modelopt_args = None
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parse_args(extra_args_provider=_extra_args_provider(add_modelopt_args))
    except SystemExit as exc:
        if exc.code:
            lines = stderr.getvalue().strip().splitlines() or [f"exit status {exc.code}"]
            print(f"launch_pretrain: Megatron-LM refuses the flags: {lines[-1]}", file=sys.stderr)
            return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    check = "--check-flags" in argv  # the recipes, once before torchrun: parse, start nothing
    if check:
        argv.remove("--check-flags")
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        print("Package flags (given to Megatron's parser):")
        add_megacpp_arguments(argparse.ArgumentParser(prog="", add_help=False)).print_help()
        print("\nMegatron-LM's own flags: python -m megacpp_mcore.upstream.launch_pretrain --megatron-lm PATH "
              "--spec MODULE ATTR --help (needs a CUDA host: pretrain_gpt imports triton)")
        return 0
    try:
        checkout, megatron_argv = split_argv(argv)
    except LaunchError as exc:
        print(f"launch_pretrain: error: {exc}", file=sys.stderr)
        return 2
    if check:
        return check_flags(checkout, megatron_argv)
    run(checkout, megatron_argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
