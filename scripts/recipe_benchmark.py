"""Runs a recipe through Megatron-LM's ``pretrain_gpt.py`` on this host and summarizes it.

    python scripts/recipe_benchmark.py --megatron-lm ~/Megatron-LM --recipe lite --iters 50 \
        --compare-upstream --out lite.json
    python scripts/recipe_benchmark.py --megatron-lm ~/Megatron-LM --recipe 8x --iters 20 --out 8x.json

For each run: iterations completed, first/last LM loss (and whether it fell), median ms/iteration
after ``--warmup`` iterations, tokens/s/GPU and model TFLOP/s/GPU (formula below), peak memory when
Megatron logs it. ``--compare-upstream`` (lite, one GPU) adds a side-by-side A/B of the same
attention+MoE trunk built two ways in ONE invocation: our spec (``NAM56R_LITE_AE``, pattern ``AE`` at
2L sub-layers, through the launcher) and Megatron-LM's own GPT spec (L layers, stock
``pretrain_gpt.py``); same parameters and math, so the step-time ratio measures our spec's overhead
(expected ~1.0) and the losses should track each other.

Model FLOPs per token, two ways (``megacpp_mcore.models.accounting.flop_counts``; training = 3 x
forward): ours, ``flops_per_token(model, causal=True)``: 6 x the matmul parameters a token passes
through (attention projections, the top-k routed experts + shared expert + router, dense MLPs,
mixer projections, the output layer, and per MTP depth the shared block + its projection + the
output layer) + causal attention scores/values per ``A`` layer (seq/2 keys on average); and
Megatron-Bridge's ``hybrid_flops`` convention (``hybrid_flops_per_token``), the count behind the
public NAM56R's 289 TFLOP/s/GPU.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megacpp_mcore.models.accounting import flop_counts  # noqa: E402
from megacpp_mcore.models.presets import ModelConfig, get_preset  # noqa: E402

RECIPES = {
    "lite": ("nam56r_lite_1xh200.sh", "nam56r-lite"),
    "8x": ("nam56r_8xh200.sh", "nam56r"),
}


def ae_trunk(preset: ModelConfig, depth: int) -> ModelConfig:
    """The A/E trunk of the ``--compare-upstream`` A/B: ``depth`` upstream layers = ``2 * depth``
    of our A/E sub-layers, without MLA, MTP or other features."""
    return preset.replace(pattern="AE", num_layers=2 * depth, mla=None, mtp_depth=0, features={})


@dataclasses.dataclass
class RunSummary:
    name: str
    command: list[str]
    returncode: int
    iterations: int
    losses: list[float]
    ms_per_iteration: float | None
    tokens_per_s_per_gpu: float | None
    tflops_per_gpu: float | None  # ours: 6 x active matmul params + causal attention
    hybrid_tflops_per_gpu: float | None  # Megatron-Bridge's hybrid_flops convention
    peak_memory_gib: float | None
    log: str

    @property
    def loss_fell(self) -> bool:
        k = min(5, len(self.losses) // 2)
        return k > 0 and sum(self.losses[-k:]) / k < sum(self.losses[:k]) / k


def parse_log(text: str) -> tuple[list[float], list[float], float | None]:
    """(LM losses, ms per iteration, peak allocated GiB) from Megatron's iteration log lines."""
    losses = [float(x) for x in re.findall(r"\blm loss: ([0-9.Ee+-]+)", text)]
    times = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", text)]
    peaks = [float(x) for x in re.findall(r"max allocated: ([0-9.]+)", text)]  # MB, memory report
    return losses, times, (max(peaks) / 1024 if peaks else None)


def flag(tokens: list[str], name: str) -> str:
    if name not in tokens:
        raise SystemExit(f"error: the command has no {name}: {shlex.join(tokens)}")
    return tokens[tokens.index(name) + 1]


def summarize(name: str, tokens: list[str], proc: subprocess.CompletedProcess, *, gpus: int,
              warmup: int, fpt: dict[str, float]) -> RunSummary:
    """``fpt``: training FLOPs per token, ``ours`` and ``hybrid`` (:func:`flop_counts`)."""
    log = proc.stdout + proc.stderr
    losses, times, peak = parse_log(log)
    steady = times[warmup:] or times
    ms = statistics.median(steady) if steady else None
    tokens_per_step = int(flag(tokens, "--global-batch-size")) * int(flag(tokens, "--seq-length"))
    tps = tokens_per_step / (ms / 1000) / gpus if ms else None
    return RunSummary(name=name, command=tokens, returncode=proc.returncode, iterations=len(losses),
                      losses=losses, ms_per_iteration=ms, tokens_per_s_per_gpu=tps,
                      tflops_per_gpu=tps * fpt["ours"] / 1e12 if tps else None,
                      hybrid_tflops_per_gpu=tps * fpt["hybrid"] / 1e12 if tps else None, peak_memory_gib=peak,
                      log=log[-4000:])


def recipe_tokens(recipe: str, env: dict[str, str]) -> list[str]:
    proc = subprocess.run(["bash", str(REPO / "recipes" / recipe), "--dry-run"],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"error: {recipe} --dry-run failed:\n{proc.stderr}")
    return shlex.split(proc.stdout)


def run(name: str, tokens: list[str], env: dict[str, str], log_dir: Path, **kw) -> RunSummary:
    print(f"[{name}] {shlex.join(tokens)}", flush=True)
    proc = subprocess.run(tokens, capture_output=True, text=True, env=env)
    (log_dir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    summary = summarize(name, tokens, proc, **kw)
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, log {log_dir / (name + '.log')})"
    print(f"[{name}] {status}: {summary.iterations} iterations", flush=True)
    if proc.returncode:
        print(summary.log[-3000:], flush=True)
    return summary


