"""The training loop: resume equality, bad input, receipt schema, observed backends, stats hooks,
FLOPs estimate, 2-rank launches of the CLI (TP=2+SP; interleaved PP=2 x VP=2 against PP=2), and
(GPU) the TE path."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megacpp_mcore import cli
from megacpp_mcore.models.accounting import flops_per_token, hybrid_flops_per_token
from megacpp_mcore.features.mtp import fused_ce
from megacpp_mcore.train import checkpoint, data, receipt, loop as training
from megacpp_mcore.models.presets import ModelConfig, get_preset
from test_data import make_tree
from scripts_module import load_script

# Small enough for seconds per run on CPU; ae-tiny's A/E blocks (MoE with a shared expert).
TINY_ARGS = ["--preset", "ae-tiny", "--num-layers", "2", "--seq-length", "32"]


def tiny_model() -> ModelConfig:
    return get_preset("ae-tiny").replace(name="custom(AE)", num_layers=2, seq_length=32)


def tiny_cfg(prefix: str, **kw) -> training.TrainConfig:
    base = dict(steps=6, micro_batch_size=2, global_batch_size=4, lr=3e-3, min_lr=3e-4,
                warmup_steps=2, log_interval=1, eval_interval=100, eval_iters=1, data=prefix,
                backend="auto")
    return training.TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted 6 steps; 3 steps then a checkpoint; resumed to 6 (all one rank, in-process)."""
    tmp = tmp_path_factory.mktemp("train")
    previous = os.environ.get("MEGACPP_CACHE")
    os.environ["MEGACPP_CACHE"] = str(tmp / "cache")
    masked = fused_ce._FusedLinearCrossEntropyMasked
    original = masked.apply
    assert "apply" not in vars(masked)
    recomputes, applied = fused_ce.masked_recomputes, []
    masked.apply = lambda *a: applied.append(1) or original(*a)  # removed below
    try:
        prefix = data.prepare(make_tree(tmp / "src", extra=120), tmp / "data" / "cpp", valid_percent=20).prefix
        lines: list[str] = []
        # the loop's fused LM loss (off by default) in all three runs: resume equality holds with it
        full = training.train(tiny_model(), tiny_cfg(prefix, receipt=str(tmp / "full.json"), fused_lm_loss=True),
                              log=lines.append)
        ckpt = tmp / "ckpt"
        stopped = training.train(tiny_model(), tiny_cfg(prefix, save=str(ckpt), stop_after=3, fused_lm_loss=True,
                                                         receipt=str(tmp / "stopped.json")), log=lambda _: None)
        resumed = training.train(tiny_model(), tiny_cfg(prefix, load=str(ckpt), receipt=str(tmp / "resumed.json"),
                                                        fused_lm_loss=True), log=lambda _: None)
    finally:
        del masked.apply  # back to autograd.Function's
        if previous is None:
            os.environ.pop("MEGACPP_CACHE", None)
        else:
            os.environ["MEGACPP_CACHE"] = previous
    return {"full": full, "stopped": stopped, "resumed": resumed, "ckpt": ckpt, "prefix": prefix,
            "tmp": tmp, "log": lines, "recomputes": fused_ce.masked_recomputes - recomputes,
            "fused_losses": len(applied)}


def test_the_loops_loss_takes_the_fused_losss_forward_time_gradients(runs):
    """With ``fused_lm_loss`` the loop's models carry the fused LM loss, and Megatron's schedule
    consumes it as ``c * sum(loss * loss_mask)``: no backward had to recompute its logits blocks."""
    assert runs["fused_losses"] > 0 and runs["recomputes"] == 0
    assert runs["full"]["training"]["lm_loss"] == "fused"  # the receipt says which loss ran


