#!/usr/bin/env python
"""Thin launcher: stock Megatron-LM ``pretrain_gpt.py`` with shared-block MTP from megacpp_mcore.

    MEGACPP_MTP_DEPTH=2 torchrun --nproc-per-node 8 scripts/pretrain_gpt_mtp.py \\
        $MEGATRON_LM/pretrain_gpt.py <usual pretrain_gpt.py args> --spec layer_specs.nam56r NAM56R

Applies ``patches/megatron_lm_shared_mtp`` (``gpt_builders.GPTModel`` -> ``MTPGPTModel``) and runs
``pretrain_gpt.py`` as ``__main__``. Do not pass ``--mtp-num-layers``: that is upstream's MTP.
"""

from __future__ import annotations

import os
import runpy
import sys


def main(argv: list[str]) -> None:
    if not argv or not argv[0].endswith(".py") or not os.path.isfile(argv[0]):
        sys.exit("usage: pretrain_gpt_mtp.py /path/to/Megatron-LM/pretrain_gpt.py [pretrain_gpt args]")
    script = os.path.abspath(argv[0])
    if "--mtp-num-layers" in argv and os.environ.get("MEGACPP_MTP_DEPTH", "0") != "0":
        sys.exit("pretrain_gpt_mtp.py: MEGACPP_MTP_DEPTH and --mtp-num-layers both ask for MTP; pick one")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [os.path.dirname(script), repo]
    from patches import megatron_lm_shared_mtp as patch

    changed = patch.apply()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[megacpp] {patch.NAME}: {changed or 'already applied'}", flush=True)
    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
