"""Fault tolerance of ``megacpp-mcore train``: a run SIGKILLed at seeded random points (mid-step,
mid-evaluation, mid-save, between publishing a checkpoint and updating the tracker) and resumed
with ``--load`` each time ends at the uninterrupted run's loss, and no kill leaves a checkpoint that
``--load`` would pick up half-written; unwritable outputs or a full disk fail before training
with one line; a save that fails mid-way leaves the last good checkpoint intact."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megacpp_mcore import cli
from megacpp_mcore.train import checkpoint, data, faults, storage
from test_data import make_tree
from test_train import TINY_ARGS

STEPS, SAVE_EVERY, EVAL_EVERY = 10, 2, 3
RUN_ARGS = [*TINY_ARGS, "--steps", str(STEPS), "--micro-batch-size", "2", "--global-batch-size", "4",
            "--log-interval", "1", "--eval-interval", str(EVAL_EVERY), "--eval-iters", "1",
            "--save-interval", str(SAVE_EVERY)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    prefix = data.prepare(make_tree(tmp / "src", extra=120), tmp / "data" / "cpp", valid_percent=20).prefix
    env = dict(os.environ, MEGACPP_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return {"tmp": tmp, "prefix": prefix, "env": env}


def _train(prepared, *argv: str) -> subprocess.CompletedProcess:
    """``megacpp-mcore train`` in its own process group, output to files: a SIGKILLed trainer
    orphans the ``multiprocessing`` manager that dist_checkpointing's writer starts at the first
    save (it holds the trainer's stdout and stderr), so the group is killed once the trainer ends."""
    cmd = [sys.executable, "-m", "megacpp_mcore.cli", "train", *RUN_ARGS, "--data", prepared["prefix"], *argv]
    out, err = prepared["tmp"] / "stdout.txt", prepared["tmp"] / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=prepared["env"], start_new_session=True)
    try:
        code = proc.wait(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # nothing of the group left
            pass
    return subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())


def timeline() -> list[tuple[str, int]]:
    """Every kill point of the run, in the order the run reaches them."""
    events = []
    for step in range(1, STEPS + 1):
        events.append(("step", step))
        if step % EVAL_EVERY == 0 or step == STEPS:
            events.append(("eval", step))
        if step % SAVE_EVERY == 0 or step == STEPS:
            events += [("save", step), ("publish", step)]
    return events


def kill_plan(seed: int, kills: int = 5) -> list[tuple[str, int]]:
    """``kills`` distinct kill points, every phase at least once, in timeline order (so each
    resumed run reaches the next), after the first complete checkpoint (each kill is followed
    by ``--load``) and before the last save (whose resume would have nothing left to run)."""
    rng = random.Random(seed)
    events = timeline()
    eligible = [e for e in events[events.index(("publish", SAVE_EVERY)):]
                if not (e[0] in ("save", "publish") and e[1] == STEPS)]
    chosen = {rng.choice([e for e in eligible if e[0] == phase]) for phase in faults.PHASES}
    while len(chosen) < kills:
        chosen.add(rng.choice(eligible))
    return sorted(chosen, key=events.index)


def last_published(kill: tuple[str, int]) -> int:
    """The step of the newest complete checkpoint when the run is killed at ``kill``."""
    events = timeline()
    done = events[:events.index(kill) + (kill[0] == "publish")]
    return max(step for phase, step in done if phase == "publish")


def test_kill_plan_covers_every_phase():
    plan = kill_plan(19)
    assert len(plan) == 5 and {phase for phase, _ in plan} == set(faults.PHASES)
    assert plan == kill_plan(19) and plan != kill_plan(20)  # seeded


