"""INVALID rules recorded by the run itself (megacpp_mcore.train.invalid): each fires on a
constructed case and not on a clean one, first unit-level, then through tiny in-process runs
(NaN step skipped or stopping the run, loss spike flagging saved weights, resume mismatch)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from megacpp_mcore import cli
from megacpp_mcore.features.mod import MoDConfig
from megacpp_mcore.models.presets import get_preset
from megacpp_mcore.spec.pattern import FeaturePlacement
from megacpp_mcore.train import checkpoint, data, invalid, receipt
from megacpp_mcore.train import loop as training
from test_data import make_tree
from test_train import TINY_ARGS, tiny_cfg, tiny_model


# ------------------------------------------------------------------------------------ unit level --

def test_schema_names_exactly_the_rules():
    items = receipt.load_schema()["properties"]["invalid"]["items"]
    assert tuple(items["properties"]["rule"]["enum"]) == invalid.RULES
    assert items["required"] == ["rule", "reason", "step"]


def test_spike_detector_needs_history_and_a_real_jump():
    det = invalid.SpikeDetector()
    clean = [6.3, 6.2, 5.4, 4.8, 4.3, 4.0, 3.7, 3.5, 3.6, 3.3]  # a learning curve with noise
    assert [det.observe(i + 1, x) for i, x in enumerate(clean)] == [None] * len(clean)
    spike = det.observe(11, 9.0)
    assert spike is not None and spike["step"] == 11 and spike["baseline"] == pytest.approx(3.85)  # median of the last 8
    early = invalid.SpikeDetector()  # too little history for a verdict
    assert [early.observe(s, x) for s, x in [(1, 1.0), (2, 1.0), (3, 1.0), (4, 5.0)]] == [None] * 4
    tiny = invalid.SpikeDetector([[s, 0.01] for s in range(8)])  # 3x a near-zero loss is noise
    assert tiny.observe(9, 0.03) is None


def _ledger(flagged: list) -> invalid.RunChecks:
    return invalid.RunChecks(policy="skip", flag_checkpoint=lambda path, flags: flagged.append((path, flags)))


def test_run_checks_flag_saves_near_a_spike_once_each():
    flagged: list = []
    checks = _ledger(flagged)
    for step, loss in enumerate([6.0, 5.5, 5.0, 4.8, 4.6, 4.4], start=1):
        assert checks.observe(step, loss) == []
    meta = checks.saving(6, Path("ck/iter_0000006"))  # clean so far: no flag
    assert meta["flags"] == [] and [s for s, _ in meta["recent_losses"]] == [1, 2, 3, 4, 5, 6]
    lines = checks.observe(7, 12.0)  # spike 1 step after the save: that checkpoint is flagged
    assert len(lines) == 1 and "iter_0000006" in lines[0] and flagged[0][0] == Path("ck/iter_0000006")
    assert checks.observe(8, 13.0) == []  # the same checkpoint is flagged only once
    meta = checks.saving(9, Path("ck/iter_0000009"))  # spikes 1-2 steps before this save
    assert [f["step"] for f in meta["flags"]] == [8]  # the largest one
    assert checks.observe(13, 4.0) == [] and checks.saving(13, Path("ck/iter_0000013"))["flags"] == []  # long after
    report = checks.report()
    assert [(r["rule"], r["step"]) for r in report] == [("loss_spike_near_save", 7), ("loss_spike_near_save", 8)]
    clean = _ledger([])
    for step in range(1, 20):
        clean.observe(step, 6.0 - 0.1 * step)
        clean.saving(step, Path(f"iter_{step}"))
    assert clean.report() == []


def test_nonfinite_lines_and_report():
    checks = invalid.RunChecks(policy="stop", flag_checkpoint=lambda *_: None)
    line = checks.nonfinite(3, float("nan"), grads_finite=False)
    assert line.startswith("step 3: non-finite loss (nan), gradients (NaN/inf); stopping")
    [item] = checks.report()
    assert item["rule"] == "nonfinite_steps" and item["step"] == 3 and "stopped" in item["reason"]
    with pytest.raises(ValueError, match="on_nonfinite='maybe'.*allowed: stop, skip"):
        invalid.RunChecks(policy="maybe", flag_checkpoint=lambda *_: None)


def test_placement_override_fires_only_where_a_guard_is_opted_out():
    base = get_preset("ae-tiny").replace(pattern="AEM", num_layers=6)
    opted = base.replace(features={"mod": MoDConfig(placement=FeaturePlacement(symbols="EM"), allow_on="M")})
    [item] = invalid.placement_overrides(opted)
    assert item["rule"] == "placement_override" and "layers 2 (M), 5 (M)" in item["reason"]
    unused = base.replace(features={"mod": MoDConfig(placement=FeaturePlacement(symbols="E"), allow_on="M")})
    assert invalid.placement_overrides(unused) == []  # opted in, but no layer uses it
    assert invalid.placement_overrides(base) == []
    assert invalid.placement_overrides(get_preset("nam56r")) == []  # the shipped MoD placement


def test_resume_mismatch_names_every_difference():
    cfg = training.TrainConfig(steps=10)
    sig = invalid.run_signature(cfg, global_batch=8, seq_length=64, manifest={"source": "x"})
    meta = {"run": sig}
    assert invalid.resume_mismatches(Path("ck"), meta, sig, step=4, consumed=32) == []
    other = invalid.run_signature(training.TrainConfig(steps=12, seed=7), global_batch=16, seq_length=64,
                                  manifest={"source": "y"})
    [item] = invalid.resume_mismatches(Path("ck"), meta, other, step=4, consumed=32)
    assert item["rule"] == "resume_mismatch" and item["step"] == 4
    for text in ("steps: checkpoint 10 vs this run 12", "seed: checkpoint 1234 vs this run 7",
                 "global_batch_size: checkpoint 8 vs this run 16", "data: checkpoint",
                 "data position: the checkpoint consumed 32 samples by step 4"):
        assert text in item["reason"], text
    # a checkpoint of an earlier release (no marker): only the data position can be compared
    assert invalid.resume_mismatches(Path("ck"), None, sig, step=4, consumed=32) == []
    # other optimizer settings are refused before the run starts (upstream cannot honour them)
    invalid.check_resume_optimizer(Path("ck"), meta, cfg)
    with pytest.raises(ValueError, match=r"'ck' was trained with lr=0.003 \(asked 0.001\).*same --lr"):
        invalid.check_resume_optimizer(Path("ck"), meta, training.TrainConfig(steps=10, lr=1e-3))


class _CountingOptimizer:
    def __init__(self):
        self.steps = self.zeroed = 0

    def zero_grad(self):
        self.zeroed += 1

    def step(self):
        self.steps += 1
        return True, 1.0, None


def test_step_guard_refuses_nonfinite_gradients():
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().backward()
    opt = _CountingOptimizer()
    seen = []
    guard = invalid.StepGuard([layer], opt, device=torch.device("cpu"), before_update=seen.append)
    guard.zero_grad()
    assert guard.step() == (True, 1.0, None) and not guard.skipped and opt.steps == 1 and opt.zeroed == 1
    assert len(seen[0]) == 2  # weight and bias gradients
    layer.bias.grad[0] = float("inf")
    assert guard.step() == (False, None, None) and guard.skipped and opt.steps == 1


# ----------------------------------------------------------------------------------- tiny runs --

@pytest.fixture(scope="module")
def faulted(tmp_path_factory):
    """Tiny runs: clean with saves; NaN at step 2 (skip) and a spike at step 7 with saves every 2
    steps; resumed from that run's iter 4 with another lr."""
    tmp = tmp_path_factory.mktemp("invalid")
    with pytest.MonkeyPatch.context() as mp:  # the module's own cache, restored afterwards
        mp.setenv("MEGACPP_CACHE", str(tmp / "cache"))
        quiet = lambda _: None  # noqa: E731
        prefix = data.prepare(make_tree(tmp / "src", extra=120), tmp / "data" / "cpp", valid_percent=20).prefix
        runs = {"prefix": prefix, "tmp": tmp}
        runs["clean"] = training.train(tiny_model(), tiny_cfg(
            prefix, steps=6, save=str(tmp / "clean"), save_interval=2, receipt=str(tmp / "clean.json")), log=quiet)
        lines: list[str] = []
        runs["faults"] = training.train(tiny_model(), tiny_cfg(
            prefix, steps=10, save=str(tmp / "ck"), save_interval=2, on_nonfinite="skip", fault="nan:2,spike:7",
            receipt=str(tmp / "faults.json")), log=lines.append)
        runs["faults_log"] = lines
        resume = tmp / "resume"
        resume.mkdir()
        os.symlink(tmp / "ck" / "iter_0000004", resume / "iter_0000004")
        runs["resumed"] = training.train(tiny_model(), tiny_cfg(
            prefix, steps=12, seed=7, load=str(resume), stop_after=5, receipt=str(tmp / "resumed.json")), log=quiet)
    return runs


