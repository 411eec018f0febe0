"""Run a function on N ranks under ``torchrun`` (gloo on CPU) and collect each rank's result.

``run_distributed("pkg.module:func", nproc=2, kwargs={...})`` launches
``python -m torch.distributed.run --nproc-per-node 2 -m megacpp_mcore.testing.worker``; the worker
imports ``func``, calls it with ``kwargs`` and writes its JSON-serializable return value to
``rank<R>.json``. A failing rank raises :class:`DistributedRunError` with the tail of its output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


class DistributedRunError(RuntimeError):
    """A torchrun launch failed; the message carries the command and the output tail."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(target: str, *, nproc: int, kwargs: dict[str, Any] | None = None,
                    timeout: float = 600) -> list[Any]:
    """Runs ``target`` (``module:function``) on ``nproc`` ranks; returns the results by rank."""
    with tempfile.TemporaryDirectory(prefix="megacpp-dist-") as tmp:
        args_file = Path(tmp, "kwargs.json")
        args_file.write_text(json.dumps(kwargs or {}))
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc-per-node={nproc}", "--nnodes=1", "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}",
            "-m", "megacpp_mcore.testing.worker", target, str(args_file), tmp,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                   CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            raise DistributedRunError(f"{target} on {nproc} ranks timed out after {timeout}s") from exc
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-6000:]
            raise DistributedRunError(
                f"{target} on {nproc} ranks exited {proc.returncode}:\n{tail}"
            )
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(nproc)]
