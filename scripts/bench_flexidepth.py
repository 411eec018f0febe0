#!/usr/bin/env python
"""FlexiDepth hard-skip inference forward versus the dense forward of the same backbone, same batch.

Builds ``--preset`` (default nam56r-lite, its MoD and MTP removed: the dense backbone) twice: dense,
and with FlexiDepth on its A and E layers in ``inference="hard"`` carrying the dense model's weights.
Both run in eval mode under ``torch.no_grad`` on one synthetic batch (forward to the logits, no
loss), bf16 with Transformer Engine on CUDA; prints the median forward times and the ratio
hard / dense (issue 16's target: <= 0.85 at the skip rate FlexiDepth was trained to).

Skip rate: each FlexiDepth layer's router bias is calibrated on the batch so that ``--skip-rate``
of that layer's tokens score below the threshold (the bias set from the quantile of the layer's
router logits, layer after layer in one hard-routed forward, so every layer sees the inputs hard
routing gives it); the measured overall and per-layer rates are printed. Dense and hard forwards
are timed interleaved (after their warm-ups) so that drift of a shared machine hits both; the
spread (min/median/max) and the host time of each are printed. ``--hard-skip-symbols``:
the layers whose block really runs on the kept tokens only (default ``E``, the per-token blocks;
``AE`` also runs attention on each sequence's kept tokens, which changes what they attend to).
MLA attention, as in the nam56r presets, is handed the kept tokens' own positions (it builds its
rotary table inside; its fused RoPE is refused with hard skip on ``A``); ``--no-mla`` times the
preset with standard attention instead. On the other FlexiDepth layers the block runs on every
token and rows are selected (no saving).

    python scripts/bench_flexidepth.py --skip-rate 0.3 --out flexidepth_bench.json
    python scripts/bench_flexidepth.py --skip-rates RUN/receipt.json  # the rates a fine-tune trained to
    python scripts/bench_flexidepth.py --cpu-smoke    # CPU, local backend, tiny model: timings mean nothing

``--moe``: both models' MoE layers run sync-free (the default: :func:`megacpp_mcore.infer.moe.
sync_free_moe_layers`, a grouped GEMM with device offsets, so no MoE layer reads its per-expert
counts on the host and the host can queue ahead of the device) or as Megatron's dropless layers
(``megatron``: one host read per MoE layer and forward, which made the hard forward host-bound).

``--profile N``: after the timing, one profiled forward of each model (torch.profiler): per model
the summed device time, kernel launches and host synchronisations (``cudaStreamSynchronize`` /
``cudaMemcpy``...), then the ``N`` operators with the largest device time (host time on CPU), so
the hard path's extra cost can be told apart: routing, sort/gather/scatter, adapters, the MoE
layers' own host reads.

Per layer (always): after the timing, ``--layer-rounds`` forwards of each model with the time of
every decoder layer and of the output head taken between forward hooks (CUDA events on the
device, so host work and the dropless MoE's host reads do not blur it; wall time on CPU): the
medians per layer, dense against hard, show which layers save, what each symbol's share of the
dense forward is in time (not FLOPs), and so the best ratio the trained rates allow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _fail(message: str) -> None:
    print(f"bench_flexidepth: {message}", file=sys.stderr)
    raise SystemExit(2)


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="model dimensions (default nam56r-lite; --cpu-smoke: ae-tiny)")
    p.add_argument("--num-layers", type=int, default=None, help="default: the preset's (--cpu-smoke: 4)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's; --cpu-smoke: 64)")
    p.add_argument("--batch", type=int, default=2, help="sequences per forward")
    p.add_argument("--skip-rate", type=float, default=0.3, help="fraction of tokens each FlexiDepth layer skips")
    p.add_argument("--skip-rates", default=None, metavar="RECEIPT|I:RATE,...",
                   help="per-layer skip rates instead: a `megacpp-mcore train` receipt of a FlexiDepth "
                        "run (its trained rates per layer index) or index:rate pairs; layers not named "
                        "take --skip-rate")
    p.add_argument("--hard-skip-symbols", default="E", help="FlexiDepthConfig.hard_skip_symbols (default E)")
    p.add_argument("--hard-skip-moe", default="gather", choices=("gather", "route"),
                   help="FlexiDepthConfig.hard_skip_moe: MoE E layers gather the kept tokens, or run on "
                        "every token with the skipped ones routed to no expert")
    p.add_argument("--hard-skip-capacity", default=None, metavar="C|kept+M",
                   help="FlexiDepthConfig.hard_skip_capacity of the gathering layers (a fixed gathered "
                        "length, no host read): a fraction C for all, or kept+M: each layer's calibrated "
                        "kept fraction plus M (e.g. kept+0.05); default none (the exact count)")
    p.add_argument("--adapter", default="mlp", choices=("mlp", "linear", "none"))
    p.add_argument("--moe", default="sync-free", choices=("sync-free", "megatron"),
                   help="MoE layers of both models: sync-free (infer.moe.sync_free_moe_layers: grouped "
                        "GEMM with device offsets, no host read; the default) or Megatron's dropless layer "
                        "(reads its per-expert counts on the host in every MoE layer)")
    p.add_argument("--warmup", type=int, default=None, help="untimed forwards each (default 3; --cpu-smoke 1)")
    p.add_argument("--iters", type=int, default=None, help="timed forwards each (default 10; --cpu-smoke 2)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--route-kernel", action="store_true",
                   help="capacity routes as one Triton kernel (dispatch.ROUTE_KERNEL, off by default until "
                        "tested on a GPU)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time both forwards captured as CUDA graphs (replays interleaved like the eager "
                        "ones): the device's time without the host's; needs a fixed --hard-skip-capacity")
    p.add_argument("--no-mla", action="store_true",
                   help="standard attention instead of the preset's MLA (needed for A in --hard-skip-symbols)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile one forward of each model and print its top N operators")
    p.add_argument("--layer-rounds", type=int, default=3, metavar="N",
                   help="forwards of each model timed layer by layer after the timing (0: none)")
    p.add_argument("--traffic", action="store_true",
                   help="after the timing, the bytes each FlexiDepth layer moves outside its block in "
                        "one hard forward, by operator (infer/traffic.py's model; any device)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="exercise the script on CPU with the local backend (no timings that mean anything)")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    defaults = {"preset": "ae-tiny" if smoke else "nam56r-lite", "num_layers": 4 if smoke else None,
                "seq": 64 if smoke else None, "warmup": 1 if smoke else 3, "iters": 2 if smoke else 10}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 0.0 <= args.skip_rate < 1.0:
        _fail(f"--skip-rate {args.skip_rate} is out of range; allowed: 0 <= rate < 1")
    args.layer_rates = _layer_rates(args.skip_rates) if args.skip_rates else {}
    args.capacity = _capacity(args.hard_skip_capacity)
    for name in ("batch", "iters"):
        if getattr(args, name) < 1:
            _fail(f"--{name} {getattr(args, name)} must be >= 1")
    if args.layer_rounds < 0:
        _fail(f"--layer-rounds {args.layer_rounds} must be >= 0")
    if args.warmup < 0:
        _fail(f"--warmup {args.warmup} must be >= 0")
    if args.cuda_graphs and (smoke or args.capacity is None or args.moe != "sync-free"):
        _fail("--cuda-graphs captures the forwards: it needs a GPU (not --cpu-smoke), a fixed "
              "--hard-skip-capacity (the exact count is read on the host) and --moe sync-free")
    return args


def _capacity(spec: str | None) -> tuple[str, float] | None:
    """``--hard-skip-capacity``: None, ("fixed", C) or ("kept", M)."""
    if spec is None:
        return None
    text = spec.strip()
    try:
        if text.startswith("kept"):
            margin = float(text[4:] or 0.0)
            if not 0.0 <= margin < 1.0:
                raise ValueError
            return "kept", margin
        value = float(text)
        if not 0.0 < value <= 1.0:
            raise ValueError
        return "fixed", value
    except ValueError:
        _fail(f"--hard-skip-capacity {spec!r}; allowed: a fraction 0 < C <= 1, or kept+M with 0 <= M < 1 "
              "(each layer's calibrated kept fraction plus M)")


def _layer_rates(spec: str) -> dict[int, float]:
    """``--skip-rates``: {layer index: rate} from a receipt's FlexiDepth statistics
    (``stats.flexidepth.skip_rate_per_layer``, what the run trained to) or from ``I:RATE`` pairs."""
    path = Path(spec)
    if path.is_file():
        try:
            rates = json.loads(path.read_text())["stats"]["flexidepth"]["skip_rate_per_layer"]
        except (OSError, ValueError, KeyError, TypeError):
            _fail(f"--skip-rates {spec}: not a receipt of a FlexiDepth run (no "
                  "stats.flexidepth.skip_rate_per_layer)")
        pairs = list(rates.items())
    else:
        pairs = [item.split(":", 1) for item in spec.split(",") if item]
    out = {}
    for pair in pairs:
        try:
            index, rate = int(pair[0]), float(pair[1])
        except (ValueError, IndexError):
            _fail(f"--skip-rates {spec!r}: {':'.join(map(str, pair))!r} is not INDEX:RATE; allowed: a "
                  "receipt path or index:rate pairs, e.g. 1:0.5,3:0.6")
        if not 0.0 <= rate < 1.0 or index < 0:
            _fail(f"--skip-rates: layer {index} rate {rate}; allowed: index >= 0, 0 <= rate < 1")
        out[index] = min(rate, 0.999)
    return out


def _models(args):
    """(dense ModelConfig, FlexiDepth ModelConfig); ValueError (one line) for bad dimensions."""
    from megacpp_mcore.features.flexidepth import FlexiDepthConfig
    from megacpp_mcore.models.presets import get_preset

    base = get_preset(args.preset)
    dense = base.replace(name=f"{base.name}-bench-dense", mtp_depth=0,
                         num_layers=args.num_layers or base.num_layers, seq_length=args.seq or base.seq_length,
                         features={k: v for k, v in base.features.items() if k not in ("mod", "flexidepth")},
                         **({"mla": None} if args.no_mla else {}))
    fd = FlexiDepthConfig(inference="hard", hard_skip_symbols=args.hard_skip_symbols, adapter=args.adapter,
                          hard_skip_moe=args.hard_skip_moe, usage_loss_weight=0.0)
    return dense, dense.replace(name=f"{base.name}-bench-flexidepth", features={**dense.features, "flexidepth": fd})


def _calibrate(gpt, tokens, positions, rate: float, layer_rates: dict[int, float]) -> None:
    """Sets every FlexiDepth layer's router bias so that ``rate`` of its tokens skip, or the rate
    ``layer_rates`` gives its layer index (docstring)."""
    import torch

    from megacpp_mcore.features.flexidepth import FlexiDepthLayer

    flexi = {index: layer for index, layer in enumerate(gpt.decoder.layers) if isinstance(layer, FlexiDepthLayer)}
    unknown = sorted(set(layer_rates) - set(flexi))
    if unknown:
        _fail(f"--skip-rates names layers {unknown}, which carry no FlexiDepth in this model; its "
              f"FlexiDepth layers: {sorted(flexi)}")
    rates = {id(layer): layer_rates.get(index, rate) for index, layer in flexi.items()}

    def hook(layer, args, kwargs):
        rate = rates[id(layer)]
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        router = layer.flexidepth.router
        logits, _ = layer.flexidepth(x)  # [s, b, 1] fp32
        unbiased = (logits - router.bias.float()).flatten().float()
        cut = math.log(layer.fd.threshold / (1.0 - layer.fd.threshold))  # logit(tau)
        with torch.no_grad():  # u + b < logit(tau) on a fraction `rate` of the tokens u
            router.bias.fill_(cut - torch.quantile(unbiased, rate).item())

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in flexi.values()]
    try:
        with torch.no_grad():
            gpt(tokens, positions, None)
    finally:
        for handle in handles:
            handle.remove()


def _time(models: dict, tokens, positions, *, warmup: int, iters: int) -> tuple[dict, dict]:
    """Interleaved timing of ``models`` (name -> model) on one batch: ``warmup`` untimed forwards
    of each, then ``iters`` rounds of one timed forward of each, the order reversed every round
    (dense, hard, hard, dense, ...), so drift of a shared machine hits every model alike. Returns
    per model the forward times (s, device synchronised before and after) and the host times (s,
    until the forward call returned, before the closing synchronisation: close to the forward
    time when the forward is host-bound, but also when it reads the device late in the forward, as
    Megatron's dropless MoE does in every E layer; a profile tells the two apart)."""
    import torch

    cuda = tokens.is_cuda
    names = list(models)
    times = {name: [] for name in names}
    host = {name: [] for name in names}
    with torch.no_grad():
        for i in range(warmup + iters):
            for name in (names if i % 2 == 0 else names[::-1]):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                models[name](tokens, positions, None)
                t1 = time.perf_counter()
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
                    host[name].append(t1 - t0)
    return times, host


def _time_graphs(models: dict, tokens, positions, *, iters: int) -> dict:
    """Each model's forward captured as one CUDA graph (:func:`megacpp_mcore.testing.cudagraph.
    capture`: warm-up on a side stream, Megatron's graph-safe RNG states registered), then
    ``iters`` rounds of one timed replay of each, the order reversed every round: the device's
    time with no host in the loop (the capacity mode has static shapes and reads nothing on the
    host, so the hard forward captures). Returns the medians, the ratio and the per-replay times."""
    import torch

    from megacpp_mcore.testing.cudagraph import capture

    graphs, times = {}, {name: [] for name in models}
    with torch.no_grad():
        for name, model in models.items():
            graphs[name] = capture(lambda model=model: model(tokens, positions, None))[0]
        names = list(models)
        for i in range(iters + 1):
            for name in (names if i % 2 == 0 else names[::-1]):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                graphs[name].replay()
                torch.cuda.synchronize()
                if i:  # the first round warms the replays
                    times[name].append(time.perf_counter() - t0)
    del graphs
    torch.cuda.empty_cache()
    median = {name: statistics.median(v) for name, v in times.items()}
    return {"median_s": median, "ratio": median["hard"] / median["dense"], "times_s": times,
            "spread_s": {name: _spread(v) for name, v in times.items()}}


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync",
              "cudaEventSynchronize")


