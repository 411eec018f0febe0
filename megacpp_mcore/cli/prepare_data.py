"""``megacpp-mcore prepare-data``: C/C++ sources -> Megatron indexed dataset, bytes or a byte-level BPE.

``--tokenizer bpe:N`` trains the BPE on the training split (no download) and saves it beside the
data as ``PREFIX.tokenizer/``; ``megacpp-mcore train --data PREFIX`` and the recipes take it from there.
"""

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
    parser.add_argument("--tokenizer", default="byte", metavar="byte|bpe:N",
                        help="byte (default: the file bytes, 258 ids with end-of-document and pad) or "
                             "bpe:N (a byte-level BPE of at most N ids trained on the training split, "
                             "saved as PREFIX.tokenizer/ for Megatron's HuggingFaceTokenizer)")


def run(args: argparse.Namespace) -> int:
    import warnings

    from megacpp_mcore.cli.train import QUIET_WARNINGS

    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    from megacpp_mcore.train import data

    prepared = data.prepare(args.source or data.DEFAULT_SOURCE, args.output,
                            valid_percent=args.valid_percent, max_bytes=args.max_bytes,
                            tokenizer=args.tokenizer)
    splits, tok = prepared.manifest["splits"], prepared.manifest["tokenizer"]
    bpe = tok["kind"] == "bpe"
    print(f"wrote {prepared.prefix}.{{train,valid}}.{{bin,idx}}"
          + (f", {prepared.prefix}.tokenizer/" if bpe else "") + f" and {prepared.prefix}.json from "
          f"{prepared.manifest['source']}: "
          + ", ".join(f"{s} {c['documents']} files / {c['bytes']:,} bytes / {c['tokens']:,} tokens"
                      for s, c in splits.items()))
    if bpe:
        valid = splits["valid"]
        print(f"tokenizer: byte-level BPE, {tok['vocab_size']} ids (asked for {tok['requested_vocab_size']}), "
              f"sha256 {tok['sha256'][:16]}; validation {valid['bytes'] / valid['tokens']:.3f} bytes/token")
    return 0
