"""What FlexiDepth's ``hard_skip_capacity`` costs in quality: validation bits/byte of a FlexiDepth
checkpoint in hard inference, exact (the gathered length is each forward's kept count) against a
fixed capacity per gathering layer (its measured kept fraction + a margin; overflowing kept tokens
take the adapter path).

    python scripts/eval_flexidepth_capacity.py --load CKPT [--margins 0.05,0.1,0.2] [--symbols AE]

CKPT: a `megacpp-mcore train --flexidepth ...` checkpoint; its model and FlexiDepth options come
from it (as `generate --load` reads them), put in hard inference gathering on ``--symbols``. The
validation batches are the training loop's (``--eval-iters`` global batches of ``--data``, default
the default data). Prints one row per setting: bits/byte, its change against exact, the skip rate
over the FlexiDepth layers (overflow counted as skipped) and the capacities; ``--out`` writes them
as JSON.
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
    p.add_argument("--data", help="prepared prefix it trained on (default: the default data, as train)")
    p.add_argument("--preset", help="name the model when the checkpoint does not (older checkpoints): "
                                    "the preset it was fine-tuned from, with --flexidepth")
    p.add_argument("--flexidepth", help="with --preset: the --flexidepth options it was fine-tuned with")
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
    if args.eval_iters < 1:
        p.error(f"--eval-iters {args.eval_iters}: at least 1")
    if (args.preset is None) != (args.flexidepth is None):
        p.error("--preset and --flexidepth name an older checkpoint's model together; give both or neither")
    return args


def hard_model(load: str, symbols: str, named=None):
    """(ModelConfig, its :class:`~megacpp_mcore.infer.checkpoint.Checkpoint`): the checkpoint's
    FlexiDepth model (``named``, a ModelConfig, where the checkpoint does not record it) in hard
    inference gathering on ``symbols``; ValueError for a checkpoint without FlexiDepth."""
    from megacpp_mcore.infer import checkpoint as ckpt

    found = ckpt.open_checkpoint(load)
    model = ckpt.resolve_model(found, named)
    fd = model.features.get("flexidepth")
    if fd is None:
        raise ValueError(f"--load {load}: {model.name} carries no FlexiDepth (fine-tune it with "
                         "megacpp-mcore train --flexidepth)")
    fd = dataclasses.replace(fd, inference="hard", hard_skip_symbols=symbols)
    return model.replace(features={**model.features, "flexidepth": fd}), found


def evaluate_capacities(load: str, *, symbols: str = "AE", margins=(0.05, 0.1), eval_iters: int = 4,
                        data: str | None = None, named=None) -> tuple[str, list[dict]]:
    """(model name, rows): validation bits/byte exact, then with each margin's capacities."""
    from megacpp_mcore.features.flexidepth import FlexiDepthLayer
    from megacpp_mcore.train import loop, runtime
    from megacpp_mcore.train.checkpoint import read_metadata
    from megacpp_mcore.train.invalid import OPTIMIZER_KEYS

    model, found = hard_model(load, symbols, named)
    # the run's own optimizer settings: a resume must match them (nothing is trained here)
    saved = (read_metadata(found.path) or {}).get("run") or {}
    cfg = loop.TrainConfig(load=load, steps=found.step, eval_iters=eval_iters, freeze_backbone=True, data=data,
                           **{k: saved[k] for k in OPTIMIZER_KEYS if k in saved})
    checked = loop.check(model, cfg)
    trainer = loop.Trainer(checked, cfg, log=lambda _line: None, t_start=time.perf_counter())
    try:
        layers = [(i, m) for i, m in enumerate(runtime.unwrap_model(trainer.chunks[0]).decoder.layers)
                  if isinstance(m, FlexiDepthLayer)]
        gathering = [(i, m) for i, m in layers if m.gathers]

        def evaluate(label: str, capacities: dict[int, float]) -> dict:
            for i, layer in gathering:
                layer.set_hard_skip_capacity(capacities.get(i))
            bpb = trainer.evaluate()
            rates = {i: layer.megacpp_stats()["skip_rate"] for i, layer in layers}
            return {"setting": label, "bpb": bpb, "skip_rate": sum(rates.values()) / len(rates),
                    "skip_rate_per_layer": rates, "capacity": dict(capacities)}

        rows = [evaluate("exact", {})]
        kept = {i: 1.0 - rows[0]["skip_rate_per_layer"][i] for i, _ in gathering}
        for margin in margins:
            rows.append(evaluate(f"kept+{margin:g}", {i: min(1.0, k + margin) for i, k in kept.items()}))
    finally:
        runtime.shutdown()
    return model.name, rows


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        named = None
        if args.preset is not None:
            from megacpp_mcore.features.flexidepth.config import FlexiDepthConfig
            from megacpp_mcore.models.presets import get_preset

            base = get_preset(args.preset)
            named = base.replace(name=f"{base.name}+flexidepth", features={
                **base.features, "flexidepth": FlexiDepthConfig.from_options(args.flexidepth)})
        name, rows = evaluate_capacities(args.load, symbols=args.symbols, margins=args.margins,
                                         eval_iters=args.eval_iters, data=args.data, named=named)
    except ValueError as exc:
        print(f"eval_flexidepth_capacity: {exc}", file=sys.stderr)
        return 2
    exact = rows[0]["bpb"]
    print(f"{args.load} ({name}, hard skip gathering on {args.symbols}, {args.eval_iters} validation batches)")
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
