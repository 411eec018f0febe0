"""Checkpoints of ``megacpp-mcore train``: model, optimizer, scheduler, step and data position
through Megatron's ``dist_checkpointing`` (resharded on load, so a run may resume under another
TP/PP/EP layout), plus the model signature that refuses loading a different model.

Layout: ``<dir>/iter_<step:07d>/`` and ``<dir>/latest_checkpointed_iteration.txt`` (written last).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megacpp_mcore.models.presets import ModelConfig
from megacpp_mcore.spec import compat

TRACKER = "latest_checkpointed_iteration.txt"


def find_checkpoint(directory: str) -> tuple[Path, int]:
    """The latest checkpoint in ``directory`` and its step; ``ValueError`` when there is none."""
    root = Path(directory)
    tracker = root / TRACKER
    if not root.is_dir():
        raise ValueError(f"--load {directory!r}: no such directory")
    try:
        step = int(tracker.read_text().strip())
    except (OSError, ValueError):
        raise ValueError(f"--load {directory!r} holds no checkpoint ({TRACKER} is missing or unreadable)") from None
    path = root / f"iter_{step:07d}"
    if not (path / "metadata.json").is_file():
        raise ValueError(f"--load {directory!r}: {TRACKER} names step {step} but {path} is not a checkpoint")
    return path, step


def model_signature(model: ModelConfig) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into ``model`` (topology may differ)."""
    keys = ("pattern", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
            "ffn_hidden_size", "vocab_size")
    table = [[e.index, e.symbol, sorted(e.features)] for e in model.layer_table()]
    return {k: getattr(model, k) for k in keys} | {"moe": repr(model.moe), "layers": table}


def check_checkpoint_matches(path: Path, model: ModelConfig) -> None:
    """``ValueError`` naming the differences when the checkpoint at ``path`` holds another model."""
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_common_state_dict(str(path)).get("model_signature")
    if saved is None:
        raise ValueError(f"--load: {path} was not written by `megacpp-mcore train` (no model signature)")
    wanted = model_signature(model)
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs model {wanted[k]!r}"
            for k in wanted if k != "layers" and saved.get(k) != wanted[k]]
    if not diff and saved.get("layers") != wanted["layers"]:
        diff.append("layer table (symbols/features per layer) differs")
    if diff:
        raise ValueError(f"--load: {path} holds a different model: " + "; ".join(diff))


def _model_keys(chunks) -> list[str]:
    """State-dict key per model chunk, Megatron-LM's convention: ``model``, or ``model0``,
    ``model1``, ... for interleaved pipelines. Each chunk keeps its own dict: its keys are local
    (``decoder.layers.0...`` in every chunk) while the storage keys inside carry global layer
    numbers, so one flat dict would let chunk 1 overwrite chunk 0."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _sharded_state(chunks, optimizer, scheduler, *, step: int, consumed: int, is_loading: bool,
                   model: ModelConfig) -> dict:
    models = {key: chunk.module.sharded_state_dict(prefix="") for key, chunk in zip(_model_keys(chunks), chunks)}
    return {
        **models,
        "optimizer": optimizer.sharded_state_dict(models, is_loading=is_loading),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "consumed_samples": consumed,
        "model_signature": model_signature(model),
    }


def save_checkpoint(directory: str, chunks, optimizer, scheduler, *, step: int, consumed: int,
                    model: ModelConfig) -> Path:
    """``directory/iter_<step>`` through dist_checkpointing; the tracker file is written last
    (atomically), so an interrupted save is never picked up by ``--load``."""
    from megatron.core import dist_checkpointing

    path = Path(directory, f"iter_{step:07d}")
    rank = torch.distributed.get_rank()
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state = _sharded_state(chunks, optimizer, scheduler, step=step, consumed=consumed, is_loading=False,
                           model=model)
    dist_checkpointing.save(state, str(path))
    torch.distributed.barrier()
    compat.write_legacy_common_file(str(path))  # 0.19 -> 0.16: see its docstring
    torch.distributed.barrier()
    if rank == 0:
        tmp = Path(directory, f".{TRACKER}.tmp")
        tmp.write_text(f"{step}\n")
        os.replace(tmp, Path(directory, TRACKER))
    torch.distributed.barrier()
    return path


def load_checkpoint(path: Path, chunks, optimizer, scheduler, *, model: ModelConfig) -> tuple[int, int]:
    """Restores model, optimizer and scheduler state; returns (step, consumed samples)."""
    from megatron.core import dist_checkpointing

    state = _sharded_state(chunks, optimizer, scheduler, step=0, consumed=0, is_loading=True, model=model)
    loaded = dist_checkpointing.load(state, str(path))
    for key, chunk in zip(_model_keys(chunks), chunks):
        own = chunk.module.state_dict(keep_vars=True)
        missing, _ = chunk.module.load_state_dict(
            {k: v for k, v in loaded[key].items() if k in own}, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks {missing[:5]}")
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    return int(loaded["step"]), int(loaded["consumed_samples"])
