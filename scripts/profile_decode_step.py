"""Where a static decode step's device time goes, by part of the step: plain and speculative (K
drafts), batch 1 by default, the step CUDA graphs replay profiled eagerly.

    python scripts/profile_decode_step.py [--load CKPT] [--speculative 0,1,2] [--batch 1] [--dtype bf16]

For each K: the graphed ms/step (as ``bench_generate --cuda-graphs`` times it), then the eager
static step under torch's profiler: every kernel is charged to the innermost package function
that was running when it was launched (``file:function``) inside its phase (``trunk``: the verification's or plain
step's layers; ``mtp``: the drafter; ``step``: embedding, head, acceptance, commits), with its
kernel count and device microseconds per step. A graphed step costs its kernels' device time plus
a gap per kernel, so the count matters at batch 1 as much as the microseconds.

To know which function was running, the profiled steps run with every function and method of the
loaded ``megacpp_mcore`` modules wrapped in a ``record_function`` range named like a Python frame
(``megacpp_mcore/infer/mtp.py(0): _run``), restored afterwards; each kernel-launching event is placed
among those ranges by time. (Torch's own Python-function events, ``with_stack=True``, do not join
the CUDA operators of torch 2.11 to their frames.)

On a CPU (no kernels) it counts the step's aten operators instead, views and allocations left
out, with their CPU microseconds: the same attribution, a proxy for the kernel count.

``--compile-speculative``: the speculative rows (K >= 1) run the step's own work compiled
(``generate(..., compile_speculative=True)``, :mod:`megacpp_mcore.infer.compiled`: the drafter and
the verification's bookkeeping); fused kernels count as kernels (on the CPU: Inductor's C++ kernels
count as operators). The wrappers would change the code the compiler traces, so those rows label
two eager functions only, ``StaticMTPDrafter.draft`` (the ``mtp`` phase) and ``Session.forward``
(``trunk``): every other kernel (the compiled bookkeeping included) counts as ``step``.

Prints one table per K (largest parts first) and, last, the totals side by side; ``--out`` writes
them as JSON.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import inspect
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
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32",
                   help="weights and compute, as bench_generate's (default fp32, TF32 off)")
    p.add_argument("--prompt-dir", default="/usr/include", help="C/C++ sources for the prompt")
    p.add_argument("--prompt-tokens", type=int, default=128, help="bytes per prompt (default 128)")
    p.add_argument("--compile-speculative", action="store_true",
                   help="speculative rows with the step's own work through torch.compile")
    p.add_argument("--out", help="JSON of the tables")
    args = p.parse_args(argv)
    args.speculative = [int(k) for k in args.speculative.split(",") if k.strip()]
    if args.mtp_depth is None and not args.load:
        args.mtp_depth = 2
    return args


# operators that launch no kernel and are not views: allocations, scalar reads, queries
_NO_KERNEL_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "_unsafe_view", "item", "_local_scalar_dense",
    "is_nonzero", "result_type", "_has_compatible_shallow_copy_type", "is_same_size"})


@functools.cache
def launches_no_kernel(name: str) -> bool:
    """Whether the aten operator of profiler event ``name`` (``aten::<op>``) launches no kernel of
    its own: a view (its schema returns an alias of an input: ``view``, ``reshape``, ``to``,
    ``contiguous``...; where such an operator copies, the copy is its child and is counted) or one
    of :data:`_NO_KERNEL_OPS`."""
    op = name.removeprefix("aten::")
    if op in _NO_KERNEL_OPS:
        return True
    packet = getattr(torch.ops.aten, op, None)
    return packet is not None and any(getattr(packet, o).is_view for o in packet.overloads())


def _counted(event) -> bool:
    """An aten operator that launches a kernel and runs inside no other counted operator (its
    own children are its kernels; an operator inside a view-like one, e.g. the copy of a
    ``to``, counts)."""
    return (event.name.startswith("aten::") and not launches_no_kernel(event.name)
            and not any(p.name.startswith("aten::") and not launches_no_kernel(p.name)
                        for p in _ancestors(event)))


def _site(frames: list[str]) -> tuple[str, str]:
    """(phase, innermost package ``file:function``) of the package's ranges around an operator
    (``path(line): function`` names, innermost first)."""
    frames = [f for f in frames if PACKAGE in f]
    phase = "mtp" if any("infer/mtp.py" in f for f in frames) else (
        "trunk" if any("infer/layers.py" in f or f.endswith("infer/engine.py(0): forward") for f in frames)
        else "step")
    if not frames:
        return phase, "?"
    path, _, func = frames[0].partition(": ")
    name = path.split(PACKAGE + "/")[-1].split("(")[0]
    return phase, f"{name}:{func}"


def attribute(events, *, cuda: bool) -> dict:
    """``{(phase, site): [count, us]}`` over profiler events: kernels and their device time on
    CUDA, else kernel-launching aten operators (:func:`_counted`)
    and their CPU time. An event is placed among the package's ranges (:func:`labelled_functions`,
    names ``path(line): function``) by its start time: a sweep over intervals that nest, on one
    timeline (decoding runs on one Python thread)."""
    frames, items = [], []
    for event in events:
        if PACKAGE in event.name and "): " in event.name:
            frames.append(event)
        elif cuda:
            kernels = getattr(event, "kernels", None) or []
            if kernels:
                items.append((event, len(kernels), sum(kernel.duration for kernel in kernels)))
        elif _counted(event) or "cpp_fused_" in event.name:
            items.append((event, 1, event.cpu_time_total))  # an operator, or an Inductor C++ kernel
    table: dict = collections.defaultdict(lambda: [0, 0.0])
    frames.sort(key=lambda e: (e.time_range.start, -e.time_range.end))
    items.sort(key=lambda item: item[0].time_range.start)
    open_frames, i = [], 0
    for event, count, us in items:
        t = event.time_range.start
        while i < len(frames) and frames[i].time_range.start <= t:
            while open_frames and open_frames[-1].time_range.end <= frames[i].time_range.start:
                open_frames.pop()
            open_frames.append(frames[i])
            i += 1
        while open_frames and open_frames[-1].time_range.end <= t:
            open_frames.pop()
        key = _site([f.name for f in reversed(open_frames)])
        table[key][0] += count
        table[key][1] += us
    return table


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


@contextlib.contextmanager
def labelled_functions(only: frozenset[str] | None = None):
    """Every function of the loaded package modules (module-level, and methods defined in their
    classes) replaced, wherever a package module or class refers to it, by a wrapper that runs it
    inside ``record_function("<file>(0): <name>")``; all restored on exit. ``only``: just the
    functions of these qualified names (``Class.method`` or ``function``)."""
    from torch.autograd.profiler import record_function

    modules = [m for name, m in list(sys.modules.items())
               if m is not None and (name == PACKAGE or name.startswith(PACKAGE + "."))]
    wrappers: dict = {}

    def wrapped(fn):
        if fn not in wrappers:
            path = inspect.getsourcefile(inspect.unwrap(fn)) or "?"  # a decorated one: its own file
            label = f"{PACKAGE}/{path.split(PACKAGE + '/')[-1]}(0): {fn.__name__}"

            @functools.wraps(fn)
            def wrapper(*args, __fn=fn, __label=label, **kwargs):
                with record_function(__label):
                    return __fn(*args, **kwargs)

            wrappers[fn] = wrapper
        return wrappers[fn]

    def ours(fn) -> bool:
        return (inspect.isfunction(fn) and (fn.__module__ or "").startswith(PACKAGE)
                and (only is None or fn.__qualname__ in only))

    undo = []
    for module in modules:
        for name, value in list(vars(module).items()):
            if ours(value):
                undo.append((module, name, value))
                setattr(module, name, wrapped(value))
            elif inspect.isclass(value) and value.__module__ == module.__name__:
                for attr, fn in list(vars(value).items()):
                    if ours(fn) and (not attr.startswith("__") or attr == "__call__"):
                        undo.append((value, attr, fn))
                        setattr(value, attr, wrapped(fn))
    try:
        yield
    finally:
        for owner, name, value in reversed(undo):
            setattr(owner, name, value)


def profile_steps(engine, rows, *, k: int, steps: int, sampling, compile_speculative: bool = False) -> dict:
    """Kernels (CPU: aten ops) and their microseconds per step by (phase, site), eager static
    decoding (with ``compile_speculative``, the step's own work compiled); the rows say ``kernels``
    either way."""
    from torch.profiler import ProfilerActivity, profile

    from megacpp_mcore.infer import generate

    def run(new_tokens):
        return generate(engine, rows, max_new_tokens=new_tokens, sampling=sampling, speculative=k,
                        static=True, compile_speculative=compile_speculative)

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    only = frozenset({"StaticMTPDrafter.draft", "Session.forward"}) if compile_speculative else None  # docstring

    def measured(new_tokens):
        with labelled_functions(only), profile(activities=activities) as prof:
            out = run(new_tokens)
            if cuda:
                torch.cuda.synchronize()
        return attribute(prof.events(), cuda=cuda), out.steps

    run(4)
    run(4 + steps)  # compiled code is compiled per session capacity: both lengths, before the profile
    short, n_short = measured(4)
    long, n_long = measured(4 + steps)
    per = max(n_long - n_short, 1)
    rows_out = {}
    for key in long:
        count = (long[key][0] - short.get(key, [0, 0.0])[0]) / per
        us = (long[key][1] - short.get(key, [0, 0.0])[1]) / per
        if count > 0.01:  # a part with no kernels per step: only the runs' timing noise
            rows_out[f"{key[0]} {key[1]}"] = {"kernels": count, "us": us}
    return rows_out


def graphed_ms(engine, rows, *, k: int, sampling, new_tokens: int = 64,
               compile_speculative: bool = False) -> tuple[float, float]:
    """(ms per graphed step, tokens per step), the faster of two runs."""
    from megacpp_mcore.infer import generate

    opts = dict(sampling=sampling, speculative=k, cuda_graphs=True, compile_speculative=compile_speculative)
    generate(engine, rows, max_new_tokens=8, **opts)
    best = None
    for _ in range(2):
        run = generate(engine, rows, max_new_tokens=new_tokens, **opts)
        if best is None or run.decode_s < best.decode_s:
            best = run
    return (1e3 * best.decode_s / max(best.steady_steps, 1),
            best.decode_tokens / max(best.steps, 1) / len(rows))


def main(argv=None) -> int:
    args = parse_args(argv)
    import bench_generate as bg

    cuda = torch.cuda.is_available()
    unit = "kernels" if cuda else "ops"
    gen_args = bg.parse_args(["--batch", str(args.batch), "--dtype", args.dtype, "--prompt-dir", args.prompt_dir,
                              "--prompt-tokens", str(args.prompt_tokens)]
                             + (["--load", args.load] if args.load else [])
                             + (["--mtp-depth", str(args.mtp_depth)] if args.mtp_depth else []))
    engine, description = bg.build_engine(gen_args)
    sampling = bg.byte_sampling(engine)
    rows = bg.prompts(gen_args, args.batch)
    ks = [k for k in args.speculative if k == 0 or 1 <= k <= engine.mtp_depth]
    if args.compile_speculative and not cuda:  # Inductor's C++ kernels as profiler events
        from torch._inductor import config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    results = {}
    for k in ks:
        compiled = args.compile_speculative and k > 0
        ms, tokens = graphed_ms(engine, rows, k=k, sampling=sampling, compile_speculative=compiled) \
            if cuda else (None, None)
        parts = profile_steps(engine, rows, k=k, steps=args.steps, sampling=sampling, compile_speculative=compiled)
        total_n = sum(p["kernels"] for p in parts.values())
        total_us = sum(p["us"] for p in parts.values())
        results[k] = {"graphed_ms_per_step": ms, "tokens_per_step": tokens, unit: total_n,
                      "device_us" if cuda else "cpu_us": total_us, "parts": parts}
        if cuda:
            print(f"\nK={k}: graphed {ms:.3f} ms/step, {tokens:.2f} tokens/step; eager static step: "
                  f"{total_n:.0f} kernels, {total_us:.0f} us of device time "
                  f"(gap per kernel if graphed: {(1e3 * ms - total_us) / max(total_n, 1):.2f} us)")
        else:
            print(f"\nK={k}: eager static step on the CPU: {total_n:.0f} aten ops, {total_us:.0f} us")
        print(f"  {'part':<58} {unit:>8} {'us':>8} {'us/' + unit[:-1]:>9}")
        for name, p in sorted(parts.items(), key=lambda kv: -kv[1]["kernels"])[:args.top]:
            print(f"  {name:<58} {p['kernels']:8.1f} {p['us']:8.1f} {p['us'] / max(p['kernels'], 1e-9):9.2f}")
    print(f"\n{description}, batch {args.batch}")
    print(f"{'K':>2} {'graphed ms':>10} {'tokens':>7} {unit:>8} {'us':>9} by phase ({unit} / us)")
    for k, r in results.items():
        phases = collections.defaultdict(lambda: [0.0, 0.0])
        for name, p in r["parts"].items():
            phases[name.split()[0]][0] += p["kernels"]
            phases[name.split()[0]][1] += p["us"]
        by = ", ".join(f"{ph} {v[0]:.0f} / {v[1]:.0f}" for ph, v in sorted(phases.items()))
        graphed = "-" if r["graphed_ms_per_step"] is None else f"{r['graphed_ms_per_step']:.3f}"
        tokens = "-" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
        print(f"{k:>2} {graphed:>10} {tokens:>7} {r[unit]:8.0f} {r.get('device_us', r.get('cpu_us')):9.0f} {by}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": description, "batch": args.batch,
                                              "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
