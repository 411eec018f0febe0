"""recipes/: syntax and shellcheck, ``--dry-run`` (exit 0, prints a command that names only files that
exist, writes nothing, says on stderr which checkout it found), refusals, preset consistency, and flags
Megatron-LM core_v0.16.1 and core_v0.19.0 know. The gpu test runs the lite recipe on an H200
(``MEGATRON_LM`` must point at a core_v0.16.1 or core_v0.19.0 checkout)."""

from __future__ import annotations

import argparse

import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megacpp_mcore.models.accounting import flops_per_token
from megacpp_mcore.upstream import launch_pretrain as lp
from scripts_module import load_script

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.sh") if p.name != "lib.sh")
MIRROR = Path("/work/.mirror/NVIDIA+Megatron-LM/repo")
PRESET_OF = {"nam56r_8xh200.sh": "nam56r", "nam56r_lite_1xh200.sh": "nam56r-lite"}
# The recipes' `python` (their flag checks) is this interpreter, which imports the package.
THIS_PYTHON = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


@pytest.fixture
def checkout(tmp_path):
    """Stand-in for a Megatron-LM checkout: the files the recipes and the launcher look for."""
    root = tmp_path / "Megatron-LM"
    for name in lp.CHECKOUT_FILES:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".py"):
            path.write_text("")
        else:
            path.mkdir()
    return root


def _run(recipe: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(recipe), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def _dry_run(recipe: Path, checkout: Path, out: Path, *extra: str) -> list[str]:
    proc = _run(recipe, "--dry-run", *extra, MEGATRON_LM=str(checkout), OUT=str(out), DATA="")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1, "one command line"
    return shlex.split(proc.stdout)


def test_recipes_present():
    assert [p.name for p in RECIPES] == ["nam56r_8xh200.sh", "nam56r_lite_1xh200.sh",
                                          "nam56r_tiny_cpu.sh"]


@pytest.mark.parametrize("script", [*RECIPES, REPO / "recipes" / "lib.sh", *sorted((REPO / "scripts").glob("*.sh"))],
                         ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is in the test extra: pip install 'megacpp-mcore[test]'"
    proc = subprocess.run([shellcheck, "-x", "--severity=style", str(script)], capture_output=True,
                          text=True, cwd=script.parent)
    assert proc.returncode == 0, proc.stdout


def _named_files(tokens: list[str]) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """(absolute paths, python modules run with -m, --spec MODULE ATTR pairs) in a command."""
    paths, modules, specs = [], [], []
    for i, tok in enumerate(tokens):
        value = tok.split("=", 1)[1] if re.match(r"^[A-Z_]+=", tok) else tok
        paths += [p for p in value.split(":") if p.startswith("/")]
        if tok == "-m":
            modules.append(tokens[i + 1])
        if tok == "--spec":
            specs.append((tokens[i + 1], tokens[i + 2]))
    return paths, modules, specs


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_dry_run_names_only_existing_files(recipe, checkout, tmp_path):
    out = tmp_path / "out"
    tokens = _dry_run(recipe, checkout, out, "--log-interval", "7")
    assert tokens[-2:] == ["--log-interval", "7"], '"$@" is passed through last'
    assert not out.exists(), "--dry-run writes nothing"
    paths, modules, specs = _named_files(tokens)
    outputs = [p for p in paths if p.startswith(str(out))]
    assert outputs or recipe.name == "nam56r_tiny_cpu.sh"
    assert [p for p in paths if p not in outputs and not Path(p).exists()] == []
    assert shutil.which(tokens[0]) and "torchrun" in tokens
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"python -m {module}"
    for module, attr in specs:
        assert hasattr(importlib.import_module(module), attr), f"--spec {module} {attr}"


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.name in PRESET_OF], ids=lambda p: p.name)
def test_refuses_missing_checkout_and_data(recipe, checkout, tmp_path):
    proc = _run(recipe, "--dry-run", MEGATRON_LM=str(tmp_path / "nowhere"), DATA="")
    assert proc.returncode == 2 and "Megatron-LM checkout" in proc.stderr and proc.stdout == ""
    proc = _run(recipe, "--dry-run", MEGATRON_LM=str(checkout), DATA=str(tmp_path / "corpus"))
    assert proc.returncode == 2 and "data prefix (DATA) not found" in proc.stderr
    for suffix in (".bin", ".idx"):
        (tmp_path / f"corpus{suffix}").write_bytes(b"")
    proc = _run(recipe, "--dry-run", MEGATRON_LM=str(checkout), DATA=str(tmp_path / "corpus"))
    assert proc.returncode == 0, proc.stderr
    tokens = shlex.split(proc.stdout)
    assert tokens[tokens.index("--data-path") + 1] == str(tmp_path / "corpus")
    assert "--mock-data" not in tokens


