"""``megacpp-mcore compare``: run receipts side by side (:mod:`megacpp_mcore.train.compare`).

Prints a Markdown table (or ``--json``) of every run's substrate, best validation bits per byte
with its step, final bits per byte, tokens/s, goodput share and verdict (INVALID with the reason
where a rule fires), and writes a PNG of the validation curves (against step and against tokens)
and the per-layer usage heatmaps. A run on another substrate than the first is refused unless
``--allow-substrate-mismatch``, which labels it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_RECEIPT",
                        help="a receipt JSON file, or a directory: its receipt.json, else every "
                             "receipt directly inside it (e.g. <cache>/runs)")
    parser.add_argument("--png", help="where to write the plot (default: <first receipt>.compare.png "
                                      "beside it, or in the current directory when that is not writable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--allow-substrate-mismatch", action="store_true",
                        help="show runs on another substrate than the first, labelled, instead of refusing")


def run(args: argparse.Namespace) -> int:
    from megacpp_mcore.train import compare, compare_plot

    paths = compare.resolve(args.runs)
    png = compare.check_png_path(Path(args.png) if args.png else compare.default_png(paths[0]))
    rows = compare.compare(paths, allow_substrate_mismatch=args.allow_substrate_mismatch)
    compare_plot.write_png(compare_plot.plot(rows), png)  # every check passed: now write
    if args.json:
        print(json.dumps(compare.as_json(rows, str(png)), indent=1))
    else:
        print(compare.markdown(rows) + f"\n\nplot: {png}")
    return 0
