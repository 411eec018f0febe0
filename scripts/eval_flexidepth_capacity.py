"""What FlexiDepth's ``hard_skip_capacity`` costs in quality: validation bits/byte of a FlexiDepth
checkpoint in hard inference, exact (the gathered length is each forward's kept count) against a
fixed capacity per gathering layer (its measured kept fraction + a margin; overflowing kept tokens
take the adapter path).

    python scripts/eval_flexidepth_capacity.py --load CKPT [--margins 0.05,0.1,0.2] [--symbols AE]

CKPT: a `megacpp-mcore train --flexidepth ...` checkpoint; ``--preset`` and ``--flexidepth`` name the
model it was trained as (default: docs/benchmarks.md's CPU fine-tune of nam56r-tiny). The
validation batches are the training loop's (``--eval-iters`` global batches of the default data). Prints one row per
setting: bits/byte, its change against exact, the skip rate over the FlexiDepth layers (overflow
counted as skipped) and the capacities; ``--out`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", required=True, help="FlexiDepth checkpoint directory (megacpp-mcore train --save)")
    p.add_argument("--preset", default="nam56r-tiny-dense", help="the preset it was fine-tuned from")
    p.add_argument("--flexidepth", default="usage_loss_weight=3e-3,inference=hard",
                   help="its --flexidepth options (inference=hard is forced)")
    p.add_argument("--symbols", default="AE", help="hard_skip_symbols: the layers that gather (default AE)")
    p.add_argument("--margins", default="0.05,0.1,0.2",
                   help="comma-separated margins M: capacity = min(1, kept fraction + M) per layer")
    p.add_argument("--eval-iters", type=int, default=4, help="validation global batches (default 4)")
    p.add_argument("--out", help="JSON of the rows")
    args = p.parse_args(argv)
    try:
        args.margins = [float(m) for m in args.margins.split(",") if m.strip()]
    except ValueError:
        p.error(f"--margins {args.margins!r}: comma-separated numbers 0 <= M < 1")
    if not args.margins or any(not 0 <= m < 1 for m in args.margins):
        p.error(f"--margins {args.margins!r}: comma-separated numbers 0 <= M < 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from megacpp_mcore.features.flexidepth import FlexiDepthLayer
    from megacpp_mcore.features.flexidepth.config import FlexiDepthConfig
    from megacpp_mcore.models.presets import get_preset
    from megacpp_mcore.train import loop, runtime
    from megacpp_mcore.train.checkpoint import read_metadata
    from megacpp_mcore.train.invalid import OPTIMIZER_KEYS

    try:
        fd = dataclasses.replace(FlexiDepthConfig.from_options(args.flexidepth), inference="hard",
                                 hard_skip_symbols=args.symbols)
    except ValueError as exc:
        print(f"eval_flexidepth_capacity: --flexidepth / --symbols: {exc}", file=sys.stderr)
        return 2
    base = get_preset(args.preset)
    model = base.replace(name=f"{base.name}+flexidepth", features={**base.features, "flexidepth": fd})
    try:
        path, step = loop.find_checkpoint(args.load)
        # the run's own optimizer settings: a resume must match them (nothing is trained here)
        saved = (read_metadata(path) or {}).get("run") or {}
        cfg = loop.TrainConfig(load=args.load, steps=step, eval_iters=args.eval_iters, freeze_backbone=True,
                               **{k: saved[k] for k in OPTIMIZER_KEYS if k in saved})
        checked = loop.check(model, cfg)
    except ValueError as exc:
        print(f"eval_flexidepth_capacity: {exc}", file=sys.stderr)
        return 2
    trainer = loop.Trainer(checked, cfg, log=lambda _line: None, t_start=time.perf_counter())
    layers = [(i, m) for i, m in enumerate(trainer.chunks[0].module.decoder.layers)
              if isinstance(m, FlexiDepthLayer)] if hasattr(trainer.chunks[0], "module") else \
        [(i, m) for i, m in enumerate(trainer.chunks[0].decoder.layers) if isinstance(m, FlexiDepthLayer)]
    gathering = [(i, m) for i, m in layers if m.gathers]

    def evaluate(label: str, capacities: dict[int, float | None]) -> dict:
        for i, layer in gathering:
            layer.set_hard_skip_capacity(capacities.get(i))
        bpb = trainer.evaluate()
        rates = {i: layer.megacpp_stats()["skip_rate"] for i, layer in layers}
        return {"setting": label, "bpb": bpb, "skip_rate": sum(rates.values()) / len(rates),
                "skip_rate_per_layer": rates, "capacity": {i: c for i, c in capacities.items()}}

    rows = [evaluate("exact", {})]
    kept = {i: 1.0 - rows[0]["skip_rate_per_layer"][i] for i, _ in gathering}
    for margin in args.margins:
        rows.append(evaluate(f"kept+{margin:g}", {i: min(1.0, k + margin) for i, k in kept.items()}))
    runtime.shutdown()
    exact = rows[0]["bpb"]
    print(f"{args.load} ({model.name}, hard skip on {args.symbols}, {args.eval_iters} validation batches)")
    print(f"{'setting':<12} {'bits/byte':>9} {'vs exact':>9} {'skip rate':>9}  capacity per gathering layer")
    for row in rows:
        caps = ", ".join(f"{i}: {c:.2f}" for i, c in row["capacity"].items()) or "-"
        print(f"{row['setting']:<12} {row['bpb']:9.4f} {100 * (row['bpb'] / exact - 1):+8.2f}% "
              f"{row['skip_rate']:9.3f}  {caps}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