def _flag_values(tokens: list[str]) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for i, tok in enumerate(tokens):
        if tok.startswith("--"):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            values[tok] = None if nxt is None or nxt.startswith("--") else nxt
    return values


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.name in PRESET_OF], ids=lambda p: p.name)
def test_architecture_matches_preset(recipe, checkout, tmp_path):
    flags = _flag_values(_dry_run(recipe, checkout, tmp_path / "out"))
    expected = _flag_values(lp.preset_args(PRESET_OF[recipe.name]))
    assert {k: flags.get(k, "<missing>") for k in expected} == expected
    assert "--bf16" in flags and flags["--transformer-impl"] == "transformer_engine"
    vocab = lp.get_preset(PRESET_OF[recipe.name]).vocab_size
    assert int(flags["--vocab-size"]) + 1 == vocab  # NullTokenizer adds the EOD id


@pytest.mark.skipif(not MIRROR.exists(), reason="needs the Megatron-LM git mirror at " + str(MIRROR))
@pytest.mark.parametrize("tag", ["core_v0.16.1", "core_v0.19.0"])
@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.name in PRESET_OF], ids=lambda p: p.name)
def test_flags_are_known_to_megatron_lm(recipe, tag, checkout, tmp_path):
    from megacpp_mcore.testing.megatron_lm import flag_known, parser_dests

    tokens = _dry_run(recipe, checkout, tmp_path / "out")
    megatron_flags = tokens[tokens.index("megacpp_mcore.launch_pretrain") + 1:]
    dests = parser_dests(str(MIRROR), tag)
    # the launcher's own flag and the ones it registers with Megatron's parser
    ours = {"--megatron-lm", *(opt for action in lp.add_megacpp_arguments(argparse.ArgumentParser())._actions
                               for opt in action.option_strings)}
    unknown = [f for f in megatron_flags
               if f.startswith("--") and f not in ours and not flag_known(f, dests)]
    assert unknown == []


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.name in PRESET_OF], ids=lambda p: p.name)
def test_dry_run_says_which_checkout_it_found(recipe, checkout, tmp_path):
    """stderr names the checkout's megatron-core version (megatron/core/package_info.py) and the
    tag line it belongs to; stdout stays the one command line."""
    proc = _run(recipe, "--dry-run", MEGATRON_LM=str(checkout), OUT=str(tmp_path), DATA="")
    assert proc.returncode == 0 and f"Megatron-LM checkout {checkout}: version unknown" in proc.stderr
    info = checkout / "megatron" / "core" / "package_info.py"
    info.parent.mkdir(parents=True, exist_ok=True)
    for (minor, patch), says in {(19, 1): "megatron-core 0.19.1 (tag line core_v0.19.0",
                                 (16, 1): "megatron-core 0.16.1 (tag line core_v0.16.1"}.items():
        info.write_text(f"MAJOR = 0\nMINOR = {minor}\nPATCH = {patch}\n")
        proc = _run(recipe, "--dry-run", MEGATRON_LM=str(checkout), OUT=str(tmp_path), DATA="")
        assert proc.returncode == 0 and says in proc.stderr, proc.stderr
        assert proc.stdout.count("\n") == 1


@pytest.mark.parametrize("recipe,fallback", [("nam56r_lite_1xh200.sh", "NAM56R_LITE_AE"),
                                             ("nam56r_8xh200.sh", "NAM56R_DENSE_ATTENTION")])
def test_mla_and_mtp_can_be_switched_off(recipe, fallback, checkout, tmp_path):
    """``USE_MLA=0 MTP_DEPTH=0 SPEC=<non-MLA object>``: a run while MLA/MTP are not available."""
    proc = _run(REPO / "recipes" / recipe, "--dry-run", MEGATRON_LM=str(checkout), DATA="",
                OUT=str(tmp_path), USE_MLA="0", MTP_DEPTH="0", SPEC=fallback)
    assert proc.returncode == 0, proc.stderr
    flags = _flag_values(shlex.split(proc.stdout))
    assert not {"--multi-latent-attention", "--kv-lora-rank", "--megacpp-mtp-depth"} & set(flags)
    assert flags["--spec"].startswith("layer_specs.") and fallback in proc.stdout


