"""The training loop's safeguards in one object: the INVALID ledger
(:class:`~megacpp_mcore.train.invalid.RunChecks`), the step guard that the schedule steps instead
of the optimizer (no update from NaN/inf gradients) and the test-only fault plan
(:mod:`megacpp_mcore.train.faults`), set up once per run from its config.

:class:`~megacpp_mcore.train.loop.Trainer` tells it what happens (a step begins, a step ended
with this loss, the run resumed from this checkpoint, a checkpoint is about to be saved) and
prints the lines it returns; the receipt takes :meth:`RunGuards.report`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from megacpp_mcore.train import faults, invalid
from megacpp_mcore.train.checkpoint import add_flags, iteration_path, read_metadata


class RunGuards:
    """Safeguards of one run (module docstring). ``step_guard`` is what ``runtime.train_step``
    gets as its optimizer; :attr:`halted` is set when ``--on-nonfinite stop`` fires."""

    def __init__(self, cfg, *, model, chunks, optimizer, device: torch.device, rank: int,
                 signature: dict[str, Any]):
        self.cfg, self.chunks, self.rank, self.signature = cfg, chunks, rank, signature
        self.faults = faults.FaultPlan.parse(cfg.fault)
        self.checks = invalid.RunChecks(policy=cfg.on_nonfinite, flag_checkpoint=self._flag)
        self.checks.add(invalid.placement_overrides(model))
        self.step = 0  # the step being computed (1-based), for the fault hooks
        self.step_guard = invalid.StepGuard(chunks, optimizer, device=device,
                                            before_update=lambda grads: self.faults.before_update(self.step, grads))
        self.halted = False

    def _flag(self, path: Path, flags: list[dict]) -> None:
        if self.rank == 0:  # one writer of the checkpoint's marker
            add_flags(path, flags)

    def resumed(self, path: Path, step: int, consumed: int) -> None:
        """The run continues from the checkpoint at ``path`` (its flags, its settings vs ours)."""
        meta = read_metadata(path)
        self.checks.resumed(path, step, meta, invalid.resume_mismatches(
            path, meta, self.signature, step=step, consumed=consumed))

    def announce(self) -> list[str]:
        """Lines for the INVALID rules known before the first step (placement, resume)."""
        return [f"INVALID ({item['rule']}): {item['reason']}" for item in self.checks.items]

    def before_step(self, step: int) -> None:
        """Step ``step`` (1-based) is about to run."""
        self.step = step
        self.faults.before_step(step, self.chunks)

    @property
    def skipped(self) -> bool:
        """Whether the last step's update was refused (non-finite gradients)."""
        return self.step_guard.skipped

    def after_step(self, step: int, loss: float) -> list[str]:
        """Step ``step`` ended with ``loss``: counts a non-finite step (and halts under ``stop``)
        or watches for a loss spike near a save; returns the lines to print."""
        if self.step_guard.skipped or not math.isfinite(loss):
            self.halted = self.cfg.on_nonfinite == "stop"
            return [self.checks.nonfinite(step, loss, grads_finite=not self.step_guard.skipped)]
        return self.checks.observe(step, loss)

    def kill_at(self, phase: str, step: int) -> None:
        self.faults.kill_at(phase, step)

    def saving(self, step: int) -> tuple[dict[str, Any], Callable[[str], None]]:
        """The marker metadata and the phase hook of the checkpoint of ``step`` in ``cfg.save``."""
        meta = {"run": self.signature, **self.checks.saving(step, iteration_path(self.cfg.save, step))}
        return meta, lambda phase: self.faults.at_save(phase, step)

    @property
    def nonfinite_steps(self) -> int:
        return self.checks.nonfinite_steps

    def report(self) -> list[dict[str, Any]]:
        """The receipt's ``invalid`` list."""
        return self.checks.report()
