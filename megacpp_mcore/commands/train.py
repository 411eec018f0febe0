"""``megacpp-mcore train``: train a preset (or pattern) on C/C++ bytes through megatron-core.

Single process: ``megacpp-mcore train --preset nam56r-tiny``; several ranks:
``torchrun --nproc-per-node 2 -m megacpp_mcore.cli train --tp 2 ...``.
"""

from __future__ import annotations

import argparse
import dataclasses

from megacpp_mcore.commands.plan import add_model_arguments, model_from_args

from megacpp_mcore.training import TrainConfig

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.set_defaults(preset="nam56r-tiny")
    d = _DEFAULTS
    group = parser.add_argument_group("run")
    group.add_argument("--steps", type=int, default=d["steps"], help=f"training steps (default {d['steps']})")
    group.add_argument("--micro-batch-size", type=int, default=d["micro_batch_size"])
    group.add_argument("--global-batch-size", type=int, default=None,
                       help="default: micro batch x data-parallel size")
    group.add_argument("--seq-length", type=int, default=None, help="default: the preset's")
    group.add_argument("--lr", type=float, default=d["lr"])
    group.add_argument("--min-lr", type=float, default=d["min_lr"])
    group.add_argument("--warmup-steps", type=int, default=None, help="default: min(20, steps // 10)")
    group.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    group.add_argument("--seed", type=int, default=d["seed"])
    group.add_argument("--backend", default="auto", choices=["auto", "te", "local"])
    group.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 weights/compute (default: on CUDA only)")
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=None,
                       help="prefix from `prepare-data`; default: --source prepared into the cache")
    group.add_argument("--source", default=d["source"], help=f"default data source ({d['source']})")
    group = parser.add_argument_group("logging and evaluation")
    group.add_argument("--log-interval", type=int, default=d["log_interval"])
    group.add_argument("--eval-interval", type=int, default=d["eval_interval"])
    group.add_argument("--eval-iters", type=int, default=d["eval_iters"],
                       help="global batches per validation")
    group.add_argument("--receipt", default=None, help="run receipt path (default: <cache>/runs/...)")
    group = parser.add_argument_group("checkpoints")
    group.add_argument("--save", default=None, help="checkpoint directory")
    group.add_argument("--save-interval", type=int, default=None, help="default: at the end only")
    group.add_argument("--load", default=None, help="resume from the latest checkpoint in this directory")
    group.add_argument("--stop-after", type=int, default=None,
                       help="stop (and save, with --save) after this step, keeping the --steps schedule")
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    group.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    group.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    group.add_argument("--vp", type=int, default=None, help="virtual pipeline stages per rank")
    group.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp >= 2)")


def run(args: argparse.Namespace) -> int:
    from megacpp_mcore import training
    from megacpp_mcore.runtime import Parallelism

    model = model_from_args(args)
    cfg = training.TrainConfig(
        steps=args.steps, micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size, seq_length=args.seq_length, lr=args.lr,
        min_lr=args.min_lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        log_interval=args.log_interval, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
        data=args.data, source=args.source, save=args.save, save_interval=args.save_interval,
        load=args.load, stop_after=args.stop_after, seed=args.seed, backend=args.backend,
        parallel=Parallelism(tp=args.tp, pp=args.pp, ep=args.ep, vp=args.vp, sp=args.sp),
        bf16=args.bf16, receipt=args.receipt,
    )
    training.train(model, cfg, preset=args.preset)
    return 0
