"""models/accounting.py: the public NAM56R preset (layer table, parameters checked by hand for one
layer of each symbol), FLOPs two ways (ours and Megatron-Bridge's hybrid_flops) for a small model
written out by hand, the matmul weights behind our count against a built model, the Mamba state size
reaching the built mixer, the first-step start-up badput of receipts; scripts/bench_stage.py and
scripts/recipe_benchmark.py, which print both counts (--dry-run commands, refusals, flags Megatron-LM
knows, log reading, the 8-GPU projection); and the builder's fast-path switches (train/fast_paths.py)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

from megacpp_mcore.models import accounting
from megacpp_mcore.models.presets import MLAConfig, ModelConfig, MoEConfig, get_preset
from megacpp_mcore.spec.pattern import LayerEntry
from megacpp_mcore.upstream import launch_pretrain as lp
from scripts_module import load_script


def _entry(symbol: str, *features: str) -> LayerEntry:
    return next(e for e in get_preset("nam56r").layer_table()
                if e.symbol == symbol and set(features) <= set(e.features))


def test_nam56r_is_the_public_configuration():
    m = get_preset("nam56r")
    assert (m.pattern, m.num_layers, m.hidden_size, m.num_attention_heads) == ("AEMEAEMEAEMR", 52, 4096, 32)
    assert (m.vocab_size, m.seq_length, m.mtp_depth, m.mamba_state_dim) == (131072, 4096, 2, 128)
    assert m.moe == MoEConfig(num_experts=16, topk=4, ffn_hidden_size=896, shared_expert_size=1024)
    assert m.mla == MLAConfig(q_lora_rank=64, kv_lora_rank=64, qk_head_dim=64, qk_pos_emb_head_dim=64,
                              v_head_dim=64)
    from megacpp_mcore.layers.mixers.dims import m2rnn_dims

    assert (m2rnn_dims(4096, 32).k_dim, m2rnn_dims(4096, 32).v_dim) == (64, 16)
    # the earlier dimensions stay available under their own name
    wide = get_preset("nam56r-wide")
    assert (wide.mla.q_lora_rank, wide.mla.kv_lora_rank, wide.moe.shared_expert_size) == (1536, 512, 896)


def test_nam56r_layer_table():
    table = get_preset("nam56r").layer_table()
    symbols = "".join(e.symbol for e in table)
    assert symbols == "AEMEAEMEAEMR" * 4 + "AEME"  # the 12-symbol pattern tiled to 52
    assert {s: symbols.count(s) for s in "AEMR"} == {"A": 13, "E": 22, "M": 13, "R": 4}
    assert [e.index for e in table if e.symbol == "R"] == [11, 23, 35, 47]
    assert all(("mla" in e.features) == (e.symbol == "A") for e in table)
    assert {e.stage for e in table} == {0}


def test_nam56r_parameters_by_hand():
    m = get_preset("nam56r")
    h = 4096
    # A (MLA): input norm; q: down [64, h], latent norm 64, up [32 * (64 + 64), 64];
    # kv: down [64 + 64 (rope key), h], latent norm 64, up [32 * (64 + 64), 64]; out [h, 32 * 64]
    a = h + (h * 64 + 64 + 64 * 32 * 128) + (h * 128 + 64 + 64 * 32 * 128) + 32 * 64 * h
    assert a == 4096 + 524_352 + 786_496 + 8_388_608 == 9_703_552
    # E: norm; router [16, h]; 16 experts of SwiGLU 896 (fc1 [2 * 896, h], fc2 [h, 896]); shared 1024
    e = h + 16 * h + 16 * 3 * h * 896 + 3 * h * 1024
    assert e == 4096 + 65_536 + 176_160_768 + 12_582_912 == 188_813_312
    # M: norm; d_inner 8192, 128 heads of 64, 8 groups, d_state 128: in_proj [2*8192 + 2*8*128 + 128, h],
    # conv (8192 + 2*8*128 channels) x (4 + bias), A_log/D/dt_bias per head, gated norm 8192, out [h, 8192]
    mm = h + h * 18_560 + 10_240 * 5 + 3 * 128 + 8192 + 8192 * h
    assert mm == 4096 + 76_021_760 + 51_200 + 384 + 8192 + 33_554_432 == 109_640_064
    # R: norm; 32 heads, k 64, v 16: in_proj [32 * (64 + 64 + 16 + 1), h], conv 32*144 channels x (4 + bias),
    # recurrent W [32, 16, 16], forget bias 32, out [h, 32 * 16]
    r = h + h * 32 * 145 + 4608 * 5 + 32 * 16 * 16 + 32 + 32 * 16 * h
    assert r == 4096 + 19_005_440 + 23_040 + 8192 + 32 + 2_097_152 == 21_137_952
    for symbol, count, features in (("A", a, ("mla",)), ("E", e, ()), ("M", mm, ()), ("R", r, ())):
        assert accounting.block_params(m, _entry(symbol, *features)) == count, symbol
    # whole model: blocks + embedding and (untied) output [131072, h] + final norm + the MTP shared
    # block (one A, one E, two norms, the [2h -> h] projection) ...
    mtp = a + e + 2 * h + 2 * h * h
    total = 13 * a + 22 * e + 13 * mm + 4 * r + 2 * 131072 * h + h + mtp
    assert total == 7_095_737_088
    table = m.layer_table()
    assert sum(accounting.block_params(m, x) for x in table) + sum(
        accounting.embedding_params(m).values()) == total
    # ... + what layer features add: MoD's router Linear(h, 1) (weight + bias) on each layer it routes
    added = sum(accounting.layer_params(m, x) - accounting.block_params(m, x) for x in table)
    assert added == (h + 1) * sum("mod" in x.features for x in table)


def small_model() -> ModelConfig:
    """All four symbols and MTP, small enough to build on CPU: h 64, 4 heads, MoE 4 x 32 top-2 +
    shared 16, Mamba d_state 16, vocab 128, seq 16, MTP depth 1."""
    return ModelConfig(name="small", pattern="AEMR", num_layers=4, hidden_size=64, num_attention_heads=4,
                       ffn_hidden_size=128, vocab_size=128, seq_length=16, mamba_state_dim=16,
                       moe=MoEConfig(num_experts=4, topk=2, ffn_hidden_size=32, shared_expert_size=16),
                       mtp_depth=1)


def test_both_flop_counts_by_hand():
    m = small_model()
    # ours: 6 x the matmul weights a token passes through + causal attention
    attn = 64 * (64 + 2 * 4 * 16) + 64 * 64  # QKV [h + 2 * 4 groups * 16, h] + out [h, h] = 16,384
    moe = 64 * 4 + 2 * 3 * 64 * 32 + 3 * 64 * 16  # router + 2 of 4 experts + shared = 15,616
    # M: 2 heads of 64 (d_inner 128), 2 groups, d_state 16: in_proj [2*128 + 2*2*16 + 2, h] + out [h, 128]
    mamba = 64 * 322 + 128 * 64  # 28,800
    m2rnn = 64 * 4 * 145 + 4 * 16 * 16 + 4 * 16 * 64  # in_proj + recurrent W + out = 42,240
    head = 64 * 128  # 8,192
    mtp = attn + moe + 2 * 64 * 64 + head  # one depth: shared A + E, [2h -> h] proj, the head again
    active = attn + moe + mamba + m2rnn + head + mtp
    assert active == 159_616
    # causal attention per A layer (trunk + MTP): 6 * s * heads * (d_qk + d_v) / 2 = 6 * 16 * 4 * 32 / 2
    attention = 2 * 6 * 16 * 4 * 32 / 2
    assert attention == 12_288
    ours = accounting.flops_per_token(m, causal=True)
    assert ours["active_params"] == active and ours["attention"] == attention
    assert ours["total"] == 6 * 159_616 + 12_288 == 969_984

    # Megatron-Bridge's hybrid_flops, forward per token then x 3:
    a_fwd = 4 * 64 * (64 + 64 * 4 / 4 + 16 / 2)  # 4h(h + h g/n + s/2) = 34,816
    e_fwd = 6 * 64 * (2 * 32 + 16)  # 6h(topk f + shared) = 30,720
    # Mamba with d_in = 2h = 128, 2 groups, d_state 16, 2 heads: in_proj + scan + out_proj
    m_fwd = 2 * 64 * (2 * 128 + 2 * 2 * 16 + 2) + 7 * 128 * 16 + 2 * 128 * 64  # 41,216 + 14,336 + 16,384
    logits_fwd = 2 * 64 * 128 * (1 + 1)  # 2hV (1 + MTP depth) = 32,768
    hybrid = accounting.hybrid_flops_per_token(m)
    assert hybrid == {"attention": 3 * a_fwd, "feedforward": 3 * e_fwd, "mamba": 3 * 2 * m_fwd,  # M + R
                      "logits": 3 * logits_fwd, "total": 3 * (34_816 + 30_720 + 2 * 71_936 + 32_768)}
    assert hybrid["total"] == 726_528
    assert accounting.flop_counts(m) == {"ours": 969_984, "hybrid": 726_528}


def test_hybrid_count_of_the_public_preset():
    """The published 289 TFLOP/s/GPU divided by the preset's count gives tokens/s/GPU."""
    hybrid = accounting.hybrid_flops_per_token(get_preset("nam56r"))
    # per token, forward: A 4h(2h + s/2) = 167.8M x 13, E 6h(4*896 + 1024) x 22, Mamba x (13 + 4),
    # logits 2 h V x 3
    h, s, v = 4096, 4096, 131072
    a = 4 * h * (2 * h + s / 2)
    e = 6 * h * (4 * 896 + 1024)
    mamba = 2 * h * (4 * h + 2 * 8 * 128 + 128) + 7 * 2 * h * 128 + 2 * 2 * h * h
    assert hybrid["total"] == 3 * (13 * a + 22 * e + 17 * mamba + 2 * h * v * 3)
    assert 289e12 / hybrid["total"] == pytest.approx(8203, abs=1)


