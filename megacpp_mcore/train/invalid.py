"""INVALID rules: what makes a run's numbers mean something other than what its configuration
claims, recorded by the run itself in its receipt (``"invalid": [{"rule", "reason", "step"}]``,
empty for a clean run) and read back by ``megacpp-mcore compare``.

Rules (:data:`RULES`):

- ``nonfinite_steps``: steps whose loss or gradients held NaN/inf (counted). :class:`StepGuard`
  refuses such an update before the optimizer applies it (in fp32 and bf16 Megatron's optimizer
  only checks with an fp16 loss scaler); the run's policy (``--on-nonfinite``) then stops the run
  or skips the step, as Megatron-LM skips an iteration on overflow: the data position advances,
  the learning-rate schedule does not.
- ``placement_override``: a layer carries a feature on a symbol its placement guard
  (:data:`~megacpp_mcore.spec.pattern.FEATURE_RULES`) refuses unless opted in (``allow_on``).
- ``loss_spike_near_save``: a step's loss is more than :data:`SPIKE_FACTOR` times the median of the
  :data:`SPIKE_WINDOW` steps before it, within :data:`SPIKE_SAVE_DISTANCE` steps of a checkpoint
  save (before or after it); the saved weights are flagged (once, by the largest such spike) in
  the checkpoint's marker as well, and a run resumed from flagged weights inherits the flag.
- ``resume_mismatch``: ``--load`` of a checkpoint written with other settings (seed, batch,
  sequence length, steps and warm-up of the schedule, clipping, data) or at a data position this
  run's batch does not reach at that step: Megatron's scheduler keeps the checkpoint's schedule
  and the data order depends on seed and sample count, so such a run does not run what it claims.
  Refused outright (:func:`check_resume_optimizer`): another model (by
  :mod:`megacpp_mcore.train.checkpoint`) and other optimizer settings (lr, min_lr, weight decay),
  which megatron-core 0.16 silently replaces by the checkpoint's and 0.19 cannot load at all.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

RULES = ("nonfinite_steps", "placement_override", "loss_spike_near_save", "resume_mismatch")
NONFINITE_POLICIES = ("stop", "skip")
SPIKE_WINDOW = 8  # steps whose median is the baseline
SPIKE_MIN_HISTORY = 4  # no verdict before this many steps
SPIKE_FACTOR = 1.5  # loss > 1.5 x baseline ...
SPIKE_MIN_RISE = 0.5  # ... and at least 0.5 nats above it (near-zero losses are not spikes)
SPIKE_SAVE_DISTANCE = 3  # steps between a spike and a save that make the saved weights suspect
# Settings a resumed run should share with the checkpoint it loads (see run_signature); the
# optimizer's own are refused when they differ, the others make the run INVALID.
OPTIMIZER_KEYS = ("lr", "min_lr", "weight_decay")
RESUME_KEYS = ("seed", "global_batch_size", "seq_length", "steps", "warmup_steps", "clip_grad", "data")


def entry(rule: str, reason: str, step: int | None = None) -> dict[str, Any]:
    """One receipt ``invalid`` item."""
    assert rule in RULES, rule
    return {"rule": rule, "reason": reason, "step": step}


# ------------------------------------------------------------------------- configuration rules --

def placement_overrides(model) -> list[dict[str, Any]]:
    """``placement_override`` items of ``model``: one per feature that sits on layers whose symbol
    its guard refuses by default."""
    from megacpp_mcore.spec.pattern import FEATURE_RULES

    overridden: dict[str, list] = collections.defaultdict(list)
    for e in model.layer_table():
        for feature in sorted(e.features):
            rule = FEATURE_RULES.get(feature)
            if rule is not None and e.symbol not in rule["allowed"]:
                overridden[feature].append(e)
    items = []
    for feature, layers in overridden.items():
        where = ", ".join(f"{e.index} ({e.symbol})" for e in layers)
        allowed = "".join(sorted(FEATURE_RULES[feature]["allowed"]))
        items.append(entry("placement_override",
                           f"{feature} is opted in (allow_on) on layers {where}, which its placement "
                           f"guard refuses by default (allowed on {allowed})"))
    return items


def prepared_data_id(manifest: dict) -> str:
    """16 hex digits identifying one prepared dataset exactly (its whole manifest: source path,
    tokenizer, split sizes), for resume checks. Not ``substrate.corpus_fingerprint``, which names
    the corpus whatever its path or tokenizer, for ``compare``."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def run_signature(cfg, *, global_batch: int, seq_length: int, manifest: dict) -> dict[str, Any]:
    """What a checkpoint records of its run, for :func:`resume_mismatches`."""
    return {"seed": cfg.seed, "global_batch_size": global_batch, "seq_length": seq_length,
            "steps": cfg.steps, "lr": cfg.lr, "min_lr": cfg.min_lr, "warmup_steps": cfg.warmup_steps,
            "weight_decay": cfg.weight_decay, "clip_grad": cfg.clip_grad,
            "data": prepared_data_id(manifest)}