def test_8xh200_layout_fits_the_model(checkout, tmp_path):
    from megacpp_mcore.train.runtime import Parallelism

    tokens = _dry_run(REPO / "recipes" / "nam56r_8xh200.sh", checkout, tmp_path / "out")
    flags = _flag_values(tokens)
    world = int(flags["--nproc-per-node"])
    assert world == 8
    par = Parallelism(tp=int(flags["--tensor-model-parallel-size"]),
                      pp=int(flags["--pipeline-model-parallel-size"]),
                      ep=int(flags["--expert-model-parallel-size"]),
                      sp="--sequence-parallel" in flags)
    par.check_model(lp.get_preset("nam56r"))
    dp = par.data_parallel(world)
    assert int(flags["--global-batch-size"]) % (int(flags["--micro-batch-size"]) * dp) == 0
    assert int(flags["--megacpp-mtp-depth"]) == 2
    # EP 1 at MBS 4 fits an H200 by 0.3 GiB with the MTP block's activations kept, 3.8 with it
    # recomputed (the header's measurement): the recipe recomputes it unless MTP_RECOMPUTE=0
    assert flags["--megacpp-mtp-recompute"] == "on" and flags["--megacpp-fused-lm-loss"] == "on"
    proc = _run(REPO / "recipes" / "nam56r_8xh200.sh", "--dry-run", MEGATRON_LM=str(checkout),
                OUT=str(tmp_path / "out"), DATA="", MTP_RECOMPUTE="0")
    assert proc.returncode == 0 and "--megacpp-mtp-recompute" not in proc.stdout, proc.stderr


def test_tiny_cpu_recipe_uses_train_flags(tmp_path, checkout):
    from megacpp_mcore import cli

    tokens = _dry_run(REPO / "recipes" / "nam56r_tiny_cpu.sh", checkout, tmp_path / "out")
    assert tokens[tokens.index("megacpp_mcore.cli") + 1] == "train"
    parser = cli._parser()
    args = parser.parse_args(tokens[tokens.index("megacpp_mcore.cli") + 1:])
    assert args.preset == "nam56r-tiny"


@pytest.mark.parametrize("bad", [["--bogus"], ["--steps", "x"]], ids=["unknown", "bad-value"])
@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
def test_tiny_cpu_recipe_refuses_a_bad_flag_before_anything_starts(bad, dry, tmp_path):
    """A flag ``megacpp-mcore train`` would refuse: exit 2 with one message naming it, no
    torchrun, no output directory (also under --dry-run, which would print a command that fails)."""
    out = tmp_path / "out"
    proc = _run(REPO / "recipes" / "nam56r_tiny_cpu.sh", *(["--dry-run"] if dry else []), *bad, OUT=str(out))
    assert proc.returncode == 2, proc.stderr
    assert bad[-1] in proc.stderr.splitlines()[-1]
    assert "torchrun" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("recipe,knob,allowed", [
    ("nam56r_8xh200.sh", "USE_MLA=yes", "0 or 1"), ("nam56r_8xh200.sh", "MTP_RECOMPUTE=on", "0 or 1"),
    ("nam56r_8xh200.sh", "MTP_DEPTH=two", "an integer >= 0"), ("nam56r_8xh200.sh", "EP=0", "an integer >= 1"),
    ("nam56r_8xh200.sh", "TP=1.5", "an integer >= 1"), ("nam56r_lite_1xh200.sh", "APEX=yes", "0 or 1"),
    ("nam56r_lite_1xh200.sh", "MBS=-2", "an integer >= 1"), ("nam56r_tiny_cpu.sh", "NPROC=two", "an integer >= 1"),
])
@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
def test_recipes_refuse_a_bad_knob_before_anything_starts(recipe, knob, allowed, dry, checkout, tmp_path):
    """A ``${VAR:-default}`` knob outside what the recipe can use (a switch not 0/1, a size not a
    positive integer) was read by bash arithmetic as 0, silently: MTP or MLA off, or a flag Megatron
    refuses per rank. Now: exit 2, one line naming the value and what is allowed, nothing made."""
    name, value = knob.split("=", 1)
    out = tmp_path / "out"
    proc = _run(REPO / "recipes" / recipe, *(["--dry-run"] if dry else []), MEGATRON_LM=str(checkout),
                OUT=str(out), DATA="", **{name: value})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: {knob}: allowed: {allowed}"]
    assert not out.exists()