def test_matmul_params_and_state_size_equal_the_built_model(single_rank):
    """Our count's matmul weights are the built model's projections (attention, top-k experts,
    mixer in/out projections, M2RNN's recurrent weight, head, MTP block); d_state reaches the M mixer."""
    from megacpp_mcore.models.plan import build_plan
    from megacpp_mcore.train import runtime

    m = small_model()
    config = runtime.transformer_config(m, runtime.Parallelism())
    assert config.mamba_state_dim == 16
    (chunk,) = runtime.build_model(m, config, backend="local", wrap_ddp=False)
    plan = build_plan(m, backend="local")
    for layer, built in zip(plan["layers"], chunk.decoder.layers, strict=True):
        assert layer["parameters"] == sum(p.numel() for p in built.parameters()), layer
    mixer = chunk.decoder.layers[2].self_attention
    assert mixer.d_state == 16
    active = tuple(f"local_experts.{i}." for i in range(m.moe.topk))
    matmul = sum(p.numel() for n, p in chunk.named_parameters()
                 if (p.dim() == 2 or n.endswith("recurrent_weight")) and "embedding" not in n
                 and ("local_experts." not in n or any(x in n for x in active)))
    # the output head runs once more per MTP depth (its weight is counted once in the model)
    assert accounting.flops_per_token(m)["active_params"] == matmul + m.mtp_depth * 64 * 128


def test_mamba_state_dim_is_validated():
    with pytest.raises(ValueError, match=r"mamba_state_dim must be an int >= 1, got 0"):
        small_model().replace(mamba_state_dim=0)


def test_first_step_overhead_is_startup_badput():
    from megacpp_mcore.train.receipt import first_step_overhead

    facts = types.SimpleNamespace(first_step_compute_s=12.0, compute_s=16.0, compute_steps=5)
    assert first_step_overhead(facts) == 11.0  # 12 s first step, later steps 1 s each
    assert first_step_overhead(types.SimpleNamespace(first_step_compute_s=3.0, compute_s=3.0,
                                                     compute_steps=1)) == 0.0
    assert first_step_overhead(types.SimpleNamespace(first_step_compute_s=None, compute_s=0.0,
                                                     compute_steps=0)) == 0.0


# ------------------------------------------------------------------------ scripts/bench_stage.py --

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/NVIDIA+Megatron-LM/repo")


def _checkout(checkout: Path, *, hybrid_script: bool = False) -> Path:
    """A stand-in Megatron-LM checkout: the files the launcher checks for, empty."""
    for name in (*lp.CHECKOUT_FILES, "pretrain_hybrid.py" if hybrid_script else "pretrain_mamba.py"):
        path = checkout / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".py"):
            path.write_text("")
        else:
            path.mkdir(exist_ok=True)
    return checkout


def _bench(argv, checkout, tmp_path, *, hybrid_script: bool = False):
    """Runs ``scripts/bench_stage.py`` on a stand-in checkout (no CUDA needed with --dry-run)."""
    _checkout(checkout, hybrid_script=hybrid_script)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "bench_stage.py"), "--megatron-lm",
                           str(checkout), *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OUT": str(tmp_path / "out")})


def _commands(stdout: str) -> dict[str, list[str]]:
    lines = stdout.strip().splitlines()
    return {name[2:]: shlex.split(cmd) for name, cmd in zip(lines[::2], lines[1::2], strict=True)}


def _flag(tokens: list[str], name: str) -> str:
    return tokens[tokens.index(name) + 1]


@pytest.fixture(scope="module")
def default_dry_run(tmp_path_factory):
    """``--dry-run`` of the default sets with two fast-path variants and the MTP-recompute run (one
    subprocess per module)."""
    tmp = tmp_path_factory.mktemp("bench_stage")
    proc = _bench(["--dry-run", "--fast", "mla_rope_fusion=off", "--fast", "moe_permute_fusion=on",
                   "--mtp-recompute"], tmp / "mlm", tmp)
    assert proc.returncode == 0, proc.stderr
    return tmp, _commands(proc.stdout)


def test_bench_stage_dry_run_prints_the_default_set(default_dry_run):
    tmp_path, runs = default_dry_run
    # the 12-layer slice and its variants first, then the projection's short slices (no 24-layer
    # slice by default: it needs ~100 GiB)
    assert list(runs) == ["ab_ours#0", "ab_upstream#0", "ab_ours#1", "ab_upstream#1", "stage12#0",
                          "stage12_mtp#0", "stage12_mtp_recompute#0", "stage12_host_counts#0", "stage4#0",
                          "stage8#0", "stage12_mla_rope_fusion=off#0", "stage12_moe_permute_fusion=on#0"]
    assert not (tmp_path / "out").exists(), "--dry-run writes nothing"
    assert runs["stage12_host_counts#0"] == runs["stage12#0"] + ["--megacpp-moe-device-counts", "off"]
    assert runs["stage12_mtp_recompute#0"] == runs["stage12_mtp#0"] + ["--megacpp-mtp-recompute", "on"]
    ours, up = runs["ab_ours#0"], runs["ab_upstream#0"]
    assert "TRITON_CACHE_AUTOTUNING=1" in ours and ours[ours.index("-m") + 1] == "megacpp_mcore.launch_pretrain"
    spec = ours.index("--spec")
    assert hasattr(importlib.import_module(ours[spec + 1]), ours[spec + 2])  # NAM56R_UPSTREAM_SYMBOLS
    assert up[up.index("--hybrid-override-pattern") + 1] == "*EME*EME*EMM"
    assert up[up.index("--spec") + 1:up.index("--spec") + 3] == ["megatron.core.models.mamba.mamba_layer_specs",
                                                                 "mamba_stack_spec"]
    # the same model, data, batch and loss on both sides: everything after the entry point but the
    # spec, and ours turning the launcher's default fused LM loss off (upstream's loss)
    ours_flags = ours[spec + 3:]
    i = ours_flags.index("--megacpp-fused-lm-loss")
    assert ours_flags.pop(i + 1) == "off" and ours_flags.pop(i)
    up_flags = up[up.index("--hybrid-override-pattern") + 2:]
    assert ours_flags == up_flags
    assert (_flag(ours, "--hidden-size"), _flag(ours, "--moe-shared-expert-intermediate-size")) == ("4096", "1024")
    stage, mtp = runs["stage12#0"], runs["stage12_mtp#0"]
    assert _flag(stage, "--q-lora-rank") == "64" and "--megacpp-mtp-depth" not in stage
    assert _flag(mtp, "--megacpp-mtp-depth") == "2"
    assert [_flag(runs[f"stage{n}#0"], "--num-layers") for n in (4, 8, 12)] == ["4", "8", "12"]
    def depthless(tokens):
        i = tokens.index("--num-layers")
        return tokens[:i] + tokens[i + 2:]

    # the slices differ in their depth only
    assert depthless(runs["stage4#0"]) == depthless(runs["stage8#0"]) == depthless(stage)
    assert "--no-rope-fusion" in runs["stage12_mla_rope_fusion=off#0"] and "--no-rope-fusion" not in stage
    assert "--moe-permute-fusion" in runs["stage12_moe_permute_fusion=on#0"]


