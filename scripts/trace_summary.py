"""Where one profiled training step's device time goes, from a torch.profiler Chrome trace (the
``*.pt.trace.json[.gz]`` Megatron-LM writes with ``--profile --use-pytorch-profiler``).

    python scripts/trace_summary.py TRACE_OR_DIR [--top 25] [--json OUT]

Reads the device events (kernels, memcpy, memset), and reports:

* ``span_ms``: first device event start to last device event end (the profiled step(s));
* ``busy_ms``: the union of the device events' intervals; ``idle_ms = span - busy``: where the device
  waited (on the host: launches, synchronizations, Python);
* per category (GEMM, attention, Mamba/SSD Triton, MoE routing and permutation, norms, elementwise,
  reductions, copies, optimizer, cross-entropy, other): device ms and kernel count;
* the top kernels by device time;
* ``idle_by_launcher`` (traces with Python stacks, which Megatron-LM's profiler records): each idle
  gap of at least 10 us charged to the innermost frame of Megatron, TE, mamba_ssm, causal_conv1d or
  this package that was on the stack when the kernel after the gap was launched: which Python code
  the device waited for.

``bench_stage.py --profile-step N`` runs this on every run's trace and keeps the summary in its JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

# (category, name pattern) in order: the first match names a kernel's category.
CATEGORIES: tuple[tuple[str, re.Pattern], ...] = tuple((name, re.compile(pattern, re.I)) for name, pattern in (
    ("attention", r"flash|fmha|cudnn|attn|sdpa|dot_product"),
    ("cross_entropy", r"cross_entropy|_row_stats|_row_grad|softmax|log_softmax|nll"),
    ("mamba_ssd", r"_chunk_|_state_passing|_bmm_chunk|causal_conv1d|selective|ssd|mamba|m2rnn"),
    ("moe_route", r"permut|unpermut|topk|sort|scatter|gather|index|histc|bincount|moe|router|cumsum"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm80_|matmul|_mm_|wgrad|dgrad"),
    ("norm", r"rmsnorm|layernorm|layer_norm|rms_norm|norm_fwd|norm_bwd"),
    ("optimizer", r"multi_tensor|adam|l2norm|lamb"),
    ("copy", r"memcpy|memset|copy|cast|transpose|cat_|fill"),
    ("reduce", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton_|silu|swiglu|gelu|bias|dropout|add"),
))
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
# Python frames that name who launched a kernel (the innermost one on the stack is charged)
LAUNCHER_FRAME = re.compile(r"megatron/|megacpp_mcore/|transformer_engine/|mamba_ssm/|causal_conv1d/")


class TraceError(ValueError):
    """Not a trace this script can read: one line, exit status 2."""


def category(name: str) -> str:
    return next((cat for cat, pattern in CATEGORIES if pattern.search(name)), "other")


def find_trace(path: str | Path) -> Path:
    """``path`` itself, or the newest ``*.pt.trace.json[.gz]`` under the directory ``path``."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        traces = sorted((p for p in path.rglob("*.json*") if ".pt.trace.json" in p.name),
                        key=lambda p: p.stat().st_mtime)
        if traces:
            return traces[-1]
    raise TraceError(f"{path}: no torch.profiler trace (*.pt.trace.json or .json.gz) found")


def load_events(trace: Path) -> list[dict]:
    opener = gzip.open if trace.name.endswith(".gz") else open
    try:
        with opener(trace, "rt") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise TraceError(f"{trace}: not a JSON trace ({type(exc).__name__}: {exc})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else None
    if not isinstance(events, list):
        raise TraceError(f"{trace}: no traceEvents list (not a Chrome trace)")
    return events


def device_events(events: list[dict]) -> list[dict]:
    """The complete device events (kernels, memcpy, memset) among ``events``, by start time."""
    return sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS
                   and isinstance(e.get("ts"), (int, float)) and isinstance(e.get("dur"), (int, float))),
                  key=lambda e: e["ts"])


