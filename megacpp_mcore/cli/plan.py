"""``megacpp-mcore plan``: the layer plan (:mod:`megacpp_mcore.models.plan`) of a preset or of an
explicit pattern."""

from __future__ import annotations

import argparse
import json

from megacpp_mcore.models.presets import PRESETS, custom_model, get_preset


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--preset`` or ``--pattern/--num-layers`` (on top of ``--preset``'s dimensions)."""
    parser.add_argument("--preset", default="nam56r",
                        help=f"model preset ({', '.join(PRESETS)}); default nam56r")
    parser.add_argument("--pattern", help="override the preset's pattern, e.g. 'AEMEAEMEAEMR'")
    parser.add_argument("--num-layers", type=int, help="override the preset's depth")


def model_from_args(args: argparse.Namespace):
    base = get_preset(args.preset)
    if args.pattern is None and args.num_layers is None:
        return base
    return custom_model(pattern=args.pattern or base.pattern,
                        num_layers=args.num_layers or base.num_layers, base=args.preset)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--pp", type=int, default=None,
                        help="pipeline-parallel stages (default: the pattern's '|' stages, else 1)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size for the memory estimate")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size for the memory estimate")
    parser.add_argument("--dp", type=int, default=1,
                        help="data-parallel size: the distributed optimizer shards its state over it")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="for the activation estimate")
    parser.add_argument("--mtp-recompute", action="store_true",
                        help="the MTP block recomputed in backward (launcher: --megacpp-mtp-recompute on; "
                             "the 8x recipe: MTP_RECOMPUTE=1) in the activation estimate")
    parser.add_argument("--backend", default="auto", choices=["auto", "te", "local"])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from megacpp_mcore.models.plan import build_plan, check_split, format_plan

    for flag in ("pp", "tp", "ep", "dp", "micro_batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    model = model_from_args(args)
    check_split(model, tp=args.tp, ep=args.ep)
    plan = build_plan(model, pp=args.pp, tp=args.tp, ep=args.ep, dp=args.dp,
                      micro_batch=args.micro_batch_size, backend=args.backend, mtp_recompute=args.mtp_recompute)
    print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
    return 0