@pytest.fixture(scope="module")
def real_checkout(tmp_path_factory):
    """An importable Megatron-LM checkout of the release line installed here (from the mirror)."""
    if not MIRROR.exists():
        pytest.skip("needs the Megatron-LM git mirror at " + str(MIRROR))
    from megacpp_mcore.spec.compat import mcore_version

    line = ".".join(str(mcore_version()).split(".")[:2])
    root = tmp_path_factory.mktemp("mlm")
    archive = subprocess.run(["git", "--git-dir", str(MIRROR), "archive", lp.CHECKOUT_TAGS[line]],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.name in PRESET_OF], ids=lambda p: p.name)
def test_gpu_recipes_check_their_flags_with_megatron_before_torchrun(recipe, real_checkout, tmp_path):
    """The recipe's own flags pass Megatron-LM's parser (``launch_pretrain --check-flags``); an
    unknown extra flag stops the launch with exit 2 and one line naming it, before torchrun and
    before the output directory exists, and a ``--dry-run`` the same way (it would print a command
    that fails on every rank)."""
    proc = _run(recipe, "--dry-run", MEGATRON_LM=str(real_checkout), OUT=str(tmp_path / "out"), DATA="",
                **THIS_PYTHON)
    # the dry run's own check passed (it runs launch_pretrain --check-flags on the flags it prints)
    assert proc.returncode == 0 and "flags not checked" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.count("\n") == 1 and "megacpp_mcore.launch_pretrain" in proc.stdout
    out = tmp_path / "run"
    for dry in ([], ["--dry-run"]):
        proc = _run(recipe, *dry, "--bogus-flag", MEGATRON_LM=str(real_checkout), OUT=str(out), DATA="",
                    **THIS_PYTHON)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.splitlines()[-1] == ("launch_pretrain: Megatron-LM refuses the flags: "
                                                "pretrain_gpt.py: error: unrecognized arguments: --bogus-flag")
        assert proc.stdout == "" and not out.exists()


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.name in PRESET_OF], ids=lambda p: p.name)
def test_gpu_recipes_dry_run_says_when_the_flags_went_unchecked(recipe, checkout, tmp_path):
    """Where the checkout's parser does not import (here: the stand-in checkout, its
    ``megatron.training`` made to fail on import, since megatron-core 0.19's wheel ships a
    ``megatron.training`` of its own that would import otherwise), ``--dry-run`` still prints its
    command and says in one line that the flags went unchecked and why; a launch stops there (exit
    2, nothing made) instead of failing on every rank."""
    (checkout / "megatron" / "training" / "__init__.py").write_text('raise ImportError("stand-in checkout")\n')
    proc = _run(recipe, "--dry-run", "--bogus-flag", MEGATRON_LM=str(checkout), OUT=str(tmp_path / "out"),
                DATA="", **THIS_PYTHON)
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1 and "--bogus-flag" in proc.stdout
    assert proc.stderr.splitlines()[-1].startswith(
        f"launch_pretrain: flags not checked: Megatron-LM's parser does not import from {checkout} here ("), proc.stderr
    out = tmp_path / "run"
    proc = _run(recipe, MEGATRON_LM=str(checkout), OUT=str(out), DATA="", **THIS_PYTHON)
    assert proc.returncode == 2 and proc.stdout == "" and not out.exists()
    assert "flags not checked" in proc.stderr.splitlines()[-1]


def _benchmark_module():
    return load_script("recipe_benchmark")