def test_bench_stage_fast_set_is_the_baseline_and_its_variants(tmp_path):
    proc = _bench(["--dry-run", "--set", "fast", "--fast", "cuda_graphs=on", "--fast", "moe_dispatcher=allgather",
                   "--base", "moe_permute_fusion=on", "--stage-spec", "NAM56R_DENSE"], tmp_path / "mlm", tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = _commands(proc.stdout)
    assert all(cmd[cmd.index("--spec") + 2] == "NAM56R_DENSE" for cmd in runs.values())
    assert list(runs) == ["stage12#0", "stage12_cuda_graphs=on#0", "stage12_moe_dispatcher=allgather#0"]
    assert all("--moe-permute-fusion" in cmd for cmd in runs.values())  # --base: every run
    graphs = runs["stage12_cuda_graphs=on#0"]
    assert graphs[graphs.index("--cuda-graph-impl") + 1:graphs.index("--cuda-graph-impl") + 5] == [
        "transformer_engine", "--cuda-graph-scope", "attn", "mamba"]  # a checkout before 0.19; no MoD
    proc = _bench(["--dry-run", "--set", "fast", "--fast", "cuda_graphs=on"], tmp_path / "mlm", tmp_path)
    assert proc.returncode == 0, proc.stderr
    graphs = _commands(proc.stdout)["stage12_cuda_graphs=on#0"]  # NAM56R carries MoD: Mamba only
    start = graphs.index("--cuda-graph-impl")
    assert graphs[start + 1:start + 4] == ["transformer_engine", "--cuda-graph-scope", "mamba"]
    assert graphs[start + 4].startswith("--")
    assert _flag(runs["stage12_moe_dispatcher=allgather#0"], "--moe-token-dispatcher-type") == "allgather"
    # the launcher's fused LM loss, a fast path of ours only and the launcher's default: the stage
    # slice runs it, and the flipped run turns it off
    proc = _bench(["--dry-run", "--set", "fast", "--fast", "fused_lm_loss=off"], tmp_path / "mlm", tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = _commands(proc.stdout)
    unfused = runs["stage12_fused_lm_loss=off#0"]
    i = unfused.index("--megacpp-fused-lm-loss")
    assert unfused[i + 1] == "off" and unfused[:i] + unfused[i + 2:] == runs["stage12#0"]
    assert "--megacpp-fused-lm-loss" not in runs["stage12#0"]


def test_bench_stage_ab_runs_pick_the_variants(tmp_path):
    proc = _bench(["--dry-run", "--set", "ab", "--repeats", "1", "--ab-runs", "ours_fused,upstream_te_ce,ours,ours_host_counts"],
                  tmp_path / "mlm", tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = _commands(proc.stdout)
    assert list(runs) == ["ab_ours_fused#0", "ab_upstream_te_ce#0", "ab_ours#0", "ab_ours_host_counts#0"]
    ours, fused, te = runs["ab_ours#0"], runs["ab_ours_fused#0"], runs["ab_upstream_te_ce#0"]
    # ours: upstream's loss (the launcher's default fused loss off); ours_fused: the default
    i = ours.index("--megacpp-fused-lm-loss")
    assert ours[i + 1] == "off" and ours[:i] + ours[i + 2:] == fused
    assert "--megacpp-fused-lm-loss" not in fused and not any(t.startswith("--megacpp") for t in te)
    assert runs["ab_ours_host_counts#0"] == fused + ["--megacpp-moe-device-counts", "off"]
    assert te[te.index("--cross-entropy-fusion-impl") + 1] == "te" and "--cross-entropy-loss-fusion" in te
    assert "--cross-entropy-loss-fusion" not in ours


def test_bench_stage_uses_pretrain_hybrid_on_core_v019(tmp_path):
    proc = _bench(["--dry-run", "--set", "ab", "--repeats", "1"], tmp_path / "mlm", tmp_path,
                  hybrid_script=True)
    assert proc.returncode == 0, proc.stderr
    up = _commands(proc.stdout)["ab_upstream#0"]
    assert up[up.index("--hybrid-layer-pattern") + 1] == "*EME*EME*EMM"
    assert any(t.endswith("pretrain_hybrid.py") for t in up)


@pytest.mark.parametrize("argv,fragment", [
    (["--fast", "warp=on"], "--fast warp=on: unknown fast path 'warp'; known: mamba_fused"),
    (["--fast", "fp8=e5m2"], "--fast fp8=e5m2: value 'e5m2'; allowed for fp8: on, off"),
    (["--fast", "mamba_fused=on"], "--fast mamba_fused=on: that is already every run's setting"),
    (["--set", "ab,bogus"], "--set ab,bogus: unknown ['bogus']; allowed: ab, stage, fast, startup"),
    (["--set", "ab", "--fast", "fp8=on"], "--fast runs variants of the stage slice: add --set stage or --set fast"),
    (["--iters", "3"], "--iters 3 must exceed --warmup 3"),
    (["--gbs", "6"], "--gbs 6 is not a multiple of --mbs 4"),
    (["--stage-spec", "AE"], "--stage-spec AE: allowed: NAM56R, NAM56R_DENSE"),
    (["--ab-runs", "ours,mine"], "--ab-runs ours,mine: unknown mine; allowed (each once): ours, upstream"),
    (["--ab-runs", "ours,ours"], "--ab-runs ours,ours: empty or repeated"),
    (["--gpu-gib", "0"], "--gpu-gib 0.0: must be > 0"),
    (["--stage-slices", "4,24"], "--stage-slices 4,24: allowed: layer counts from 4, 8, 12, 16, 24, comma-separated, 12 among"),
    (["--stage-slices", "12,20"], "--stage-slices 12,20: allowed: layer counts from 4, 8, 12, 16, 24"),
    (["--stage-slices", "12,x"], "--stage-slices 12,x: allowed: layer counts from"),
    (["--base", "fused_lm_loss=off"], "--base fused_lm_loss=off: ours only (upstream's scripts have no such flag)"),
    (["--set", "fast", "--fast", "fused_lm_loss=on"], "--fast fused_lm_loss=on: that is already every run's setting"),
])
def test_bench_stage_bad_input_is_one_line_exit_2(argv, fragment, tmp_path):
    proc = _bench(["--dry-run", *argv], tmp_path / "mlm", tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.skipif(not MIRROR.exists(), reason="needs the Megatron-LM git mirror at " + str(MIRROR))
@pytest.mark.parametrize("tag", ["core_v0.16.1", "core_v0.19.0"])
def test_bench_stage_flags_are_known_to_megatron_lm(tag, default_dry_run):
    """Every flag of every run, each fast-path setting included, exists in that tag's parser."""
    from megacpp_mcore.testing.megatron_lm import flag_known, parser_dests

    bench = _load_bench()
    dests = parser_dests(str(MIRROR), tag)
    release = "0.19.0" if tag == "core_v0.19.0" else "0.16.1"
    flags = {f for _, values in bench.FAST_PATHS.values() for v in values
             for f in bench.fast_flags(_name_of(bench, values), v, release) if f.startswith("--")}
    for tokens in default_dry_run[1].values():
        start = next(i for i, t in enumerate(tokens) if t.endswith(".py") or t == "megacpp_mcore.launch_pretrain")
        flags |= {t for t in tokens[start + 1:] if t.startswith("--")}
    launcher = lp.add_megacpp_arguments(argparse.ArgumentParser())
    ours = {"--megatron-lm", "--no-rope-fusion"} | {  # the last: add_argument by hand
        f for action in launcher._actions for f in action.option_strings}
    assert [f for f in sorted(flags) if f not in ours and not flag_known(f, dests)] == []


@pytest.mark.skipif(not MIRROR.exists(), reason="needs the Megatron-LM git mirror at " + str(MIRROR))
def test_bench_stage_profile_step_profiles_every_run_with_known_flags(tmp_path):
    """--profile-step N: Megatron's torch.profiler on iteration N of every run (both sides), each
    run's trace in its own directory; the flags exist in both tags' parsers; bad N refused."""
    from megacpp_mcore.testing.megatron_lm import flag_known, parser_dests

    proc = _bench(["--dry-run", "--set", "ab", "--repeats", "1", "--iters", "12", "--profile-step", "9"],
                  tmp_path / "mlm", tmp_path)
    assert proc.returncode == 0, proc.stderr
    runs = _commands(proc.stdout)
    dirs = set()
    for tokens in runs.values():
        assert _flag(tokens, "--profile-step-start") == "9" and _flag(tokens, "--profile-step-end") == "10"
        assert "--use-pytorch-profiler" in tokens and "--profile" in tokens
        dirs.add(_flag(tokens, "--tensorboard-dir"))
    assert len(dirs) == len(runs) == 2
    flags = {"--profile", "--use-pytorch-profiler", "--profile-step-start", "--profile-step-end", "--tensorboard-dir"}
    for tag in ("core_v0.16.1", "core_v0.19.0"):
        dests = parser_dests(str(MIRROR), tag)
        assert [f for f in sorted(flags) if not flag_known(f, dests)] == [], tag
    bad = _bench(["--dry-run", "--iters", "8", "--profile-step", "8"], tmp_path / "mlm", tmp_path)
    assert bad.returncode == 2 and "--profile-step 8: must be in 1..7 (--iters 8)" in bad.stderr


def test_bench_stage_leaves_the_profiled_iterations_out_of_the_timing():
    bench = _load_bench()
    m = get_preset("nam56r").replace(num_layers=12, mtp_depth=0, features={})
    run = bench.Run(name="r#0", model=m, command=[], env={}, returncode=0,
                    ms=[9000, 1100, 1000, 1000, 5000, 7000, 1000, 1020, 980])
    args = types.SimpleNamespace(warmup=2, gbs=8, profile_step=5)  # iterations 4..7 (1-based) left out
    row = bench.summarize(run, args)
    assert row["ms_steady"] == [1000, 1020, 980] and row["ms_per_iteration"] == 1000


def test_trace_summary_charges_idle_gaps_to_the_launching_frame():
    """Each gap before a kernel is charged to the innermost package frame open at its launch."""
    ts = load_script("trace_summary")

    def kernel(ts_, dur, corr):
        return {"ph": "X", "cat": "kernel", "name": "k", "ts": ts_, "dur": dur, "args": {"correlation": corr}}

    def launch(ts_, corr):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts_, "dur": 1, "tid": 7,
                "args": {"correlation": corr}}

    def frame(name, ts_, dur, tid=7):
        return {"ph": "X", "cat": "python_function", "name": name, "ts": ts_, "dur": dur, "tid": tid}

    events = [
        kernel(0, 100, 1), kernel(150, 10, 2), kernel(400, 10, 3), kernel(415, 10, 4),  # gaps 50, 240, 5
        launch(5, 1), launch(140, 2), launch(390, 3), launch(405, 4),
        frame("/x/site-packages/megatron/core/transformer/moe/moe_layer.py(357): forward", 100, 400),
        frame("/x/site-packages/transformer_engine/pytorch/cpp_extensions/gemm.py(213): general_grouped_gemm", 380, 20),
        frame("/x/site-packages/torch/nn/modules/module.py(1779): _wrapped_call_impl", 385, 10),  # not a package
        frame("/x/megacpp_mcore/layers/moe.py(9): other_thread", 0, 1000, tid=8),
    ]
    got = {e["frame"]: (e["idle_ms"], e["gaps"]) for e in ts.idle_by_launcher(events)}
    assert got == {"transformer_engine/pytorch/cpp_extensions/gemm.py(213): general_grouped_gemm": (0.24, 1),
                   "megatron/core/transformer/moe/moe_layer.py(357): forward": (0.05, 1)}
    assert ts.idle_by_launcher([kernel(0, 1, 1), kernel(50, 1, 2)]) == []  # no Python stacks


def test_trace_summary_reads_device_time_idle_gaps_and_categories(tmp_path):
    """A synthetic Chrome trace: the union of device intervals is busy time, the rest of the span
    idle; kernels fall into categories by name; a gzipped trace in a directory is found; bad input
    is one line, exit 2."""
    import gzip

    ts = load_script("trace_summary")
    events = [
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_256x128", "ts": 0, "dur": 400},
        {"ph": "X", "cat": "kernel", "name": "flash_fwd_kernel", "ts": 300, "dur": 200},  # overlaps
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 600, "dur": 50},
        {"ph": "X", "cat": "kernel", "name": "_chunk_scan_fwd_kernel", "ts": 1000, "dur": 500},
        {"ph": "X", "cat": "kernel", "name": "void at::native::vectorized_elementwise_kernel", "ts": 1500, "dur": 100},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},  # host: not counted
    ]
    summary = ts.summarize(events)
    assert summary["span_ms"] == pytest.approx(1.6) and summary["busy_ms"] == pytest.approx(1.15)
    assert summary["idle_ms"] == pytest.approx(0.45) and summary["device_events"] == 5
    cats = {k: v["ms"] for k, v in summary["categories"].items()}
    assert cats == {"mamba_ssd": pytest.approx(0.5), "gemm": pytest.approx(0.4), "attention": pytest.approx(0.2),
                    "elementwise": pytest.approx(0.1), "copy": pytest.approx(0.05)}
    assert summary["top_kernels"][0]["name"] == "_chunk_scan_fwd_kernel"
    trace_dir = tmp_path / "traces" / "run_0"
    trace_dir.mkdir(parents=True)
    with gzip.open(trace_dir / "host_1.1234.pt.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert ts.find_trace(tmp_path / "traces").name == "host_1.1234.pt.trace.json.gz"
    assert ts.main([str(tmp_path / "traces"), "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["busy_ms"] == pytest.approx(1.15)
    (tmp_path / "empty").mkdir()
    for bad, fragment in ((tmp_path / "empty", "no torch.profiler trace"),):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "trace_summary.py"), str(bad)],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and fragment in proc.stderr and len(proc.stderr.splitlines()) == 1
    with pytest.raises(ts.TraceError, match="no device events"):
        ts.summarize(events[-1:])


def _load_bench():
    return load_script("bench_stage")


def _name_of(bench, values) -> str:
    return next(name for name, (_, v) in bench.FAST_PATHS.items() if v is values)


def test_bench_stage_writes_after_every_run_and_resumes_the_rest(tmp_path, monkeypatch, capsys):
    """A call cut at its deadline (here: the second run) leaves an --out file with the runs it
    finished; --resume of it runs only the others and writes the complete result. A resume file
    of other settings, or not a result at all, is refused (exit 2, the reason named)."""
    import torch

    bench = _load_bench()
    checkout = _checkout(tmp_path / "mlm")
    monkeypatch.setenv("OUT", str(tmp_path / "logs"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in")
    executed, cut = [], {"at": 2}

    def execute(run, args, log_dir):
        executed.append(run.name)
        if len(executed) == cut["at"]:
            raise KeyboardInterrupt  # the deadline
        run.returncode, run.startup_s = 0, 1.0
        run.ms, run.losses = [100.0 + len(executed)] * args.iters, [5.0, 4.0]

    monkeypatch.setattr(bench, "execute", execute)
    out = tmp_path / "stage.json"
    argv = ["--megatron-lm", str(checkout), "--set", "fast", "--fast", "cuda_graphs=on",
            "--fast", "moe_permute_fusion=on", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    partial = json.loads(out.read_text())
    assert [r["name"] for r in partial["runs"]] == ["stage12#0"] and partial["complete"] is False
    cut["at"] = None
    executed.clear()
    assert bench.main([*argv, "--resume", str(out)]) == 0
    assert executed == ["stage12_cuda_graphs=on#0", "stage12_moe_permute_fusion=on#0"]
    result = json.loads(out.read_text())
    assert result["complete"] and [r["name"] for r in result["runs"]] == [
        "stage12#0", "stage12_cuda_graphs=on#0", "stage12_moe_permute_fusion=on#0"]
    assert result["runs"][0]["ms_per_iteration"] == 101.0  # the first call's run, kept
    capsys.readouterr()
    assert bench.main([*argv, "--iters", "9", "--resume", str(out)]) == 2
    assert "other settings (iters)" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert bench.main([*argv, "--resume", str(tmp_path / "junk.json")]) == 2
    assert "not a bench_stage --out file" in capsys.readouterr().err


def test_bench_stage_projection_from_the_short_slices_by_hand():
    """t4, t8, t12, t12+MTP = 40, 55, 100, 130 us/token: a MoD AEME (layers 4-7) is 15, a MoD period
    AEME + AEME + AEMR 100 + 55 - 80 = 75, the 52 layers and the head t12 + 3 periods + AEME = 340
    (head alone ~ 2 t4 - t8 = 25, trunk 315), MTP 30: compute 370 us/token; communication as with
    the long slices. With a 24-layer run too, the short slices still make the projection and t24
    checks their prediction 2 t12 + t8 - 2 t4 = 175, a 16-layer one t12 + t8 - t4 = 115."""
    bench = _load_bench()
    args = types.SimpleNamespace(ep=1, dp=8, gbs_8x=64, a2a_gbps=300.0, a2a_overlap=0.0,
                                 allreduce_gbps=300.0, grad_overlap=0.0, mbs=4, gbs=8)
    tps = {"stage4": 1 / 40e-6, "stage8": 1 / 55e-6, "stage12": 1 / 100e-6, "stage12_mtp": 1 / 130e-6}
    proj = bench.projection(tps, args)
    t = proj["seconds_per_token"]
    assert proj["slices"] == ["stage4", "stage8", "stage12", "stage12_mtp"] and proj["checks"] is None
    assert (t["aeme"], t["period_12_layers"]) == (pytest.approx(15e-6), pytest.approx(75e-6))
    assert (t["head"], t["trunk_52_layers"]) == (pytest.approx(25e-6), pytest.approx(315e-6))
    assert t["mtp_depth_2"] == pytest.approx(30e-6) and t["all_to_all"] == 0.0  # EP 1
    assert 1 / proj["tokens_per_s_per_gpu"] == pytest.approx(370e-6 + t["gradient_sync"])
    assert "t12 + 3 x (t12 + t8 - 2 t4) + (t8 - t4)" in proj["assumptions"][3]
    longer = bench.projection({**tps, "stage16": 1 / 110e-6, "stage24": 1 / 180e-6}, args)
    assert longer["tokens_per_s_per_gpu"] == pytest.approx(proj["tokens_per_s_per_gpu"])
    check = longer["checks"]  # t16 = t12 + AEME = 115; t24 = t12 + a period = 175
    assert (check["stage16"]["predicted"], check["stage16"]["measured"]) == (pytest.approx(115e-6), pytest.approx(110e-6))
    assert (check["stage24"]["predicted"], check["stage24"]["measured"]) == (pytest.approx(175e-6), pytest.approx(180e-6))
    assert check["stage24"]["measured_over_predicted"] == pytest.approx(180 / 175)
    # a short slice missing: the long slices' model where they ran, else none
    del tps["stage4"]
    assert bench.projection(tps, args) is None
    assert bench.projection({**tps, "stage24": 1 / 180e-6}, args)["slices"] == ["stage12", "stage24", "stage12_mtp"]
    # the optimizer's kernels (4, 6, 8, 9 us/token) sharded 8 ways: t4, t8, t12, t12+MTP = 36.5,
    # 49.75, 93, 122.125; a period 69.75, AEME 13.25, head 23.25
    tps["stage4"] = 1 / 40e-6
    opt = {"stage4": 4e-6, "stage8": 6e-6, "stage12": 8e-6, "stage12_mtp": 9e-6}
    sharded = bench.projection(tps, args, optimizer=opt)["seconds_per_token"]
    assert (sharded["period_12_layers"], sharded["aeme"]) == (pytest.approx(69.75e-6), pytest.approx(13.25e-6))
    assert sharded["head"] + sharded["trunk_52_layers"] == pytest.approx(93e-6 + 3 * 69.75e-6 + 13.25e-6)
    assert sharded["mtp_depth_2"] == pytest.approx(29.125e-6)


def test_bench_stage_short_slices_sum_the_whole_layer_table():
    """In a world where each layer costs what its symbol and MoD make it (made-up, all different)
    and the head a fixed amount, slices that are prefixes of the preset's own layer table give the
    projection exactly the 52 layers + head + MTP: the formula follows the table's MoD placement."""
    bench = _load_bench()
    args = types.SimpleNamespace(ep=1, dp=8, gbs_8x=64, a2a_gbps=300.0, a2a_overlap=0.0,
                                 allreduce_gbps=300.0, grad_overlap=0.0, mbs=4, gbs=8)
    nam = get_preset("nam56r")
    cost = {("A", False): 3.0, ("A", True): 2.5, ("E", False): 5.0, ("E", True): 4.25, ("M", False): 7.0,
            ("R", False): 11.0}
    head, mtp = 13.0, 17.0

    def seconds(n: int) -> float:  # us per token of the first n layers of the table, and the head
        return (head + sum(cost[e.symbol, "mod" in e.features] for e in nam.layer_table()[:n])) * 1e-6

    tps = {f"stage{n}": 1 / seconds(n) for n in (4, 8, 12, 16, 24)}
    tps["stage12_mtp"] = 1 / (seconds(12) + mtp * 1e-6)
    proj = bench.projection(tps, args)
    t = proj["seconds_per_token"]
    assert t["trunk_52_layers"] + t["head"] == pytest.approx(seconds(52))
    assert t["mtp_depth_2"] == pytest.approx(mtp * 1e-6)
    assert all(c["measured_over_predicted"] == pytest.approx(1.0) for c in proj["checks"].values())


def test_bench_stage_projection_by_hand():
    """The long slices (an earlier call's JSON, without stage4/stage8): t12, t24, t12+MTP = 100,
    180, 130 us/token: period 80, head 20, MTP 30; the trunk is 4 periods + AEME at 0.3142 of a
    period (hybrid FLOPs 1.862 G / 5.927 G); all-to-all 4 x 24 x 4 x 4096 x 2 B x 7/8 = 2,752,512 B
    at 300 GB/s; gradient sync 3,044,039,424 x 6 B x 7/8 at 300 GB/s over 32,768 tokens per GPU
    and step."""
    bench = _load_bench()
    args = types.SimpleNamespace(ep=8, dp=8, gbs_8x=64, a2a_gbps=300.0, a2a_overlap=0.0,
                                 allreduce_gbps=300.0, grad_overlap=0.0, mbs=4, gbs=8)
    proj = bench.projection({"stage12": 1 / 100e-6, "stage24": 1 / 180e-6, "stage12_mtp": 1 / 130e-6}, args)
    t = proj["seconds_per_token"]
    aeme = 503_316_480 + 2 * 339_738_624 + 679_477_248  # hybrid A + 2 E + M per token
    period = 3 * 503_316_480 + 5 * 339_738_624 + 4 * 679_477_248  # A3 E5 M3 + R (as M)
    assert (aeme, period) == (1_862_270_976, 5_926_551_552)
    assert t["trunk_52_layers"] == pytest.approx(4 * 80e-6 + 80e-6 * aeme / period)
    assert (t["head"], t["mtp_depth_2"]) == (pytest.approx(20e-6), pytest.approx(30e-6))
    assert t["all_to_all"] == pytest.approx(2_752_512 / 300e9)
    # dense = all 7,095,737,088 parameters less the 4,051,697,664 of 23 x 16 experts, + MoD routers
    mod = 4097 * sum("mod" in x.features for x in get_preset("nam56r").layer_table())
    assert t["gradient_sync"] == pytest.approx((3_044_039_424 + mod) * 6 * 7 / 8 / 300e9 / 32_768)
    assert proj["tokens_per_s_per_gpu"] == pytest.approx(1 / (t["trunk_52_layers"] + 50e-6 + t["all_to_all"]
                                                              + t["gradient_sync"]))
    assert t["host_counts"] == 0.0  # no stage12_host_counts run: not included, and the assumptions say so
    assert "NOT included" in proj["assumptions"][-2]
    # stage12 with the host's MoE counts at 110 us/token: 10 us over its 5 E layers, 2 us per E pass,
    # at every E pass of the whole model (its E layers and one per MTP depth)
    host = bench.projection({"stage12": 1 / 100e-6, "stage24": 1 / 180e-6, "stage12_mtp": 1 / 130e-6,
                             "stage12_host_counts": 1 / 110e-6}, args)
    passes = sum(e.symbol == "E" for e in get_preset("nam56r").layer_table()) + 2
    assert host["seconds_per_token"]["host_counts"] == pytest.approx(2e-6 * passes)
    assert 1 / host["tokens_per_s_per_gpu"] == pytest.approx(1 / proj["tokens_per_s_per_gpu"] + 2e-6 * passes)
    args.ep = 1  # one expert group: the counts stay on the device
    assert bench.projection({"stage12": 1 / 100e-6, "stage24": 1 / 180e-6, "stage12_mtp": 1 / 130e-6,
                             "stage12_host_counts": 1 / 110e-6}, args)["seconds_per_token"]["host_counts"] == 0.0
    assert bench.projection({"stage12": 1.0}, args) is None  # needs all three slices
    # each slice's optimizer kernels (8, 12, 9 us/token in their profiled steps) sharded 8 ways: the
    # slices count 7/8 of them less, t12, t24, t12+MTP = 93, 169.5, 122.125 us/token
    opt = {"stage12": 8e-6, "stage24": 12e-6, "stage12_mtp": 9e-6}
    sharded = bench.projection({"stage12": 1 / 100e-6, "stage24": 1 / 180e-6, "stage12_mtp": 1 / 130e-6}, args,
                               optimizer=opt)["seconds_per_token"]
    assert sharded["period_12_layers"] == pytest.approx(76.5e-6)
    assert (sharded["head"], sharded["mtp_depth_2"]) == (pytest.approx(16.5e-6), pytest.approx(29.125e-6))
    # the per-token optimizer time of a run comes from its profiled step: ms / (gbs x seq) tokens
    rows = [{"name": f"stage12#{r}", "returncode": 0, "profile": {"categories": {"optimizer": {"ms": ms}}}}
            for r, ms in enumerate((60.0, 70.0))]
    assert bench.optimizer_seconds_per_token(rows, args) == {"stage12": pytest.approx(65e-3 / (8 * 4096))}


def test_bench_stage_layouts_by_hand():
    """Each EP on 8 GPUs: the all-to-all scales with (ep - 1)/ep; the gradient sync adds each GPU's
    ep-th of the 4,051,697,664 expert parameters, reduced over expert-DP = 8 / ep ranks; the host
    read of the counts only where EP > 1; memory = the plan's estimate + the stage12_mtp run's peak
    beyond the plan's estimate for that slice, fitting under --gpu-gib."""
    from megacpp_mcore.models.plan import build_plan

    bench = _load_bench()
    args = types.SimpleNamespace(ep=8, dp=8, gbs_8x=64, a2a_gbps=300.0, a2a_overlap=0.0,
                                 allreduce_gbps=300.0, grad_overlap=0.0, mbs=4, gbs=8, gpu_gib=130.0)
    tps = {"stage12": 1 / 100e-6, "stage24": 1 / 180e-6, "stage12_mtp": 1 / 130e-6, "stage12_host_counts": 1 / 110e-6}
    table = bench.layouts(tps, {"stage12_mtp": 70.0}, args)
    assert [row["ep"] for row in table] == [8, 4, 2, 1]
    by_ep = {row["ep"]: row for row in table}
    nam = get_preset("nam56r")
    mod = 4097 * sum("mod" in x.features for x in nam.layer_table())
    dense, experts, tokens = 3_044_039_424 + mod, 4_051_697_664, 32_768
    for ep, row in by_ep.items():
        t = row["seconds_per_token"]
        assert t["all_to_all"] == pytest.approx(4 * 24 * 4 * 4096 * 2 * (ep - 1) / ep / 300e9)
        edp = 8 // ep
        assert t["gradient_sync"] == pytest.approx((dense * 7 / 8 + experts / ep * (edp - 1) / edp) * 6 / 300e9 / tokens)
        assert (t["host_counts"] > 0) == (ep > 1)
        mem = row["memory"]
        assert mem["estimate_gib"] == pytest.approx(build_plan(nam, ep=ep, dp=8, micro_batch=4)["memory"]["total"] / 2**30)
        sliced = build_plan(nam.replace(num_layers=12), ep=1, dp=1, micro_batch=4)["memory"]["total"] / 2**30
        assert mem["unmodelled_gib"] == pytest.approx(70.0 - sliced)
        assert mem["fits"] == (mem["estimate_gib"] + 70.0 - sliced <= 130.0)
    assert by_ep[1]["seconds_per_token"]["all_to_all"] == 0.0
    assert by_ep[8]["tokens_per_s_per_gpu"] == pytest.approx(bench.projection(tps, args)["tokens_per_s_per_gpu"])
    # more experts per GPU, more memory: EP 1 holds all 16 on every GPU
    assert by_ep[1]["memory"]["estimate_gib"] > by_ep[8]["memory"]["estimate_gib"]
    # without the stage12_mtp run's peak the memory is an estimate only, and no fit is claimed
    assert bench.layouts(tps, {}, args)[0]["memory"]["fits"] is None
    assert bench.layouts({"stage12": 1.0}, {}, args) == []


def _row(name: str, us_per_token: float, peak_gib: float) -> dict:
    """A finished bench_stage run: 8 x 4096 tokens per iteration at ``us_per_token``."""
    ms = us_per_token * 8 * 4096 / 1e3
    return {"name": f"{name}#0", "returncode": 0, "startup_s": 30.0, "autotune_s": 0.0, "ms_per_iteration": ms,
            "ms_p25_p75": [ms, ms], "ms_steady": [ms] * 3, "tokens_per_s": 1e6 / us_per_token,
            "tflops_ours": None, "tflops_hybrid": None, "megatron_reported_tflops": None,
            "peak_gib": peak_gib, "loss_first": 11.0, "loss_last": 10.0}


def test_bench_stage_mtp_recompute_run_projects_its_own_layouts(capsys):
    """stage12_mtp_recompute: its ratio and peak against stage12_mtp (not stage12), and a second
    layout table where its time and peak stand for stage12_mtp's: MTP 30 -> 45 us/token, the
    measured rest 10 GiB lower."""
    bench = _load_bench()
    args = types.SimpleNamespace(ep=1, dp=8, gbs_8x=64, a2a_gbps=300.0, a2a_overlap=0.0, allreduce_gbps=300.0,
                                 grad_overlap=0.0, mbs=4, gbs=8, gpu_gib=134.0, device=None)
    rows = [_row("stage12", 100, 58.0), _row("stage12_mtp", 130, 80.0), _row("stage12_mtp_recompute", 145, 70.0),
            _row("stage12_host_counts", 110, 58.0), _row("stage4", 40, 30.0), _row("stage8", 55, 45.0)]
    out = bench.report(rows, args)
    printed = capsys.readouterr().out
    assert out["ratios"]["stage12_mtp_recompute"] == pytest.approx(130 / 145)
    assert out["ratios"]["stage12_host_counts"] == pytest.approx(100 / 110)
    assert "stage12_mtp_recompute: 0.897 x the stage12_mtp tokens/s, peak 70.0 GiB (the stage12_mtp run's: 80.0)" in printed
    plain, recomputed = out["layouts_8xh200"], out["layouts_8xh200_mtp_recompute"]
    assert [row["ep"] for row in recomputed] == [row["ep"] for row in plain] == [8, 4, 2, 1]
    assert "with --megacpp-mtp-recompute on" in printed
    for a, b in zip(plain, recomputed):
        assert 1 / b["tokens_per_s_per_gpu"] - 1 / a["tokens_per_s_per_gpu"] == pytest.approx(15e-6)
        assert b["seconds_per_token"]["mtp_depth_2"] == pytest.approx(45e-6)
        assert a["memory"]["total_gib"] - b["memory"]["total_gib"] == pytest.approx(10.0)
    # without the recompute run: one table, as before
    out = bench.report([r for r in rows if not r["name"].startswith("stage12_mtp_recompute")], args)
    assert "layouts_8xh200_mtp_recompute" not in out and out["layouts_8xh200"] == plain


def test_recipe_benchmark_prints_both_counts(capsys):
    """scripts/recipe_benchmark.py: TFLOP/s/GPU ours and by hybrid_flops from the same tokens/s."""
    rb = load_script("recipe_benchmark")
    log = "".join(f"iteration {i}/ 3 | elapsed time per iteration (ms): 1000.0 | lm loss: {11 - i}.0E+00 |\n"
                  for i in (1, 2, 3))
    proc = subprocess.CompletedProcess([], 0, stdout=log, stderr="")
    run = rb.summarize("lite", ["--global-batch-size", "8", "--seq-length", "4096"], proc, gpus=1,
                       warmup=1, fpt={"ours": 2e9, "hybrid": 3e9})
    # 8 x 4096 tokens per 1.0 s = 32,768 tokens/s; x 2 GFLOP = 65.5 TFLOP/s, x 3 GFLOP = 98.3
    assert run.tokens_per_s_per_gpu == 32_768
    assert (run.tflops_per_gpu, run.hybrid_tflops_per_gpu) == (pytest.approx(65.536), pytest.approx(98.304))
    rb.print_table([run])
    out = capsys.readouterr().out
    assert "TFLOP/s/GPU ours | TFLOP/s/GPU hybrid_flops" in out and "| 65.5 | 98.3 |" in out
    assert accounting.flop_counts(get_preset("nam56r-lite"))["hybrid"] > 0


def test_bench_stage_reads_a_megatron_log(tmp_path):
    """execute() + summarize() on a stand-in run printing Megatron-LM's log lines: start-up to the
    first finished iteration, autotuning seconds, median ms after warm-up, both TFLOP/s, peak."""
    bench = _load_bench()
    lines = ["Triton autotuning for function _chunk_scan_fwd_kernel,", "finished after 2.50s,",
             "finished after 1.25s,"]
    lines += [f" [2026-12-04] iteration {i}/ 5 | elapsed time per iteration (ms): {ms} | throughput per GPU "
              f"(TFLOP/s/GPU): 300.0 | lm loss: {12 - i}.0E+00 |" for i, ms in enumerate([9000, 1100, 1000, 1000, 900], 1)]
    lines.insert(4, "[Rank 0] (after 1 iterations) memory (MB) | allocated: 1.0 | max allocated: 40960.0 |")
    script = "import sys\nfor line in sys.argv[1:]: print(line)\n"
    m = get_preset("nam56r").replace(num_layers=12, mtp_depth=0, features={})
    run = bench.Run(name="stage12#0", model=m, command=[sys.executable, "-c", script, *lines], env={})
    args = types.SimpleNamespace(autotune_cache=True, triton_cache=None, print_autotuning=True, warmup=2,
                                 gbs=8, profile_step=0)
    bench.execute(run, args, tmp_path)
    row = bench.summarize(run, args)
    assert row["returncode"] == 0 and row["startup_s"] > 0 and row["autotune_s"] == 3.75
    assert (row["first_iteration_ms"], row["ms_per_iteration"]) == (9000, 1000)  # median of 1000, 1000, 900
    tokens = 8 * 4096 / 1.0
    assert row["tokens_per_s"] == tokens and row["peak_gib"] == 40.0
    assert row["tflops_hybrid"] == pytest.approx(tokens * accounting.hybrid_flops_per_token(m)["total"] / 1e12)
    assert row["tflops_ours"] == pytest.approx(tokens * accounting.flops_per_token(m, causal=True)["total"] / 1e12)
    assert (row["loss_first"], row["loss_last"], row["megatron_reported_tflops"]) == (11.0, 7.0, 300.0)
    assert (tmp_path / "stage12_0.log").read_text().count("lm loss") == 5  # the log is kept
    assert row["ms_steady"] == [1000, 1000, 900] and row["ms_p25_p75"] == [900, 1000]


def test_bench_stage_ratio_interval_brackets_the_ratio_and_widens_with_spread():
    """ratio_interval: the ratio of medians with a bootstrap interval; identical samples give a
    point interval, samples that spread by 10% an interval that holds 1 for a 2% difference."""
    bench = _load_bench()
    assert bench.ratio_interval([100.0] * 8, [105.0] * 8) == (1.05, 1.05, 1.05)
    fast = [95.0, 100.0, 105.0, 110.0, 90.0, 100.0, 108.0, 93.0]
    slow = [t * 1.02 for t in fast[::-1]]
    point, low, high = bench.ratio_interval(fast, slow)
    assert point == pytest.approx(1.02) and low < 1.0 < point < high
    assert bench.ratio_interval(fast, slow) == (point, low, high)  # seeded: the same every call


# ------------------------------------------------------------- train/fast_paths.py (the builder) --

def _fast_kwargs(fast, model, *, cuda=True, fused_rope=True, fused_conv=True, fused_permute=True):
    return fast.config_kwargs(model, cuda=cuda, fused_rope=fused_rope, fused_conv=fused_conv,
                              fused_permute=fused_permute)


def test_fast_paths_default_reproduces_the_builder_defaults():
    from megacpp_mcore.train.fast_paths import FastPaths

    tiny = get_preset("nam56r-tiny")  # MLA, M, MoE
    assert _fast_kwargs(FastPaths(), tiny, cuda=False, fused_rope=False, fused_conv=False,
                        fused_permute=False) == {
        "bias_dropout_fusion": False, "cross_entropy_loss_fusion": False, "cuda_graph_impl": "none",
        "apply_rope_fusion": False, "use_mamba_mem_eff_path": False,
        "moe_token_dispatcher_type": "allgather", "moe_permute_fusion": False, "moe_router_fusion": False}
    on_gpu = _fast_kwargs(FastPaths(), tiny)
    assert on_gpu["bias_dropout_fusion"] and on_gpu["use_mamba_mem_eff_path"]
    assert on_gpu["moe_token_dispatcher_type"] == "alltoall" and not on_gpu["apply_rope_fusion"]  # MLA: off
    assert on_gpu["moe_permute_fusion"]  # TE's fused permutation where it is installed (x1.04-1.05)
    assert not _fast_kwargs(FastPaths(), tiny, fused_permute=False)["moe_permute_fusion"]
    assert not _fast_kwargs(FastPaths(moe_permute_fusion=False), tiny)["moe_permute_fusion"]
    dense = get_preset("ae-tiny").replace(moe=None)
    assert _fast_kwargs(FastPaths(), dense)["apply_rope_fusion"] and "use_mamba_mem_eff_path" not in \
        _fast_kwargs(FastPaths(), dense)


def test_fast_paths_switch_each_kernel_path():
    from megacpp_mcore.train.fast_paths import FastPaths

    tiny = get_preset("nam56r-tiny")
    kw = _fast_kwargs(FastPaths(mamba_fused=False, fused_residual=False, moe_dispatcher="alltoall",
                                moe_permute_fusion=True, moe_router_fusion=True, cross_entropy_fusion=True,
                                cuda_graphs="transformer_engine", fp8="hybrid"), tiny)
    assert {k: kw[k] for k in ("use_mamba_mem_eff_path", "bias_dropout_fusion",
                                                   "moe_permute_fusion", "moe_router_fusion",
                                                   "cross_entropy_loss_fusion", "cuda_graph_impl", "fp8",
                                                   "fp8_recipe")} == {
        "use_mamba_mem_eff_path": False, "bias_dropout_fusion": False, "moe_permute_fusion": True,
        "moe_router_fusion": True, "cross_entropy_loss_fusion": True, "cuda_graph_impl": "transformer_engine",
        "fp8": "hybrid", "fp8_recipe": "delayed"}
    # MLA's fused RoPE: YaRN at factor 1 (== RoPE, next test), the fused kernels' path
    mla = _fast_kwargs(FastPaths(mla_rope_fusion=True), tiny)
    assert {k: mla[k] for k in ("apply_rope_fusion", "rope_type", "rotary_scaling_factor", "mscale",
                                "mscale_all_dim", "original_max_position_embeddings")} == {
        "apply_rope_fusion": True, "rope_type": "yarn", "rotary_scaling_factor": 1.0, "mscale": 1.0,
        "mscale_all_dim": 0.0, "original_max_position_embeddings": 256}


@pytest.mark.parametrize("fast,host,fragment", [
    (dict(mla_rope_fusion=True), dict(cuda=False), "needs a CUDA device for mla_rope_fusion"),
    (dict(fp8="hybrid", cuda_graphs="local"), dict(cuda=False), "for cuda_graphs, fp8"),
    (dict(mamba_fused=True), dict(fused_conv=False), "mamba_fused=True needs causal_conv1d"),
    (dict(rope_fusion=True), dict(fused_rope=False, model="ae-tiny"), "rope_fusion=True needs Transformer Engine"),
    (dict(mla_rope_fusion=True), dict(model="ae-tiny"), "needs a model with MLA"),
    (dict(moe_permute_fusion=True), dict(fused_permute=False), "moe_permute_fusion=True needs Transformer "
                                                                "Engine's fused MoE permutation"),
])
def test_fast_paths_refuse_what_the_host_lacks(fast, host, fragment):
    from megacpp_mcore.train.fast_paths import FastPaths

    model = get_preset(host.pop("model", "nam56r-tiny"))
    with pytest.raises(ValueError, match=fragment):
        _fast_kwargs(FastPaths(**fast), model, **host)


@pytest.mark.parametrize("fast,fragment", [
    (dict(moe_dispatcher="nccl"), "FastPaths.moe_dispatcher='nccl'; allowed: alltoall, allgather, flex"),
    (dict(cuda_graphs="full"), "FastPaths.cuda_graphs='full'; allowed: none, local, transformer_engine"),
    (dict(fp8="e5m2"), "FastPaths.fp8='e5m2'; allowed: e4m3, hybrid"),
    (dict(moe_permute_fusion="yes"), "FastPaths.moe_permute_fusion must be True, False or None"),
])
def test_fast_paths_validate_their_values(fast, fragment):
    from megacpp_mcore.train.fast_paths import FastPaths

    with pytest.raises(ValueError, match=re.escape(fragment)):
        FastPaths(**fast)


def test_fast_paths_from_options():
    """``megacpp-mcore train --fast NAME=VALUE``: on/off/auto for the switches, names for the rest."""
    from megacpp_mcore.train.fast_paths import FastPaths

    assert FastPaths.from_options([]) == FastPaths()
    assert FastPaths.from_options(["moe_permute_fusion=off", "mamba-fused=auto", "cuda_graphs=local",
                                   "fp8=hybrid", "fp8_recipe=tensorwise", "moe_dispatcher=allgather"]) == \
        FastPaths(moe_permute_fusion=False, mamba_fused=None, cuda_graphs="local", fp8="hybrid",
                  fp8_recipe="tensorwise", moe_dispatcher="allgather")
    assert FastPaths.from_options(["fp8=off", "moe_router_fusion=on"]) == FastPaths(moe_router_fusion=True)
    for items, fragment in ((["foo=on"], "'foo=on': expected NAME=VALUE with NAME one of mamba_fused"),
                            (["moe_permute_fusion"], "'moe_permute_fusion': expected NAME=VALUE"),
                            (["moe_permute_fusion=yes"], "moe_permute_fusion takes on, off, auto"),
                            (["moe_router_fusion=auto"], "moe_router_fusion takes on, off"),  # no host default
                            (["fp8=e5m2"], "fp8 takes off, e4m3, hybrid"),
                            (["cuda_graphs=full"], "cuda_graphs takes none, local, transformer_engine"),
                            (["fp8=off", "fp8=e4m3"], "'fp8=e4m3': fp8 given twice")):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            FastPaths.from_options(items)


def test_yarn_at_factor_one_is_rope(monkeypatch):
    """The rotary embedding MLA's fused path uses (YaRN, factor 1, mscale 1, mscale_all_dim 0)
    equals plain RoPE, so switching mla_rope_fusion on changes kernels, not the model."""
    import torch
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # YaRN moves its tables there
    rope = RotaryEmbedding(kv_channels=64, rotary_percent=1.0, use_cpu_initialization=True)
    yarn = YarnRotaryEmbedding(kv_channels=64, scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0,
                               original_max_position_embeddings=256, use_cpu_initialization=True)
    emb, mscale = yarn(256)
    assert mscale == 1.0 and torch.equal(emb, rope(256))  # [s, 1, 1, 64]


def test_transformer_config_takes_the_fast_paths():
    from megacpp_mcore.train import runtime
    from megacpp_mcore.train.fast_paths import FastPaths

    tiny = get_preset("nam56r-tiny")
    config = runtime.transformer_config(tiny, runtime.Parallelism(),
                                        fast=FastPaths(moe_dispatcher="allgather", fused_residual=False))
    assert config.moe_token_dispatcher_type == "allgather" and config.rope_type == "rope"
    assert config.bias_dropout_fusion is False
    with pytest.raises(ValueError, match="needs a CUDA device for moe_dispatcher"):  # a CUDA stream
        runtime.transformer_config(tiny, runtime.Parallelism(), fast=FastPaths(moe_dispatcher="alltoall"))
    assert not runtime.fused_permute_available() and config.moe_permute_fusion is False  # no CUDA here
    with pytest.raises(ValueError, match="needs a CUDA device for fp8"):
        runtime.transformer_config(tiny, runtime.Parallelism(), fast=FastPaths(fp8="hybrid"))


def test_fused_permute_is_detected_from_every_op(monkeypatch):
    """``moe_permute_fusion`` defaults on only where a CUDA device and all five of TE's fused
    permutation ops are present (Megatron's config check raises on any one missing)."""
    import torch
    from megatron.core.transformer.moe import moe_utils

    from megacpp_mcore.train import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in runtime.FUSED_PERMUTE_OPS:
        monkeypatch.setattr(moe_utils, name, lambda *a: None, raising=False)
    assert runtime.fused_permute_available()
    monkeypatch.setattr(moe_utils, "fused_unpermute", None)
    assert not runtime.fused_permute_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(moe_utils, "fused_unpermute", lambda *a: None)
    assert not runtime.fused_permute_available()