def _profile(models: dict, tokens, positions, rows: int) -> dict:
    """One profiled forward per model: totals (device ms, host ms, kernel launches, host syncs)
    and the ``rows`` top operators by device time (CUDA) or host time (CPU), printed and
    returned."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = tokens.is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    out, by_key, launchers = {}, {}, {}
    with torch.no_grad():
        for name, model in models.items():
            with profile(activities=activities, record_shapes=True, with_stack=True) as prof:
                model(tokens, positions, None)
                if cuda:
                    torch.cuda.synchronize()
            launchers[name] = _launchers(prof.events())
            events = prof.key_averages()
            # operators (aten::...) own host time; kernels own device time; runtime calls count
            device_ms = sum(e.self_device_time_total for e in events) / 1e3
            host_ms = sum(e.self_cpu_time_total for e in events) / 1e3
            launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC",
                                                                 "cuLaunchKernel", "cuLaunchKernelEx"))
            syncs = sum(e.count for e in events if e.key in SYNC_CALLS)
            aten = sum(e.count for e in events if e.key.startswith("aten::"))  # host operator calls
            top = sorted(events, key=lambda e: getattr(e, sort), reverse=True)[:rows]
            out[name] = {"device_ms": device_ms, "host_ms": host_ms, "aten_calls": aten,
                         "kernel_launches": launches,
                         "host_sync_calls": syncs,
                         "top": [{"op": e.key, "count": e.count, "self_device_ms": e.self_device_time_total / 1e3,
                                  "self_host_ms": e.self_cpu_time_total / 1e3} for e in top]}
            print(f"profile {name}: device {device_ms:.2f} ms, host (self, all ops) {host_ms:.2f} ms, "
                  f"{aten} aten calls, {launches} kernel launches, {syncs} synchronising runtime calls")
            for e in out[name]["top"]:
                print(f"    {e['self_device_ms']:8.3f} ms dev {e['self_host_ms']:8.3f} ms host "
                      f"x{e['count']:<5d} {e['op'][:90]}")
            by_key[name] = {e.key: (e.count, e.self_device_time_total / 1e3, e.self_cpu_time_total / 1e3)
                            for e in events}
    if "dense" in by_key and "hard" in by_key:
        out["hard_minus_dense"] = _difference(by_key["dense"], by_key["hard"], rows, cuda)
        out["launchers_added"] = _launchers_added(launchers["dense"], launchers["hard"], out["hard_minus_dense"])
    return out


OUR_FRAMES = ("megacpp_mcore", "megatron", "transformer_engine")


def _launchers(events) -> dict:
    """Who launched each kernel: ``{kernel: {(operator, input shapes, Python frame): [count,
    device ms]}}`` over the profiled operators (the innermost frame in our package, Megatron or
    Transformer Engine), so that a kernel the hard path adds (a device-to-device copy, say) is
    placed in the code. CPU-only profiles have no kernels: empty."""
    table: dict = {}
    for event in events:
        for kernel in getattr(event, "kernels", ()):
            frame, parent = "?", event.cpu_parent  # with_stack: Python frames are the op's ancestors
            while parent is not None:
                if any(m in parent.name for m in OUR_FRAMES):
                    frame = parent.name
                    break
                parent = parent.cpu_parent
            where = (event.name, str(getattr(event, "input_shapes", ""))[:80], frame[-110:])
            entry = table.setdefault(kernel.name, {}).setdefault(where, [0, 0.0])
            entry[0] += 1
            entry[1] += kernel.duration / 1e3
    return table


def _launchers_added(dense: dict, hard: dict, added: list[dict], kernels: int = 6, rows: int = 4) -> list[dict]:
    """For the ``kernels`` largest increases that are kernels: the launch sites whose count grew
    from the dense forward to the hard one, by added device time (printed and returned)."""
    report = []
    for entry in added:
        name = entry["op"]
        if name not in hard or len(report) >= kernels:
            continue
        before = dense.get(name, {})
        sites = sorted(((count - before.get(where, [0, 0.0])[0], ms - before.get(where, [0, 0.0])[1], where)
                        for where, (count, ms) in hard[name].items()), key=lambda t: -t[1])[:rows]
        report.append({"kernel": name, "sites": [{"added": n, "ms_added": ms, "op": w[0], "shapes": w[1],
                                                  "frame": w[2]} for n, ms, w in sites if n > 0]})
        print(f"  launched by (added count, added ms): {name[:70]}")
        for site in report[-1]["sites"]:
            print(f"      +{site['added']:<3d} {site['ms_added']:+7.3f} ms  {site['op']} {site['shapes']}  {site['frame']}")
    return report


def _difference(dense: dict, hard: dict, rows: int, cuda: bool) -> list[dict]:
    """The ``rows`` operators or kernels whose self time grows most from the dense forward to the
    hard one (device time on CUDA, host time on CPU): where the hard path's overhead goes, kernel by
    kernel, since the block's own kernels shrink with the kept fraction. Printed and returned."""
    zero = (0, 0.0, 0.0)
    at = 1 if cuda else 2
    table = []
    for key in set(dense) | set(hard):
        (count_dense, *before), (count_hard, *after) = dense.get(key, zero), hard.get(key, zero)
        table.append({"op": key, "count_dense": count_dense, "count_hard": count_hard,
                      "ms_dense": before[at - 1], "ms_hard": after[at - 1],
                      "ms_added": after[at - 1] - before[at - 1]})
    table = sorted(table, key=lambda e: e["ms_added"], reverse=True)[:rows]
    print(f"hard minus dense, {'device' if cuda else 'host'} self time, the {rows} largest increases:")
    for e in table:
        print(f"    {e['ms_added']:+8.3f} ms ({e['ms_dense']:.3f} -> {e['ms_hard']:.3f}) "
              f"x{e['count_dense']}->{e['count_hard']} {e['op'][:90]}")
    return table


