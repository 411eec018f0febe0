"""pyproject.toml: one package for megatron-core 0.16.1 (Python 3.11) and 0.17 - 0.19 (Python 3.12+);
the ``te`` extra inside each release line's Transformer Engine range; the installed environment is one
the markers allow."""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirements(group: str | None = None) -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return [Requirement(line) for line in lines]


def _active(requirements: list[Requirement], name: str, python: str) -> list[Requirement]:
    env = {"python_version": python, "python_full_version": f"{python}.0"}
    return [r for r in requirements if r.name == name and (r.marker is None or r.marker.evaluate(env))]


@pytest.mark.parametrize("python,allowed,refused", [
    ("3.10", ["0.16.1"], ["0.17.0", "0.19.2"]),
    ("3.11", ["0.16.1", "0.16.2"], ["0.16.0", "0.17.0", "0.19.2"]),
    ("3.12", ["0.17.0", "0.17.1", "0.18.2", "0.19.2"], ["0.16.1", "0.20.0"]),
    ("3.13", ["0.19.2"], ["0.16.1", "0.20.0"]),
])
def test_megatron_core_release_line_follows_the_python_version(python, allowed, refused):
    """megatron-core 0.17+ require Python >= 3.12 (their wheels' Requires-Python), so the
    Python version picks the line: exactly one requirement applies on each interpreter."""
    (mcore,) = _active(_requirements(), "megatron-core", python)
    assert [v for v in allowed if not mcore.specifier.contains(v)] == []
    assert [v for v in refused if mcore.specifier.contains(v)] == []


@pytest.mark.parametrize("python,allowed,refused", [
    # 0.16.1's own metadata: transformer-engine>=2.9.0a0,<2.12.0
    ("3.11", ["2.9.0", "2.11.0"], ["2.12.0", "2.17.1"]),
    # 0.17 - 0.19 declare no range; their tags lock 2.14.1 / 2.16.0 / 2.17.1; patches checked to 2.18
    ("3.12", ["2.14.1", "2.16.0", "2.17.1", "2.18.0"], ["2.11.0", "2.19.0"]),
])
def test_te_extra_per_release_line(python, allowed, refused):
    (te,) = _active(_requirements("te"), "transformer-engine", python)
    assert "pytorch" in te.extras
    assert [v for v in allowed if not te.specifier.contains(v)] == []
    assert [v for v in refused if te.specifier.contains(v)] == []


def test_te_extra_agrees_with_the_te_patch_targets():
    """The TE releases the extra allows are ones te-attention-backend-per-layer was checked on."""
    from megacpp_mcore.patches import registry, te_attention_backend_per_layer

    targets = registry.parse_targets(te_attention_backend_per_layer.TARGETS).specifier
    for python in ("3.11", "3.12"):
        (te,) = _active(_requirements("te"), "transformer-engine", python)
        lower = min(Version(s.version) for s in te.specifier if s.operator == ">=")
        upper = max(Version(s.version) for s in te.specifier if s.operator == "<")
        newest = f"{upper.major}.{upper.minor - 1}.99"  # the newest release the extra lets in
        assert targets.contains(str(lower)) and targets.contains(newest), (python, te, targets)


def test_installed_environment_satisfies_the_markers():
    """The megatron-core this interpreter runs is one pyproject allows here, and the installed
    package's metadata carries the same markers (the install is not stale)."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    (mcore,) = _active(_requirements(), "megatron-core", python)
    assert mcore.specifier.contains(importlib.metadata.version("megatron-core"))
    installed = [Requirement(r) for r in importlib.metadata.requires("megacpp-mcore") or []]
    assert sorted(map(str, installed)) == sorted(
        map(str, _requirements() + [r for g in ("te", "test") for r in _with_extra(g)]))


def _with_extra(group: str) -> list[Requirement]:
    """The group's requirements as wheel metadata spells them (``extra == "group"`` added)."""
    out = []
    for r in _requirements(group):
        marker = f'({r.marker}) and extra == "{group}"' if r.marker else f'extra == "{group}"'
        out.append(Requirement(f"{r.name}{'[' + ','.join(sorted(r.extras)) + ']' if r.extras else ''}"
                               f"{r.specifier}; {marker}"))
    return out


