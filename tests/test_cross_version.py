"""A distributed checkpoint of ``megacpp-mcore train`` written with one megatron-core release loads
with the other and gives the same loss: 0.16.1 (Python 3.11) -> 0.19.2 (Python 3.12) and back, for a
pattern with all four symbols (A attention, E MoE, M Mamba-2 on the package's local path, R M2RNN).

The other release runs in another interpreter, named by ``MEGACPP_OTHER_PYTHON`` (``.ci/run`` sets it
to its Python 3.12 venv for the 3.11 leg, so in CI this always runs; on a dev machine e.g.
``MEGACPP_OTHER_PYTHON=/tmp/v312/bin/python``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

OTHER_ENV = "MEGACPP_OTHER_PYTHON"
OTHER = os.environ.get(OTHER_ENV)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not OTHER, reason=f"set {OTHER_ENV} to a Python with the other megatron-core "
                                          "release and this package (.ci/run sets it)"),
]

MODEL = ["--preset", "ae-tiny", "--pattern", "AEMR", "--num-layers", "4", "--seq-length", "32"]
SCHEDULE = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4",
            "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "1",
            "--backend", "local"]
SAVED_AT, STEPS = 2, 4


def _train(python: str, tmp: Path, name: str, *extra: str) -> dict:
    """``python -m megacpp_mcore.cli train`` on one CPU rank; its receipt."""
    receipt = tmp / f"{name}.json"
    # each interpreter keeps its own cache (Megatron's dataset index files), the data is shared
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               MEGACPP_CACHE=str(tmp / f"cache-{Path(python).resolve().parent.parent.name}-{name}"))
    proc = subprocess.run([python, "-m", "megacpp_mcore.cli", "train", *MODEL, *SCHEDULE,
                           "--steps", str(STEPS), *extra, "--receipt", str(receipt)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (name, (proc.stdout + proc.stderr)[-4000:])
    return json.loads(receipt.read_text())


def _version(python: str) -> str:
    out = subprocess.run([python, "-c", "import megatron.core; print(megatron.core.__version__)"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def _losses(receipt: dict) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in receipt["training"]["losses"]}


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    from test_data import make_tree

    from megacpp_mcore.train import data

    tmp = tmp_path_factory.mktemp("xver")
    return tmp, data.prepare(make_tree(tmp / "src", extra=120), tmp / "data" / "cpp", valid_percent=20).prefix


def test_checkpoint_round_trip_between_releases(prefix):
    tmp, data_prefix = prefix
    here, other = sys.executable, OTHER
    versions = {here: _version(here), other: _version(other)}
    assert versions[here].split(".")[:2] != versions[other].split(".")[:2], (
        f"{OTHER_ENV} must run another megatron-core release line than this interpreter: {versions}")
    data_args = ["--data", str(data_prefix)]
    # the losses of an uninterrupted run: a resumed run matches them only from the saved state
    full = _losses(_train(here, tmp, "full-here", *data_args))
    # one checkpoint per release, saved after step SAVED_AT of a STEPS-step schedule
    for python, tag in ((here, "here"), (other, "other")):
        saved = _train(python, tmp, f"save-{tag}", *data_args, "--stop-after", str(SAVED_AT),
                       "--save", str(tmp / f"ckpt-{tag}"))
        assert saved["checkpoints"]["saved"][-1].endswith(f"iter_{SAVED_AT:07d}")
    # every checkpoint resumed by both releases: the loss of the first resumed step is computed
    # on the loaded weights, the next one after an optimizer step from the loaded optimizer state
    for tag in ("here", "other"):
        resumed = {who: _train(python, tmp, f"load-{tag}-by-{who}", *data_args,
                               "--load", str(tmp / f"ckpt-{tag}"))
                   for python, who in ((here, "here"), (other, "other"))}
        for who, rec in resumed.items():
            assert rec["checkpoints"]["loaded_from"].endswith(f"iter_{SAVED_AT:07d}"), who
            assert sorted(_losses(rec)) == list(range(SAVED_AT + 1, STEPS + 1)), who
        same, cross = _losses(resumed["here" if tag == "here" else "other"]), \
            _losses(resumed["other" if tag == "here" else "here"])
        for step in same:
            assert same[step] == pytest.approx(full[step], abs=1e-5), (tag, step, same, full)
            assert cross[step] == pytest.approx(same[step], abs=1e-5), (
                f"checkpoint of megatron-core {versions[here if tag == 'here' else other]} at step "
                f"{step}: {cross[step]} with the other release vs {same[step]} with its own", versions)
        bpb = {who: rec["validation"]["final_bpb"] for who, rec in resumed.items()}
        assert bpb["here"] == pytest.approx(bpb["other"], abs=1e-5), (tag, bpb)