def summarize(events: list[dict], top: int = 25) -> dict:
    """The summary of the device events among ``events`` (times in ms)."""
    device = device_events(events)
    if not device:
        raise TraceError("the trace has no device events (kernels, memcpy, memset): was CUDA profiled?")
    intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in device)
    busy, (start, end) = 0.0, intervals[0]
    first = start
    last = max(stop for _, stop in intervals)
    for s, e in intervals[1:]:
        if s > end:
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    by_cat: dict[str, list[float]] = {}
    by_name: dict[str, list[float]] = {}
    for e in device:
        name = e.get("name", "?")
        for key, table in ((category(name) if e["cat"] == "kernel" else "copy", by_cat), (name[:100], by_name)):
            entry = table.setdefault(key, [0.0, 0])
            entry[0] += e["dur"] / 1e3
            entry[1] += 1
    return {
        "span_ms": (last - first) / 1e3,
        "busy_ms": busy / 1e3,
        "idle_ms": (last - first - busy) / 1e3,
        "device_events": len(device),
        "categories": {k: {"ms": v[0], "count": v[1]} for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1][0])},
        "top_kernels": [{"name": k, "ms": v[0], "count": v[1]}
                        for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
        "idle_by_launcher": idle_by_launcher(events, top=top),
    }


def idle_by_launcher(events: list[dict], min_gap_us: float = 10.0, top: int = 15) -> list[dict]:
    """Idle device time charged to the Python frame that launched the kernel after each gap (see
    the module doc); empty where the trace has no Python stacks."""
    import numpy as np

    device = device_events(events)
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATS and "correlation" in (e.get("args") or {})}
    frames: dict = {}
    for e in events:
        if e.get("cat") == "python_function" and e.get("ph") == "X" and LAUNCHER_FRAME.search(e.get("name", "")):
            frames.setdefault(e.get("tid"), []).append(e)
    if not device or not frames:
        return []
    stacks = {tid: (np.array([f["ts"] for f in fs]), np.array([f["ts"] + f["dur"] for f in fs]), fs)
              for tid, fs in frames.items()}
    charged: dict[str, list[float]] = {}
    end = device[0]["ts"] + device[0]["dur"]
    for event in device[1:]:
        gap = event["ts"] - end
        end = max(end, event["ts"] + event["dur"])
        if gap < min_gap_us:
            continue
        launch = launches.get((event.get("args") or {}).get("correlation"))
        key = "(launch not in the trace)"
        if launch is not None and launch.get("tid") in stacks:
            starts, ends, fs = stacks[launch["tid"]]
            open_frames = np.nonzero((starts <= launch["ts"]) & (ends >= launch["ts"]))[0]
            key = "(no package frame)"
            if len(open_frames):
                inner = max(open_frames, key=lambda i: (fs[i]["ts"], -fs[i]["dur"]))
                name = fs[inner]["name"]
                key = name[LAUNCHER_FRAME.search(name).start():]  # from the package's path on
        entry = charged.setdefault(key, [0.0, 0])
        entry[0] += gap / 1e3
        entry[1] += 1
    return [{"frame": k, "idle_ms": v[0], "gaps": v[1]}
            for k, v in sorted(charged.items(), key=lambda kv: -kv[1][0])[:top]]


def print_summary(summary: dict, title: str = "") -> None:
    print(f"\n{title}device span {summary['span_ms']:.1f} ms, busy {summary['busy_ms']:.1f} ms, idle "
          f"{summary['idle_ms']:.1f} ms ({summary['idle_ms'] / summary['span_ms']:.1%}), "
          f"{summary['device_events']} device events")
    print("| category | ms | kernels |\n|---|---|---|")
    for name, entry in summary["categories"].items():
        print(f"| {name} | {entry['ms']:.1f} | {entry['count']} |")
    print("| top kernel | ms | calls |\n|---|---|---|")
    for entry in summary["top_kernels"]:
        print(f"| {entry['name']} | {entry['ms']:.2f} | {entry['count']} |")
    if summary.get("idle_by_launcher"):
        print("| idle before a launch from (innermost package frame) | idle ms | gaps |\n|---|---|---|")
        for entry in summary["idle_by_launcher"]:
            print(f"| {entry['frame']} | {entry['idle_ms']:.2f} | {entry['gaps']} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="a *.pt.trace.json[.gz] file, or a directory holding one (the newest)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)
    try:
        trace = find_trace(args.trace)
        summary = summarize(load_events(trace), top=args.top)
    except TraceError as exc:
        print(f"trace_summary: {exc}", file=sys.stderr)
        return 2
    print_summary(summary, f"{trace}: ")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
