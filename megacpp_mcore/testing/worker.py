"""Entry of one rank launched by :func:`megacpp_mcore.testing.dist.run_distributed`."""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from pathlib import Path


def main(argv: list[str]) -> None:
    target, args_file, out_dir = argv
    warnings.filterwarnings("ignore")
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(**json.loads(Path(args_file).read_text()))
    rank = int(os.environ.get("RANK", 0))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