class _LayerClock:
    """Times the decoder layers and the output head of a model between forward hooks: CUDA events
    recorded on the current stream (device time between the layer's first and last kernel, queued
    while the host runs ahead) or, on CPU, wall time."""

    def __init__(self, model, cuda: bool):
        import torch

        self.cuda = cuda
        self.parts = [(str(i), layer) for i, layer in enumerate(model.decoder.layers)]
        head = getattr(model, "output_layer", None)
        if head is not None:
            self.parts.append(("head", head))
        self.marks: dict[str, list] = {}
        self._now = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else None
        self.handles = []
        for name, module in self.parts:
            self.handles.append(module.register_forward_pre_hook(self._mark(name, 0)))
            self.handles.append(module.register_forward_hook(self._mark(name, 1)))

    def _mark(self, name: str, end: int):
        def hook(*_):
            if self.cuda:
                event = self._now()
                event.record()
            else:
                event = time.perf_counter()
            self.marks.setdefault(name, [None, None])[end] = event
        return hook

    def read(self) -> dict[str, float]:
        """ms per part of the last forward (the device synchronised first)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return {name: a.elapsed_time(b) for name, (a, b) in self.marks.items()}
        return {name: 1e3 * (b - a) for name, (a, b) in self.marks.items()}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _layer_times(models: dict, tokens, positions, rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per decoder layer and head of each model over ``rounds`` forwards (interleaved)."""
    import torch

    clocks = {name: _LayerClock(model, tokens.is_cuda) for name, model in models.items()}
    seen: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    try:
        with torch.no_grad():
            for i in range(rounds):
                for name in (list(models) if i % 2 == 0 else list(models)[::-1]):
                    models[name](tokens, positions, None)
                    for part, ms in clocks[name].read().items():
                        seen[name].setdefault(part, []).append(ms)
    finally:
        for clock in clocks.values():
            clock.close()
    return {name: {part: statistics.median(v) for part, v in parts.items()} for name, parts in seen.items()}


