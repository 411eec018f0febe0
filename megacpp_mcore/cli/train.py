"""``megacpp-mcore train``: train a preset (or pattern) on C/C++ bytes through megatron-core.

Single process: ``megacpp-mcore train --preset nam56r-tiny``; several ranks:
``torchrun --nproc-per-node 2 -m megacpp_mcore.cli train --tp 2 ...``.
Options left unset take :class:`megacpp_mcore.train.loop.TrainConfig`'s defaults.

FlexiDepth fine-tune of a dense checkpoint (:mod:`megacpp_mcore.train.dynamic_depth`):
``megacpp-mcore train --preset nam56r-tiny-dense --load DENSE --flexidepth [OPTIONS] --freeze-backbone
--save FT``; resuming it: the same command with ``--load FT``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path

from megacpp_mcore.cli.plan import add_model_arguments, model_from_args

# argparse dest -> TrainConfig field, for options that map one to one.
_FIELDS = ("steps", "micro_batch_size", "global_batch_size", "seq_length", "lr", "min_lr",
           "warmup_steps", "weight_decay", "seed", "backend", "bf16", "data", "source",
           "log_interval", "eval_interval", "eval_iters", "receipt", "save", "save_interval",
           "load", "stop_after", "on_nonfinite", "test_fault", "freeze_backbone", "fused_lm_loss")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Heavy imports (torch, megatron-core) stay in run(): building the CLI parser must stay instant.
    add_model_arguments(parser)
    parser.set_defaults(preset="nam56r-tiny")
    parser.add_argument("--mtp-depth", type=int,
                        help="shared-block MTP depth (0 = no MTP block, at most 8; default: the "
                             "preset's); `generate --speculative K` drafts up to it")
    group = parser.add_argument_group("run (unset: the CPU smoke-run defaults)")
    group.add_argument("--steps", type=int, help="training steps (default 250)")
    group.add_argument("--micro-batch-size", type=int, help="default 8")
    group.add_argument("--global-batch-size", type=int, help="default: micro batch x data-parallel size")
    group.add_argument("--seq-length", type=int, help="default: the preset's")
    group.add_argument("--lr", type=float, help="peak learning rate, cosine decay (default 3e-3)")
    group.add_argument("--min-lr", type=float, help="default 3e-4")
    group.add_argument("--warmup-steps", type=int, help="default: min(20, steps // 10)")
    group.add_argument("--weight-decay", type=float, help="default 0")
    group.add_argument("--seed", type=int, help="default 1234")
    group.add_argument("--backend", choices=["auto", "te", "local"], help="default auto")
    group.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 weights/compute (default: on CUDA only)")
    group.add_argument("--fused-lm-loss", action=argparse.BooleanOptionalAction, default=None,
                       help="the LM loss through the package's fused linear cross-entropy: the "
                            "[tokens x vocab] logits never built (default: on; --no-fused-lm-loss: "
                            "GPTModel's loss)")
    group.add_argument("--on-nonfinite", choices=["stop", "skip"],
                       help="NaN/inf gradients are never applied; on such a step (or a NaN/inf loss) stop the "
                            "run, or skip the step and go on (default stop); either way the receipt marks the "
                            "run INVALID")
    group.add_argument("--fast", action="append", default=[], metavar="NAME=VALUE",
                       help="a kernel-path switch (repeatable): mamba_fused, fused_residual, rope_fusion, "
                            "moe_permute_fusion, ... =on/off/auto; moe_dispatcher=alltoall/allgather/flex; "
                            "cuda_graphs=none/local/transformer_engine; fp8=off/e4m3/hybrid; "
                            "fp8_recipe=delayed/tensorwise/blockwise (default: this host's defaults, "
                            "megacpp_mcore.train.fast_paths; the receipt records the result)")
    # Test-only fault injection (megacpp_mcore.train.faults): kills and NaN/spike steps on purpose.
    group.add_argument("--test-fault", help=argparse.SUPPRESS)
    group = parser.add_argument_group("data")
    group.add_argument("--data", help="prefix from `prepare-data` (its tokenizer, bytes or BPE, comes with it and "
                                      "sets the vocabulary); default: --source prepared into the cache, bytes")
    group.add_argument("--source", help="default data source (default /usr/include)")
    group = parser.add_argument_group("logging and evaluation")
    group.add_argument("--log-interval", type=int, help="steps per progress line (default 25)")
    group.add_argument("--eval-interval", type=int, help="steps per validation (default 50)")
    group.add_argument("--eval-iters", type=int, help="global batches per validation (default 4)")
    group.add_argument("--receipt", help="run receipt path (default: <cache>/runs/<model>-<utc>.json)")
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--save", help="checkpoint directory (default, single process and no --receipt: a run "
                                      "directory <cache>/runs/<model>-<utc>/ holding the final checkpoint and "
                                      "receipt.json, which `compare` and `generate --load` take)")
    group.add_argument("--no-checkpoint", action="store_true",
                       help="without --save: write the receipt only, no checkpoint")
    group.add_argument("--save-interval", type=int, help="default: at the end only")
    group.add_argument("--load", help="resume from the latest checkpoint in this directory")
    group.add_argument("--stop-after", type=int,
                       help="stop (and save, with --save) after this step, keeping the --steps schedule")
    parser.add_argument("--mod", metavar="OPTIONS",
                        help="change the preset's MoD settings (its layers stay the preset's): key=value,... "
                             "of MoDConfig, e.g. router_scale=width (a router that learns at nam56r-tiny's "
                             "speed at any width) or sparsity_loss_weight=0,budget_steps=run")
    group = parser.add_argument_group("dynamic depth: FlexiDepth fine-tune (arXiv 2503.23798)")
    group.add_argument("--flexidepth", nargs="?", const="", metavar="OPTIONS",
                       help="add FlexiDepth (per layer and token, a router between the block and a light "
                            "adapter) on the A and E layers; OPTIONS: key=value,... of FlexiDepthConfig, e.g. "
                            "usage_loss_weight=1e-3,inference=hard,layers=1:3:5 (with --load of a checkpoint "
                            "without it: its weights make the backbone, and steps, LR schedule and optimizer "
                            "start fresh)")
    group.add_argument("--freeze-backbone", action="store_true", default=None,
                       help="train FlexiDepth's routers and adapters only (needs --flexidepth and --load)")
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    group.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    group.add_argument("--vp", type=int, default=None, help="virtual pipeline stages per rank")
    group.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp >= 2)")


# megatron-core's import-time notices on hosts without TE/apex: expected here, not actionable.
QUIET_WARNINGS = (r"(Transformer Engine and Apex are|Apex is) not installed", r"full scope is deprecated")


def default_run_dir(model_name: str) -> Path:
    """``<cache>/runs/<model>-<utc>``: where a run without --save/--receipt keeps its outputs."""
    from megacpp_mcore.train.data import cache_dir
    from megacpp_mcore.train.loop import file_name

    return cache_dir() / "runs" / f"{file_name(model_name)}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"


def next_commands(receipt_path: str, save: str | None) -> list[str]:
    """The lines a user runs next: compare this run (with others), continue a prompt with it."""
    run = str(Path(receipt_path).parent) if Path(receipt_path).name == "receipt.json" else receipt_path
    lines = [f"next: megacpp-mcore compare {shlex.quote(run)}   (add other runs or receipts to compare them)"]
    if save:
        lines.append(f"      megacpp-mcore generate --load {shlex.quote(save)} --prompt '#include <' "
                     f"--max-new-tokens 200")
    return lines


def run(args: argparse.Namespace) -> int:
    import warnings

    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    from megacpp_mcore.train import loop as training
    from megacpp_mcore.train.checkpoint import CheckpointError
    from megacpp_mcore.train.runtime import Parallelism

    model = model_from_args(args)
    if args.mtp_depth is not None:
        try:
            model = model.replace(mtp_depth=args.mtp_depth)
        except ValueError as exc:  # names the allowed depths
            raise ValueError(f"--mtp-depth {args.mtp_depth}: {exc}") from None
    if args.mod is not None:
        mod = model.features.get("mod")
        if mod is None:
            raise ValueError(f"--mod {args.mod!r}: preset {model.name!r} carries no MoD (a dense variant?); "
                             "--mod changes the settings of a preset that has it, e.g. nam56r-tiny")
        try:
            model = model.replace(features={**model.features, "mod": mod.with_options(args.mod)})
        except ValueError as exc:
            raise ValueError(f"--mod {args.mod!r}: {exc}") from None
    if args.flexidepth is not None:
        from megacpp_mcore.features.flexidepth.config import FlexiDepthConfig

        try:
            fd = FlexiDepthConfig.from_options(args.flexidepth)
        except ValueError as exc:
            raise ValueError(f"--flexidepth {args.flexidepth!r}: {exc}") from None
        model = model.replace(name=f"{model.name}+flexidepth", features={**model.features, "flexidepth": fd})
    if args.no_checkpoint and args.save is not None:
        raise ValueError(f"--no-checkpoint and --save {args.save!r} contradict each other; give one of them")
    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    if args.save is None and args.receipt is None and os.environ.get("WORLD_SIZE", "1") == "1":
        # One directory per run, so that `compare RUN_DIR` and `generate --load RUN_DIR` just work.
        # (Under torchrun the ranks could disagree on the timestamp: name --save/--receipt there.)
        run_dir = default_run_dir(model.name)
        given["receipt"] = str(run_dir / "receipt.json")
        if not args.no_checkpoint:
            given["save"] = str(run_dir)
    if args.fast:
        from megacpp_mcore.train.fast_paths import FastPaths

        try:
            given["fast"] = FastPaths.from_options(args.fast)
        except ValueError as exc:
            raise ValueError(f"--fast {exc}") from None
    if "test_fault" in given:
        given["fault"] = given.pop("test_fault")
    cfg = training.TrainConfig(
        **given, parallel=Parallelism(tp=args.tp, pp=args.pp, ep=args.ep, vp=args.vp, sp=args.sp))
    try:
        receipt = training.train(model, cfg, preset=args.preset)
    except CheckpointError as exc:  # not bad input: the run failed while writing (exit 1)
        print(f"megacpp-mcore train: error: {exc}", file=sys.stderr)
        return 1
    if receipt.get("receipt_path"):  # rank 0
        for line in next_commands(receipt["receipt_path"], cfg.save):
            print(line, flush=True)
    # A run that stopped before the step it was asked to reach (--on-nonfinite stop) failed.
    return 0 if receipt["training"]["completed_steps"] >= min(cfg.steps, cfg.stop_after or cfg.steps) else 1