def test_ci_runs_the_readme_command_and_the_312_leg():
    """``.ci/run``'s first leg is the README's test command; its second runs the suite on Python
    3.12 with megatron-core 0.19.2; the cross-release test gets the other interpreter."""
    import re
    import shutil
    import subprocess

    root = PYPROJECT.parent
    readme = (root / "README.md").read_text()
    block = readme[readme.index("## Run the tests (fresh machine)"):]
    command = re.search(r"```bash\n(.+?)\n```", block, re.S).group(1).strip()
    ci = (root / ".ci" / "run").read_text()
    pip_part, pytest_part = command.rsplit(" && ", 1)
    assert pip_part in ci and f'MEGACPP_OTHER_PYTHON="$VENV312/bin/python" {pytest_part}' in ci
    assert 'MCORE_312=0.19.2' in ci and '"$VENV312/bin/python" -m pytest -q' in ci
    assert "/.ci/venv312/" in (root / ".gitignore").read_text().splitlines()
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is in the test extra"
    proc = subprocess.run([shellcheck, "--severity=style", str(root / ".ci" / "run")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def _fake_ci(tmp_path, *, leg1: int, leg2: int, mcore: str = "0.19.2"):
    """Runs a copy of ``.ci/run`` whose interpreters are stand-ins: pip succeeds, the venv reports
    ``mcore``, pytest exits ``leg1``/``leg2``; returns (process, what the stand-ins were asked)."""
    import os
    import shutil
    import stat
    import subprocess

    (tmp_path / ".ci").mkdir()
    shutil.copy(PYPROJECT.parent / ".ci" / "run", tmp_path / ".ci" / "run")
    log = tmp_path / "calls.log"
    bindir, venv = tmp_path / "bin", tmp_path / "venv312"
    for path, rc, version in ((bindir / "python", leg1, "0.16.1"), (venv / "bin" / "python", leg2, mcore)):
        path.parent.mkdir(parents=True)
        path.write_text(f"""#!/usr/bin/env bash
echo "$0 $* OTHER=${{MEGACPP_OTHER_PYTHON:-}}" >> {log}
case "$*" in
  "-m pytest -q") exit {rc} ;;
  -c*) echo "3.x megatron-core {version}"; [[ {version} == 0.19.2 || $0 != *venv312* ]] ;;
  *) exit 0 ;;
esac
""")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", MEGACPP_CI_VENV312=str(venv))
    proc = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True,
                          env=env, timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("leg1,leg2", [(0, 0), (1, 0), (0, 5)])
def test_ci_runs_both_legs_and_fails_when_either_fails(tmp_path, leg1, leg2):
    proc, calls = _fake_ci(tmp_path, leg1=leg1, leg2=leg2)
    pytest_calls = [c for c in calls if " -m pytest -q " in c + " "]
    assert len(pytest_calls) == 2, calls  # both legs ran, whatever the first one gave
    assert pytest_calls[0].endswith(f"OTHER={tmp_path / 'venv312' / 'bin' / 'python'}")
    assert "venv312" in pytest_calls[1]
    assert proc.stdout.count("after ") == 4  # every step prints its wall time
    if leg1 == leg2 == 0:
        assert proc.returncode == 0 and "both legs passed" in proc.stdout
    else:  # pytest's exit 5 (no tests collected) fails the run too
        failed = "leg 1" if leg1 else "leg 2"
        assert proc.returncode == 1 and f"[ci] FAILED: {failed}" in proc.stderr


def test_ci_stops_when_the_312_venv_runs_another_release(tmp_path):
    proc, calls = _fake_ci(tmp_path, leg1=0, leg2=0, mcore="0.18.2")
    assert proc.returncode != 0 and not [c for c in calls if "-m pytest" in c]
