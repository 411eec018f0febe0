"""Checkpoints of ``megacpp-mcore train``: model, optimizer, scheduler, step and data position
through Megatron's ``dist_checkpointing`` (resharded on load, so a run may resume under another
TP/PP/EP layout), plus the model signature that refuses loading a different model.

Layout: ``<dir>/iter_<step:07d>/`` holding dist_checkpointing's files and :data:`MARKER` (the
completion marker: step, data position, the run's settings and flags such as a loss spike near
the save), and ``<dir>/latest_checkpointed_iteration.txt`` (Megatron-LM's tracker).

A save is atomic: everything is written into ``<dir>/.iter_<step>.partial``, the marker last, all
files and the directory are fsynced, then the directory is renamed to ``iter_<step>`` and the
tracker is replaced. A process killed at any moment leaves either the previous checkpoints alone or
one more complete checkpoint; :func:`find_checkpoint` takes the newest complete ``iter_*`` and
ignores partial directories. A save that fails (full disk) removes its partial directory and
raises :class:`CheckpointError`; the checkpoints before it are never touched.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from megacpp_mcore.models.presets import ModelConfig
from megacpp_mcore.spec import compat
from megacpp_mcore.train import storage

TRACKER = "latest_checkpointed_iteration.txt"
MARKER = "megacpp_checkpoint.json"
MARKER_FORMAT = 1
PARTIAL_SUFFIX = ".partial"  # .iter_<step>.partial: a save in progress (or killed)
REPLACED_SUFFIX = ".replaced"  # .iter_<step>.replaced: a same-step checkpoint being replaced
_ITER = re.compile(r"iter_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (full disk, I/O error); one line, the last good one named."""


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The completion marker of the checkpoint at ``path``; None when it has none (incomplete, or
    written before markers existed)."""
    try:
        marker = json.loads(Path(path, MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("complete") is True else None


def _tracked_step(root: Path) -> int | None:
    try:
        return int(Path(root, TRACKER).read_text().strip())
    except (OSError, ValueError):
        return None


def complete_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``directory``, oldest first: ``iter_*`` with a
    marker, or without one (earlier releases) when the tracker names it."""
    root = Path(directory)
    tracked = _tracked_step(root)
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = _ITER.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        step = int(match[1])
        legacy = step == tracked and (path / "metadata.json").is_file() and not (path / MARKER).exists()
        if legacy or read_metadata(path) is not None:
            found.append((step, path))
    return sorted(found)


def find_checkpoint(directory: str) -> tuple[Path, int]:
    """The newest complete checkpoint in ``directory`` and its step; ``ValueError`` when there is
    none. Partial saves (a process killed while saving) are ignored."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--load {directory!r}: no such directory")
    found = complete_checkpoints(root)
    if not found:
        partial = [p.name for p in root.iterdir() if p.name.endswith(PARTIAL_SUFFIX) or _ITER.fullmatch(p.name)]
        raise ValueError(f"--load {directory!r} holds no checkpoint (no complete iter_*/{MARKER})"
                         + (f"; ignored incomplete: {', '.join(sorted(partial))}" if partial else ""))
    step, path = found[-1]
    return path, step


def model_signature(model: ModelConfig) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into ``model`` (topology may differ)."""
    keys = ("pattern", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
            "ffn_hidden_size", "vocab_size")
    table = [[e.index, e.symbol, sorted(e.features)] for e in model.layer_table()]
    return {k: getattr(model, k) for k in keys} | {"moe": repr(model.moe), "layers": table}


# Features a fine-tune may add to a checkpoint's model: their parameters are absent from it.
ADDABLE_FEATURES = ("flexidepth",)


def added_feature_configs(model: ModelConfig) -> dict[str, dict]:
    """The configs of the :data:`ADDABLE_FEATURES` ``model`` carries, as plain data for a
    checkpoint (the signature names a layer's features, not how they were configured: ``generate``
    rebuilds them with :func:`read_added_features`)."""
    return {name: dataclasses.asdict(model.features[name]) for name in ADDABLE_FEATURES
            if name in model.features and dataclasses.is_dataclass(model.features[name])}


def read_added_features(saved: dict | None) -> dict[str, Any]:
    """The feature configs :func:`added_feature_configs` stored (``{}`` for a checkpoint without
    them); ``ValueError`` naming what cannot be rebuilt."""
    from megacpp_mcore.features.flexidepth import FlexiDepthConfig
    from megacpp_mcore.spec.pattern import FeaturePlacement

    out = {}
    for name, fields in (saved or {}).items():
        if name != "flexidepth" or not isinstance(fields, dict):
            raise ValueError(f"the checkpoint records feature {name!r}, which this release cannot "
                             f"rebuild; allowed: {', '.join(ADDABLE_FEATURES)}")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        placement = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.pop("placement").items()}
        out[name] = FlexiDepthConfig(**fields, placement=FeaturePlacement(**placement))
    return out