def test_benchmark_script_ab_commands_and_log_parsing(checkout, tmp_path):
    rb = _benchmark_module()
    env = {**os.environ, "MEGATRON_LM": str(checkout), "ITERS": "50", "OUT": str(tmp_path)}
    lite = rb.recipe_tokens("nam56r_lite_1xh200.sh", env)
    ours, upstream, depth = rb.ab_commands(lite, str(checkout))
    assert depth == 12 and _flag_values(ours)["--num-layers"] == "24"
    assert _flag_values(ours)["--spec"] == "layer_specs.nam56r_lite"
    assert ours[ours.index("--spec") + 2] == "NAM56R_LITE_AE"
    assert str(checkout / "pretrain_gpt.py") in upstream and "--spec" not in upstream
    for cmd in (ours, upstream):
        assert "--multi-latent-attention" not in cmd and "--megacpp-mtp-depth" not in cmd
    assert _flag_values(ours)["--megacpp-fused-lm-loss"] == "off"  # the same loss as upstream's
    same = {k: v for k, v in _flag_values(ours).items()
            if k not in ("--num-layers", "--spec", "--megatron-lm", "--megacpp-fused-lm-loss")}
    assert same == {k: v for k, v in _flag_values(upstream).items() if k != "--num-layers"}
    log = ("iteration 3/ 50 | elapsed time per iteration (ms): 812.3 | lm loss: 1.040123E+01 |\n"
           "validation loss at iteration 50 | lm loss value: 9.9E+00 | lm loss PPL: 2.0E+04 |\n"
           "[Rank 0] (after 1 iterations) memory (MB) | allocated: 1.0 | max allocated: 20480.0 |\n")
    assert rb.parse_log(log) == ([10.40123], [812.3], 20.0)
    # the A/B trunk's FLOPs (accounting, causal): 6 x (matmul weights a token meets) + 3 x causal
    # attention scores/values (seq/2 keys), computed by hand for a dense GPT
    dense = lp.get_preset("nam56r-lite").replace(moe=None)
    h, f, v, s, layers = 2048, 5632, 32768, 4096, 12
    by_hand = 6 * (layers * (4 * h * h + 3 * h * f) + h * v) + 3 * (
        layers * 2 * (s / 2) * 16 * (2 * h // 16))
    trunk = rb.ae_trunk(dense, layers)
    assert (trunk.pattern, trunk.num_layers, trunk.mla, trunk.mtp_depth) == ("AE", 24, None, 0)
    assert flops_per_token(trunk, causal=True)["total"] == by_hand


def _parse_megatron_log(text: str) -> tuple[list[float], list[float]]:
    losses = [float(x) for x in re.findall(r"\blm loss: ([0-9.Ee+-]+)", text)]
    times = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", text)]
    return losses, times


GPU_RUNS = [("nam56r_lite_1xh200.sh", 1, "50"), ("nam56r_8xh200.sh", 8, "20")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs (H200) with TE")
@pytest.mark.skipif(not os.environ.get("MEGATRON_LM"), reason="set MEGATRON_LM to a core_v0.16.1 or core_v0.19.0 checkout")
@pytest.mark.parametrize("recipe,gpus,default_iters", GPU_RUNS, ids=[r[0] for r in GPU_RUNS])
def test_recipe_trains_on_gpu(recipe, gpus, default_iters, tmp_path):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"{recipe} needs {gpus} GPUs, this host has {torch.cuda.device_count()}")
    iters = int(os.environ.get("ITERS", default_iters))
    proc = subprocess.run(
        ["bash", str(REPO / "recipes" / recipe)], capture_output=True, text=True, timeout=3600,
        env={**os.environ, "OUT": str(tmp_path / "out"), "ITERS": str(iters)})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "Traceback" not in log
    losses, times = _parse_megatron_log(log)
    assert len(losses) >= iters, log[-6000:]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"loss did not fall: {losses}"
    print(f"{recipe}: {iters} iterations, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"median {statistics.median(times[5:] or times):.1f} ms/iteration")
    if gpus > 1:
        return
    # the checkpoint pretrain_gpt.py saved (--save OUT/checkpoints) generates, drafting with its MTP
    gen = subprocess.run(
        [sys.executable, "-m", "megacpp_mcore.cli", "generate", "--load", str(tmp_path / "out" / "checkpoints"),
         "--prompt", "int main(", "--max-new-tokens", "16", "--speculative", "1", "--json"],
        capture_output=True, text=True, timeout=900)
    assert gen.returncode == 0, gen.stderr[-3000:]
    report = json.loads(gen.stdout)
    assert report["step"] == iters and len(report["rows"][0]["tokens"]) >= 1
    print(f"{recipe}: generate on its checkpoint, acceptance {report['acceptance_per_position']}")


def test_h200_scripts_list_their_parts_and_refuse_unknown_ones(tmp_path):
    """scripts/h200_regression.sh --list is the one list of parts; both H200 scripts refuse an
    unknown part with exit status 2, naming it and the parts, before anything runs or is written."""
    listed = subprocess.run(["bash", str(REPO / "scripts" / "h200_regression.sh"), "--list"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert {"tests", "stage", "fast", "moe-decode", "flexidepth-batch"} <= set(listed)
    for script, argv in (("h200_regression.sh", ["stage", "stagee"]), ("h200_session.sh", ["info", "nope"])):
        out = tmp_path / script
        proc = subprocess.run(["bash", str(REPO / "scripts" / script), *argv], capture_output=True, text=True,
                              env={**os.environ, "OUT": str(out)}, timeout=60)
        assert proc.returncode == 2
        assert f"unknown part '{argv[1]}'" in proc.stderr and "moe-decode" in proc.stderr
        assert not out.exists()