def _rules(rec) -> list[str]:
    return [item["rule"] for item in rec["invalid"]]


def test_clean_run_is_valid_and_its_checkpoints_carry_markers(faulted):
    rec = faulted["clean"]
    assert rec["invalid"] == [] and rec["training"]["nonfinite_steps"] == 0
    receipt.validate(json.loads(Path(rec["receipt_path"]).read_text()))
    for step in (2, 4, 6):
        meta = checkpoint.read_metadata(faulted["tmp"] / "clean" / f"iter_{step:07d}")
        assert meta["step"] == step and meta["consumed_samples"] == 4 * step and meta["flags"] == []
        assert meta["run"]["global_batch_size"] == 4 and meta["run"]["seed"] == 1234


def test_nan_step_is_skipped_counted_and_marked(faulted):
    rec = faulted["faults"]
    receipt.validate(json.loads(Path(rec["receipt_path"]).read_text()))
    assert rec["status"] == "completed" and rec["training"]["nonfinite_steps"] == 1
    [item] = [i for i in rec["invalid"] if i["rule"] == "nonfinite_steps"]
    assert item["step"] == 2 and "skipped" in item["reason"]
    assert "step 2: non-finite gradients (NaN/inf); update skipped (--on-nonfinite skip, 1 such step(s) so far)" \
        in faulted["faults_log"]
    losses = {x["step"]: x for x in rec["training"]["losses"]}
    assert math.isnan(losses[2]["grad_norm"])  # no update: no norm
    assert all(math.isfinite(x["loss"]) for x in rec["training"]["losses"])  # the weights stayed finite
    summary = "\n".join(faulted["faults_log"])
    assert "INVALID (nonfinite_steps): 1 step(s)" in summary