def _signature_diff(saved: dict, wanted: dict) -> list[str]:
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs model {wanted[k]!r}"
            for k in wanted if k != "layers" and saved.get(k) != wanted[k]]
    if not diff and saved.get("layers") != wanted["layers"]:
        diff.append("layer table (symbols/features per layer) differs")
    return diff


def check_checkpoint_matches(path: Path, model: ModelConfig, *, frozen_backbone: bool = False) -> str:
    """How the checkpoint at ``path`` loads into ``model``: ``"resume"`` when it holds ``model``
    itself (also its MTP depth, where recorded), saved by a run that froze the backbone exactly
    when this one does (``frozen_backbone``; the optimizer state holds the trainable parameters
    only); ``"backbone"`` when it holds ``model`` without the :data:`ADDABLE_FEATURES` it carries
    (a dense checkpoint to fine-tune from: :func:`load_backbone`). ``ValueError`` naming the
    differences otherwise."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(path))
    saved = common.get("model_signature")
    if saved is None:
        raise ValueError(f"--load: {path} was not written by `megacpp-mcore train` (no model signature)")
    diff = _signature_diff(saved, model_signature(model))
    if not diff:
        depth = common.get("mtp_depth", model.mtp_depth)  # absent before train --mtp-depth existed
        if depth != model.mtp_depth:
            raise ValueError(f"--load: {path} was trained with MTP depth {depth}, this run has "
                             f"{model.mtp_depth}; resume it with --mtp-depth {depth}")
        if bool(common.get("frozen_backbone", False)) != frozen_backbone:
            was = "with" if common.get("frozen_backbone") else "without"
            raise ValueError(f"--load: {path} was saved by a run {was} --freeze-backbone; resume it {was} "
                             "--freeze-backbone (its optimizer state covers what that run trained)")
        return "resume"
    added = [name for name in ADDABLE_FEATURES if name in model.features]
    base = model.replace(features={k: v for k, v in model.features.items() if k not in added})
    if added and not _signature_diff(saved, model_signature(base)):
        return "backbone"
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
        # the trained MTP depth (`train --mtp-depth`): the shared block's weights do not show it, and
        # `generate --speculative K` drafts at most that many tokens (infer.checkpoint reads it)
        "mtp_depth": model.mtp_depth,
        # how a fine-tune's added features (FlexiDepth) were configured: generate rebuilds them
        "added_features": added_feature_configs(model),
        # a frozen-backbone fine-tune: resumed only as one (check_checkpoint_matches)
        "frozen_backbone": any(not p.requires_grad for c in chunks for p in c.module.parameters()),
    }


def iteration_path(directory: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``directory`` (Megatron-LM's naming)."""
    return Path(directory, f"iter_{step:07d}")


def _remove_leftovers(root: Path) -> None:
    """Partial directories of saves that were interrupted (never loaded; see the module docstring)."""
    for path in root.iterdir():
        if path.name.startswith(".iter_") and path.name.endswith((PARTIAL_SUFFIX, REPLACED_SUFFIX)):
            shutil.rmtree(path, ignore_errors=True)


def _publish(partial: Path, final: Path, marker: dict) -> None:
    """Marker, fsync, rename ``partial`` -> ``final`` (a same-step checkpoint is moved aside first
    and removed only once the new one is in place)."""
    storage.write_atomic(partial / MARKER, json.dumps(marker, indent=1) + "\n")
    storage.fsync_tree(partial)
    replaced = None
    if final.exists():
        replaced = final.with_name(f".{final.name}{REPLACED_SUFFIX}")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(partial, final)
    storage.fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


def _failure_reason(exc: BaseException) -> str:
    """The underlying error of a failed save in one line (torch.distributed.checkpoint wraps the
    per-rank errors in ``CheckpointException.failures``)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        exc = getattr(inner, "exception", inner)
    text = getattr(exc, "strerror", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


class _PhaseFailed(Exception):
    """A save phase failed on some rank; raised on every rank with that rank's reason."""


def _phase(work: Callable[[], None] | None) -> None:
    """Runs ``work`` (None: nothing on this rank), then agrees with every rank on the outcome: a
    collective, so that a rank whose part failed does not leave the others waiting in a barrier.
    Raises :class:`_PhaseFailed` on every rank when any rank failed (the lowest failing rank's
    reason)."""
    from torch.distributed.checkpoint.api import CheckpointException

    reason = None
    if work is not None:
        try:
            work()
        except (OSError, CheckpointException) as exc:
            reason = _failure_reason(exc)
    world = torch.distributed.get_world_size()
    reasons: list[str | None] = [None] * world
    torch.distributed.all_gather_object(reasons, reason)
    failed = [(rank, text) for rank, text in enumerate(reasons) if text is not None]
    if failed:
        rank, text = failed[0]
        raise _PhaseFailed(text if world == 1 else f"{text} (rank {rank})")


