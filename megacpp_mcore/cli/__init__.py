"""``megacpp-mcore``: the package's command line. Each subcommand lives in
``megacpp_mcore/cli/<name>.py`` with ``add_arguments(parser)`` and ``run(args) -> int``.

Bad input (unknown preset, malformed pattern, sizes that do not fit) prints one ``error:`` line and
exits with status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "plan": ("megacpp_mcore.cli.plan", "print the layer plan, parameter counts and memory estimate"),
    "patches": ("megacpp_mcore.cli.patches", "status/apply of runtime patches against upstream"),
    "prepare-data": ("megacpp_mcore.cli.prepare_data", "C/C++ sources -> byte-level Megatron indexed dataset"),
    "train": ("megacpp_mcore.cli.train", "train a preset on C/C++ bytes through megatron-core"),
    "generate": ("megacpp_mcore.cli.generate", "continue a prompt with a trained checkpoint (MTP drafts optional)"),
    "compare": ("megacpp_mcore.cli.compare", "run receipts side by side: substrate, best/final bits per byte, INVALID, plot"),
}


class UsageError(ValueError):
    """Bad command-line input; reported as one line with exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megacpp-mcore", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (UsageError, ValueError) as exc:  # PatternError is a ValueError
        print(f"megacpp-mcore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # e.g. BackendUnavailable: what to install
        print(f"megacpp-mcore {args.command}: error: {exc}", file=sys.stderr)
        return 2

