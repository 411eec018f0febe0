"""Where a run writes, checked before it starts, and how it writes so that a crash leaves either
the old file or the new one, never half of one.

:func:`preflight` refuses, with one line naming the path, a checkpoint directory, receipt path or
data cache that cannot be written (a path component that is a file, no write permission, a
read-only file system: found by creating and removing a probe file in the nearest existing
directory, so nothing is left behind) and a checkpoint directory whose file system has less free
space than one checkpoint of the model (:func:`checkpoint_bytes`, from the parameter count of
:mod:`megacpp_mcore.models.accounting`). :func:`write_atomic`, :func:`fsync_tree` and
:func:`fsync_dir` are the durable-write primitives of :mod:`megacpp_mcore.train.checkpoint`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from megacpp_mcore.models.presets import ModelConfig

# Bytes per parameter in a checkpoint: the weight (fp32, or bf16 plus the optimizer's fp32 master
# copy) and Adam's two fp32 moments. Slack covers dist_checkpointing's metadata and common state.
FP32_BYTES_PER_PARAM = 4 + 8
BF16_BYTES_PER_PARAM = 2 + 4 + 8
SLACK = 1.1
SLACK_BYTES = 1 << 20


def checkpoint_bytes(model: ModelConfig, *, bf16: bool) -> int:
    """Estimated size of one checkpoint of ``model`` (all ranks together)."""
    from megacpp_mcore.models.accounting import embedding_params, layer_params

    params = sum(layer_params(model, e) for e in model.layer_table()) + sum(embedding_params(model).values())
    per_param = BF16_BYTES_PER_PARAM if bf16 else FP32_BYTES_PER_PARAM
    return int(params * per_param * SLACK) + SLACK_BYTES


def _fmt(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (what creating ``path`` would write into)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, what: str, *, directory: bool) -> Path:
    """``ValueError`` (one line naming ``what`` and ``path``) unless ``path`` can be created or
    written: as a directory (``directory``) or as a file. Returns the nearest existing directory.
    Leaves nothing behind (the probe file is removed; missing directories are not created)."""
    target = Path(path)
    if target.exists() and target.is_dir() != directory:
        kind = "a file" if directory else "a directory"
        raise ValueError(f"{what} {str(path)!r} is {kind}; give a {'directory' if directory else 'file'} path")
    base = nearest_existing(target if directory else target.parent)
    if not base.is_dir():
        raise ValueError(f"{what} {str(path)!r} cannot be created: {base} is a file, not a directory")
    try:  # a real write: os.access says yes to root on a read-only file system
        fd, probe = tempfile.mkstemp(prefix=".megacpp-write-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{what} {str(path)!r} is not writable: {base}: {exc.strerror or exc}") from None
    return base


def check_free_space(directory: str | os.PathLike, need: int, what: str) -> None:
    """``ValueError`` when the file system of ``directory`` has fewer than ``need`` bytes free."""
    base = nearest_existing(Path(directory))
    free = shutil.disk_usage(base).free
    if free < need:
        raise ValueError(f"{what} {str(directory)!r}: {_fmt(free)} free on its file system ({base}), "
                         f"one checkpoint of this model needs about {_fmt(need)}")


def preflight(*, save: str | None, receipt: str | None, cache: Path, model: ModelConfig, bf16: bool) -> None:
    """Every output location of a run, checked before anything starts (see the module docstring)."""
    check_writable(cache, "data cache (MEGACPP_CACHE)", directory=True)
    if receipt is not None:
        check_writable(receipt, "--receipt", directory=False)
    if save is not None:
        check_writable(save, "--save", directory=True)
        check_free_space(save, checkpoint_bytes(model, bf16=bf16), "--save")


# ------------------------------------------------------------------------------- durable writes --

def fsync_dir(path: str | os.PathLike) -> None:
    """Makes ``path``'s entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsyncs every file and directory under ``root`` (files first, ``root`` last)."""
    for parent, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(parent)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same directory: fsync, rename,
    fsync the directory. Readers see the old content or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