def _layer_table(per_layer: dict[str, dict[str, float]], pattern: list[str], rates: dict[str, float]) -> dict:
    """Rows (part, symbol, dense ms, hard ms, skip rate) and per-symbol sums of the layer times,
    with the ratio a hard forward would reach if each FlexiDepth layer's time scaled with its kept
    fraction and everything else stayed (``scaled_bound``), against the measured layer sum."""
    dense, hard = per_layer["dense"], per_layer["hard"]
    rows, by_symbol = [], {}
    bound = 0.0
    for part in dense:
        symbol = pattern[int(part)] if part.isdigit() else "head"
        rate = rates.get(part)
        rows.append({"part": part, "symbol": symbol, "dense_ms": dense[part], "hard_ms": hard.get(part),
                     "skip_rate": rate})
        sums = by_symbol.setdefault(symbol, {"dense_ms": 0.0, "hard_ms": 0.0})
        sums["dense_ms"] += dense[part]
        sums["hard_ms"] += hard.get(part, 0.0)
        bound += dense[part] * (1.0 - rate if rate is not None else 1.0)
    total_dense, total_hard = sum(dense.values()), sum(hard.values())
    return {"rows": rows, "by_symbol": by_symbol, "dense_sum_ms": total_dense, "hard_sum_ms": total_hard,
            "layer_sum_ratio": total_hard / total_dense, "scaled_bound": bound / total_dense}