def save_checkpoint(directory: str, chunks, optimizer, scheduler, *, step: int, consumed: int,
                    model: ModelConfig, metadata: dict | None = None,
                    hook: Callable[[str], None] | None = None) -> Path:
    """``directory/iter_<step>``, written atomically (module docstring); ``metadata`` (JSON) goes
    into the marker. ``hook(phase)`` runs on every rank at ``"save"`` (all files written, nothing
    published) and ``"publish"`` (renamed, tracker not yet updated): the fault tests' kill points;
    an ``OSError`` it raises fails the save like a failed write.
    Raises :class:`CheckpointError` on every rank when the files cannot be written on any rank (the
    ranks agree after each phase, so none is left waiting for one that failed)."""
    from megatron.core import dist_checkpointing

    root = Path(directory)
    final = iteration_path(root, step)
    partial = root / f".{final.name}{PARTIAL_SUFFIX}"
    rank0 = torch.distributed.get_rank() == 0
    marker = {"format": MARKER_FORMAT, "complete": True, "step": step, "consumed_samples": consumed,
              "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(), "flags": [],
              **(metadata or {})}

    def prepare():
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        partial.mkdir()

    try:
        _phase(prepare if rank0 else None)
        state = _sharded_state(chunks, optimizer, scheduler, step=step, consumed=consumed,
                               is_loading=False, model=model)
        _phase(lambda: dist_checkpointing.save(state, str(partial)))
        _phase(lambda: compat.write_legacy_common_file(str(partial)))  # 0.19 -> 0.16: its docstring
        _phase(hook and (lambda: hook("save")))
        _phase((lambda: _publish(partial, final, marker)) if rank0 else None)
        _phase(hook and (lambda: hook("publish")))
        # Megatron-LM's tools read the tracker; our loader does not need it
        _phase((lambda: storage.write_atomic(root / TRACKER, f"{step}\n")) if rank0 else None)
    except _PhaseFailed as exc:
        if rank0:
            shutil.rmtree(partial, ignore_errors=True)
        good = complete_checkpoints(root)
        last = f"the last good checkpoint {good[-1][1]} is intact" if good else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint of step {step} could not be written to {final}: "
                              f"{exc}; {last}") from None
    return final


def add_flags(path: Path, flags: list[dict]) -> None:
    """Appends ``flags`` to the marker of the complete checkpoint at ``path`` (atomically; rank 0).
    A checkpoint without a marker, or in a read-only directory, keeps no flags (the receipt does)."""
    marker = read_metadata(path)
    if marker is None or not flags:
        return
    marker["flags"] = list(marker.get("flags", [])) + list(flags)
    try:
        storage.write_atomic(Path(path, MARKER), json.dumps(marker, indent=1) + "\n")
    except OSError:
        pass


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


def load_backbone(path: Path, chunks, *, model: ModelConfig) -> list[str]:
    """The model weights of a checkpoint holding ``model`` without its :data:`ADDABLE_FEATURES`
    (:func:`check_checkpoint_matches` said ``"backbone"``): every model tensor of the checkpoint
    loads, the added features' parameters are absent from it (deliberately missing: they keep
    their initialization), and nothing else is read: no optimizer, scheduler, step or data
    position (a fine-tune starts those fresh). Any other key difference is a ``RuntimeError``.
    Returns the parameter names left at their initialization (this rank's)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    added = re.compile(r"(^|\.)(" + "|".join(ADDABLE_FEATURES) + r")\.")
    models = {key: chunk.module.sharded_state_dict(prefix="") for key, chunk in zip(_model_keys(chunks), chunks)}
    # dist_checkpointing's words: "missing" = in the checkpoint, requested by no rank; "unexpected"
    # = requested by this rank, absent from the checkpoint (dropped from the request)
    loaded, missing, unexpected = dist_checkpointing.load(models, str(path), strict=StrictHandling.RETURN_ALL)
    other_missing = sorted(k for k in missing if not k.startswith("optimizer."))
    other_unexpected = sorted(k for k in unexpected if not added.search(k))
    if other_missing or other_unexpected:
        raise RuntimeError(f"checkpoint {path} does not hold this model's backbone: model lacks "
                           f"{other_missing[:5]}, checkpoint lacks {other_unexpected[:5]}")
    fresh: list[str] = []
    for key, chunk in zip(_model_keys(chunks), chunks):
        own = chunk.module.state_dict(keep_vars=True)
        absent, _ = chunk.module.load_state_dict({k: v for k, v in loaded[key].items() if k in own}, strict=False)
        absent = [k for k in absent if not k.endswith("_extra_state")]
        if any(not added.search(k) for k in absent):
            raise RuntimeError(f"checkpoint {path} lacks {[k for k in absent if not added.search(k)][:5]}")
        fresh += absent
    return fresh