def check_resume_optimizer(path: Path, metadata: dict | None, cfg) -> None:
    """``ValueError`` when ``cfg`` asks for other optimizer settings than the checkpoint at
    ``path`` was trained with (megatron-core keys parameter groups and the scheduler by them)."""
    saved = (metadata or {}).get("run") or {}
    diffs = [f"{k}={saved[k]!r} (asked {getattr(cfg, k)!r})"
             for k in OPTIMIZER_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if diffs:
        raise ValueError(f"--load {str(path)!r} was trained with {', '.join(diffs)}; megatron-core restores "
                         "the checkpoint's optimizer settings (0.19 refuses others): resume with the same "
                         "--lr, --min-lr and --weight-decay")


def resume_mismatches(path: Path, metadata: dict | None, current: dict, *, step: int,
                      consumed: int) -> list[dict[str, Any]]:
    """``resume_mismatch`` (at most one item, listing every difference) of resuming ``current``
    (a :func:`run_signature`) from the checkpoint at ``path`` (step, consumed samples, marker)."""
    saved = (metadata or {}).get("run") or {}
    diffs = [f"{k}: checkpoint {saved[k]!r} vs this run {current[k]!r}"
             for k in RESUME_KEYS if k in saved and saved[k] != current[k]]
    expected = step * current["global_batch_size"]
    if consumed != expected:
        diffs.append(f"data position: the checkpoint consumed {consumed} samples by step {step}, "
                     f"this run's global batch {current['global_batch_size']} reaches {expected}")
    if not diffs:
        return []
    return [entry("resume_mismatch", f"resumed from {path}: " + "; ".join(diffs), step)]


# ------------------------------------------------------------------------------------- spikes --

class SpikeDetector:
    """Loss spikes: ``loss > SPIKE_FACTOR x median`` of the last :data:`SPIKE_WINDOW` finite step
    losses (and :data:`SPIKE_MIN_RISE` above it). ``recent`` ([step, loss] pairs) resumes it."""

    def __init__(self, recent=()):
        self.recent: collections.deque = collections.deque((list(x) for x in recent), maxlen=SPIKE_WINDOW)

    def observe(self, step: int, loss: float) -> dict[str, float] | None:
        """The spike at ``step`` (step, loss, baseline, steps), or None."""
        spike = None
        if len(self.recent) >= SPIKE_MIN_HISTORY:
            base = statistics.median(x[1] for x in self.recent)
            if loss > SPIKE_FACTOR * base and loss - base >= SPIKE_MIN_RISE:
                spike = {"step": step, "loss": loss, "baseline": base, "steps": len(self.recent)}
        self.recent.append([step, loss])
        return spike


def _spike_flag(spike: dict, save_step: int, path: Path) -> dict[str, Any]:
    gap = spike["step"] - save_step
    when = f"{-gap} step(s) after it" if gap < 0 else ("at that step" if gap == 0 else f"{gap} step(s) before it")
    return entry("loss_spike_near_save",
                 f"loss {spike['loss']:.4f} at step {spike['step']} is {spike['loss'] / spike['baseline']:.1f}x "
                 f"the median {spike['baseline']:.4f} of the {spike['steps']} steps before; checkpoint "
                 f"{Path(path).name} (step {save_step}), saved {when}, is flagged", spike["step"])


# ------------------------------------------------------------------------------ the run's ledger --

class RunChecks:
    """The INVALID ledger of one run: the loop reports steps, saves and resumes; :meth:`report` is
    the receipt's ``invalid`` list. ``flag_checkpoint(path, flags)`` marks saved weights that a
    later spike makes suspect."""

    def __init__(self, *, policy: str, flag_checkpoint: Callable[[Path, list[dict]], None]):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite={policy!r} is unknown; allowed: {', '.join(NONFINITE_POLICIES)}")
        self.policy, self.flag_checkpoint = policy, flag_checkpoint
        self.items: list[dict[str, Any]] = []
        self.nonfinite_steps, self.first_nonfinite = 0, None
        self.spikes = SpikeDetector()
        self.recent_spikes: list[dict] = []  # within SPIKE_SAVE_DISTANCE of the latest step
        self.saves: list[tuple[int, Path]] = []  # saves a spike may still flag
        self.flagged: set[int] = set()  # steps of checkpoints flagged (each once)

    def add(self, items: list[dict[str, Any]]) -> None:
        self.items.extend(items)

    def resumed(self, path: Path, step: int, metadata: dict | None, mismatches: list[dict]) -> None:
        """The run continues from ``path``: its flags carry over, the spike baseline resumes."""
        metadata = metadata or {}
        self.add(mismatches)
        self.add([entry(f["rule"], f"resumed from {path}, whose weights are flagged: {f['reason']}", f["step"])
                  for f in metadata.get("flags", [])])
        self.spikes = SpikeDetector(metadata.get("recent_losses", ()))
        self.saves.append((step, Path(path)))
        if metadata.get("flags"):
            self.flagged.add(step)

    def nonfinite(self, step: int, loss: float, grads_finite: bool) -> str:
        """Counts a non-finite step; returns the line to print."""
        self.nonfinite_steps += 1
        self.first_nonfinite = self.first_nonfinite or step
        what = ", ".join(([] if math.isfinite(loss) else [f"loss ({loss})"])
                         + ([] if grads_finite else ["gradients (NaN/inf)"]))
        if self.policy == "stop":
            return (f"step {step}: non-finite {what}; stopping (--on-nonfinite stop; 'skip' steps past "
                    f"such steps); the receipt marks this run INVALID")
        return (f"step {step}: non-finite {what}; update skipped (--on-nonfinite skip, "
                f"{self.nonfinite_steps} such step(s) so far)")

    def observe(self, step: int, loss: float) -> list[str]:
        """A finite step loss; returns lines for spikes that flag a save made before it."""
        spike = self.spikes.observe(step, loss)
        self.recent_spikes = [s for s in self.recent_spikes if step - s["step"] <= SPIKE_SAVE_DISTANCE]
        if spike is None:
            return []
        self.recent_spikes.append(spike)
        lines = []
        for save_step, path in self.saves:
            if 0 < step - save_step <= SPIKE_SAVE_DISTANCE and save_step not in self.flagged:
                flag = self._flag(spike, save_step, path)
                self.flag_checkpoint(path, [flag])
                lines.append(f"step {step}: {flag['reason']}")
        return lines

    def _flag(self, spike: dict, save_step: int, path: Path) -> dict[str, Any]:
        flag = _spike_flag(spike, save_step, path)
        self.flagged.add(save_step)
        self.add([flag])
        return flag

    def saving(self, step: int, path: Path) -> dict[str, Any]:
        """Before saving step ``step`` at ``path``: the marker's ``flags`` (the largest spike at or
        shortly before it) and ``recent_losses`` (the spike baseline, for a resume)."""
        near = [s for s in self.recent_spikes if 0 <= step - s["step"] <= SPIKE_SAVE_DISTANCE]
        flags = [self._flag(max(near, key=lambda s: s["loss"]), step, path)] if near else []
        self.saves = [(s, p) for s, p in self.saves if step - s <= SPIKE_SAVE_DISTANCE] + [(step, Path(path))]
        return {"flags": flags, "recent_losses": list(self.spikes.recent)}

    def report(self) -> list[dict[str, Any]]:
        """The receipt's ``invalid`` list."""
        items = list(self.items)
        if self.nonfinite_steps:
            action = ("the run stopped there (--on-nonfinite stop)" if self.policy == "stop"
                      else "their updates were skipped (--on-nonfinite skip)")
            items.insert(0, entry("nonfinite_steps",
                                  f"{self.nonfinite_steps} step(s) with a non-finite loss or gradients, "
                                  f"first at step {self.first_nonfinite}; {action}", self.first_nonfinite))
        return items


# ------------------------------------------------------------------------------ the step guard --

def param_grads(chunks) -> list[torch.Tensor]:
    """This rank's gradient tensors (Megatron DDP's ``main_grad`` buffers, else ``.grad``)."""
    grads = []
    for chunk in chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is not None:
                grads.append(grad)
    return grads


def grads_finite(chunks, device: torch.device) -> bool:
    """Whether every rank's gradients are finite (one sum per tensor: NaN/inf propagate; one
    all-reduce so that every rank takes the same decision)."""
    grads = param_grads(chunks)
    total = torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum() if grads else torch.zeros(())
    bad = (~torch.isfinite(total)).to(device=device, dtype=torch.float32).reshape(1)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


class StepGuard:
    """The optimizer as :func:`megacpp_mcore.train.runtime.train_step` sees it: ``zero_grad`` and
    ``step`` of Megatron's optimizer, except that an update with non-finite gradients is not
    applied (``step`` returns Megatron's skipped-update triple ``(False, None, None)`` and
    :attr:`skipped` is set). ``before_update(grads)`` runs first (the fault tests' hook)."""

    def __init__(self, chunks, optimizer, *, device: torch.device,
                 before_update: Callable[[list[torch.Tensor]], None] | None = None):
        self.chunks, self.optimizer, self.device = chunks, optimizer, device
        self.before_update = before_update
        self.skipped = False

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self):
        if self.before_update is not None:
            self.before_update(param_grads(self.chunks))
        self.skipped = not grads_finite(self.chunks, self.device)
        if self.skipped:
            return False, None, None
        return self.optimizer.step()
