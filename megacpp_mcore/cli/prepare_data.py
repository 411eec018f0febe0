"""``megacpp-mcore prepare-data``: C/C++ sources -> byte-level Megatron indexed dataset."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Heavy imports (megatron-core) stay in run(): building the CLI parser must stay instant.
    parser.add_argument("--source", default=None,
                        help="directory of C/C++ sources (default: /usr/include)")
    parser.add_argument("--output", required=True,
                        help="output prefix: writes PREFIX.{train,valid}.{bin,idx} and PREFIX.json")
    parser.add_argument("--valid-percent", type=float, default=2.0,
                        help="share of files held out for validation, by path hash (default 2)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="stop after this many source bytes (default: all)")


def run(args: argparse.Namespace) -> int:
    import warnings

    from megacpp_mcore.cli.train import QUIET_WARNINGS

    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    from megacpp_mcore.train import data

    prepared = data.prepare(args.source or data.DEFAULT_SOURCE, args.output,
                            valid_percent=args.valid_percent, max_bytes=args.max_bytes)
    splits = prepared.manifest["splits"]
    print(f"wrote {prepared.prefix}.{{train,valid}}.{{bin,idx}} and {prepared.prefix}.json from "
          f"{prepared.manifest['source']}: "
          + ", ".join(f"{s} {c['documents']} files / {c['bytes']:,} bytes" for s, c in splits.items()))
    return 0
