"""nam56r-lite with its shipped MoD through Megatron-LM's ``pretrain_gpt.py`` on one GPU (issue 16).

    MEGATRON_LM=.gpu/mlm16 python scripts/bench_mod_pretrain.py      # Python 3.11, megatron-core 0.16.1
    MEGATRON_LM=.gpu/mlm19 python3.12 scripts/bench_mod_pretrain.py  # Python 3.12, megatron-core 0.19.x

Three runs of ``recipes/nam56r_lite_1xh200.sh`` (mock data, no checkpoint save), in this order:

* ``dense``: ``SPEC=NAM56R_LITE_DENSE`` through the launcher, ``--iters`` iterations (default 30);
* ``mod``: ``SPEC=NAM56R_LITE`` (the shipped MoD: gateskip on layers 3, 4, 5, 7, 8, 9, token budget
  1.0 -> 0.8 over ``--train-iters``) through the launcher, ``--iters`` iterations;
* ``mod-stock``: the same spec through the checkout's own ``pretrain_gpt.py`` without the launcher
  (no patches; no MTP, which needs the launcher), ``--stock-iters`` iterations (default 10; 0
  skips it): what a user without the launcher sees (docs/upstream.md, "MoD under pretrain_gpt.py").

Each log is kept under ``OUT`` (default ``runs/bench_mod_pretrain``). Printed last: per run, the
iteration lines that carry MoD statistics, the budget and gate mean first -> last, the last
fraction processed and sparsity loss, the median ms/iteration after ``--warmup`` iterations and the
step-time ratio against ``dense`` (target: ``mod`` <= 1.05), then the checks: MoD statistics on
every iteration line of ``mod``, its budget decaying from 1.0 to 0.8. Exit status 0 when the
launcher runs pass those checks and the ratio target.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from recipe_benchmark import _drop, _set, recipe_tokens  # noqa: E402

RECIPE = "nam56r_lite_1xh200.sh"
# one iteration line of Megatron-LM's training_log: "iteration   12/  30 | ... |"
ITERATION = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|(.*)")
METRIC = re.compile(r"\b(mod_\w+): ([0-9.Ee+-]+) \|")
ELAPSED = re.compile(r"elapsed time per iteration \(ms\): ([0-9.]+)")


def parse_iterations(log: str) -> list[dict]:
    """Per iteration line: ``iteration``, ``ms`` and the ``mod_*`` values it prints (core_v0.16:
    among the losses as ``%.6E``; core_v0.18+: non-loss metrics as ``%.2f`` at the end)."""
    rows = []
    for line in log.splitlines():
        match = ITERATION.search(line)
        if not match:
            continue
        ms = ELAPSED.search(line)
        rows.append({"iteration": int(match.group(1)), "ms": float(ms.group(1)) if ms else None,
                     **{k: float(v) for k, v in METRIC.findall(match.group(2))}})
    return rows


def commands(megatron_lm: str, iters: int, stock_iters: int, env: dict) -> dict[str, list[str]]:
    """The recipe's command per run: no checkpoint save; ``mod-stock`` through pretrain_gpt.py."""
    out = {}
    for name, spec in (("dense", "NAM56R_LITE_DENSE"), ("mod", "NAM56R_LITE")):
        tokens = recipe_tokens(RECIPE, {**env, "SPEC": spec, "ITERS": str(iters)})
        out[name] = _drop(_drop(tokens, "--save", 1), "--save-interval", 1)
    if stock_iters:
        tokens = _set(out["mod"], "--train-iters", str(stock_iters))
        tokens = _set(tokens, "--eval-interval", str(stock_iters))
        # Megatron's scheduler needs warm-up < decay iterations (= --train-iters here)
        warmup = int(tokens[tokens.index("--lr-warmup-iters") + 1])
        tokens = _set(tokens, "--lr-warmup-iters", str(min(warmup, stock_iters - 1)))
        start = tokens.index("-m")  # torchrun ... -m megacpp_mcore.launch_pretrain --megatron-lm PATH
        tokens = tokens[:start] + [str(Path(megatron_lm) / "pretrain_gpt.py")] + tokens[start + 4:]
        out["mod-stock"] = _drop(tokens, "--megacpp-mtp-depth", 1)
    return out