def test_receipt_records_the_kernel_paths_as_built(runs):
    """The receipt names the kernel paths the run's TransformerConfig was built with (CPU: all
    fusions off, allgather dispatcher), so tokens/s in it can be read against them."""
    from megacpp_mcore.train.fast_paths import CONFIG_FIELDS

    paths = runs["full"]["backends"]["kernel_paths"]
    assert set(paths) == set(CONFIG_FIELDS)
    assert paths["moe_token_dispatcher_type"] == "allgather" and paths["moe_permute_fusion"] is False
    assert paths["bias_dropout_fusion"] is False and paths["fp8"] is None and paths["cuda_graph_impl"] == "none"


def _losses(rec) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in rec["training"]["losses"]}


def test_resume_reaches_the_same_losses_as_an_uninterrupted_run(runs):
    full, stopped, resumed = _losses(runs["full"]), _losses(runs["stopped"]), _losses(runs["resumed"])
    assert sorted(stopped) == [1, 2, 3] and sorted(resumed) == [4, 5, 6]
    for step in (1, 2, 3):
        assert stopped[step] == pytest.approx(full[step], abs=1e-6)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-5), (step, resumed[step], full[step])
    assert full[6] < full[1]  # it learns
    assert runs["resumed"]["data"]["consumed_samples"] == runs["full"]["data"]["consumed_samples"] == 24
    assert runs["resumed"]["checkpoints"]["loaded_from"].endswith("iter_0000003")
    assert runs["stopped"]["status"] == "stopped" and runs["resumed"]["status"] == "completed"
    assert (runs["ckpt"] / checkpoint.TRACKER).read_text().strip() == "3"


def test_progress_lines_and_final_summary(runs):
    lines = runs["log"]
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 6
    for field in ("loss ", "lr ", "tokens/s", "peak mem ", "ETA "):
        assert all(field in line for line in steps), field
    assert any(line.startswith("validation step 0:") and "bits/byte" in line for line in lines)
    assert any(line.startswith("validation step 6:") for line in lines)
    summary = "\n".join(lines[lines.index("-" * 72):])
    for text in ("completed: 6/6 steps", "validation bits/byte: first (step 6)", "tokens/s",
                 "model TFLOP/s", "observed attention local", "receipt: "):
        assert text in summary, text


def test_receipts_validate_against_the_schema(runs):
    for name in ("full", "stopped", "resumed"):
        rec = json.loads(Path(runs[name]["receipt_path"]).read_text())
        receipt.validate(rec)
        assert rec == json.loads(json.dumps(runs[name], allow_nan=False))
    rec = runs["full"]
    assert rec["expanded_pattern"] == "AE" and len(rec["layer_table_hash"]) == 16
    assert rec["topology"].items() >= {"tp": 1, "pp": 1, "dp": 1, "micro_batch_size": 2,
                                       "global_batch_size": 4, "num_microbatches": 2}.items()
    assert rec["features"]["moe"]["enabled"] and rec["features"]["moe"]["layers"] == [1]
    assert not rec["features"]["mla"]["enabled"] and not rec["features"]["mod"]["enabled"]
    assert rec["stats"]["heatmaps"] == {}  # no dynamic-depth layer, no usage heatmap
    v = rec["validation"]
    assert [h["step"] for h in v["history"]] == [0, 6]
    assert v["best_bpb"] == min(h["bpb"] for h in v["history"]) and v["best_step"] == 6
    t = rec["time"]
    assert t["goodput_s"] > 0 and t["badput_s"]["evaluation"] > 0 and t["badput_s"]["startup"] > 0
    # launch -> first finished step covers the start-up and the first step; its excess is badput
    assert t["startup_to_first_step_s"] > t["badput_s"]["startup"] and t["badput_s"]["first_step_overhead"] >= 0
    assert rec["throughput"]["hybrid_flops_per_token"] == hybrid_flops_per_token(tiny_model())["total"]
    assert runs["stopped"]["time"]["badput_s"]["checkpoint"] > 0
    assert rec["throughput"]["tokens_per_s"] > 0 and rec["peak_memory"]["bytes"] > 0
    with pytest.raises(Exception):
        receipt.validate(dict(rec, backends=dict(rec["backends"], resolved="cuda-magic")))


