"""Stage benchmark on one H200: the layers one GPU of the 8 x H200 NAM56R layout runs, through
Megatron-LM's stock training scripts, ours against upstream's own hybrid, and a projection of the
whole model on 8 GPUs.

    python scripts/bench_stage.py --megatron-lm $MEGATRON_LM [--set ab,stage] [--out stage.json]
    python scripts/bench_stage.py --megatron-lm $MEGATRON_LM --set fast --fast mla_rope_fusion=off \\
        --fast moe_permute_fusion=on          # each fast path on/off in the same call
    python scripts/bench_stage.py --megatron-lm $MEGATRON_LM --set startup   # cold vs warm start
    python scripts/bench_stage.py ... --dry-run                              # print the commands

Layout (recipes/nam56r_8xh200.sh): TP 1, PP 1, EP 1, DP 8 (EP 8, 4, 2 projected too). With PP 1
every GPU runs all 52 layers for its own tokens; at EP 1 it holds all 16 experts, and at EP 8 it
holds 2 of them and, under balanced routing, computes the same expert FLOPs per token. So one GPU's
work per token is the whole trunk at full width, which does not fit one GPU's memory at once: it is
measured in slices of the 12-layer period ``AEMEAEMEAEMR`` (all experts local) and the rest is
modelled (below).

Sets (``--set``, runs interleaved within a repeat, ``--repeats`` / ``--stage-repeats`` times):

* ``ab``: the NAM56R structure on the symbols upstream has (``AEMEAEMEAEMM``, standard attention,
  M for R, no MTP), 12 layers at the public dims; ours (``pretrain_gpt.py`` through the launcher,
  ``layer_specs.nam56r NAM56R_UPSTREAM_SYMBOLS``) against upstream's hybrid (``pretrain_mamba.py``
  ``*EME*EME*EMM``, or ``pretrain_hybrid.py`` on core_v0.19); same dims, mock data, seed, batch,
  and the same loss (``ours`` turns the launcher's default fused LM loss off).
  ``--ab-runs`` adds variants: ours with the fused LM loss, upstream with TE's fused CE, ours
  with Megatron's MoE dispatcher (``ours_host_counts``).
* ``stage``: the public NAM56R (MLA, R, ``layer_specs.nam56r NAM56R``) in the slices of
  ``--stage-slices`` (default 12, 4 and 8 layers: prefixes of the pattern, all of which fit an
  80 GB card; on an H200 add 16 or 24 (estimates ~71 and ~96 GiB before what the plan leaves
  out; on an H100 16 runs at ``--mbs 2``: 1.005 x its prediction) to check the projection's
  additive model against a measured slice), the 12-layer slice with MTP depth 2, the 12-layer slice with the
  MoE counts read on the host (``stage12_host_counts``, as EP > 1 needs), with ``--mtp-recompute``
  the MTP slice with the MTP block recomputed (``stage12_mtp_recompute``), plus one run per
  ``--fast`` toggle (the 12-layer slice with it flipped);
  ``fast``: only the 12-layer slice and the ``--fast`` runs (each fast path's on/off ratio).
* ``startup``: the nam56r-lite preset (MLA, MTP 1) twice on a new, empty Triton cache: cold (a
  fresh machine compiles and autotunes every Triton kernel), then warm (all of it cached).

Every run reports: start-up (launch to the first finished iteration, and the Triton autotuning
seconds inside it with ``--print-autotuning``), median ms per iteration after ``--warmup``, tokens/s,
TFLOP/s both ways (``models/accounting.py``: ours = 6 x active matmul params + causal attention;
hybrid = Megatron-Bridge's hybrid_flops), peak allocated memory and first/last LM loss.

Projection of the whole model on 8 H200s (assumptions printed with it), from per-token times of
the slices, layers taken as additive: t12 holds the head (embedding, output layer, loss, optimizer
share) and the first period, whose layers 0-3 carry no MoD (``skip_first``); ``t8 - t4`` is a MoD
``AEME`` and ``t12 + t8 - 2 t4`` a whole MoD period, so the 52 layers and the head take
``t12 + 3 (t12 + t8 - 2 t4) + (t8 - t4)``, no further assumption; MTP ``t12mtp - t12``. Without the
short slices (an earlier call's JSON), a period is ``t24 - t12``, the head ``2 t12 - t24`` and
``AEME`` is scaled from a period by hybrid FLOPs; a 16- or 24-layer run checks the short slices'
prediction ``t12 + t8 - t4`` or ``2 t12 + t8 - 2 t4``. All-to-all per token = 4 (dispatch,
combine; forward, backward) x E passes x top-k x h x 2 B x (ep - 1)/ep at ``--a2a-gbps``, exposed fraction
``1 - --a2a-overlap``; gradient sync per step = dense params x (4 B reduce-scatter + 2 B
all-gather) x (dp - 1)/dp at ``--allreduce-gbps``, exposed ``1 - --grad-overlap``; with EP > 1
the host read of the MoE counts per E pass, ``(t12_host_counts - t12) / 5`` (the slice's E layers).
The same projection for each EP that divides DP and the experts (8, 4, 2, 1; expert gradients then
reduced over expert-DP = dp / ep ranks), with its memory per GPU: ``models/plan.py``'s estimate plus
what the ``stage12_mtp`` run measured beyond the plan's estimate for that slice, against ``--gpu-gib``.
With ``--profile-step``, each slice's optimizer kernels are charged as the distributed optimizer shards
them on 8 GPUs (1/dp), not whole as on the one GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "scripts"))  # trace_summary

from megacpp_mcore.models.accounting import (embedding_params, flops_per_token,  # noqa: E402
                                             hybrid_flops_per_token, layer_params)
from megacpp_mcore.layers.mixers.dims import mamba_dims  # noqa: E402
from megacpp_mcore.models.presets import ModelConfig, get_preset  # noqa: E402
from megacpp_mcore.upstream import launch_pretrain as lp  # noqa: E402

SETS = ("ab", "stage", "fast", "startup")
STAGE_SLICES = (4, 8, 12, 16, 24)  # prefixes of the pattern: the projection's 4, 8, 12; checks 16, 24
#: stage runs that repeat a slice with our flags changed: name -> (the slice, the flags), in run order
STAGE_VARIANTS = {
    # the MTP block's forward run again in backward (the recipe's MTP_RECOMPUTE=1; --mtp-recompute)
    "stage12_mtp_recompute": ("stage12_mtp", ["--megacpp-mtp-recompute", "on"]),
    # the MoE counts read on the host, as with EP > 1 (the projection's host-counts term)
    "stage12_host_counts": ("stage12", ["--megacpp-moe-device-counts", "off"]),
}
AB_RUNS = ("ours", "upstream", "ours_fused", "upstream_te_ce", "ours_host_counts")
UPSTREAM_SYMBOLS = {"A": "*", "E": "E", "M": "M"}  # our letter -> megatron-core's hybrid symbol

# The launcher's own default for its fused LM loss (read from its parser, not restated here): that
# value passes no flag, the other one says it.
_FUSED_LM_LOSS = lp.add_megacpp_arguments(argparse.ArgumentParser()).get_default("megacpp_fused_lm_loss")

# Fast paths of the stage slice: name -> (default, {value: Megatron-LM flags}); "{cg}" is the CUDA
# graph module flag of the checkout (--cuda-graph-scope to 0.18, --cuda-graph-modules from 0.19).
FAST_PATHS: dict[str, tuple[str, dict[str, list[str]]]] = {
    "mamba_fused": ("on", {"on": [], "off": ["--no-use-mamba-mem-eff-path"]}),  # causal_conv1d path
    "fused_residual": ("on", {"on": [], "off": ["--no-bias-dropout-fusion"]}),
    "mla_rope_fusion": ("on", {"on": [], "off": ["--no-rope-fusion"]}),  # MLA's YaRN(1) fused kernels
    "moe_grouped_gemm": ("on", {"on": ["--moe-grouped-gemm"], "off": []}),
    "moe_dispatcher": ("alltoall", {v: ["--moe-token-dispatcher-type", v]
                                    for v in ("alltoall", "allgather", "flex")}),
    "moe_permute_fusion": ("off", {"on": ["--moe-permute-fusion"], "off": []}),
    "moe_router_fusion": ("off", {"on": ["--moe-router-fusion"], "off": []}),
    "ce_fusion": ("off", {"on": ["--cross-entropy-loss-fusion"], "off": [],
                          "te": ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te"]}),
    # "{cg_modules}": attn and mamba, or mamba alone where the model carries MoD (a captured
    # attention or MoE layer would bypass MoD's gate: MoDLayer refuses such configs)
    "cuda_graphs": ("off", {"on": ["--cuda-graph-impl", "transformer_engine", "{cg}", "{cg_modules}"],
                            "off": []}),
    "fp8": ("off", {"on": ["--fp8-format", "hybrid", "--fp8-recipe", "delayed"], "off": []}),
    # the launcher's (ours only): the LM loss without the logits, its default (the ab set's ours
    # run turns it off: upstream's loss, for the shared structure; ours_fused keeps it)
    "fused_lm_loss": (_FUSED_LM_LOSS, {v: [] if v == _FUSED_LM_LOSS else ["--megacpp-fused-lm-loss", v]
                                       for v in ("on", "off")}),
}
OURS_ONLY = ("fused_lm_loss",)  # fast paths upstream's scripts have no flag for


class BenchError(ValueError):
    """Bad input: one line, exit status 2."""


@dataclasses.dataclass
class Run:
    """One launch: what ran and what its log says."""

    name: str
    model: ModelConfig
    command: list[str]
    env: dict[str, str]
    returncode: int | None = None
    startup_s: float | None = None  # launch -> first finished iteration
    autotune_s: float = 0.0  # Triton autotuning inside the run (with --print-autotuning)
    ms: list[float] = dataclasses.field(default_factory=list)  # per iteration
    losses: list[float] = dataclasses.field(default_factory=list)
    peak_gib: float | None = None
    megatron_tflops: float | None = None  # Megatron's own count (hybrid models only)
    trace_dir: Path | None = None  # --profile-step: where Megatron's torch.profiler trace goes


def model_args(m: ModelConfig, *, mla: bool, mtp: bool) -> list[str]:
    """Architecture flags of ``m`` (the launcher's :func:`preset_args`, less what a side lacks)
    and the Mamba sizes our ``M`` builds with (megatron-core's defaults today, said explicitly)."""
    flags = lp.preset_args(m.replace(mla=m.mla if mla else None, mtp_depth=m.mtp_depth if mtp else 0))
    dims = mamba_dims(m.hidden_size, d_state=m.mamba_state_dim)
    return flags + ["--mamba-state-dim", str(dims.d_state), "--mamba-head-dim", str(dims.head_dim),
                    "--mamba-num-groups", str(dims.ngroups)]


def common_args(m: ModelConfig, args, iters: int, fast: dict[str, str]) -> list[str]:
    """Flags both sides share: training, precision, mock data, logging (as the 8x recipe's, plus
    ``--manual-gc`` against timing jitter) and the fast-path settings ``fast`` (name -> value of
    :data:`FAST_PATHS`)."""
    release = lp.checkout_release(args.megatron_lm)
    mod = "mod" in m.features
    paths = [flag for name, value in fast.items() for flag in fast_flags(name, value, release, mod)]
    return paths + [
        "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
        "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
        "--attention-dropout", "0", "--hidden-dropout", "0", "--init-method-std", "0.02",
        "--moe-router-load-balancing-type", "aux_loss", "--moe-router-dtype", "fp32",
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
        "--expert-model-parallel-size", "1",
        "--micro-batch-size", str(args.mbs), "--global-batch-size", str(args.gbs),
        "--train-iters", str(iters), "--seed", "1234", "--lr", "3e-4", "--min-lr", "3e-5",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "1", "--weight-decay", "0.1",
        "--clip-grad", "1.0", "--adam-beta2", "0.95", "--bf16", "--transformer-impl",
        "transformer_engine", "--no-gradient-accumulation-fusion", "--use-distributed-optimizer",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(m.vocab_size - 1),
        "--log-interval", "1", "--log-throughput", "--eval-interval", str(iters + 1), "--eval-iters", "0",
        # Python's collector off during the timed steps (Megatron's jitter remedy): its pauses stall
        # the host, and the host stalls the device at every MoE layer's token-count read
        "--manual-gc",
    ]


def upstream_entry(root: Path) -> tuple[str, list[str], str]:
    """(script, --spec MODULE ATTR, pattern flag) of upstream's hybrid in this checkout."""
    if (root / "pretrain_hybrid.py").exists():  # core_v0.18+: HybridModel
        return ("pretrain_hybrid.py", ["megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"],
                "--hybrid-layer-pattern")
    if (root / "pretrain_mamba.py").exists():
        return ("pretrain_mamba.py", ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"],
                "--hybrid-override-pattern")
    raise BenchError(f"--megatron-lm {root}: neither pretrain_hybrid.py nor pretrain_mamba.py found "
                     "(upstream's hybrid); use a core_v0.16.1 or core_v0.19.0 checkout")


def launcher(args) -> list[str]:
    """One process on one GPU, stopped by ``timeout`` after ``--run-timeout`` seconds (exit 124)."""
    return ["timeout", "--kill-after=30", str(int(args.run_timeout)),
            "torchrun", "--standalone", "--nproc-per-node", "1"]


def ours(name: str, m: ModelConfig, spec: tuple[str, str], args, *, iters: int, mla: bool,
         fast: dict[str, str], env=None, extra: list[str] | None = None) -> Run:
    """Our spec ``spec`` (module, attribute) through the launcher and ``pretrain_gpt.py``."""
    command = [*launcher(args), "-m", "megacpp_mcore.launch_pretrain", "--megatron-lm",
               str(args.megatron_lm), "--spec", *spec, *model_args(m, mla=mla, mtp=m.mtp_depth > 0),
               *common_args(m, args, iters, fast), *(extra or []), *args.ours_extra]
    return Run(name=name, model=m, command=command, env=dict(env or {}))


def upstream(name: str, m: ModelConfig, args, *, iters: int, fast: dict[str, str]) -> Run:
    """Upstream's own hybrid on ``m``'s layer table (A -> ``*``, E, M)."""
    script, spec, pattern_flag = upstream_entry(args.megatron_lm)
    pattern = "".join(UPSTREAM_SYMBOLS[e.symbol] for e in m.layer_table())
    fast = {name: value for name, value in fast.items() if name not in OURS_ONLY}
    command = [*launcher(args), str(args.megatron_lm / script), "--spec", *spec, pattern_flag, pattern,
               *model_args(m, mla=False, mtp=False), *common_args(m, args, iters, fast)]
    return Run(name=name, model=m, command=command, env={})


def fast_flags(name: str, value: str, release: str | None, mod: bool = False) -> list[str]:
    """Megatron-LM flags of one fast-path setting for a checkout of ``release``; ``mod``: the
    model carries MoD (CUDA graphs then capture the Mamba layers only)."""
    graph_flag = "--cuda-graph-modules" if release and tuple(map(int, release.split(".")[:2])) >= (0, 19) \
        else "--cuda-graph-scope"
    modules = ["mamba"] if mod else ["attn", "mamba"]
    out: list[str] = []
    for flag in FAST_PATHS[name][1][value]:
        out += [graph_flag] if flag == "{cg}" else modules if flag == "{cg_modules}" else [flag]
    return out


def parse_settings(items: list[str], option: str) -> list[tuple[str, str]]:
    """``NAME=VALUE`` items of ``--fast`` / ``--base`` checked against :data:`FAST_PATHS`."""
    out = []
    for item in items:
        name, _, value = item.partition("=")
        if name not in FAST_PATHS:
            raise BenchError(f"{option} {item}: unknown fast path {name!r}; known: {', '.join(FAST_PATHS)}")
        allowed = FAST_PATHS[name][1]
        if value not in allowed:
            raise BenchError(f"{option} {item}: value {value!r}; allowed for {name}: {', '.join(allowed)}")
        out.append((name, value))
    return out


def base_settings(args) -> dict[str, str]:
    """The fast-path settings of every run: the defaults, changed by ``--base``."""
    return {name: default for name, (default, _) in FAST_PATHS.items()} | dict(args.base)


def spec_features(module: str, attr: str) -> dict:
    """The layer features (MoD, ...) the spec object builds, MLA aside (the flags carry MLA): the
    model each run counts FLOPs for is the one its spec builds."""
    import importlib

    features = getattr(importlib.import_module(module), attr).submodules.features
    return {name: cfg for name, cfg in features.items() if name != "mla"}


def plan_runs(args) -> list[Run]:
    """The launches of the selected sets, interleaved within each repeat."""
    nam, base = get_preset("nam56r"), base_settings(args)
    runs: list[Run] = []
    if "ab" in args.set:
        shared = nam.replace(name="nam56r-upstream-symbols", pattern="AEMEAEMEAEMM", num_layers=12,
                             mla=None, mtp_depth=0, features={})
        spec = ("layer_specs.nam56r", "NAM56R_UPSTREAM_SYMBOLS")
        unfused, fused = base | {"fused_lm_loss": "off"}, base | {"fused_lm_loss": "on"}
        variants = {
            # GPTModel's loss, as upstream's: the same model and loss on both sides
            "ours": lambda n: ours(n, shared, spec, args, iters=args.iters, mla=False, fast=unfused),
            "upstream": lambda n: upstream(n, shared, args, iters=args.iters, fast=base),
            # the fused LM loss (the launcher's default): no logits built, gradients computed in forward
            "ours_fused": lambda n: ours(n, shared, spec, args, iters=args.iters, mla=False, fast=fused),
            # ours_fused with Megatron's dispatcher (the MoE token counts read on the host each layer)
            "ours_host_counts": lambda n: ours(n, shared, spec, args, iters=args.iters, mla=False, fast=fused,
                                               extra=["--megacpp-moe-device-counts", "off"]),
            # upstream's best loss: TE's fused cross-entropy (the logits still built)
            "upstream_te_ce": lambda n: upstream(n, shared, args, iters=args.iters,
                                                 fast=base | {"ce_fusion": "te"}),
        }
        for r in range(args.repeats):
            runs += [variants[v](f"ab_{v}#{r}") for v in args.ab_runs]
    if "stage" in args.set or "fast" in args.set:
        spec = ("layer_specs.nam56r", args.stage_spec)
        built = nam.replace(features=spec_features(*spec))
        # the 12-layer slice first (the TFLOP/s point), its MTP and host-counts variants, then the
        # other slices of the projection, shortest first (a call cut at its deadline loses the longest)
        slices = {"stage12": built.replace(num_layers=12, mtp_depth=0)}
        if "stage" in args.set:  # "fast": the 12-layer baseline and the --fast variants only
            slices["stage12_mtp"] = built.replace(num_layers=12)
            for name, (base_slice, _) in STAGE_VARIANTS.items():
                if name != "stage12_mtp_recompute" or args.mtp_recompute:
                    slices[name] = slices[base_slice]
            for n in sorted(n for n in args.stage_slices if n != 12):
                slices[f"stage{n}"] = built.replace(num_layers=n, mtp_depth=0)
        for r in range(args.stage_repeats):
            for name, m in slices.items():
                runs.append(ours(f"{name}#{r}", m, spec, args, iters=args.iters, mla=True, fast=base,
                                 extra=STAGE_VARIANTS.get(name, (None, None))[1]))
            for fast, value in args.fast:
                runs.append(ours(f"stage12_{fast}={value}#{r}", slices["stage12"], spec, args,
                                 iters=args.iters, mla=True, fast=base | {fast: value}))
    if "startup" in args.set:
        lite = get_preset("nam56r-lite")
        lite = lite.replace(features=spec_features("layer_specs.nam56r_lite", "NAM56R_LITE"))
        # a new, empty Triton cache: the first run compiles and autotunes everything (a fresh
        # machine), the second finds it all in the cache
        cache = str(Path(args.log_dir) / f"triton-cache-startup-{time.strftime('%Y%m%d-%H%M%S')}")
        for phase in ("cold", "warm"):
            runs.append(ours(f"startup_{phase}", lite, ("layer_specs.nam56r_lite", "NAM56R_LITE"), args,
                             iters=args.warmup + 2, mla=True, fast=base, env={"TRITON_CACHE_DIR": cache}))
    if args.profile_step:  # one profiled step on every side, its trace summarized after the run
        for run in runs:
            run.trace_dir = args.log_dir / "traces" / run.name.replace("#", "_").replace("=", "-")
            run.command += ["--profile", "--use-pytorch-profiler", "--profile-step-start",
                            str(args.profile_step), "--profile-step-end", str(args.profile_step + 1),
                            "--tensorboard-dir", str(run.trace_dir)]
    return runs


ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+")
ELAPSED = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")
LOSS = re.compile(r"\blm loss: ([0-9.Ee+-]+)")
TFLOPS = re.compile(r"throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+)")
MAX_ALLOC = re.compile(r"max allocated: ([0-9.]+)")
AUTOTUNE = re.compile(r"finished after ([0-9.]+)s")


def run_env(run: Run, args) -> dict[str, str]:
    """The environment a run adds: the repository on PYTHONPATH, unbuffered logs, one CUDA queue
    (as the 8x recipe), Triton's persistent autotuning cache (``--no-autotune-cache`` leaves it
    off), ``--triton-cache`` and ``--print-autotuning``; then the run's own (e.g. its cache dir)."""
    env = {"PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}".rstrip(":"),
           "PYTHONUNBUFFERED": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    if args.autotune_cache:
        env["TRITON_CACHE_AUTOTUNING"] = "1"
    if args.triton_cache:
        env["TRITON_CACHE_DIR"] = str(args.triton_cache)
    if args.print_autotuning:
        env["TRITON_PRINT_AUTOTUNING"] = "1"
    return env | run.env


def execute(run: Run, args, log_dir: Path) -> None:
    """Runs ``run``, streaming its log to ``log_dir`` with the time of the first finished iteration."""
    env = {**os.environ, **run_env(run, args)}
    print(f"[{run.name}] {shlex.join(run.command)}", flush=True)
    t0 = time.monotonic()
    log = (log_dir / f"{run.name.replace('#', '_')}.log").open("w")
    proc = subprocess.Popen(run.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO)
    try:
        for line in proc.stdout:
            log.write(line)
            it = ITERATION.search(line)
            if it:
                if run.startup_s is None:
                    run.startup_s = time.monotonic() - t0
                for regex, target in ((ELAPSED, run.ms), (LOSS, run.losses)):
                    found = regex.search(line)
                    if found:
                        target.append(float(found.group(1)))
                found = TFLOPS.search(line)
                run.megatron_tflops = float(found.group(1)) if found else run.megatron_tflops
            found = MAX_ALLOC.search(line)
            if found:
                run.peak_gib = max(run.peak_gib or 0.0, float(found.group(1)) / 1024)
            found = AUTOTUNE.search(line)
            if found:
                run.autotune_s += float(found.group(1))
        run.returncode = proc.wait()  # 124: stopped by timeout after --run-timeout seconds
    finally:
        log.close()
    status = "ok" if run.returncode == 0 else f"FAILED ({run.returncode}), log {log.name}"
    print(f"[{run.name}] {status}: start-up {_fmt(run.startup_s, '.1f')} s, "
          f"{len(run.ms)} iterations", flush=True)


def profile_summary(run: Run) -> dict:
    """``trace_summary`` of the run's profiled step (printed), or the reason there is none."""
    import trace_summary

    try:
        summary = trace_summary.summarize(trace_summary.load_events(trace_summary.find_trace(run.trace_dir)),
                                          top=15)
    except trace_summary.TraceError as exc:
        print(f"[{run.name}] no profile: {exc}", flush=True)
        return {"error": str(exc)}
    trace_summary.print_summary(summary, f"[{run.name}] profiled step: ")
    return summary


def summarize(run: Run, args) -> dict:
    """Per-run figures; tokens/s from the median iteration after ``--warmup``."""
    # the profiled iteration N and its neighbours (the profiler's warm-up step N - 1, the trace
    # written at the start of N + 1, one more for safety) are left out of the timing (0-based here)
    profiled = range(args.profile_step - 2, args.profile_step + 2) if args.profile_step else range(0)
    steady = [ms for i, ms in enumerate(run.ms) if i >= args.warmup and i not in profiled]
    ms = statistics.median(steady) if steady else None
    seq = run.model.seq_length
    tokens = args.gbs * seq / (ms / 1e3) if ms else None
    flops = flops_per_token(run.model, seq, causal=True)["total"]
    hybrid = hybrid_flops_per_token(run.model, seq)["total"]
    quartiles = statistics.quantiles(steady, n=4) if len(steady) >= 2 else None
    return {"name": run.name, "returncode": run.returncode, "startup_s": run.startup_s,
            "autotune_s": run.autotune_s, "first_iteration_ms": run.ms[0] if run.ms else None,
            "ms_per_iteration": ms, "ms_steady": steady,
            "ms_p25_p75": [quartiles[0], quartiles[2]] if quartiles else None, "tokens_per_s": tokens,
            "tflops_ours": tokens * flops / 1e12 if tokens else None,
            "tflops_hybrid": tokens * hybrid / 1e12 if tokens else None,
            "megatron_reported_tflops": run.megatron_tflops, "peak_gib": run.peak_gib,
            "loss_first": run.losses[0] if run.losses else None,
            "loss_last": run.losses[-1] if run.losses else None,
            "parameters": sum(layer_params(run.model, e) for e in run.model.layer_table()),
            "command": run.command}


def ratio_interval(times: list[float], reference: list[float], *, draws: int = 2000,
                   level: float = 0.9, seed: int = 0) -> tuple[float, float, float]:
    """The speed of ``times`` over ``reference`` (two samples of iteration times): ``median(reference)
    / median(times)``, and its bootstrap interval at ``level`` (iterations resampled with
    replacement, each side on its own): what a ratio of medians is worth when the iterations of one
    configuration spread by 10%."""
    import random

    rng = random.Random(seed)
    point = statistics.median(reference) / statistics.median(times)
    ratios = sorted(statistics.median(rng.choices(reference, k=len(reference)))
                    / statistics.median(rng.choices(times, k=len(times))) for _ in range(draws))
    tail = (1 - level) / 2
    return point, ratios[int(tail * draws)], ratios[min(draws - 1, int((1 - tail) * draws))]


def _by_base(rows: list[dict], key: str) -> dict[str, list]:
    """``row[key]`` of every finished run that has it, grouped over repeats by base name."""
    groups: dict[str, list] = {}
    for row in rows:
        if row.get(key) is not None and row["returncode"] == 0:
            groups.setdefault(row["name"].split("#")[0], []).append(row[key])
    return groups


def _median_by_base(rows: list[dict], key: str) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in _by_base(rows, key).items()}


def optimizer_seconds_per_token(rows: list[dict], args) -> dict[str, float]:
    """Per slice (base name): the device time of the optimizer's kernels in its profiled step
    (``trace_summary``'s ``optimizer`` category: Adam, the gradient norm, multi-tensor scaling) per
    token of a step; medians over repeats. Empty without ``--profile-step``."""
    tokens = args.gbs * get_preset("nam56r").seq_length
    per_run = [dict(r, optimizer_s=r["profile"]["categories"].get("optimizer", {"ms": 0.0})["ms"] / 1e3 / tokens)
               for r in rows if r.get("profile") and "categories" in r["profile"]]
    return _median_by_base(per_run, "optimizer_s")


SHORT_SLICES = ("stage4", "stage8", "stage12", "stage12_mtp")
LONG_SLICES = ("stage12", "stage24", "stage12_mtp")


def projection(tps: dict[str, float], args, ep: int | None = None,
               optimizer: dict[str, float] | None = None) -> dict | None:
    """Whole NAM56R on 8 H200s (TP 1, PP 1, EP ``ep``, default ``--ep``; DP ``--dp``) from the
    stage slices: the short ones (4, 8, 12 layers and 12 with MTP) where measured, else 12 and 24
    layers; None without either set. ``optimizer`` (:func:`optimizer_seconds_per_token`): each
    slice's optimizer time, which the distributed optimizer shards ``dp`` ways on 8 GPUs (left
    unsharded where missing)."""
    short = set(SHORT_SLICES) <= tps.keys()
    used = SHORT_SLICES if short else LONG_SLICES
    if not set(used) <= tps.keys():
        return None
    ep = args.ep if ep is None else ep
    nam = get_preset("nam56r")
    optimizer = optimizer or {}
    sharded = set(used) <= optimizer.keys()
    # s per token; with the optimizer's time measured, each slice as if its optimizer were sharded:
    # on 8 GPUs each one updates total/dp parameters at every EP (dense: 1/dp of them; experts: its
    # 1/ep, over expert-DP dp/ep ranks)
    t = {k: 1 / tps[k] - (optimizer[k] * (1 - 1 / args.dp) if sharded else 0.0) for k in used}
    mtp = t["stage12_mtp"] - t["stage12"]
    check = None
    if short:
        # layers 0-3 (no MoD) and the head are in every slice; layers 4-7 are a MoD AEME, 8-11 AEMR
        aeme = t["stage8"] - t["stage4"]
        period = t["stage12"] + t["stage8"] - 2 * t["stage4"]  # AEME + AEME + AEMR, all with MoD
        # the 52 layers and the head: t12 + 3 periods + AEME, exactly (additive layers); the split
        # into head and trunk alone assumes layers 0-3 cost what 4-7 do (MoD's share aside)
        head = 2 * t["stage4"] - t["stage8"]
        trunk = t["stage12"] + 3 * period + aeme - head
        # a longer slice that ran checks the additive model: layers 12-15 are a MoD AEME, 12-23 a
        # MoD period (predicted from the raw times, the optimizer's share unsharded as it ran)
        raw = {k: 1 / v for k, v in tps.items()}
        predict = {"stage16": raw["stage12"] + raw["stage8"] - raw["stage4"],
                   "stage24": 2 * raw["stage12"] + raw["stage8"] - 2 * raw["stage4"]}
        check = {name: {"predicted": predicted, "measured": raw[name],
                        "measured_over_predicted": raw[name] / predicted}
                 for name, predicted in predict.items() if name in raw} or None
    else:
        period, head = t["stage24"] - t["stage12"], 2 * t["stage12"] - t["stage24"]

        def layer_flops(m: ModelConfig) -> float:
            parts = hybrid_flops_per_token(m.replace(mtp_depth=0))
            return parts["total"] - parts["logits"]

        tail = nam.replace(pattern="AEME", num_layers=4, mtp_depth=0)
        aeme = period * layer_flops(tail) / layer_flops(nam.replace(num_layers=12, mtp_depth=0))
        trunk = 4 * period + aeme
    compute = trunk + head + mtp
    e_passes = sum(e.symbol == "E" for e in nam.layer_table()) + nam.mtp_depth
    a2a_bytes = 4 * e_passes * nam.moe.topk * nam.hidden_size * 2 * (ep - 1) / ep
    a2a = a2a_bytes / (args.a2a_gbps * 1e9) * (1 - args.a2a_overlap)
    # parameters outside the experts (replicated over DP); the experts of the E layers and of the
    # MTP block's E, split over EP: each GPU's ep-th of them is replicated over expert-DP = dp / ep
    # ranks (no gradient reduction at expert-DP 1)
    e_layers = sum(e.symbol == "E" for e in nam.layer_table()) + (1 if nam.mtp_depth else 0)
    experts = e_layers * nam.moe.num_experts * 3 * nam.hidden_size * nam.moe.ffn_hidden_size
    total = sum(layer_params(nam, e) for e in nam.layer_table()) + sum(embedding_params(nam).values())
    dense = total - experts
    expert_dp = max(1, args.dp // ep)
    tokens_per_step = args.gbs_8x * nam.seq_length / args.dp
    grad_bytes = (dense * (args.dp - 1) / args.dp + experts / ep * (expert_dp - 1) / expert_dp) * (4 + 2)
    grad = grad_bytes / (args.allreduce_gbps * 1e9) * (1 - args.grad_overlap) / tokens_per_step
    # with EP > 1 the dispatcher reads the per-expert counts on the host at every E pass (the
    # all-to-all's split sizes), which the one-GPU slices skip: their cost per E pass is measured
    # as stage12 with the host's counts against stage12
    e_in_12 = sum(e.symbol == "E" for e in nam.replace(num_layers=12).layer_table())
    host_measured = ep > 1 and "stage12_host_counts" in tps
    host_counts = 0.0
    if host_measured:
        host_counts = max(0.0, (1 / tps["stage12_host_counts"] - 1 / tps["stage12"]) / e_in_12 * e_passes)
    per_token = compute + a2a + grad + host_counts
    tokens = 1 / per_token
    return {
        "seconds_per_token": {"period_12_layers": period, "aeme": aeme, "head": head, "mtp_depth_2": mtp,
                              "trunk_52_layers": trunk, "all_to_all": a2a, "gradient_sync": grad,
                              "host_counts": host_counts},
        "slices": list(used),
        "checks": check,
        "tokens_per_s_per_gpu": tokens,
        "tflops_hybrid_per_gpu": tokens * hybrid_flops_per_token(nam)["total"] / 1e12,
        "tflops_ours_per_gpu": tokens * flops_per_token(nam, causal=True)["total"] / 1e12,
        "assumptions": [
            f"TP 1, PP 1, EP {ep}, DP {args.dp}, global batch {args.gbs_8x} x {nam.seq_length}",
            "balanced routing: each GPU's expert FLOPs per token equal the one-GPU slice's",
            (f"optimizer: each slice's optimizer kernels (its profiled step) sharded {args.dp} ways, as the "
             "distributed optimizer does (each GPU updates total/dp parameters at every EP)" if sharded
             else f"optimizer: unsharded, as in the one-GPU slices (no profiled step of each of "
                  f"{', '.join(used)}; an overestimate of its share on 8 GPUs)"),
            ("layers additive: trunk + head = t12 + 3 x (t12 + t8 - 2 t4) + (t8 - t4) (t12: the head and "
             "the first period, layers 0-3 without MoD; t8 - t4: a MoD AEME); head alone ~ 2 t4 - t8 "
             "(layers 0-3 costing what 4-7 do); MTP = t12mtp - t12" if short else
             "trunk = 4 x (t24 - t12) + AEME scaled from a period by hybrid FLOPs; head = 2 t12 - t24 "
             "(embedding, output layer, loss, optimizer share); MTP = t12mtp - t12"),
            f"all-to-all: 4 x {e_passes} E passes x top-{nam.moe.topk} x h x 2 B x {ep - 1}/{ep} "
            f"per token at {args.a2a_gbps} GB/s, {args.a2a_overlap:.0%} hidden",
            f"gradient sync: ({dense / 1e9:.2f}B dense params x {args.dp - 1}/{args.dp} + "
            f"{experts / ep / 1e9:.2f}B expert params per GPU x {expert_dp - 1}/{expert_dp} (expert-DP "
            f"{expert_dp})) x (4 B reduce-scatter + 2 B all-gather) per step at {args.allreduce_gbps} GB/s, "
            f"{args.grad_overlap:.0%} hidden",
            (f"MoE counts read on the host at each of {e_passes} E passes (EP > 1): per pass "
             f"(t(stage12_host_counts) - t12) / {e_in_12}" if host_measured
             else "MoE counts on the device (EP 1)" if ep == 1
             else "MoE counts' host read at EP > 1 NOT included (no stage12_host_counts run)"),
            f"the stage slices ran at micro-batch {args.mbs} and {args.gbs} x {nam.seq_length} tokens "
            f"per optimizer step, as one GPU of the 8-GPU recipe at micro-batch {args.mbs} "
            f"({args.gbs_8x} x {nam.seq_length} / {args.dp} tokens per GPU and step)",
        ],
    }


def layout_memory(ep: int, args, peaks: dict[str, float]) -> dict:
    """GiB per GPU of the whole NAM56R at TP 1, PP 1, EP ``ep``, DP ``--dp``, micro-batch ``--mbs``:
    the plan's estimate (``models/plan.py``: weights, fp32 grads, sharded optimizer, activations)
    plus what it leaves out (logits, workspaces, the allocator's slack), measured as the
    ``stage12_mtp`` run's peak less the plan's estimate for that slice on one GPU."""
    from megacpp_mcore.models.plan import build_plan

    nam = get_preset("nam56r")
    estimate = build_plan(nam, ep=ep, dp=args.dp, micro_batch=args.mbs)["memory"]["total"] / 2**30
    unmodelled = None
    if peaks.get("stage12_mtp") is not None:
        sliced = build_plan(nam.replace(num_layers=12), ep=1, dp=1, micro_batch=args.mbs)["memory"]["total"]
        unmodelled = max(0.0, peaks["stage12_mtp"] - sliced / 2**30)
    total = None if unmodelled is None else estimate + unmodelled
    return {"estimate_gib": estimate, "unmodelled_gib": unmodelled, "total_gib": total,
            "fits": None if total is None else total <= args.gpu_gib}


def layouts(tps: dict[str, float], peaks: dict[str, float], args,
            optimizer: dict[str, float] | None = None) -> list[dict]:
    """The projection and the memory of each expert-parallel size that divides both ``--dp`` and
    the experts (EP 8, 4, 2, 1 on 8 GPUs), largest EP first."""
    experts = get_preset("nam56r").moe.num_experts
    rows = []
    for ep in (ep for ep in range(args.dp, 0, -1) if args.dp % ep == 0 and experts % ep == 0):
        proj = projection(tps, args, ep=ep, optimizer=optimizer)
        if proj is None:
            return []
        rows.append({"ep": ep, "tokens_per_s_per_gpu": proj["tokens_per_s_per_gpu"],
                     "tflops_hybrid_per_gpu": proj["tflops_hybrid_per_gpu"],
                     "seconds_per_token": proj["seconds_per_token"], "memory": layout_memory(ep, args, peaks)})
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(rows: list[dict], args) -> dict:
    print("\n| run | rc | start-up s | autotune s | ms/iter (p25-p75) | tokens/s | TFLOP/s ours | TFLOP/s hybrid "
          "| Megatron's | peak GiB | loss first -> last |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        spread = r.get("ms_p25_p75")
        iqr = f" ({spread[0]:.0f}-{spread[1]:.0f})" if spread else ""
        print(f"| {r['name']} | {r['returncode']} | {_fmt(r['startup_s'], '.1f')} | {r['autotune_s']:.1f} "
              f"| {_fmt(r['ms_per_iteration'], '.1f')}{iqr} | {_fmt(r['tokens_per_s'], ',.0f')} "
              f"| {_fmt(r['tflops_ours'], '.1f')} | {_fmt(r['tflops_hybrid'], '.1f')} "
              f"| {_fmt(r['megatron_reported_tflops'], '.1f')} | {_fmt(r['peak_gib'], '.1f')} "
              f"| {_fmt(r['loss_first'], '.3f')} -> {_fmt(r['loss_last'], '.3f')} |")
    tps = _median_by_base(rows, "tokens_per_s")
    out: dict = {"median_tokens_per_s": tps, "ratios": {}}
    pooled = {name: [ms for run in runs for ms in run] for name, runs in _by_base(rows, "ms_steady").items()}
    # each of our runs against each upstream run (a like pair first: ab_ours/ab_upstream, then
    # ab_ours_fused/ab_upstream_te_ce, both with a fused LM loss), ours fused over unfused, and the
    # MoE device counts (the default) over the host's
    pairs = [(a, b) for a in ("ab_ours", "ab_ours_fused", "ab_ours_host_counts")
             for b in ("ab_upstream", "ab_upstream_te_ce")]
    pairs += [("ab_ours_fused", "ab_ours"), ("ab_ours_fused", "ab_ours_host_counts")]
    for a, b in pairs:
        if a not in tps or b not in tps:
            continue
        key = f"{a}_over_{b[3:]}"
        out["ratios"][key] = tps[a] / tps[b]
        line = f"{a[3:]}/{b[3:]} tokens/s = {out['ratios'][key]:.3f} (median over repeats)"
        if len(pooled.get(a, [])) >= 2 and len(pooled.get(b, [])) >= 2:
            point, low, high = ratio_interval(pooled[a], pooled[b])
            out["ratios"][f"{key}_pooled"] = {"ratio": point, "ci90": [low, high]}
            line += (f"; pooled iterations ({len(pooled[a])} / {len(pooled[b])}): {point:.3f}, 90% "
                     f"bootstrap interval {low:.3f}-{high:.3f}{'' if low > 1 or high < 1 else ' (includes 1)'}")
        print(line)
    peaks = _median_by_base(rows, "peak_gib")
    for name in tps:
        ref = STAGE_VARIANTS.get(name, ("stage12",))[0]
        if name.startswith("stage12_") and name != "stage12_mtp" and ref in tps:
            out["ratios"][name] = tps[name] / tps[ref]
            line = f"{name}: {out['ratios'][name]:.3f} x the {ref} tokens/s"
            if name in STAGE_VARIANTS and peaks.get(name) is not None and peaks.get(ref) is not None:
                line += f", peak {peaks[name]:.1f} GiB (the {ref} run's: {peaks[ref]:.1f})"
            print(line)
    hybrid = _median_by_base(rows, "tflops_hybrid")
    if "stage12" in hybrid:
        print(f"full-width NAM56R stage (12 layers): {hybrid['stage12']:.1f} TFLOP/s by hybrid_flops "
              "(target >= 350)")
    starts = _median_by_base(rows, "startup_s")
    if "startup_cold" in starts:
        print(f"nam56r-lite start-up to the first step: cold {starts['startup_cold']:.1f} s, warm "
              f"{_fmt(starts.get('startup_warm'), '.1f')} s (target <= 60)")
    profiled = [r for r in rows if r.get("profile") and "error" not in r["profile"]]
    if profiled:
        cats = sorted({c for r in profiled for c in r["profile"]["categories"]},
                      key=lambda c: -max(r["profile"]["categories"].get(c, {"ms": 0})["ms"] for r in profiled))
        print("\nprofiled step (device ms): | run | span | busy | idle | " + " | ".join(cats) + " |")
        for r in profiled:
            prof = r["profile"]
            print(f"| {r['name']} | {prof['span_ms']:.1f} | {prof['busy_ms']:.1f} | {prof['idle_ms']:.1f} | "
                  + " | ".join(f"{prof['categories'].get(c, {'ms': 0})['ms']:.1f}" for c in cats) + " |")
    optimizer = optimizer_seconds_per_token(rows, args)
    proj = projection(tps, args, optimizer=optimizer)
    if proj:
        out["projection_8xh200"] = proj
        device = getattr(args, "device", None)
        print(f"\nprojection, whole NAM56R on 8 x H200: {proj['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
              f"{proj['tflops_hybrid_per_gpu']:.0f} TFLOP/s/GPU by hybrid_flops "
              f"({proj['tflops_ours_per_gpu']:.0f} ours); target >= 12,000 tokens/s/GPU; from the slices "
              f"{', '.join(proj['slices'])}" + (f" as measured on {device}" if device else ""))
        for name, seconds in proj["seconds_per_token"].items():
            print(f"  {name}: {seconds * 1e6:.1f} us/token")
        for name, check in (proj["checks"] or {}).items():
            print(f"  check: {name} measured {check['measured'] * 1e6:.1f} us/token, the short slices "
                  f"predict {check['predicted'] * 1e6:.1f} "
                  f"(measured/predicted {check['measured_over_predicted']:.3f})")
        for line in proj["assumptions"]:
            print(f"  assumption: {line}")
        out["layouts_8xh200"] = _print_layouts(layouts(tps, peaks, args, optimizer), args, "")
        if "stage12_mtp_recompute" in tps:  # the same with the MTP block recomputed, as measured
            replaced = STAGE_VARIANTS["stage12_mtp_recompute"][0]

            def swapped(values: dict) -> dict:
                return {k: values[v] for k in values
                        if (v := "stage12_mtp_recompute" if k == replaced else k) in values}

            table = layouts(swapped(tps), swapped(peaks), args, swapped(optimizer))
            out["layouts_8xh200_mtp_recompute"] = _print_layouts(
                table, args, " with --megacpp-mtp-recompute on (the stage12_mtp_recompute run in place of stage12_mtp)")
    return out


def _print_layouts(table: list[dict], args, variant: str) -> list[dict]:
    print(f"\nlayouts on 8 x H200{variant} (TP 1, PP 1, DP {args.dp}, micro-batch {args.mbs}; memory: the "
          f"plan's estimate + what the stage12_mtp run measured beyond it; fits: <= --gpu-gib {args.gpu_gib}):")
    print("| EP | all-to-all us | grad sync us | host counts us | total us/token | tokens/s/GPU "
          "| TFLOP/s hybrid | GiB (estimate + measured rest) | fits |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in table:
        t, mem = row["seconds_per_token"], row["memory"]
        print(f"| {row['ep']} | {t['all_to_all'] * 1e6:.1f} | {t['gradient_sync'] * 1e6:.1f} "
              f"| {t['host_counts'] * 1e6:.1f} | {1e6 / row['tokens_per_s_per_gpu']:.1f} "
              f"| {row['tokens_per_s_per_gpu']:,.0f} | {row['tflops_hybrid_per_gpu']:.0f} "
              f"| {_fmt(mem['total_gib'], '.1f')} ({mem['estimate_gib']:.1f} + "
              f"{_fmt(mem['unmodelled_gib'], '.1f')}) | {_fmt(mem['fits'], '')} |")
    fitting = [row for row in table if row["memory"]["fits"]]
    if fitting:
        best = max(fitting, key=lambda row: row["tokens_per_s_per_gpu"])
        print(f"fastest layout that fits: EP {best['ep']}, {best['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU "
              f"(the recipe's: EP {args.ep})")
    return table


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"),
                   help="Megatron-LM checkout (core_v0.16.1 or core_v0.19.0; default $MEGATRON_LM)")
    p.add_argument("--set", default="ab,stage", help=f"comma-separated, of: {', '.join(SETS)}")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the ab runs")
    p.add_argument("--ab-runs", default="ours,upstream",
                   help=f"the ab runs of each repeat, in order, of: {', '.join(AB_RUNS)} (ours: "
                        "--megacpp-fused-lm-loss off, upstream's loss; ours_fused: the launcher's "
                        "default fused LM loss; upstream_te_ce: upstream with TE's fused CE; "
                        "ours_host_counts: ours_fused with --megacpp-moe-device-counts off)")
    p.add_argument("--stage-repeats", type=int, default=1, help="repeats of the stage runs")
    p.add_argument("--iters", type=int, default=8, help="training iterations per run")
    p.add_argument("--warmup", type=int, default=3, help="iterations left out of the timing")
    p.add_argument("--mbs", type=int, default=4, help="micro-batch (the 8x recipe's)")
    p.add_argument("--gbs", type=int, default=8, help="global batch of the one-GPU runs")
    p.add_argument("--fast", action="append", default=[], metavar="NAME=VALUE",
                   help=f"one more stage12 run with this fast path set; names: {', '.join(FAST_PATHS)}")
    p.add_argument("--base", action="append", default=[], metavar="NAME=VALUE",
                   help="change a fast path's setting for every run (ours and upstream's)")
    p.add_argument("--stage-slices", default="12,4,8",
                   help="layer counts of the stage set's slices, prefixes of the pattern (of: "
                        f"{', '.join(map(str, STAGE_SLICES))}; 12 always; 4 and 8 give the projection, 16 "
                        "and 24 check it on an H200 (on an H100, 16 at --mbs 2)")
    p.add_argument("--mtp-recompute", action="store_true",
                   help="the stage set also runs stage12_mtp with --megacpp-mtp-recompute on "
                        "(stage12_mtp_recompute: the recipe's MTP_RECOMPUTE=1) and projects the layouts with it")
    p.add_argument("--stage-spec", default="NAM56R",
                   help="object of layer_specs/nam56r.py for the stage runs (NAM56R_DENSE: without MoD)")
    p.add_argument("--ours-extra", default="", help="extra Megatron-LM flags for our runs (one string)")
    p.add_argument("--triton-cache", help="TRITON_CACHE_DIR for the runs (persistent; default Triton's)")
    p.add_argument("--no-autotune-cache", dest="autotune_cache", action="store_false",
                   help="do not set TRITON_CACHE_AUTOTUNING=1 (autotune in every launch)")
    p.add_argument("--print-autotuning", action="store_true",
                   help="TRITON_PRINT_AUTOTUNING=1: sum the autotuning seconds per run")
    p.add_argument("--run-timeout", type=float, default=420, help="seconds before a run is stopped")
    p.add_argument("--ep", type=int, default=1,
                   help="the 8-GPU recipe's expert parallelism (its headline projection)")
    p.add_argument("--dp", type=int, default=8)
    p.add_argument("--gbs-8x", type=int, default=64, help="global batch of the 8-GPU recipe")
    p.add_argument("--a2a-gbps", type=float, default=300.0, help="assumed all-to-all GB/s per GPU")
    p.add_argument("--a2a-overlap", type=float, default=0.0, help="fraction of all-to-all hidden")
    p.add_argument("--allreduce-gbps", type=float, default=300.0, help="assumed gradient-sync GB/s")
    p.add_argument("--gpu-gib", type=float, default=134.0,
                   help="memory a layout may use per GPU (H200: 140 GiB less ~6 for the CUDA context, "
                        "NCCL buffers and fragmentation)")
    p.add_argument("--grad-overlap", type=float, default=0.0, help="fraction of gradient sync hidden")
    p.add_argument("--out", help="write the results as JSON here (rewritten after every run, so a "
                                   "call cut at its deadline keeps the runs it finished)")
    p.add_argument("--resume", metavar="JSON",
                   help="the --out of an earlier call with the same settings: its finished runs are "
                        "kept, not run again (the stage set over two device calls)")
    p.add_argument("--profile-step", type=int, default=0, metavar="N",
                   help="profile iteration N of every run (Megatron's --profile --use-pytorch-profiler) and "
                        "keep a summary of where its device time went (scripts/trace_summary.py); "
                        "iterations N-1..N+2 leave the timing")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    raw_slices = args.stage_slices
    if not args.megatron_lm:
        raise BenchError("--megatron-lm PATH (or MEGATRON_LM) is required")
    args.megatron_lm = lp.check_checkout(args.megatron_lm)
    args.set = [s for s in args.set.split(",") if s]
    unknown = [s for s in args.set if s not in SETS]
    if unknown or not args.set:
        raise BenchError(f"--set {','.join(args.set)}: unknown {unknown or 'empty'}; allowed: {', '.join(SETS)}")
    args.ab_runs = [r for r in args.ab_runs.split(",") if r]
    bad = [r for r in args.ab_runs if r not in AB_RUNS]
    if bad or not args.ab_runs or len(set(args.ab_runs)) < len(args.ab_runs):
        raise BenchError(f"--ab-runs {','.join(args.ab_runs)}: {'unknown ' + ', '.join(bad) if bad else 'empty or repeated'}"
                         f"; allowed (each once): {', '.join(AB_RUNS)}")
    if args.profile_step and not 1 <= args.profile_step < args.iters:
        raise BenchError(f"--profile-step {args.profile_step}: must be in 1..{args.iters - 1} (--iters {args.iters})")
    if args.iters <= args.warmup:
        raise BenchError(f"--iters {args.iters} must exceed --warmup {args.warmup}")
    for name in ("repeats", "stage_repeats", "mbs", "gbs", "ep", "dp", "gbs_8x"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.gbs % args.mbs:
        raise BenchError(f"--gbs {args.gbs} is not a multiple of --mbs {args.mbs}")
    if args.gpu_gib <= 0:
        raise BenchError(f"--gpu-gib {args.gpu_gib}: must be > 0 (GiB a layout may use per GPU)")
    for name in ("a2a_overlap", "grad_overlap"):
        if not 0 <= getattr(args, name) <= 1:
            raise BenchError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    try:
        args.stage_slices = sorted({int(n) for n in args.stage_slices.split(",") if n.strip()})
    except ValueError:
        args.stage_slices = None
    if (not args.stage_slices or 12 not in args.stage_slices
            or not set(args.stage_slices) <= set(STAGE_SLICES)):
        raise BenchError(f"--stage-slices {raw_slices}: allowed: layer counts from "
                         f"{', '.join(map(str, STAGE_SLICES))}, comma-separated, 12 among them")
    args.ours_extra = shlex.split(args.ours_extra)
    if args.stage_spec not in ("NAM56R", "NAM56R_DENSE"):
        raise BenchError(f"--stage-spec {args.stage_spec}: allowed: NAM56R, NAM56R_DENSE (MLA on every A)")
    args.base = parse_settings(args.base, "--base")
    args.fast = parse_settings(args.fast, "--fast")
    if args.fast and not {"stage", "fast"} & set(args.set):
        raise BenchError("--fast runs variants of the stage slice: add --set stage or --set fast")
    base = base_settings(args)
    ours_only = [f"{n}={v}" for n, v in args.base if n in OURS_ONLY and v != FAST_PATHS[n][0]]
    if ours_only and "ab" in args.set:
        raise BenchError(f"--base {ours_only[0]}: ours only (upstream's scripts have no such flag), so "
                         "not for the ab set (ours runs upstream's loss there, ours_fused the fused one); "
                         "--ab-runs ours_fused,upstream_te_ce compare fused losses")
    same = [f"{n}={v}" for n, v in args.fast if base[n] == v]
    if same:
        raise BenchError(f"--fast {same[0]}: that is already every run's setting (the default or "
                         "--base); give the other value to measure")
    args.log_dir = Path(os.environ.get("OUT", REPO / "runs" / "bench_stage"))
    args.resumed = _resumed_rows(args) if args.resume else []
    return args


# settings an earlier call must share for its runs to be kept by --resume
RESUME_SETTINGS = ("megatron_lm", "set", "ab_runs", "profile_step", "repeats", "stage_repeats", "iters", "warmup", "mbs", "gbs",
                   "fast", "base", "stage_spec", "ours_extra")


def _settings(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
            if k not in ("resumed", "log_dir")}


def _resumed_rows(args) -> list[dict]:
    """The finished runs of ``--resume``'s JSON; BenchError for a file that is not one, or one
    written with other settings (named)."""
    path = Path(args.resume)
    try:
        earlier = json.loads(path.read_text())
        rows, settings = earlier["runs"], earlier["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"--resume {path}: not a bench_stage --out file ({type(exc).__name__}: {exc})")
    now = json.loads(json.dumps(_settings(args)))  # lists and tuples as JSON has them
    differ = [k for k in RESUME_SETTINGS if settings.get(k) != now.get(k)]
    if differ:
        raise BenchError(f"--resume {path}: written with other settings ({', '.join(differ)}); "
                         "resume with the same flags")
    return [row for row in rows if row.get("returncode") == 0]


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        runs = plan_runs(args)
    except (BenchError, lp.LaunchError) as exc:
        print(f"bench_stage: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for run in runs:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in run_env(run, args).items())
            print(f"# {run.name}\nenv {env} {shlex.join(run.command)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench_stage: error: no CUDA device; run on the H200 (--dry-run prints the commands)",
              file=sys.stderr)
        return 2
    args.log_dir.mkdir(parents=True, exist_ok=True)
    rows = list(args.resumed)
    done = {row["name"] for row in rows}
    if done:
        print(f"[resume] kept {len(done)} finished runs of {args.resume}: {', '.join(sorted(done))}",
              flush=True)
    for run in runs:
        if run.name in done:
            continue
        execute(run, args, args.log_dir)
        rows.append(summarize(run, args))
        if run.trace_dir is not None:
            rows[-1]["profile"] = profile_summary(run)
        if args.out:  # after every run: a call cut at its deadline keeps what it finished
            _write(args.out, {"runs": rows, "complete": False, "settings": _settings(args)})
    args.device = torch.cuda.get_device_name()
    result = {"runs": rows, "complete": True, **report(rows, args), "settings": _settings(args),
              "device": args.device}
    if args.out:
        _write(args.out, result)
        print(f"wrote {args.out}")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


def _write(path: str, result: dict) -> None:
    """Writes ``result`` as JSON through a temporary file, so that ``path`` is never half-written."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