def run(name: str, tokens: list[str], env: dict, log_dir: Path) -> tuple[int, list[dict]]:
    print(f"[{name}] {shlex.join(tokens)}", flush=True)
    proc = subprocess.run(tokens, capture_output=True, text=True, env=env)
    log = proc.stdout + proc.stderr
    (log_dir / f"{name}.log").write_text(log)
    rows = parse_iterations(log)
    print(f"[{name}] exit {proc.returncode}, {len(rows)} iteration lines, log {log_dir / (name + '.log')}",
          flush=True)
    if proc.returncode:
        print(log[-3000:], flush=True)
    return proc.returncode, rows


def _median_ms(rows: list[dict], warmup: int) -> float | None:
    times = [r["ms"] for r in rows[warmup:] if r["ms"] is not None]
    return statistics.median(times) if times else None


def _span(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if key in r]
    return f"{values[0]:.3g} -> {values[-1]:.3g}" if values else "-"


def _last(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if key in r]
    return f"{values[-1]:.3g}" if values else "-"


def report(results: dict[str, tuple[int, list[dict]]], warmup: int) -> bool:
    """Prints the table and the checks; True when the launcher runs pass them."""
    dense_ms = _median_ms(results["dense"][1], warmup) if "dense" in results else None
    print("\n| run | exit | iteration lines | with MoD stats | mod_budget | mod_gate_mean "
          "| mod_fraction_processed (last) | mod_sparsity_loss (last) | ms/iter | vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (code, rows) in results.items():
        ms = _median_ms(rows, warmup)
        ratio = f"{ms / dense_ms:.3f}" if ms and dense_ms and name != "mod-stock" else "-"
        with_stats = sum(1 for r in rows if "mod_budget" in r)
        print(f"| {name} | {code} | {len(rows)} | {with_stats} | {_span(rows, 'mod_budget')} | "
              f"{_span(rows, 'mod_gate_mean')} | {_last(rows, 'mod_fraction_processed')} | "
              f"{_last(rows, 'mod_sparsity_loss')} | {'-' if ms is None else f'{ms:.1f}'} | {ratio} |")
    code, rows = results["mod"]
    budgets = [r["mod_budget"] for r in rows if "mod_budget" in r]
    every = bool(rows) and all("mod_budget" in r and "mod_gate_mean" in r for r in rows)
    decays = (len(budgets) >= 2 and abs(budgets[0] - 1.0) < 0.01 and abs(budgets[-1] - 0.8) < 0.01
              and all(b >= a for a, b in zip(budgets[1:], budgets)))
    mod_ms = _median_ms(rows, warmup)
    ratio = mod_ms / dense_ms if mod_ms and dense_ms else None
    print(f"\nmod: MoD statistics on every iteration line: {'yes' if every else 'NO'}; budget 1.0 -> "
          f"0.8, never rising: {'yes' if decays else 'NO'}; step-time ratio mod/dense: "
          f"{'-' if ratio is None else f'{ratio:.3f}'} (target <= 1.05)")
    return (code == 0 and results["dense"][0] == 0 and every and decays
            and ratio is not None and ratio <= 1.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron-lm", default=os.environ.get("MEGATRON_LM"),
                        required=not os.environ.get("MEGATRON_LM"),
                        help="Megatron-LM checkout (core_v0.16.1 or core_v0.19.0; or MEGATRON_LM)")
    parser.add_argument("--iters", type=int, default=30, help="iterations of the dense and mod runs")
    parser.add_argument("--stock-iters", type=int, default=10,
                        help="iterations of the run without the launcher (0: skip it)")
    parser.add_argument("--warmup", type=int, default=10, help="iterations left out of the timing")
    args = parser.parse_args(argv)
    if args.iters <= args.warmup or args.warmup < 0 or args.stock_iters < 0:
        parser.error(f"need --iters ({args.iters}) > --warmup ({args.warmup}) >= 0 and "
                     f"--stock-iters ({args.stock_iters}) >= 0")
    log_dir = Path(os.environ.get("OUT", REPO / "runs" / "bench_mod_pretrain"))
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MEGATRON_LM": args.megatron_lm, "OUT": str(log_dir)}
    results = {name: run(name, tokens, env, log_dir)
               for name, tokens in commands(args.megatron_lm, args.iters, args.stock_iters, env).items()}
    return 0 if report(results, args.warmup) else 1


if __name__ == "__main__":
    sys.exit(main())
