"""``megacpp-mcore train``: train a preset (or pattern) on C/C++ bytes through megatron-core.

Single process: ``megacpp-mcore train --preset nam56r-tiny``; several ranks:
``torchrun --nproc-per-node 2 -m megacpp_mcore.cli train --tp 2 ...``.
Options left unset take :class:`megacpp_mcore.train.loop.TrainConfig`'s defaults.
"""

from __future__ import annotations

import argparse

from megacpp_mcore.cli.plan import add_model_arguments, model_from_args

# argparse dest -> TrainConfig field, for options that map one to one.
_FIELDS = ("steps", "micro_batch_size", "global_batch_size", "seq_length", "lr", "min_lr",
           "warmup_steps", "weight_decay", "seed", "backend", "bf16", "data", "source",
           "log_interval", "eval_interval", "eval_iters", "receipt", "save", "save_interval",
           "load", "stop_after")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Heavy imports (torch, megatron-core) stay in run(): building the CLI parser must stay instant.
    add_model_arguments(parser)
    parser.set_defaults(preset="nam56r-tiny")
    group = parser.add_argument_group("run (unset: the CPU smoke-run defaults)")
    group.add_argument("--steps", type=int, help="training steps (default 300)")
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
    group = parser.add_argument_group("data")
    group.add_argument("--data", help="prefix from `prepare-data`; default: --source prepared into the cache")
    group.add_argument("--source", help="default data source (default /usr/include)")
    group = parser.add_argument_group("logging and evaluation")
    group.add_argument("--log-interval", type=int, help="steps per progress line (default 25)")
    group.add_argument("--eval-interval", type=int, help="steps per validation (default 50)")
    group.add_argument("--eval-iters", type=int, help="global batches per validation (default 4)")
    group.add_argument("--receipt", help="run receipt path (default: <cache>/runs/<model>-<utc>.json)")
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--save", help="checkpoint directory")
    group.add_argument("--save-interval", type=int, help="default: at the end only")
    group.add_argument("--load", help="resume from the latest checkpoint in this directory")
    group.add_argument("--stop-after", type=int,
                       help="stop (and save, with --save) after this step, keeping the --steps schedule")
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    group.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    group.add_argument("--vp", type=int, default=None, help="virtual pipeline stages per rank")
    group.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp >= 2)")


# megatron-core's import-time notices on hosts without TE/apex: expected here, not actionable.
QUIET_WARNINGS = (r"(Transformer Engine and Apex are|Apex is) not installed", r"full scope is deprecated")


def run(args: argparse.Namespace) -> int:
    import warnings

    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    from megacpp_mcore.train import loop as training
    from megacpp_mcore.train.runtime import Parallelism

    model = model_from_args(args)
    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    cfg = training.TrainConfig(
        **given, parallel=Parallelism(tp=args.tp, pp=args.pp, ep=args.ep, vp=args.vp, sp=args.sp))
    training.train(model, cfg, preset=args.preset)
    return 0
