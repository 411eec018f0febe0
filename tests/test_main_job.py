"""The README's main job as a user meets it: a run without --save/--receipt gets its own run
directory (checkpoint + receipt.json), says how long it will take once the first steps are timed,
and ends with the `compare` and `generate` lines, which work on that directory as printed."""

from __future__ import annotations

import json
import shlex

import pytest

from megacpp_mcore import cli
from megacpp_mcore.cli.train import next_commands
from megacpp_mcore.train import data
from test_data import make_tree
from test_train import TINY_ARGS


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGACPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return tmp_path


def test_run_without_outputs_gets_a_run_directory_and_next_commands(cache, capsys):
    prefix = data.prepare(make_tree(cache / "src", extra=60), cache / "d" / "cpp", valid_percent=20).prefix
    argv = ["train", *TINY_ARGS, "--steps", "7", "--micro-batch-size", "2", "--eval-interval", "5",
            "--eval-iters", "1", "--log-interval", "5", "--data", str(prefix)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    runs = list((cache / "cache" / "runs").iterdir())
    assert len(runs) == 1 and runs[0].is_dir()
    run = runs[0]
    receipt = json.loads((run / "receipt.json").read_text())
    assert receipt["training"]["completed_steps"] == 7
    assert any(p.name.startswith("iter_") for p in run.iterdir())  # the final checkpoint

    # The estimate comes once, after the timed steps (5), and counts the validations still to run:
    # step 5's own (it follows the estimate) and the final one.
    estimates = [line for line in out.splitlines() if line.startswith("estimate: ")]
    assert len(estimates) == 1 and "2 steps at" in estimates[0] and "2 validations" in estimates[0]

    compare_line, generate_line = [line.strip() for line in out.splitlines()[-2:]]
    assert compare_line.startswith("next: megacpp-mcore compare ")
    compare_argv = shlex.split(compare_line.removeprefix("next: megacpp-mcore ").split("   (")[0])
    assert compare_argv == ["compare", str(run)]
    generate_argv = shlex.split(generate_line.removeprefix("megacpp-mcore "))
    assert generate_argv[:3] == ["generate", "--load", str(run)]

    # Both printed commands run as printed (compare's PNG into the run directory).
    assert cli.main([*compare_argv, "--png", str(run / "compare.png")]) == 0
    assert (run / "compare.png").stat().st_size > 0
    capsys.readouterr()
    assert cli.main([*generate_argv[:-2], "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_no_checkpoint_writes_the_receipt_only(cache):
    prefix = data.prepare(make_tree(cache / "src", extra=60), cache / "d" / "cpp", valid_percent=20).prefix
    argv = ["train", *TINY_ARGS, "--steps", "2", "--micro-batch-size", "2", "--eval-interval", "10",
            "--eval-iters", "1", "--data", str(prefix), "--no-checkpoint"]
    assert cli.main(argv) == 0
    (run,) = (cache / "cache" / "runs").iterdir()
    assert (run / "receipt.json").is_file()
    assert not any(p.name.startswith(("iter_", ".iter_")) for p in run.iterdir())

    def lm_loss(receipt):
        return json.loads(receipt.read_text())["training"]["lm_loss"]

    assert lm_loss(run / "receipt.json") == "fused"  # the default
    # --no-fused-lm-loss: GPTModel's own loss
    assert cli.main([*argv, "--no-fused-lm-loss", "--receipt", str(cache / "unfused.json")]) == 0
    assert lm_loss(cache / "unfused.json") == "gptmodel"


def test_no_checkpoint_with_save_is_refused(cache, capsys):
    assert cli.main(["train", *TINY_ARGS, "--no-checkpoint", "--save", str(cache / "s")]) == 2
    err = capsys.readouterr().err
    assert "--no-checkpoint" in err and "--save" in err
    assert not (cache / "s").exists()


def test_next_commands_quote_paths():
    lines = next_commands("/tmp/my runs/receipt.json", "/tmp/my runs")
    assert shlex.split(lines[0].split("   (")[0])[-1] == "/tmp/my runs"
    assert "--load '/tmp/my runs'" in lines[1]
    assert len(next_commands("/tmp/r.json", None)) == 1  # no checkpoint: nothing to generate from