def test_loss_spike_flags_the_checkpoints_around_it(faulted):
    rec, ck = faulted["faults"], faulted["tmp"] / "ck"
    spikes = [i for i in rec["invalid"] if i["rule"] == "loss_spike_near_save"]
    assert min(i["step"] for i in spikes) == 7
    named = sorted(i["reason"].split("checkpoint ")[1].split(" ")[0] for i in spikes)
    # 3 and 1 steps before the spike, 1 and 3 after (the loss stays up: later steps spike too)
    assert named == ["iter_0000004", "iter_0000006", "iter_0000008", "iter_0000010"]
    for step in (4, 6, 8, 10):
        [flag] = checkpoint.read_metadata(ck / f"iter_{step:07d}")["flags"]
        assert flag["rule"] == "loss_spike_near_save" and flag["step"] >= 7
    assert checkpoint.read_metadata(ck / "iter_0000004")["flags"][0]["step"] == 7
    assert checkpoint.read_metadata(ck / "iter_0000002")["flags"] == []  # 5 steps before: not near


def test_resume_with_other_settings_and_flagged_weights_is_invalid(faulted):
    rec = faulted["resumed"]
    assert rec["checkpoints"]["loaded_from"].endswith("iter_0000004")
    assert _rules(rec) == ["resume_mismatch", "loss_spike_near_save"]
    mismatch = rec["invalid"][0]
    assert mismatch["step"] == 4 and "seed: checkpoint 1234 vs this run 7; steps: checkpoint 10 vs this run 12" \
        in mismatch["reason"]
    assert "whose weights are flagged" in rec["invalid"][1]["reason"]


def test_resume_with_another_lr_is_refused_in_one_line(faulted, monkeypatch, capsys):
    monkeypatch.setenv("MEGACPP_CACHE", str(faulted["tmp"] / "cache"))
    code = cli.main(["train", *TINY_ARGS, "--data", faulted["prefix"], "--load", str(faulted["tmp"] / "ck"),
                     "--steps", "12", "--lr", "1e-3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "was trained with lr=0.003 (asked 0.001)" in err[0], err


def test_nonfinite_stop_policy_stops_with_one_line_and_exit_1(faulted, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEGACPP_CACHE", str(faulted["tmp"] / "cache"))
    rec_path = tmp_path / "stop.json"
    code = cli.main(["train", *TINY_ARGS, "--steps", "6", "--micro-batch-size", "2", "--global-batch-size", "4",
                     "--eval-interval", "100", "--eval-iters", "1", "--data", faulted["prefix"],
                     "--receipt", str(rec_path), "--test-fault", "nan:2"])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    [line] = [x for x in out if x.startswith("step 2: non-finite")]
    assert "stopping (--on-nonfinite stop" in line
    rec = json.loads(rec_path.read_text())
    receipt.validate(rec)
    assert rec["status"] == "stopped" and rec["training"]["completed_steps"] == 2
    assert _rules(rec) == ["nonfinite_steps"] and "the run stopped there" in rec["invalid"][0]["reason"]


def test_bad_policy_and_fault_spec_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEGACPP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *TINY_ARGS, "--on-nonfinite", "ignore"])
    assert exc.value.code == 2 and "invalid choice: 'ignore'" in capsys.readouterr().err
    assert cli.main(["train", *TINY_ARGS, "--test-fault", "kill:lunch:3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'kill:lunch:3' is malformed; allowed: kill:{step|eval|save|publish}" in err[0]
    # kernel-path switches: a bad item, and one this CPU host cannot run (refused before any write)
    assert cli.main(["train", *TINY_ARGS, "--fast", "moe_permute_fusion=yes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fast 'moe_permute_fusion=yes': moe_permute_fusion takes on, off, auto" in err[0]
    assert cli.main(["train", *TINY_ARGS, "--fast", "fp8=hybrid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA device for fp8" in err[0]
    assert not (tmp_path / "cache").exists()