def _drop(tokens: list[str], name: str, values: int) -> list[str]:
    if name not in tokens:
        return tokens
    i = tokens.index(name)
    return tokens[:i] + tokens[i + 1 + values:]


def _set(tokens: list[str], name: str, value: str) -> list[str]:
    out = list(tokens)
    out[out.index(name) + 1] = value
    return out


def ab_commands(lite: list[str], megatron_lm: str) -> tuple[list[str], list[str], int]:
    """(ours, upstream, upstream depth): the lite recipe's command turned into the AE trunk A/B."""
    base = lite
    for name, n in (("--multi-latent-attention", 0), ("--q-lora-rank", 1), ("--kv-lora-rank", 1),
                    ("--qk-head-dim", 1), ("--qk-pos-emb-head-dim", 1), ("--v-head-dim", 1),
                    ("--megacpp-mtp-depth", 1), ("--megacpp-fused-lm-loss", 1), ("--save", 1),
                    ("--save-interval", 1)):
        base = _drop(base, name, n)
    depth = int(flag(base, "--num-layers"))
    ours = _set(_set(base, "--num-layers", str(2 * depth)), "--spec", "layer_specs.nam56r_lite")
    ours[ours.index("--spec") + 2] = "NAM56R_LITE_AE"
    ours += ["--megacpp-fused-lm-loss", "off"]  # GPTModel's loss, as upstream's (the launcher's default is fused)
    start = ours.index("-m")  # torchrun ... -m megacpp_mcore.upstream.launch_pretrain --megatron-lm PATH
    upstream = base[:start] + [str(Path(megatron_lm) / "pretrain_gpt.py")] + base[start + 4:]
    upstream = _drop(upstream, "--spec", 2)
    return ours, upstream, depth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"),
                        required=not os.environ.get("MEGATRON_LM"), help="Megatron-LM checkout at tag core_v0.16.1 (or MEGATRON_LM)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="lite")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5, help="iterations left out of the timing")
    parser.add_argument("--compare-upstream", action="store_true",
                        help="also run the AE-trunk A/B: our spec vs Megatron's GPT spec (lite only)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.iters <= args.warmup:
        parser.error(f"--iters {args.iters} must exceed --warmup {args.warmup}")
    if args.compare_upstream and args.recipe != "lite":
        parser.error("--compare-upstream runs on one GPU with the lite recipe")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; this script measures on the H200 (Megatron-LM's "
                         "pretrain_gpt.py needs CUDA). For CPU use recipes/nam56r_tiny_cpu.sh")
    recipe, preset_name = RECIPES[args.recipe]
    preset = get_preset(preset_name)
    log_dir = Path(os.environ.get("OUT", REPO / "runs" / f"recipe_benchmark_{args.recipe}"))
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MEGATRON_LM": args.megatron_lm, "ITERS": str(args.iters), "OUT": str(log_dir)}
    tokens = recipe_tokens(recipe, env)
    gpus = int(flag(tokens, "--nproc-per-node"))
    runs = [run(args.recipe, tokens, env, log_dir, gpus=gpus, warmup=args.warmup,
                fpt=flop_counts(preset))]
    if args.compare_upstream:
        ours, upstream, depth = ab_commands(tokens, args.megatron_lm)
        fpt = flop_counts(ae_trunk(preset, depth))
        runs.append(run("ae_trunk_ours", ours, env, log_dir, gpus=gpus, warmup=args.warmup, fpt=fpt))
        runs.append(run("ae_trunk_upstream", upstream, env, log_dir, gpus=gpus, warmup=args.warmup, fpt=fpt))
    print_table(runs)
    if args.out:
        Path(args.out).write_text(json.dumps(
            [dataclasses.asdict(r) | {"loss_fell": r.loss_fell} for r in runs], indent=1))
        print(f"wrote {args.out}")
    return 0 if all(r.returncode == 0 and r.loss_fell for r in runs) else 1


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(runs: list[RunSummary]) -> None:
    print("\n| run | iters | loss first -> last | fell | ms/iter | tokens/s/GPU | TFLOP/s/GPU ours "
          "| TFLOP/s/GPU hybrid_flops | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        loss = f"{r.losses[0]:.3f} -> {r.losses[-1]:.3f}" if r.losses else "-"
        print(f"| {r.name} | {r.iterations} | {loss} | {'yes' if r.loss_fell else 'NO'} | "
              f"{_fmt(r.ms_per_iteration, '.1f')} | {_fmt(r.tokens_per_s_per_gpu, ',.0f')} | "
              f"{_fmt(r.tflops_per_gpu, '.1f')} | {_fmt(r.hybrid_tflops_per_gpu, '.1f')} | "
              f"{_fmt(r.peak_memory_gib, '.1f')} |")
    named = {r.name: r for r in runs}
    ours, up = named.get("ae_trunk_ours"), named.get("ae_trunk_upstream")
    if ours and up and ours.ms_per_iteration and up.ms_per_iteration:
        print(f"\nAE trunk step-time ratio ours/upstream: {ours.ms_per_iteration / up.ms_per_iteration:.3f}"
              f" (expected ~1.0); final loss ours {ours.losses[-1]:.4f} vs upstream {up.losses[-1]:.4f}")
    if "8x" in named and named["8x"].hybrid_tflops_per_gpu:
        print(f"8xH200: {named['8x'].hybrid_tflops_per_gpu:.1f} TFLOP/s/GPU by hybrid_flops (ours "
              f"{named['8x'].tflops_per_gpu:.1f}) vs the public NAM56R figure 289 (hybrid_flops)")


if __name__ == "__main__":
    sys.exit(main())
