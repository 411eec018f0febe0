"""``megacpp-mcore prepare-data``: C/C++ sources -> byte-level Megatron indexed dataset."""

from __future__ import annotations

import argparse

from megacpp_mcore import data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default=data.DEFAULT_SOURCE,
                        help=f"directory of C/C++ sources (default {data.DEFAULT_SOURCE})")
    parser.add_argument("--output", required=True,
                        help="output prefix: writes PREFIX.{train,valid}.{bin,idx} and PREFIX.json")
    parser.add_argument("--valid-percent", type=float, default=2.0,
                        help="share of files held out for validation, by path hash (default 2)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="stop after this many source bytes (default: all)")


def run(args: argparse.Namespace) -> int:
    prepared = data.prepare(args.source, args.output, valid_percent=args.valid_percent,
                            max_bytes=args.max_bytes)
    splits = prepared.manifest["splits"]
    print(f"wrote {prepared.prefix}.{{train,valid}}.{{bin,idx}} and {prepared.prefix}.json from "
          f"{prepared.manifest['source']}: "
          + ", ".join(f"{s} {c['documents']} files / {c['bytes']:,} bytes" for s, c in splits.items()))
    return 0