# allocations and views that the byte model would charge for the tensors they are handed
_NOT_MOVED = frozenset({"new_empty", "empty", "empty_like", "empty_strided", "_unsafe_view"})
_FUSED_NORMS = ("rms_norm", "layer_norm")  # one kernel on CUDA and in TE; composite on the CPU


def _overhead_traffic(model, tokens, positions) -> dict:
    """The bytes each FlexiDepth layer of ``model`` moves outside its wrapped block in one forward
    (its router, adapter, route, gather and combine), by operator, as activation passes: bytes /
    (the layer input's bytes). The model of :class:`megacpp_mcore.infer.traffic.Traffic` (each
    operator reads its inputs and writes its outputs once), with allocations left out and a norm
    counted as the one kernel it is on CUDA (on the CPU torch composes it from five). An operator is
    the block's when a ``TransformerLayer`` method of Megatron runs inside the layer's forward (its
    ``super().forward``)."""
    import collections
    import functools

    import torch
    from torch.overrides import TorchFunctionMode
    from megatron.core.transformer import transformer_layer

    from megacpp_mcore.features.flexidepth import FlexiDepthLayer
    from megacpp_mcore.infer.traffic import Traffic, _tensors

    block_file = transformer_layer.__file__
    layer_forward = FlexiDepthLayer.forward.__code__
    current: list = []  # the FlexiDepth layer running (its index), innermost last
    table: dict = collections.defaultdict(collections.Counter)
    fused = {"depth": 0}

    def owner() -> int | None:
        """The FlexiDepth layer whose own work the running operator is, if any."""
        if not current:
            return None
        frame = sys._getframe(2)
        while frame is not None and frame.f_code is not layer_forward:  # up to the layer's forward
            if frame.f_code.co_filename == block_file:
                return None  # inside it, the wrapped block's own work
            frame = frame.f_back
        return current[-1]

    class Norms(TorchFunctionMode):  # a norm as one fused kernel: its input, weights and output
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") not in _FUSED_NORMS:
                return func(*args, **kwargs)
            fused["depth"] += 1
            try:
                out = func(*args, **kwargs)
            finally:
                fused["depth"] -= 1
            layer = owner()
            if layer is not None:
                inputs = _tensors(args) + _tensors(kwargs.values())
                table[layer][func.__name__] += Traffic.moved(func.__name__, inputs, [out])
            return out

    class Outside(Traffic):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = self.bytes
            out = super().__torch_dispatch__(func, types, args, kwargs)
            name = func._opname
            layer = owner() if not fused["depth"] and name not in _NOT_MOVED else None
            if layer is not None:
                table[layer][name] += self.bytes - before
            return out

    sizes: dict[int, int] = {}  # per layer: its input's bytes, one pass

    def enter(_, args, kwargs, index):
        x = kwargs.get("hidden_states", args[0] if args else None)
        sizes.setdefault(index, x.numel() * x.element_size())
        current.append(index)

    def leave(*_):
        current.pop()

    handles = []
    for index, layer in enumerate(model.decoder.layers):
        if isinstance(layer, FlexiDepthLayer):
            handles.append(layer.register_forward_pre_hook(functools.partial(enter, index=index), with_kwargs=True))
            handles.append(layer.register_forward_hook(leave))
    try:
        with torch.no_grad(), Norms(), Outside():
            model(tokens, positions, None)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for index, ops in sorted(table.items()):
        unit = sizes[index]
        out[str(index)] = {"passes": sum(ops.values()) / unit,
                           "by_op": {k: v / unit for k, v in ops.most_common() if v}}
    return out