def test_mod_run_writes_its_usage_heatmaps(tmp_path, monkeypatch):
    """A run with MoD layers draws their logged usage (gate mean, fraction processed) per layer and
    step next to the receipt, and the receipt names the PNGs."""
    from megacpp_mcore.features.mod import MoDConfig
    from megacpp_mcore.spec.pattern import FeaturePlacement

    monkeypatch.setenv("MEGACPP_CACHE", str(tmp_path / "cache"))
    prefix = data.prepare(make_tree(tmp_path / "src", extra=60), tmp_path / "d" / "cpp", valid_percent=20).prefix
    model = tiny_model().replace(num_layers=4, features={
        "mod": MoDConfig(placement=FeaturePlacement(symbols="AE"))})
    rec = training.train(model, tiny_cfg(prefix, steps=3, receipt=str(tmp_path / "r.json")),
                         log=lambda _: None)
    receipt.validate(rec)
    # the receipt's parameter count (the layer plan's) includes the 4 MoD routers Linear(h, 1)
    from megacpp_mcore.models.plan import build_plan

    dense = build_plan(model.replace(features={}))["parameters"]["total"]
    assert rec["parameters"] == dense + 4 * (model.hidden_size + 1)
    maps = rec["stats"]["heatmaps"]
    assert set(maps) == {"fraction_processed", "gate_mean"}
    assert maps["gate_mean"] == str(tmp_path / "r.gate_mean.png")
    from megacpp_mcore.train.heatmap import usage_matrix

    matrix, rows = usage_matrix(rec["stats"]["history"], "gate_mean")
    assert matrix.shape == (len(rec["features"]["mod"]["layers"]), 3) and len(rows) == matrix.shape[0]
    assert Path(maps["gate_mean"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_observed_backends_are_read_from_the_modules(runs):
    rec = runs["full"]
    assert rec["backends"]["requested"] == "auto" and rec["backends"]["resolved"] == "local"
    observed = rec["backends"]["observed"]
    assert observed["attention"] == "local" and observed["te_attention"] is None
    assert observed["summary"]["core_attention"] == {"DotProductAttention": 1}
    assert observed["summary"]["experts"] == {"SequentialMLP": 1}
    (attn,) = [layer for layer in observed["layers"] if layer["index"] == 0]
    assert attn["modules"]["self_attention.core_attention"].endswith("dot_product_attention.DotProductAttention")


def test_observe_backends_reports_what_was_built_not_the_request(single_rank):
    """Swap one layer's attention core for a TE-named class: observation follows the modules."""
    from megacpp_mcore.train import runtime

    model = tiny_model().replace(num_layers=4)
    config = runtime.transformer_config(model, runtime.Parallelism())
    (chunk,) = runtime.build_model(model, config, backend="local", wrap_ddp=False)
    assert receipt.observe_backends([chunk])["attention"] == "local"

    # A stand-in for an adapter deriving from Megatron's TE wrapper under its own name.
    te_base = type("TEDotProductAttention", (torch.nn.Module,),
                   {"__module__": "megatron.core.extensions.transformer_engine"})
    latent = type("LatentTEDotProductAttention", (te_base,), {})
    chunk.decoder.layers[2].self_attention.core_attention = latent()
    observed = receipt.observe_backends([chunk])
    assert observed["attention"] == "mixed"
    assert observed["summary"]["core_attention"] == {"DotProductAttention": 1, "LatentTEDotProductAttention": 1}
    assert receipt.is_te_module(latent()) and not receipt.is_te_module(chunk.decoder.layers[0])


def test_te_attention_selection_reads_tes_last_choice(monkeypatch):
    """The kernel TE picked is read from TE's own selection state (stand-in modules here, on any
    host: TE's real modules, where installed, are shadowed)."""
    import types

    def selection(**chosen):
        module = types.ModuleType("dpa")
        module._attention_backends = {"attention_params": object(), "use_flash_attention": False,
                                      "flash_attention_backend": None, "use_fused_attention": False,
                                      "fused_attention_backend": None, "use_unfused_attention": False,
                                      **chosen}
        return module

    for name in receipt.TE_SELECTION_MODULES:  # no TE attention has run yet
        monkeypatch.setitem(sys.modules, name, selection())
    assert receipt.te_attention_selection() is None
    fused = selection(use_fused_attention=True, fused_attention_backend="NVTE_F16_arbitrary_seqlen")
    monkeypatch.setitem(sys.modules, receipt.TE_SELECTION_MODULES[0], fused)
    monkeypatch.setenv("NVTE_FUSED_ATTN", "1")
    selected = receipt.te_attention_selection()
    assert selected["kernel"] == "cudnn-fused (NVTE_F16_arbitrary_seqlen)"
    assert selected["use_fused_attention"] and not selected["use_flash_attention"]
    assert selected["env"]["NVTE_FUSED_ATTN"] == "1"
    # With te-attention-backend-per-layer applied, each instance keeps its own selection and the
    # module global stays unselected: the instances' dicts are read first.
    for name in receipt.TE_SELECTION_MODULES:
        monkeypatch.setitem(sys.modules, name, selection())
    core = torch.nn.Module()
    flash = selection(use_flash_attention=True, flash_attention_backend="2.7")._attention_backends
    setattr(core, receipt.TE_INSTANCE_SELECTION_ATTR, flash)
    assert receipt.te_attention_selection([torch.nn.Module(), core])["kernel"] == "flash-attention (2.7)"
    from megacpp_mcore.patches import te_attention_backend_per_layer as patch

    assert receipt.TE_INSTANCE_SELECTION_ATTR == patch._ATTR  # one name for the patch and the reader


def test_stats_hooks_are_driven_every_step(single_rank):
    from megacpp_mcore.train.stats import StatsCollector

    class Budget(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.steps = []

        def megacpp_set_step(self, step):
            self.steps.append(step)

        def megacpp_stats(self):
            return {"budget": 1.0 - 0.1 * self.steps[-1], "calls": len(self.steps)}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Sequential(torch.nn.Linear(2, 2), Budget())

    class Wrapper(torch.nn.Module):  # like Megatron's DDP: names come from below the wrapper
        def __init__(self):
            super().__init__()
            self.module = Net()

    collector = StatsCollector([Wrapper()])
    assert len(collector) == 1
    for step in range(3):
        collector.set_step(step)
        collector.collect()
    assert collector.gather() == {"inner.1.budget": pytest.approx(0.8), "inner.1.calls": 3.0}


def test_stats_name_decoder_layers_by_global_index(single_rank):
    """Two chunks (pipeline stages or virtual chunks) both number their module lists from 0: the
    statistics are keyed by each layer's global index, so neither overwrites the other."""
    from megacpp_mcore.train.stats import StatsCollector

    class Layer(torch.nn.Module):
        def __init__(self, layer_number, value):
            super().__init__()
            self.layer_number, self.value = layer_number, value
            self.router = torch.nn.Module()
            self.router.megacpp_stats = lambda: {"gate_mean": value}

    def chunk(first, values):
        model = torch.nn.Module()
        model.decoder = torch.nn.Module()
        model.decoder.layers = torch.nn.ModuleList(Layer(first + i, v) for i, v in enumerate(values))
        return model

    collector = StatsCollector([chunk(1, [0.1, 0.2]), chunk(3, [0.3, 0.4])])  # layers 0-1 and 2-3
    assert collector.collect() == {f"decoder.layers.{i}.router.gate_mean": pytest.approx(v)
                                   for i, v in enumerate([0.1, 0.2, 0.3, 0.4])}


def test_model_flops_per_token_matches_instantiated_weights(single_rank):
    """6 * (matmul weights a token passes through) + 12 * s * h per attention layer; dense model."""
    from megacpp_mcore.train import runtime

    model = tiny_model().replace(moe=None, num_layers=4)
    config = runtime.transformer_config(model, runtime.Parallelism())
    (chunk,) = runtime.build_model(model, config, backend="local", wrap_ddp=False)
    matmul = sum(p.numel() for n, p in chunk.named_parameters()
                 if p.dim() == 2 and "embedding" not in n)
    flops = flops_per_token(model)
    assert flops["active_params"] == matmul
    assert flops["attention"] == 2 * 12 * model.seq_length * model.hidden_size
    assert flops["total"] == 6 * matmul + flops["attention"]
    # MoE: a token passes the router, top-k of the routed experts and the shared expert.
    model = tiny_model()
    config = runtime.transformer_config(model, runtime.Parallelism())
    (chunk,) = runtime.build_model(model, config, backend="local", wrap_ddp=False)
    active_experts = tuple(f"local_experts.{i}." for i in range(model.moe.topk))
    matmul = sum(p.numel() for n, p in chunk.named_parameters()
                 if p.dim() == 2 and "embedding" not in n
                 and ("local_experts." not in n or any(a in n for a in active_experts)))
    assert flops_per_token(model)["active_params"] == matmul
    # MTP: per depth, the shared block's matmuls (its A, E and [2h -> h] projection) and the head again
    model = tiny_model().replace(moe=None, num_layers=4, mtp_depth=2)
    config = runtime.transformer_config(model, runtime.Parallelism())
    (chunk,) = runtime.build_model(model, config, backend="local", wrap_ddp=False)
    block = sum(p.numel() for p in chunk.mtp_block.parameters() if p.dim() == 2)
    flops = flops_per_token(model)
    plain = flops_per_token(model.replace(mtp_depth=0))
    assert flops["active_params"] - plain["active_params"] == 2 * (block + model.hidden_size * model.vocab_size)
    assert flops["attention"] == 2 * plain["attention"]  # 2 A layers, plus 1 per depth
    assert flops_per_token(model, causal=True)["attention"] == flops["attention"] / 2


def _cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr()


@pytest.mark.parametrize("case", [
    "unknown-preset", "malformed-pattern", "unreadable-data", "missing-source", "empty-source",
    "load-without-checkpoint", "load-other-model", "tp-not-dividing-world", "pp-not-dividing-layers", "segments-not-summing",
])
def test_bad_input_one_line_exit_2_nothing_written(case, runs, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEGACPP_CACHE", str(cache))
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "noload").mkdir()
    save, rec = tmp_path / "save", tmp_path / "r.json"
    argv = {
        "unknown-preset": ["--preset", "nam99"],
        "malformed-pattern": ["--pattern", "AEX"],
        "unreadable-data": TINY_ARGS + ["--data", str(tmp_path / "nope" / "cpp")],
        "missing-source": TINY_ARGS + ["--source", str(tmp_path / "missing")],
        "empty-source": TINY_ARGS + ["--source", str(empty)],
        "load-without-checkpoint": TINY_ARGS + ["--source", str(empty), "--load", str(tmp_path / "noload")],
        "load-other-model": ["--preset", "ae-tiny", "--num-layers", "4", "--seq-length", "32",
                             "--data", "PREFIX", "--load", "CKPT"],
        "tp-not-dividing-world": TINY_ARGS + ["--tp", "2", "--sp"],
        "pp-not-dividing-layers": ["--preset", "ae-tiny", "--num-layers", "3", "--pp", "2"],
        "segments-not-summing": ["--preset", "ae-tiny", "--pattern", "AE|AE", "--num-layers", "6"],
    }[case]
    if case == "pp-not-dividing-layers":
        monkeypatch.setenv("WORLD_SIZE", "2")
    if case == "load-without-checkpoint":  # data is fine; only the checkpoint is missing
        make_tree(tmp_path / "src")
        argv[argv.index("--source") + 1] = str(tmp_path / "src")
    if case == "load-other-model":  # the checkpoint of the 2-layer run into a 4-layer model
        argv[argv.index("PREFIX")], argv[argv.index("CKPT")] = runs["prefix"], str(runs["ckpt"])
    code, out = _cli(["train", *argv, "--save", str(save), "--receipt", str(rec)], capsys)
    err = out.err.strip().splitlines()
    assert code == 2, out
    assert len(err) == 1 and err[0].startswith("megacpp-mcore train: error: "), err
    expected = {"unknown-preset": "nam99", "malformed-pattern": "X", "unreadable-data": "nope",
                "missing-source": "missing", "empty-source": "no C/C++ sources",
                "load-without-checkpoint": "holds no checkpoint", "tp-not-dividing-world": "tp*pp",
                "load-other-model": "num_layers: checkpoint 2 vs model 4",
                "pp-not-dividing-layers": "num_layers=3", "segments-not-summing": "2+2=4 layers, but num_layers is 6"}[case]
    assert expected in err[0]
    assert out.out == ""
    assert not cache.exists() and not save.exists() and not rec.exists()


@pytest.mark.distributed
def test_two_rank_tp2_sp_cli_resumes_the_single_rank_checkpoint(runs):
    """``torchrun --nproc-per-node 2 -m megacpp_mcore.cli train --tp 2 --sp``: loads the 1-rank
    checkpoint (resharded model and optimizer) and reaches the 1-rank resumed losses."""
    rec_path = runs["tmp"] / "tp2.json"
    proc = _torchrun_cli(
        ["train", *TINY_ARGS, "--tp", "2", "--sp", "--steps", "6", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "2",
         "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1",
         "--data", runs["prefix"], "--load", str(runs["ckpt"]), "--receipt", str(rec_path)],
        runs["tmp"] / "cache")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "step      6/6" in proc.stdout and "bits/byte" in proc.stdout
    rec = json.loads(rec_path.read_text())
    receipt.validate(rec)
    assert rec["topology"]["tp"] == 2 and rec["topology"]["world_size"] == 2
    assert rec["backends"]["observed"]["counted_over_ranks"] == 2
    single = _losses(runs["resumed"])
    for step, loss in _losses(rec).items():
        assert loss == pytest.approx(single[step], abs=1e-5), (step, loss, single[step])


def _torchrun_cli(argv: list[str], cache: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 -m megacpp_mcore.cli <argv>`` on gloo (2 CPU ranks)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "megacpp_mcore.cli", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGACPP_CACHE=str(cache), PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.distributed
def test_two_rank_interleaved_pipeline_matches_plain_pipeline(runs, monkeypatch):
    """``train --pp 2 --vp 2`` (interleaved 1F1B, two model chunks per rank) runs through the CLI
    and reaches the losses and validation of ``train --pp 2`` within 1e-5; both resume the same
    1-rank checkpoint of a 4-layer model, so their weights are equal by construction."""
    tmp, layers = runs["tmp"], ["--preset", "ae-tiny", "--num-layers", "4", "--seq-length", "32"]
    schedule = dict(steps=3, micro_batch_size=1, warmup_steps=1)
    model = tiny_model().replace(num_layers=4)
    monkeypatch.setenv("MEGACPP_CACHE", str(tmp / "cache"))
    training.train(model, tiny_cfg(runs["prefix"], **schedule, stop_after=1, save=str(tmp / "ckpt4"),
                                   receipt=str(tmp / "ckpt4.json")), log=lambda _: None)
    recs = {}
    for name, extra in (("pp2", []), ("pp2-vp2", ["--vp", "2", "--save", str(tmp / "ckpt-vp")])):
        argv = ["train", *layers, "--pp", "2", *extra, "--steps", "3", "--micro-batch-size", "1",
                "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4", "--warmup-steps", "1",
                "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1",
                "--data", runs["prefix"], "--load", str(tmp / "ckpt4"),
                "--receipt", str(tmp / f"{name}.json")]
        proc = _torchrun_cli(argv, tmp / "cache")
        assert proc.returncode == 0, (name, (proc.stdout + proc.stderr)[-4000:])
        recs[name] = json.loads((tmp / f"{name}.json").read_text())
        receipt.validate(recs[name])
    assert recs["pp2-vp2"]["topology"]["vp"] == 2 and recs["pp2"]["topology"]["vp"] is None
    assert recs["pp2-vp2"]["topology"]["num_microbatches"] == 4
    plain, interleaved = _losses(recs["pp2"]), _losses(recs["pp2-vp2"])
    assert sorted(plain) == sorted(interleaved) == [2, 3]
    for step, loss in interleaved.items():
        assert loss == pytest.approx(plain[step], abs=1e-5), (step, loss, plain[step])
    bpb = [r["validation"]["final_bpb"] for r in (recs["pp2"], recs["pp2-vp2"])]
    assert bpb[1] == pytest.approx(bpb[0], abs=1e-5)
    # the interleaved save holds every chunk's tensors (model and optimizer), as the 1-rank one does
    from megatron.core import dist_checkpointing

    saved = [set(dist_checkpointing.load_tensors_metadata(str(p))) for p in
             (tmp / "ckpt4" / "iter_0000001", tmp / "ckpt-vp" / "iter_0000003")]
    assert saved[0] == saved[1] and "decoder.layers.3.mlp.router.weight" in saved[1]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with Transformer Engine")
def test_gpu_train_uses_te_and_records_the_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGACPP_CACHE", str(tmp_path / "cache"))
    prefix = data.prepare(make_tree(tmp_path / "src", extra=400), tmp_path / "d" / "cpp", valid_percent=20).prefix
    model = get_preset("ae-tiny").replace(hidden_size=256, seq_length=128)
    rec = training.train(model, tiny_cfg(prefix, steps=20, log_interval=5, global_batch_size=8,
                                         micro_batch_size=4, receipt=str(tmp_path / "r.json")),
                         log=lambda _: None)
    receipt.validate(rec)
    assert rec["backends"]["resolved"] == "te" and rec["precision"] == "bf16"
    observed = rec["backends"]["observed"]
    assert observed["attention"] == "te"
    assert set(observed["summary"]["core_attention"]) == {"TEDotProductAttention"}
    assert observed["te_attention"] and observed["te_attention"]["kernel"]
    assert rec["peak_memory"]["kind"] == "cuda_max_allocated"
    assert rec["throughput"]["model_tflops_per_s"] > 0
    v = rec["validation"]
    # validation runs before training (step 0: untrained_bpb) and at the end; with no evaluation
    # in between, first_bpb (the first trained one) IS final_bpb
    assert v["final_bpb"] < v["untrained_bpb"] and all(math.isfinite(h["bpb"]) for h in v["history"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with Transformer Engine")
def test_gpu_bench_script_compares_ours_with_upstream(tmp_path):
    bench = load_script("bench_train")
    out = tmp_path / "bench.json"
    assert bench.main(["--preset", "ae-tiny", "--steps", "3", "--warmup", "2", "--skip-full",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    names = [r["name"] for r in result["results"]]
    assert names == ["ours/ae-tiny-AE", "upstream/ae-tiny-AE"]
    assert result["ratio_ours_over_upstream"] > 0
    assert all(r["attention"] == "te" for r in result["results"])


def test_cli_parser_is_light_and_help_defaults_match_train_config():
    """Building the CLI imports neither torch nor megatron; --help states TrainConfig's defaults."""
    code = ("import sys, megacpp_mcore.cli as c; c._parser(); "
            "print('torch' in sys.modules, 'megatron.core' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    text = " ".join(cli._parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    d = training.TrainConfig()
    sci = lambda x: f"{x:.0e}".replace("e-0", "e-")  # 0.003 -> 3e-3, as the help writes it
    for phrase in (f"steps (default {d.steps})", f"default {d.micro_batch_size}",
                   f"(default {sci(d.lr)})", f"default {sci(d.min_lr)}", f"(default {d.log_interval})",
                   f"(default {d.eval_interval})", f"(default {d.eval_iters})", f"default {d.seed}",
                   f"default {d.source}"):
        assert phrase in text, phrase