def test_killed_runs_resume_to_the_uninterrupted_loss(prepared, monkeypatch, capsys):
    tmp, ck = prepared["tmp"], prepared["tmp"] / "ck"
    monkeypatch.setenv("MEGACPP_CACHE", prepared["env"]["MEGACPP_CACHE"])
    # The uninterrupted run in this process (one interpreter start-up less), the others in their own.
    assert cli.main(["train", *RUN_ARGS, "--data", prepared["prefix"], "--receipt", str(tmp / "ref.json")]) == 0
    capsys.readouterr()
    reference = json.loads((tmp / "ref.json").read_text())
    load: list[str] = []
    for i, (phase, step) in enumerate(kill_plan(19)):
        rec = tmp / f"killed{i}.json"
        proc = _train(prepared, "--save", str(ck), *load, "--receipt", str(rec), "--test-fault", f"kill:{phase}:{step}")
        assert proc.returncode == -signal.SIGKILL, (phase, step, proc.stderr[-3000:])
        if load:  # it resumed from the newest complete checkpoint the previous kill left
            assert f"resumed from {ck / f'iter_{expected:07d}'}:" in proc.stdout, proc.stdout
        assert not rec.exists()
        # Nothing half-written is a candidate: every iter_* is complete, partial saves are hidden.
        complete = checkpoint.complete_checkpoints(ck)
        assert sorted(p.name for p in ck.glob("iter_*")) == [p.name for _, p in complete]
        expected = last_published((phase, step))
        assert checkpoint.find_checkpoint(str(ck)) == (ck / f"iter_{expected:07d}", expected)
        if phase == "save":  # killed with the files written but unpublished
            partial = ck / f".iter_{step:07d}{checkpoint.PARTIAL_SUFFIX}"
            assert any(partial.iterdir()) and not (partial / checkpoint.MARKER).exists()
        if phase == "publish":  # published, the tracker still names the previous one
            assert int((ck / checkpoint.TRACKER).read_text()) < step
        load = ["--load", str(ck)]
    proc = _train(prepared, "--save", str(ck), *load, "--receipt", str(tmp / "final.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {ck / f'iter_{expected:07d}'}:" in proc.stdout
    final = json.loads((tmp / "final.json").read_text())
    assert final["status"] == "completed" and final["invalid"] == []
    assert final["training"]["final_loss"] == pytest.approx(reference["training"]["final_loss"], abs=1e-5)
    ref_losses = {x["step"]: x["loss"] for x in reference["training"]["losses"]}
    for x in final["training"]["losses"]:
        assert x["loss"] == pytest.approx(ref_losses[x["step"]], abs=1e-5), x
    assert final["validation"]["final_bpb"] == pytest.approx(reference["validation"]["final_bpb"], abs=1e-5)
    assert (ck / checkpoint.TRACKER).read_text().strip() == str(STEPS)
    assert not list(ck.glob(".iter_*"))  # the last saves cleared the leftovers


def _marker(path: Path, step: int) -> None:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    (path / checkpoint.MARKER).write_text(json.dumps({"complete": True, "step": step}))


def test_find_checkpoint_skips_incomplete_and_accepts_tracked_legacy(tmp_path):
    _marker(tmp_path / "iter_0000002", 2)
    (tmp_path / "iter_0000004").mkdir()  # no marker: a save of an older release cut short
    (tmp_path / "iter_0000004" / "metadata.json").write_text("{}")
    (tmp_path / ".iter_0000006.partial").mkdir()
    (tmp_path / "iter_0000008").mkdir()
    (tmp_path / "iter_0000008" / checkpoint.MARKER).write_text('{"complete": tru')  # torn marker
    assert checkpoint.find_checkpoint(str(tmp_path)) == (tmp_path / "iter_0000002", 2)
    (tmp_path / checkpoint.TRACKER).write_text("4\n")  # an older release's published checkpoint
    assert checkpoint.find_checkpoint(str(tmp_path)) == (tmp_path / "iter_0000004", 4)
    empty = tmp_path / "empty"
    (empty / ".iter_0000002.partial").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds no checkpoint .*ignored incomplete: \.iter_0000002\.partial"):
        checkpoint.find_checkpoint(str(empty))


@pytest.mark.parametrize("case", ["save-under-file", "save-is-file", "receipt-under-file", "receipt-is-dir",
                                  "cache-under-file", "disk-full"])
def test_unwritable_outputs_fail_before_training(case, prepared, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEGACPP_CACHE", str(cache))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    save, rec = tmp_path / "save", tmp_path / "r.json"
    if case == "save-under-file":
        save = blocker / "ckpt"
    elif case == "save-is-file":
        save = blocker
    elif case == "receipt-under-file":
        rec = blocker / "r.json"
    elif case == "receipt-is-dir":
        rec = tmp_path
    elif case == "cache-under-file":
        cache = blocker / "cache"
        monkeypatch.setenv("MEGACPP_CACHE", str(cache))
    else:
        monkeypatch.setattr(storage.shutil, "disk_usage", lambda _p: type("U", (), {"free": 1000})())
    code = cli.main(["train", *TINY_ARGS, "--data", prepared["prefix"], "--save", str(save), "--receipt", str(rec)])
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("megacpp-mcore train: error: "), out
    expected = {"save-under-file": "a-file is a file, not a directory", "save-is-file": "--save",
                "receipt-under-file": "a-file is a file", "receipt-is-dir": "is a directory",
                "cache-under-file": "data cache", "disk-full": "1000 B free on its file system"}[case]
    assert expected in err[0], err[0]
    assert out.out == "" and not (tmp_path / "save").exists() and not (tmp_path / "r.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no probe file left behind


def test_failed_save_keeps_the_last_good_checkpoint(prepared, tmp_path, monkeypatch, capsys):
    """The disk fills during the second save: one line, exit 1, the first checkpoint intact and
    still the one ``--load`` takes, no partial directory left."""
    from megatron.core import dist_checkpointing

    monkeypatch.setenv("MEGACPP_CACHE", str(prepared["tmp"] / "cache"))
    real_save = dist_checkpointing.save

    def save(state, path, *args, **kwargs):
        if "iter_0000004" in str(path):
            Path(path, "__0_0.distcp").write_bytes(b"half")  # what a full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", save)
    ck = tmp_path / "ck"
    code = cli.main(["train", *RUN_ARGS, "--steps", "4", "--eval-interval", "100", "--data", prepared["prefix"],
                     "--save", str(ck), "--receipt", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "checkpoint of step 4 could not be written" in err[0] and "No space left on device" in err[0]
    assert f"the last good checkpoint {ck / 'iter_0000002'} is intact" in err[0]
    assert sorted(p.name for p in ck.iterdir()) == ["iter_0000002", checkpoint.TRACKER]
    assert checkpoint.find_checkpoint(str(ck)) == (ck / "iter_0000002", 2)
    assert checkpoint.read_metadata(ck / "iter_0000002")["step"] == 2


def test_fail_items_parse_and_raise_on_their_rank(monkeypatch):
    plan = faults.FaultPlan.parse("fail:save:4:1,fail:publish:6")
    assert plan.fails == {("save", 4, 1), ("publish", 6, None)}
    monkeypatch.setenv("RANK", "0")
    plan.at_save("save", 4)  # rank 1's fault: nothing on rank 0
    with pytest.raises(OSError, match="injected I/O error at publish of step 6 on rank 0"):
        plan.at_save("publish", 6)
    for bad in ("fail:step:4", "fail:save:4:x", "fail:save"):
        with pytest.raises(ValueError, match="allowed: kill:"):
            faults.FaultPlan.parse(bad)


@pytest.mark.distributed
def test_a_save_failing_on_one_rank_stops_every_rank(prepared, tmp_path):
    """2 ranks (gloo): rank 1's writes fail while the checkpoint of step 4 is saved. Every rank
    learns it after that phase (none waits in a barrier for a rank that gave up): the run stops with
    the error naming the rank, the step-2 checkpoint intact and still the one --load takes."""
    from test_train import _torchrun_cli

    ck = tmp_path / "ck"
    proc = _torchrun_cli(["train", *RUN_ARGS, "--steps", "4", "--eval-interval", "100",
                          "--data", prepared["prefix"], "--save", str(ck), "--receipt", str(tmp_path / "r.json"),
                          "--test-fault", "fail:save:4:1"], prepared["tmp"] / "cache")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "checkpoint of step 4 could not be written" in out, out[-3000:]
    assert "injected I/O error at save of step 4 on rank 1 (rank 1)" in out
    assert f"the last good checkpoint {ck / 'iter_0000002'} is intact" in out
    assert sorted(p.name for p in ck.iterdir()) == ["iter_0000002", checkpoint.TRACKER]
    assert checkpoint.find_checkpoint(str(ck)) == (ck / "iter_0000002", 2)