def _spread(times: list[float]) -> dict[str, float]:
    return {"min": min(times), "median": statistics.median(times), "max": max(times)}


def run(args) -> dict:
    import torch

    from megacpp_mcore.features.flexidepth import FlexiDepthLayer, usage_summary
    from megacpp_mcore.infer.moe import sync_free_moe_layers
    from megacpp_mcore.spec.pattern import expand_pattern
    from megacpp_mcore.train import runtime

    if not args.cpu_smoke and not torch.cuda.is_available():
        _fail("no CUDA device visible; this benchmark needs one GPU with Transformer Engine (or --cpu-smoke)")
    try:
        dense_cfg, fd_cfg = _models(args)
    except ValueError as exc:
        _fail(str(exc))
    backend = "local" if args.cpu_smoke else "te"
    if args.route_kernel:
        from megacpp_mcore.features.flexidepth import dispatch

        dispatch.ROUTE_KERNEL = True
    runtime.initialize(runtime.Parallelism(), seed=args.seed)
    if args.cuda_graphs:  # graph-safe RNG states before the modules are built (testing.cudagraph)
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(args.seed, use_cudagraphable_rng=True, force_reset_rng=True)
    try:
        built = {}
        for name, cfg in (("dense", dense_cfg), ("hard", fd_cfg)):
            config = runtime.transformer_config(cfg, runtime.Parallelism(), bf16=not args.cpu_smoke)
            try:
                (built[name],) = runtime.build_model(cfg, config, backend=backend, wrap_ddp=False)
            except ValueError as exc:  # e.g. hard skip on MLA with fused RoPE: one line, exit 2
                _fail(str(exc))
        dense, hard = built["dense"].eval(), built["hard"].eval()
        missing, unexpected = hard.load_state_dict(dense.state_dict(), strict=False)
        assert not unexpected and all(".flexidepth." in k or k.endswith("_extra_state") for k in missing)
        gen = torch.Generator().manual_seed(args.seed)
        for layer in hard.decoder.layers:  # a live adapter (its up projection starts at zero)
            if isinstance(layer, FlexiDepthLayer) and args.adapter != "none":
                with torch.no_grad():
                    up = layer.flexidepth.up.weight
                    up.copy_(torch.randn(up.shape, generator=gen).mul_(0.02).to(up))
        dev = runtime.device()
        seq = dense_cfg.seq_length
        tokens = torch.randint(0, dense_cfg.vocab_size, (args.batch, seq), generator=gen).to(dev)
        positions = torch.arange(seq, device=dev).unsqueeze(0).expand_as(tokens)
        _calibrate(hard, tokens, positions, args.skip_rate, args.layer_rates)
        layers = [(i, layer) for i, layer in enumerate(hard.decoder.layers) if isinstance(layer, FlexiDepthLayer)]
        if args.capacity is not None:  # after the calibration, which reads the exact kept counts
            kind, value = args.capacity
            for i, layer in layers:
                if layer.gathers:
                    kept = 1.0 - args.layer_rates.get(i, args.skip_rate)
                    layer.set_hard_skip_capacity(value if kind == "fixed" else min(1.0, kept + value))
        for _, layer in layers:
            layer.megacpp_set_step(0)
        with contextlib.ExitStack() as stack:
            moe_layers = {}
            if args.moe == "sync-free":  # after the calibration, which ran Megatron's layers
                moe_layers = {name: stack.enter_context(sync_free_moe_layers(model))
                              for name, model in (("dense", dense), ("hard", hard))}
            times, host = _time({"dense": dense, "hard": hard}, tokens, positions, warmup=args.warmup,
                                iters=args.iters)
            graphed = None
            if args.cuda_graphs:
                try:
                    graphed = _time_graphs({"dense": dense, "hard": hard}, tokens, positions, iters=args.iters)
                except RuntimeError as exc:  # the eager figures stand; say why the capture failed
                    graphed = {"error": str(exc).splitlines()[0][:300]}
            per_layer = {str(i): layer.megacpp_stats()["skip_rate"] for i, layer in layers}
            layer_table = _layer_table(
                _layer_times({"dense": dense, "hard": hard}, tokens, positions, args.layer_rounds),
                expand_pattern(dense_cfg.pattern, dense_cfg.num_layers), per_layer) if args.layer_rounds else None
            profiled = _profile({"dense": dense, "hard": hard}, tokens, positions, args.profile) \
                if args.profile else None
            traffic = _overhead_traffic(hard, tokens, positions) if args.traffic else None
    finally:
        runtime.shutdown()
    median = {k: statistics.median(v) for k, v in times.items()}
    summary = usage_summary({f"{i}.skip_rate": v for i, v in per_layer.items()}, dense_cfg.num_layers)
    return {"preset": args.preset, "num_layers": dense_cfg.num_layers, "hidden_size": dense_cfg.hidden_size,
            "batch": args.batch, "seq_length": seq, "backend": backend,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu_smoke else "cpu",
            "requested_skip_rate": args.skip_rate, "requested_per_layer": args.layer_rates,
            "hard_skip_symbols": args.hard_skip_symbols, "hard_skip_moe": args.hard_skip_moe,
            "gathering_layers": [i for i, layer in layers if layer.gathers],
            "hard_skip_capacity": {str(i): layer.hard_skip_capacity for i, layer in layers if layer.gathers},
            "routing_layers": [i for i, layer in layers if layer.routes_kept],
            "moe": args.moe,
            "moe_layers_kept_megatron": {model: {name: why for name, why in report.items() if why}
                                         for model, report in moe_layers.items()},
            "skip_rate_per_layer": per_layer, "flexidepth_skip_rate": summary["layers_skipped"] / len(layers),
            "mean_layers_used": summary["mean_layers_used"], "times_s": times, "median_s": median,
            "ratio": median["hard"] / median["dense"], "timing": "interleaved",
            "spread_s": {k: _spread(v) for k, v in times.items()}, "host_times_s": host,
            "host_median_s": {k: statistics.median(v) for k, v in host.items()},
            "profile": profiled, "layer_times": layer_table, "overhead_traffic": traffic,
            "cuda_graphs": graphed}


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed")
    args = _args(argv)
    result = run(args)
    print(f"{result['preset']} ({result['num_layers']} layers, h={result['hidden_size']}), batch "
          f"{result['batch']} x {result['seq_length']}, {result['backend']} on {result['device']}")
    requested = args.skip_rates or args.skip_rate
    print(f"FlexiDepth skip rate {result['flexidepth_skip_rate']:.3f} (requested {requested}), gathering "
          f"layers {result['gathering_layers']}, routing layers {result['routing_layers']}, mean layers "
          f"used {result['mean_layers_used']:.2f}")
    kept = {model: sorted(why) for model, why in result["moe_layers_kept_megatron"].items() if why}
    print(f"MoE layers: {args.moe}" + (f" (Megatron's layer kept for {kept})" if kept else ""))
    if args.capacity is not None:
        print("  hard-skip capacity per gathering layer: " + ", ".join(
            f"{i}: {c:.2f}" for i, c in result["hard_skip_capacity"].items()))
    print("  per layer: " + ", ".join(f"{i}: {r:.2f}" for i, r in result["skip_rate_per_layer"].items()))
    print(f"forward median: dense {1e3 * result['median_s']['dense']:.2f} ms, hard skip "
          f"{1e3 * result['median_s']['hard']:.2f} ms, ratio {result['ratio']:.3f} (target <= 0.85)")
    for name, spread in result["spread_s"].items():
        print(f"  {name}: min/median/max {1e3 * spread['min']:.2f}/{1e3 * spread['median']:.2f}/"
              f"{1e3 * spread['max']:.2f} ms over {len(result['times_s'][name])} interleaved forwards, "
              f"host median {1e3 * result['host_median_s'][name]:.2f} ms")
    graphed = result["cuda_graphs"]
    if graphed and "error" in graphed:
        print(f"CUDA graphs: capture failed: {graphed['error']}")
    elif graphed:
        spread = graphed["spread_s"]
        print(f"CUDA graphs, replay median: dense {1e3 * graphed['median_s']['dense']:.2f} ms, hard skip "
              f"{1e3 * graphed['median_s']['hard']:.2f} ms, ratio {graphed['ratio']:.3f} (min/max dense "
              f"{1e3 * spread['dense']['min']:.2f}/{1e3 * spread['dense']['max']:.2f}, hard "
              f"{1e3 * spread['hard']['min']:.2f}/{1e3 * spread['hard']['max']:.2f} ms)")
    table = result["layer_times"]
    if table:
        print(f"per layer (median of {args.layer_rounds} forwards, ms): part symbol dense hard skip-rate")
        for row in table["rows"]:
            rate = "" if row["skip_rate"] is None else f"{row['skip_rate']:.2f}"
            print(f"  {row['part']:>4} {row['symbol']:>4} {row['dense_ms']:8.2f} {row['hard_ms']:8.2f} {rate}")
        print("  by symbol: " + ", ".join(f"{sym} {v['dense_ms']:.1f}/{v['hard_ms']:.1f}"
                                          for sym, v in table["by_symbol"].items()))
        print(f"  layer sums dense {table['dense_sum_ms']:.2f} / hard {table['hard_sum_ms']:.2f} ms: "
              f"{table['layer_sum_ratio']:.3f}; if each FlexiDepth layer scaled with its kept "
              f"fraction at no cost: {table['scaled_bound']:.3f}")
    if result["overhead_traffic"]:
        print("bytes each FlexiDepth layer moves outside its block, in passes over its input "
              "(traffic model; norms as one kernel):")
        for index, row in result["overhead_traffic"].items():
            top = ", ".join(f"{op} {v:.2f}" for op, v in list(row["by_op"].items())[:8])
            print(f"  {index:>4} {row['passes']:6.2f}  ({top})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
