"""Where a static decode step's device time goes, by part of the step: plain and speculative (K
drafts), batch 1 by default, the step CUDA graphs replay profiled eagerly on CUDA.

    python scripts/profile_decode_step.py [--load CKPT] [--speculative 0,1,2] [--batch 1]

For each K: the graphed ms/step (as ``bench_generate --cuda-graphs`` times it), then the eager
static step under torch's profiler: every kernel is charged to the innermost package function
that launched it (``file:function``) inside its phase (``trunk``: the verification's or plain
step's layers; ``mtp``: the drafter; ``step``: embedding, head, acceptance, commits), with its
kernel count and device microseconds per step. A graphed step costs its kernels' device time plus
a gap per kernel, so the count matters at batch 1 as much as the microseconds.

Prints one table per K (largest parts first) and, last, the totals side by side; ``--out`` writes
them as JSON. CUDA only (on a CPU the script says so and exits 2).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PACKAGE = "megacpp_mcore"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", help="checkpoint of `megacpp-mcore train --save` (default: random weights)")
    p.add_argument("--mtp-depth", type=int, default=None,
                   help="MTP depth of the random-weight model (default 2 without --load)")
    p.add_argument("--speculative", default="0,1,2", help="comma-separated K values, 0 = plain")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=16, help="profiled steps per K (after 4 warm-up ones)")
    p.add_argument("--top", type=int, default=25, help="rows per table")
    p.add_argument("--out", help="JSON of the tables")
    args = p.parse_args(argv)
    args.speculative = [int(k) for k in args.speculative.split(",") if k.strip()]
    if args.mtp_depth is None and not args.load:
        args.mtp_depth = 2
    return args


def _site(frames: list[str]) -> tuple[str, str]:
    """(phase, innermost package ``file:function``) of an operator's Python frames (the
    profiler's ``path(line): function`` events above it, innermost first)."""
    frames = [f for f in frames if PACKAGE in f]
    phase = "mtp" if any("infer/mtp.py" in f for f in frames) else (
        "trunk" if any("infer/layers.py" in f for f in frames) else "step")
    if not frames:
        return phase, "?"
    path, _, func = frames[0].partition(": ")
    name = path.split(PACKAGE + "/")[-1].split("(")[0]
    return phase, f"{name}:{func}"


def _frames(event) -> list[str]:
    """The names of an event's ancestors, innermost first."""
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def profile_steps(engine, rows, *, k: int, steps: int, sampling) -> dict:
    """Kernels and device time per step by (phase, site), eager static decoding."""
    from torch.profiler import ProfilerActivity, profile

    from megacpp_mcore.infer import generate

    def run(new_tokens):
        return generate(engine, rows, max_new_tokens=new_tokens, sampling=sampling, speculative=k,
                        static=True)

    def measured(new_tokens):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            out = run(new_tokens)
            torch.cuda.synchronize()
        table: dict = collections.defaultdict(lambda: [0, 0.0])
        for event in prof.events():
            kernels = getattr(event, "kernels", None) or []
            if not kernels:
                continue
            key = _site(_frames(event))
            table[key][0] += len(kernels)
            table[key][1] += sum(kernel.duration for kernel in kernels)
        return table, out.steps

    run(4)
    short, n_short = measured(4)
    long, n_long = measured(4 + steps)
    per = max(n_long - n_short, 1)
    rows_out = {}
    for key in long:
        count = (long[key][0] - short.get(key, [0, 0.0])[0]) / per
        us = (long[key][1] - short.get(key, [0, 0.0])[1]) / per
        if count > 0.01 or us > 0.01:
            rows_out[f"{key[0]} {key[1]}"] = {"kernels": count, "us": us}
    return rows_out


def graphed_ms(engine, rows, *, k: int, sampling, new_tokens: int = 64) -> tuple[float, float]:
    """(ms per graphed step, tokens per step), the faster of two runs."""
    from megacpp_mcore.infer import generate

    generate(engine, rows, max_new_tokens=8, sampling=sampling, speculative=k, cuda_graphs=True)
    best = None
    for _ in range(2):
        run = generate(engine, rows, max_new_tokens=new_tokens, sampling=sampling, speculative=k,
                       cuda_graphs=True)
        if best is None or run.decode_s < best.decode_s:
            best = run
    return 1e3 * best.decode_s / max(best.steps, 1), best.decode_tokens / max(best.steps, 1) / len(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode_step: needs a CUDA device (kernel times); none is visible here", file=sys.stderr)
        return 2
    import bench_generate as bg

    gen_args = bg.parse_args(["--batch", str(args.batch)] + (["--load", args.load] if args.load else [])
                             + (["--mtp-depth", str(args.mtp_depth)] if args.mtp_depth else []))
    engine, description = bg.build_engine(gen_args)
    sampling = bg.byte_sampling(engine)
    rows = bg.prompts(gen_args, args.batch)
    ks = [k for k in args.speculative if k == 0 or 1 <= k <= engine.mtp_depth]
    results = {}
    for k in ks:
        ms, tokens = graphed_ms(engine, rows, k=k, sampling=sampling)
        parts = profile_steps(engine, rows, k=k, steps=args.steps, sampling=sampling)
        total_n = sum(p["kernels"] for p in parts.values())
        total_us = sum(p["us"] for p in parts.values())
        results[k] = {"graphed_ms_per_step": ms, "tokens_per_step": tokens, "kernels": total_n,
                      "device_us": total_us, "parts": parts}
        print(f"\nK={k}: graphed {ms:.3f} ms/step, {tokens:.2f} tokens/step; eager static step: "
              f"{total_n:.0f} kernels, {total_us:.0f} us of device time "
              f"(gap per kernel if graphed: {(1e3 * ms - total_us) / max(total_n, 1):.2f} us)")
        print(f"  {'part':<58} {'kernels':>8} {'us':>8} {'us/kernel':>9}")
        for name, p in sorted(parts.items(), key=lambda kv: -kv[1]["us"])[:args.top]:
            print(f"  {name:<58} {p['kernels']:8.1f} {p['us']:8.1f} {p['us'] / max(p['kernels'], 1e-9):9.2f}")
    print(f"\n{description}, batch {args.batch}")
    print(f"{'K':>2} {'graphed ms':>10} {'tokens':>7} {'kernels':>8} {'device us':>9} {'by phase (kernels / us)'}")
    for k, r in results.items():
        phases = collections.defaultdict(lambda: [0.0, 0.0])
        for name, p in r["parts"].items():
            phases[name.split()[0]][0] += p["kernels"]
            phases[name.split()[0]][1] += p["us"]
        by = ", ".join(f"{ph} {v[0]:.0f} / {v[1]:.0f}" for ph, v in sorted(phases.items()))
        print(f"{k:>2} {r['graphed_ms_per_step']:10.3f} {r['tokens_per_step']:7.2f} {r['kernels']:8.0f} "
              f"{r['device_us']:9.0f} {by}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": description, "batch": args.batch,
                                              "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
