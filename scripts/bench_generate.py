"""Decode speed of ``megacpp-mcore generate``'s engine: plain greedy against MTP self-speculative
decoding (K = 1, 2) through the same code, at batch 1 and 8, with the acceptance rate per draft
position and a check that the speculative output equals plain greedy's token for token.

    python scripts/bench_generate.py --load CKPT_DIR [--batch 1,8] [--speculative 1,2] [--out r.json]
    python scripts/bench_generate.py [--mtp-depth 2]       # nam56r-lite, RANDOM weights (speed only)
    python scripts/bench_generate.py --preset nam56r-tiny --pattern AEMR --num-layers 4 \\
        --prompt-tokens 16 --new-tokens 8 --batch 1,2 --speculative 1   # CPU smoke (local backend)

Prompts are C/C++ sources (``--prompt-dir``, default /usr/include): row ``i`` of a batch starts with
the end-of-document token and the first ``--prompt-tokens`` bytes of the ``i``-th file, as training
saw documents. Rows never stop early (no stop token), so every run decodes exactly
``--new-tokens`` per row. Each configuration runs ``--repeats`` times after a warm-up; the fastest
decode time counts. Figures are decode tokens/s (all rows) excluding the prefill.

Numerics: ``--dtype fp32`` (the default) with torch's TF32 off, so that the speculative-vs-plain
identity check compares fp32 arithmetic (Transformer Engine's own GEMMs run fp32 tensors in TF32
whatever torch's flag says, still with fp32 outputs; ``--backend local`` avoids them). In bf16 a
verification forward over K + 1 positions rounds differently from single steps and near-ties can
flip (the table then says how much agrees).

Host syncs: the decode step runs MoE layers without host synchronisation (``infer/moe.py``); on
CUDA the last column counts the synchronising CUDA calls per decode step (``torch.cuda``'s sync
debug mode over two run lengths): 0 for plain decoding, 1 per speculative step (the accepted
length), more where a layer fell back to Megatron's MoE (the engine logs which).

Output loops: ``distinct 8-grams`` (plain rows) is the mean share of distinct 8-grams in each
row's output; greedy output of a weakly trained model falls into loops, which a drafter predicts
trivially, so acceptance rates are only comparable with published ones where this is near 1.

Host work: ``torch ops/step`` counts the operator calls of a decode step at torch's dispatcher
(device-independent); ``host-bound vs plain`` is the speed-up speculative decoding would reach if
a step's time were that count alone (tokens per step over the step's ops relative to plain's).
Drafting runs the MTP block (one ``A`` and one ``E`` sub-layer, the head) per draft, so on a
shallow trunk it costs a large share of a plain step: on the 12-layer tiny/lite pattern a plain
step is ~1,130 ops and each draft ~240 (CPU count, docs/benchmarks.md), which caps K=1 at x1.56
with every draft accepted while the step is host-bound.

Memory traffic: ``MB/step`` models the bytes the static-shape step's kernels read and write (the
step CUDA graphs replay; counted at the dispatcher on any device, ``megacpp_mcore.infer.traffic``:
every weight a step uses is one read from memory), and ``bytes-bound vs plain`` is the speed-up
speculative decoding would reach if a step's time were its bytes. A graphed decode step at batch 1
is close to that bound: it reads each weight it uses once and does little else. The sparse MoE
kernel (``infer/moe_triton.py``, CUDA) is a Triton kernel the dispatcher does not see: its reads
(the distinct chosen experts' weights) are added per call, and ``MB/step, sparse MoE kernel`` puts
them in place of the torch routes' bytes wherever those ran (on the CPU: what the kernel would
read).

Device work: on CUDA, ``GPU ms/step`` is the kernels' time per decode step (torch.profiler, summed
device time of every kernel and copy; two run lengths cancel the prefill's), the floor a step
would reach with its host work hidden, and ``device-bound vs plain`` the speed-up speculative
decoding would have there: tokens per step over the step's device time relative to plain's.
``--cuda-graphs`` also times greedy decoding replaying one captured CUDA graph per step
(``generate(..., cuda_graphs=True)``), plain and speculative; ``vs graphed plain`` is then the
speed-up with both at their best settings (the speculative step's one read per step included),
and ``identical to graphed plain`` compares their outputs (in bf16 a graphed step's kernels round
like no eager step's, so graphed against graphed is the comparison of equals).
``--compile-speculative`` (with ``--cuda-graphs``) adds, per K, the graphed speculative step with its
own work compiled (``generate(..., compile_speculative=True)``: the drafter and the verification's
bookkeeping; the trunk eager), so both are timed in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--load", help="checkpoint of `megacpp-mcore train --save` (default: random weights)")
    p.add_argument("--preset", help="model preset (default: the checkpoint's; without --load nam56r-lite)")
    p.add_argument("--pattern", help="--pattern the model was trained with")
    p.add_argument("--num-layers", type=int, help="--num-layers the model was trained with")
    p.add_argument("--backend", default="auto", choices=["auto", "te", "local"],
                   help="auto: te on a CUDA host with Transformer Engine, else local")
    p.add_argument("--dtype", choices=["bf16", "fp32"],
                   help="weights and compute (default fp32, TF32 off: exact identity check)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="same as --dtype bf16 / --dtype fp32")
    p.add_argument("--mtp-depth", type=int,
                   help="MTP depth of the random-weight model (default: the preset's; not with --load)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--speculative", default="1,2", help="comma-separated K values (default 1,2)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="bytes per prompt (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per row (default 128)")
    p.add_argument("--prompt-dir", default="/usr/include", help="C/C++ sources for the prompts")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (default 3)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time greedy decoding, plain and speculative, replaying one CUDA graph "
                        "per step (CUDA only)")
    p.add_argument("--compile-speculative", action="store_true",
                   help="with --cuda-graphs: also time each K's graphed step with its own work (the "
                        "drafter, the verification's bookkeeping) through torch.compile")
    p.add_argument("--moe-routes", default="dense,gathered",
                   help="expert routes the decode-sized MoE may take (infer/moe.py: SyncFreeMoE.route; "
                        "default dense,gathered; add sparse for the Triton kernel, CUDA only)")
    p.add_argument("--ssd-verify", default="quadratic",
                   help="how a verification keeps Mamba's per-position states (infer/mixers.py: "
                        "VERIFY_STATES): unmaterialised (fewer bytes), materialised (fewer kernels), or "
                        "one position at a time (a plain step's arithmetic)")
    p.add_argument("--head-dtype", default="fp32", choices=("fp32", "model"),
                   help="the vocabulary-limited head's GEMM (Engine.fp32_head): fp32 (default; bf16 logits "
                        "tie close candidates) or the model's dtype (before the fourteenth session)")
    p.add_argument("--matched-plain", action="store_true",
                   help="also time plain greedy with each K's verification shapes (generate(plain_width=K + 1), "
                        "with --cuda-graphs graphed) and compare the speculative output with it: the bf16 "
                        "identity (exact with --ssd-verify recurrent)")
    p.add_argument("--bytes-by-part", action="store_true",
                   help="also split the static step's MB/step (first --batch, plain and each K) by part of "
                        "the model: weights by part, routed experts, caches/states/activations")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    from megacpp_mcore.infer.mixers import VERIFY_STATES
    from megacpp_mcore.infer.moe import ROUTES

    if args.ssd_verify not in VERIFY_STATES:
        p.error(f"--ssd-verify {args.ssd_verify!r}; allowed: {', '.join(VERIFY_STATES)}")
    args.moe_routes = tuple(r.strip() for r in args.moe_routes.split(",") if r.strip())
    unknown = sorted(set(args.moe_routes) - set(ROUTES))
    if unknown or not args.moe_routes:
        p.error(f"--moe-routes: {unknown or 'nothing'}; allowed: a comma-separated subset of "
                f"{', '.join(ROUTES)}")
    if args.dtype is not None and args.bf16 is not None and args.bf16 != (args.dtype == "bf16"):
        p.error(f"--dtype {args.dtype} contradicts --{'' if args.bf16 else 'no-'}bf16")
    args.bf16 = args.dtype == "bf16" if args.dtype is not None else bool(args.bf16)
    if args.mtp_depth is not None and args.load:
        p.error("--mtp-depth is for random weights; a checkpoint records the depth it was trained at")
    if args.cuda_graphs and not torch.cuda.is_available():
        p.error("--cuda-graphs needs a CUDA device; none is visible here")
    if args.compile_speculative and not args.cuda_graphs:
        p.error("--compile-speculative adds graphed rows; allowed with --cuda-graphs")
    args.batch = [int(x) for x in args.batch.split(",")]
    args.speculative = [int(x) for x in args.speculative.split(",") if x.strip()]
    return args


def build_engine(args):
    """(Engine, description). A checkpoint when ``--load`` is given, else the preset with random
    weights (said so loudly: acceptance figures then mean nothing)."""
    from megacpp_mcore.infer import Engine
    from megacpp_mcore.models.presets import custom_model, get_preset
    from megacpp_mcore.train import runtime

    named = None
    if args.preset or args.pattern or args.num_layers:
        base = args.preset or "nam56r-lite"
        named = get_preset(base)
        if args.pattern or args.num_layers:
            named = custom_model(pattern=args.pattern or named.pattern,
                                 num_layers=args.num_layers or named.num_layers, base=base)
    if args.load:
        from megacpp_mcore.infer import checkpoint as ckpt

        found = ckpt.open_checkpoint(args.load)
        model = ckpt.resolve_model(found, named)
        gpt = ckpt.load_model(found, model, backend=args.backend, bf16=args.bf16)
        return Engine(gpt), f"{model.name} from {found.path} (step {found.step})"
    model = named or get_preset("nam56r-lite")
    if args.mtp_depth is not None:
        try:
            model = model.replace(mtp_depth=args.mtp_depth)
        except ValueError as exc:
            sys.exit(f"bench_generate: --mtp-depth {args.mtp_depth}: {exc}")
    print(f"[bench_generate] no --load: {model.name} with RANDOM weights; speeds are real, "
          "acceptance rates are not", flush=True)
    par = runtime.Parallelism()
    runtime.initialize(par, seed=1234)
    config = runtime.transformer_config(model, par, bf16=args.bf16)
    (gpt,) = runtime.build_model(model, config, backend=args.backend, wrap_ddp=False)
    return Engine(gpt), f"{model.name} (random weights)"


def prompts(args, batch: int) -> list[list[int]]:
    """``batch`` prompts: the end-of-document token, then the first bytes of distinct sources."""
    from megacpp_mcore.train.data import ByteTokenizer, walk_sources

    eod, out = ByteTokenizer().eod, []
    for _, path in walk_sources(args.prompt_dir):
        body = path.read_bytes()[:args.prompt_tokens]
        if len(body) == args.prompt_tokens:
            out.append([eod, *body])
        if len(out) == batch:
            return out
    sys.exit(f"bench_generate: {args.prompt_dir} has fewer than {batch} C/C++ files of "
             f"{args.prompt_tokens} bytes")


def backend_report(engine) -> dict:
    """What was built, read from the modules: the first layer's projection and core attention
    classes (the te backend builds TE modules), and which MoE layers decode without host syncs."""
    from megacpp_mcore.train.receipt import observe_backends

    observed = observe_backends([engine.model])
    plans = [p for p in (*engine.plans, *engine.mtp_plans) if p.moe is not None or p.moe_fallback]
    cuda = torch.cuda.is_available()
    return {"attention": observed.get("attention"), "device": str(engine.device),
            "dtype": str(engine.dtype), "tf32": cuda and torch.backends.cuda.matmul.allow_tf32,
            "moe_sync_free": f"{sum(p.moe is not None for p in plans)}/{len(plans)}",
            "moe_routes": ",".join(next((p.moe.routes for p in plans if p.moe is not None), ())),
            "moe_kernel": any(p.moe is not None and p.moe.kernel for p in plans),
            "ssd_verify": engine.ssd_verify, "head": "fp32" if engine.fp32_head else "model dtype",
            "gpu": torch.cuda.get_device_name() if cuda else None}


def _per_step(label: str, measure, *, warmup: bool = False):
    """``measure(new_tokens) -> (amount or tuple of amounts, steps)`` for runs of 8 and 24 new
    tokens (after one discarded run of 8 with ``warmup``); the difference per step (the two run
    lengths cancel the prefill's share). A diagnostic: a failure prints one line naming ``label``
    and gives None, never failing the benchmark."""
    try:
        if warmup:
            measure(8)
        (a1, s1), (a2, s2) = (measure(new_tokens) for new_tokens in (8, 24))
    except Exception as exc:
        print(f"[bench_generate] {label} unavailable: {type(exc).__name__}: {exc}", flush=True)
        return None
    if s2 <= s1:
        return None
    if isinstance(a1, tuple):
        return tuple((y - x) / (s2 - s1) for x, y in zip(a1, a2))
    return (a2 - a1) / (s2 - s1)


def syncs_per_step(engine, rows, *, k: int, sampling) -> float | None:
    """Synchronising CUDA calls per decode step (None off CUDA or where torch cannot count them):
    torch.cuda's sync debug mode warns once per such call (after a warm-up run, so one-time
    synchronisations do not count)."""
    import warnings

    from megacpp_mcore.infer import generate

    if not torch.cuda.is_available():
        return None

    def measure(new_tokens):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run = generate(engine, rows, max_new_tokens=new_tokens, sampling=sampling, speculative=k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught), run.steps

    return _per_step("sync count", measure, warmup=True)


def traffic_per_step(engine, rows, *, k: int, sampling, static: bool = False) -> tuple:
    """(torch operator calls, MB moved, MB moved with the sparse MoE kernel) per decode step,
    counted at the dispatcher on any device (:class:`megacpp_mcore.infer.traffic.Traffic`);
    ``static``: the static-shape step CUDA graphs replay. The calls are the host work of an eager
    step (decode at small batch is host-bound: ~17 us per call on the H200 host); the bytes what a
    step's kernels read and write, which bound a graphed step (the model counts every weight read
    as a read from memory). The dispatcher does not see the sparse route's Triton kernel: each
    routed-expert call is counted on its own (:func:`_expert_traffic`), the kernel's reads (the
    distinct chosen experts' weights, once) added where it ran, and the third figure puts them in
    place of the torch routes' bytes wherever those ran (on the CPU: the kernel's figure, modelled)."""
    from megacpp_mcore.infer import generate
    from megacpp_mcore.infer.traffic import Traffic

    def measure(new_tokens):
        with _expert_traffic() as experts, Traffic() as traffic:
            run = generate(engine, rows, max_new_tokens=new_tokens, sampling=sampling, speculative=k,
                           static=static)
        total = traffic.bytes + experts["kernel_ran"]
        return (traffic.ops, total / 1e6, (total - experts["routed"] + experts["kernel"]) / 1e6), run.steps

    counted = _per_step("traffic count", measure)
    return (None, None, None) if counted is None else counted


@contextlib.contextmanager
def _expert_traffic():
    """Per call of a decode-sized MoE expert route (``SyncFreeMoE.dense`` / ``gathered`` /
    ``sparse``, patched for the block): ``routed``, the bytes the call moved (the sparse kernel's
    reads included), ``kernel``, what the sparse kernel reads for the call (the distinct chosen
    experts' weights), and ``kernel_ran``, that figure for the calls the kernel did run."""
    from torch.utils._python_dispatch import _disable_current_modes

    from megacpp_mcore.infer.moe import ROUTES, SyncFreeMoE
    from megacpp_mcore.infer.traffic import Traffic

    tally = {"routed": 0, "kernel": 0, "kernel_ran": 0}
    originals = {route: getattr(SyncFreeMoE, route) for route in ROUTES}

    def counted(route):
        def call(self, x, probs):
            with Traffic() as inner:
                out = originals[route](self, x, probs)
            with _disable_current_modes():  # not part of the step: not counted
                chosen = int((probs != 0).any(dim=0).sum())
            kernel = chosen * (self.w1[0].numel() + self.w2[0].numel()) * self.w1.element_size()
            ran = kernel if route == "sparse" else 0
            tally["routed"] += inner.bytes + ran
            tally["kernel"] += kernel
            tally["kernel_ran"] += ran
            return out
        return call

    try:
        for route in ROUTES:
            setattr(SyncFreeMoE, route, counted(route))
        yield tally
    finally:
        for route, original in originals.items():
            setattr(SyncFreeMoE, route, original)


def bytes_visible(engine) -> bool:
    """Whether torch's dispatcher sees the model's work: not where Transformer Engine modules were
    built (their GEMMs and fused kernels are TE's own calls), so the byte columns would leave most
    of a step out (the H200's te build counted 335 MB for a step that reads ~1.4 GB)."""
    from megacpp_mcore.train.receipt import is_te_module

    return not any(is_te_module(module) for module in engine.model.modules())


# bytes_by_part: the parts, in the order printed ("other" of Traffic.by_owner last)
PARTS = ("trunk attention, mixers, norms", "trunk MLPs, shared experts, routers", "trunk routed experts",
         "MTP block", "MTP routed experts", "output head", "embedding", "other")


def byte_owners(engine) -> dict[int, str]:
    """Traffic's labels (:data:`PARTS`): the model's weights by part, and the decode-sized MoE's
    stacked expert weights (what the torch routes read, gathered copies included)."""
    owners = {}
    for name, param in engine.model.named_parameters():
        if name.startswith("decoder."):
            label = PARTS[1] if ".mlp." in name else PARTS[0]
        else:
            label = {"output_layer": PARTS[5], "embedding": PARTS[6]}.get(name.split(".")[0], PARTS[3])
        owners.setdefault(param.untyped_storage().data_ptr(), label)
    for plans, label in ((engine.plans, PARTS[2]), (engine.mtp_plans, PARTS[4])):
        for plan in plans:
            if plan.moe is not None:
                for weight in (plan.moe.w1, plan.moe.w2):
                    owners[weight.untyped_storage().data_ptr()] = label
    return owners


def bytes_by_part(engine, rows, ks: list[int], sampling) -> dict[int, dict[str, float]]:
    """``{K: {part: MB per static step}}`` (K = 0: plain) by :data:`PARTS`; ``other`` is the
    caches, recurrent states and activations (and the gathered route's GEMMs reading its copies of
    the experts; the copying counts for the routed experts). Torch routes only (the sparse kernel is invisible
    to the dispatcher); empty where the dispatcher does not see the work (:func:`bytes_visible`)."""
    from megacpp_mcore.infer import generate
    from megacpp_mcore.infer.traffic import Traffic

    if not bytes_visible(engine):
        return {}
    owners, out = byte_owners(engine), {}
    for k in (0, *ks):
        def measure(new_tokens, k=k):
            with Traffic(owners) as traffic:
                run = generate(engine, rows, max_new_tokens=new_tokens, sampling=sampling, speculative=k,
                               static=True)
            return tuple(traffic.by_owner.get(part, 0) / 1e6 for part in PARTS), run.steps

        per_step = _per_step(f"bytes by part (K={k})", measure)
        if per_step is not None:
            out[k] = dict(zip(PARTS, per_step))
    return out


def print_bytes_by_part(parts: dict[int, dict[str, float]], batch: int) -> None:
    ks = sorted(parts)
    print(f"\nMB per static step by part, batch {batch} (other: caches, recurrent states, activations, "
          "and the gathered MoE route's reads of its expert copies)")
    print("| part | " + " | ".join("plain" if k == 0 else f"K={k}" for k in ks) + " |")
    print("|---|" + "---|" * len(ks))
    for part in (*PARTS, "total"):
        values = [sum(parts[k].values()) if part == "total" else parts[k][part] for k in ks]
        print(f"| {part} | " + " | ".join(f"{v:,.1f}" for v in values) + " |")


def _traffic(engine, rows, *, k: int, sampling) -> dict:
    """A row's ``ops_per_step`` (the eager step's operator calls: what bounds it on the host),
    ``mb_per_step`` (the static-shape step's bytes: what bounds the step CUDA graphs replay) and
    ``mb_per_step_kernel`` (the same with the sparse MoE kernel wherever a torch route ran); the
    bytes are None where the dispatcher does not see them (:func:`bytes_visible`)."""
    ops, _, _ = traffic_per_step(engine, rows, k=k, sampling=sampling)
    mb = mb_kernel = None
    if bytes_visible(engine):
        _, mb, mb_kernel = traffic_per_step(engine, rows, k=k, sampling=sampling, static=True)
    return {"ops_per_step": ops, "mb_per_step": mb, "mb_per_step_kernel": mb_kernel}


def gpu_ms_per_step(engine, rows, *, k: int, sampling) -> float | None:
    """Device time (kernels and copies, ms) per decode step on CUDA, else None: the summed device
    time of a profiled run."""
    from torch.profiler import ProfilerActivity, profile

    from megacpp_mcore.infer import generate

    if not torch.cuda.is_available():
        return None

    def measure(new_tokens):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run = generate(engine, rows, max_new_tokens=new_tokens, sampling=sampling, speculative=k)
            torch.cuda.synchronize()
        return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3, run.steps

    return _per_step("device time", measure)


def _bound(spec: dict, plain: dict, cost: str) -> float | None:
    """The speed-up speculative decoding would reach if a step's time were its ``cost``
    (``ops_per_step``: host-bound; ``mb_per_step``: bound by memory traffic, the static step's
    bytes; ``gpu_ms_per_step``: device-bound, host work hidden as CUDA
    graphs would): tokens per step over the step's cost, relative to a plain step's."""
    if not spec.get(cost) or not plain.get(cost) or not spec["steps"] or not plain["steps"]:
        return None
    return _gain(spec, plain) / (spec[cost] / plain[cost])


def _gain(spec: dict, plain: dict) -> float:
    """Tokens per speculative step over tokens per plain step (plain: one per running row)."""
    return (spec["decode_tokens"] / spec["steps"]) / (plain["decode_tokens"] / plain["steps"])


def timed(engine, rows, *, k: int, new_tokens: int, repeats: int, sampling, cuda_graphs=False,
          compile_speculative=False, plain_width=1):
    """The fastest of ``repeats`` runs (after one short warm-up run)."""
    from megacpp_mcore.infer import generate

    opts = dict(sampling=sampling, speculative=k, cuda_graphs=cuda_graphs, compile_speculative=compile_speculative,
                plain_width=plain_width)
    # compiled code is compiled per session capacity: the warm-up runs the timed runs' length
    generate(engine, rows, max_new_tokens=new_tokens if compile_speculative else min(8, new_tokens), **opts)
    best = None
    for _ in range(repeats):
        run = generate(engine, rows, max_new_tokens=new_tokens, **opts)
        if best is None or run.decode_s < best.decode_s:
            best = run
    return best


def graphed_row(engine, rows, args, sampling, *, k: int, plain, graphed_plain: dict | None = None,
                compile_speculative: bool = False) -> dict:
    """One configuration decoded replaying a CUDA graph per step, as a table row: speed-ups over
    eager plain decoding (``plain``) and, for speculative rows, over graphed plain decoding, whose
    output it is also compared with (both at their best settings; in bf16 a graphed step rounds
    like no eager one, so equal to graphed plain is the identity that holds there)."""
    run = timed(engine, rows, k=k, new_tokens=args.new_tokens, repeats=args.repeats,
                sampling=sampling, cuda_graphs=True, compile_speculative=compile_speculative)
    row = {"batch": len(rows), "k": k, "graphs": True, "compiled": compile_speculative,
           "tokens_per_s": run.decode_tokens_per_s,
           "speedup": run.decode_tokens_per_s / plain.decode_tokens_per_s,
           "ms_per_step": 1e3 * run.decode_s / max(run.steady_steps, 1),
           "syncs_per_step": None, "ops_per_step": None, "mb_per_step": None,
           "mb_per_step_kernel": None, "gpu_ms_per_step": None,
           "identical": run.tokens == plain.tokens,
           "agreeing_prefix": agreeing_prefix(run.tokens, plain.tokens), "tokens": run.tokens,
           **run.summary()}
    if graphed_plain is not None:
        row["vs_graphed_plain"] = run.decode_tokens_per_s / graphed_plain["tokens_per_s"]
        row["identical_to_graphed_plain"] = run.tokens == graphed_plain["tokens"]
        row["agreeing_prefix_graphed"] = agreeing_prefix(run.tokens, graphed_plain["tokens"])
    return row


def matched_row(engine, rows, args, sampling, *, k: int, plain: dict, spec: dict) -> dict:
    """Plain greedy decoding with the shapes of a K-draft verification (``plain_width=K + 1``),
    with the same CUDA-graph setting as ``plain`` and ``spec`` (rows of the table): its speed
    against one-row plain steps, and whether the speculative output equals it token for token."""
    graphs = bool(spec.get("graphs"))
    run = timed(engine, rows, k=0, new_tokens=args.new_tokens, repeats=args.repeats, sampling=sampling,
                cuda_graphs=graphs, plain_width=k + 1)
    return {"batch": len(rows), "k": k, "graphs": graphs, "tokens_per_s": run.decode_tokens_per_s,
            "plain_tokens_per_s": plain["tokens_per_s"], "spec_tokens_per_s": spec["tokens_per_s"],
            "vs_one_row_plain": run.decode_tokens_per_s / plain["tokens_per_s"],
            "spec_vs_matched": spec["tokens_per_s"] / run.decode_tokens_per_s,
            "spec_vs_one_row_plain": spec["tokens_per_s"] / plain["tokens_per_s"],
            "identical": spec["tokens"] == run.tokens,
            "agreeing_prefix": agreeing_prefix(spec["tokens"], run.tokens),
            "identical_one_row": plain["tokens"] == run.tokens, "tokens": run.tokens, **run.summary()}


def byte_sampling(engine):
    """Greedy over the byte tokenizer's ids (the model's vocabulary may be larger)."""
    from megacpp_mcore.infer import Sampling
    from megacpp_mcore.train.data import ByteTokenizer

    vocab = ByteTokenizer().vocab_size
    return Sampling(vocab_limit=vocab if engine.vocab_size >= vocab else None)


def usable_ks(engine, args) -> list[int]:
    return [k for k in args.speculative if 1 <= k <= engine.mtp_depth]


def measure(engine, args) -> tuple[list[dict], list[dict]]:
    """The table's rows, and with ``--matched-plain`` the matched-plain rows (:func:`matched_row`)."""
    sampling = byte_sampling(engine)
    usable = usable_ks(engine, args)
    skipped = sorted(set(args.speculative) - set(usable))
    if skipped:
        print(f"[bench_generate] skipping K={skipped}: the model's MTP depth is "
              f"{engine.mtp_depth}", flush=True)
    results, matched = [], []
    for batch in args.batch:
        rows = prompts(args, batch)
        plain = timed(engine, rows, k=0, new_tokens=args.new_tokens, repeats=args.repeats,
                      sampling=sampling)
        base = plain.decode_tokens_per_s
        plain_row = {"batch": batch, "k": 0, "tokens_per_s": base, "speedup": 1.0,
                     "ms_per_step": 1e3 * plain.decode_s / max(plain.steps, 1),
                     "syncs_per_step": syncs_per_step(engine, rows, k=0, sampling=sampling),
                     **_traffic(engine, rows, k=0, sampling=sampling),
                     "gpu_ms_per_step": gpu_ms_per_step(engine, rows, k=0, sampling=sampling),
                     "distinct_8grams": distinct_ngrams(plain.tokens), "tokens": plain.tokens,
                     **plain.summary()}
        results.append(plain_row)
        loops = plain_row["distinct_8grams"]
        print(f"[bench_generate] batch {batch} plain: {base:.1f} tokens/s, distinct 8-grams of the "
              f"output {'-' if loops is None else f'{loops:.2f}'} (near 0: the output loops, and "
              "acceptance rates say little)", flush=True)
        graphed = None
        if args.cuda_graphs:  # plain greedy replaying one CUDA graph per step
            graphed = graphed_row(engine, rows, args, sampling, k=0, plain=plain)
            results.append(graphed)
            print(f"[bench_generate] batch {batch} plain, CUDA graphs: {graphed['tokens_per_s']:.1f} "
                  f"tokens/s (x{graphed['speedup']:.2f}), identical {graphed['identical']}, capture "
                  f"{1e3 * graphed['graph_capture_s']:.0f} ms, warm-up step "
                  f"{1e3 * graphed['warmup_s']:.0f} ms (once per generate call, not in the "
                  "decode time)", flush=True)
        for k in usable:
            spec = timed(engine, rows, k=k, new_tokens=args.new_tokens, repeats=args.repeats,
                         sampling=sampling)
            row = {"batch": batch, "k": k, "tokens_per_s": spec.decode_tokens_per_s,
                   "speedup": spec.decode_tokens_per_s / base,
                   "ms_per_step": 1e3 * spec.decode_s / max(spec.steps, 1),
                   "syncs_per_step": syncs_per_step(engine, rows, k=k, sampling=sampling),
                   **_traffic(engine, rows, k=k, sampling=sampling),
                   "gpu_ms_per_step": gpu_ms_per_step(engine, rows, k=k, sampling=sampling),
                   "identical": spec.tokens == plain.tokens, "tokens": spec.tokens,
                   "agreeing_prefix": agreeing_prefix(spec.tokens, plain.tokens), **spec.summary()}
            row["host_bound_speedup"] = _bound(row, plain_row, "ops_per_step")
            row["bytes_bound_speedup"] = _bound(row, plain_row, "mb_per_step")
            row["bytes_bound_speedup_kernel"] = _bound(row, plain_row, "mb_per_step_kernel")
            row["device_bound_speedup"] = _bound(row, plain_row, "gpu_ms_per_step")
            results.append(row)
            print(f"[bench_generate] batch {batch} K={k}: {row['tokens_per_s']:.1f} tokens/s "
                  f"(x{row['speedup']:.2f}), acceptance {_rates(spec.acceptance)}, identical "
                  f"{row['identical']}", flush=True)
            best = row
            if args.cuda_graphs:  # both with their best settings: graphed against graphed
                fast = best = graphed_row(engine, rows, args, sampling, k=k, plain=plain, graphed_plain=graphed)
                results.append(fast)
                print(f"[bench_generate] batch {batch} K={k}, CUDA graphs: {fast['tokens_per_s']:.1f} "
                      f"tokens/s (x{fast['vs_graphed_plain']:.2f} graphed plain), acceptance "
                      f"{_rates(fast['acceptance_per_position'])}, identical {fast['identical']} "
                      f"(to graphed plain: {fast['identical_to_graphed_plain']})", flush=True)
            if args.compile_speculative:  # the same graphed step, its own work compiled
                fast = graphed_row(engine, rows, args, sampling, k=k, plain=plain, graphed_plain=graphed,
                                   compile_speculative=True)
                results.append(fast)
                print(f"[bench_generate] batch {batch} K={k}, CUDA graphs, compiled: "
                      f"{fast['tokens_per_s']:.1f} tokens/s (x{fast['vs_graphed_plain']:.2f} graphed "
                      f"plain), {fast['ms_per_step']:.3f} ms/step, warm-up (compiles) "
                      f"{fast['warmup_s']:.1f} s, identical {fast['identical']} (to graphed plain: "
                      f"{fast['identical_to_graphed_plain']})", flush=True)
            if args.matched_plain:  # plain steps of K + 1 rows, the same graph setting as `best`
                same = matched_row(engine, rows, args, sampling, k=k, plain=graphed or plain_row, spec=best)
                matched.append(same)
                print(f"[bench_generate] batch {batch} plain of {k + 1} rows{', CUDA graphs' if same['graphs'] else ''}: "
                      f"{same['tokens_per_s']:.1f} tokens/s (x{same['vs_one_row_plain']:.2f} one-row plain), "
                      f"K={k} x{same['spec_vs_matched']:.2f} it, identical {same['identical']}", flush=True)
    return results, matched


def agreeing_prefix(got: list[list[int]], want: list[list[int]]) -> float:
    """Mean share of each row's tokens before its first difference from plain greedy. Below 1.0
    in bf16 means a near-tie flipped: verifying K + 1 positions in one forward rounds differently
    from single steps (the logic is exact: tests/test_infer.py checks it in fp32)."""
    shares = []
    for a, b in zip(got, want):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        shares.append(same / max(len(b), 1))
    return sum(shares) / len(shares)


def distinct_ngrams(rows: list[list[int]], n: int = 8) -> float | None:
    """Mean share of distinct ``n``-grams among each row's ``n``-grams (1.0: no ``n``-gram
    repeats; near 0: the row loops). Greedy output of a weak model falls into loops, which a
    drafter predicts trivially, so acceptance rates are read next to this."""
    shares = []
    for row in rows:
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        if grams:
            shares.append(len(set(grams)) / len(grams))
    return sum(shares) / len(shares) if shares else None


def _rates(rates) -> str:
    return "/".join(f"{r:.2f}" for r in rates)


def print_table(description: str, stack: dict, results: list[dict]) -> None:
    print(f"\n{description}; {stack}")
    print("| batch | K | decode tokens/s | vs plain | ms/step | acceptance per position "
          "| accepted/step | identical | host syncs/step | torch ops/step | host-bound vs plain "
          "| MB/step | bytes-bound vs plain | MB/step, sparse MoE kernel | its bytes-bound vs plain "
          "| GPU ms/step | device-bound vs plain | vs graphed plain | identical to graphed plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    # (key, format) of the columns after "identical"; a missing or None value prints "-"
    measured = (("syncs_per_step", "{:.1f}"), ("ops_per_step", "{:.0f}"), ("host_bound_speedup", "x{:.2f}"),
                ("mb_per_step", "{:.1f}"), ("bytes_bound_speedup", "x{:.2f}"),
                ("mb_per_step_kernel", "{:.1f}"), ("bytes_bound_speedup_kernel", "x{:.2f}"),
                ("gpu_ms_per_step", "{:.2f}"), ("device_bound_speedup", "x{:.2f}"),
                ("vs_graphed_plain", "x{:.2f}"))
    for r in results:
        acc = _rates(r["acceptance_per_position"]) if r["k"] else "-"
        mean = f"{r['mean_accepted']:.2f}" if r["k"] else "-"
        same = "-" if "identical" not in r else ("yes" if r["identical"] else
                                                  f"NO ({r['agreeing_prefix']:.0%} agree)")
        k = (f"{r['k']} (CUDA graphs{', compiled' if r.get('compiled') else ''})"
             if r.get("graphs") else r["k"])
        cells = ["-" if r.get(key) is None else fmt.format(r[key]) for key, fmt in measured]
        if "identical_to_graphed_plain" in r:
            cells.append("yes" if r["identical_to_graphed_plain"] else
                         f"NO ({r['agreeing_prefix_graphed']:.0%} agree)")
        else:
            cells.append("-")
        print(f"| {r['batch']} | {k} | {r['tokens_per_s']:.1f} | x{r['speedup']:.2f} "
              f"| {r['ms_per_step']:.2f} | {acc} | {mean} | {same} | {' | '.join(cells)} |")


def print_matched(rows: list[dict]) -> None:
    print("\n| batch | K | graphs | one-row plain tokens/s | plain of K + 1 rows tokens/s | its speed vs one-row "
          "| speculative tokens/s | vs one-row plain | vs plain of K + 1 rows | identical to plain of K + 1 rows "
          "| plain of K + 1 rows identical to one-row |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = "yes" if r["identical"] else f"NO ({r['agreeing_prefix']:.0%} agree)"
        print(f"| {r['batch']} | {r['k']} | {'yes' if r['graphs'] else 'no'} | {r['plain_tokens_per_s']:.1f} "
              f"| {r['tokens_per_s']:.1f} | x{r['vs_one_row_plain']:.2f} | {r['spec_tokens_per_s']:.1f} "
              f"| x{r['spec_vs_one_row_plain']:.2f} | x{r['spec_vs_matched']:.2f} | {same} "
              f"| {'yes' if r['identical_one_row'] else 'no'} |")


def main(argv=None) -> int:
    import warnings

    args = parse_args(argv)
    if torch.cuda.is_available():
        from megacpp_mcore.testing import stub_mamba1_extension

        stub_mamba1_extension()  # mamba_ssm without its Mamba-1 extension still has Mamba-2
    warnings.filterwarnings("ignore", category=UserWarning)
    if torch.cuda.is_available() and not args.bf16:  # real fp32 GEMMs for the identity check
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    from megacpp_mcore.train import runtime

    try:
        engine, description = build_engine(args)
        engine.ssd_verify = args.ssd_verify
        engine.fp32_head = args.head_dtype == "fp32"
        for plan in (*engine.plans, *engine.mtp_plans):
            if plan.moe is not None:
                plan.moe.routes = args.moe_routes
        stack = backend_report(engine)
        if not bytes_visible(engine):
            print("[bench_generate] MB/step: not counted (Transformer Engine modules run outside "
                  "torch's dispatcher; --backend local counts them)", flush=True)
        results, matched = measure(engine, args)
        parts = {}
        if args.bytes_by_part:
            parts = bytes_by_part(engine, prompts(args, args.batch[0]), usable_ks(engine, args),
                                  byte_sampling(engine))
    finally:
        runtime.shutdown()
    if args.out:
        Path(args.out).write_text(json.dumps({"model": description, "stack": stack, "args": vars(args),
                                              "results": results, "matched_plain": matched,
                                              "bytes_by_part": parts}, indent=1))
    if parts:
        print_bytes_by_part(parts, args.batch[0])
    print_table(description, stack, results)
    if matched:
        print_matched(matched)
    return 0


if __name__ == "__main__":
    sys.exit(main())
