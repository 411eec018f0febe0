"""Fault injection for the fault-tolerance tests of ``megacpp-mcore train`` (hidden ``--test-fault``
option, :attr:`TrainConfig.fault <megacpp_mcore.train.loop.TrainConfig>`): parsed once at start-up
into a :class:`FaultPlan`, whose hooks the loop calls at a few fixed points outside the model's
forward and backward. Without a plan every hook is a set lookup that finds nothing.

Spec: comma-separated items

- ``kill:PHASE:STEP``: SIGKILL this process (no cleanup, like a lost node) at ``PHASE`` of ``STEP``:
  ``step`` (step STEP's gradients computed, its update not applied), ``eval`` (the validation
  after step STEP, after its first batch), ``save`` (checkpoint of step STEP fully written, not yet
  published) or ``publish`` (checkpoint published, the tracker not yet updated);
- ``fail:PHASE:STEP[:RANK]``: an I/O error (``OSError`` EIO) at ``PHASE`` (``save`` or
  ``publish``, as above) of the checkpoint of ``STEP``, on rank ``RANK`` only (default: every
  rank): a save that fails on one node;
- ``nan:STEP``: a NaN in step STEP's gradients (a non-finite step);
- ``spike:STEP``: Gaussian noise (std 1) added to every weight before step STEP (a loss spike;
  CPU fp32 runs, where the optimizer steps the model's own parameters).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal

PHASES = ("step", "eval", "save", "publish")
SAVE_PHASES = ("save", "publish")
GRAMMAR = ("kill:{step|eval|save|publish}:STEP, fail:{save|publish}:STEP[:RANK], nan:STEP or "
           "spike:STEP, comma-separated")


def _step(item: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--test-fault item {item!r}: step {text!r} is not an int >= 1; allowed: {GRAMMAR}")
    return int(text)


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """The faults to inject into one run (see the module docstring)."""

    kills: frozenset[tuple[str, int]] = frozenset()
    fails: frozenset[tuple[str, int, int | None]] = frozenset()  # (phase, step, rank or None: all)
    nans: frozenset[int] = frozenset()
    spikes: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, spec: str | None) -> "FaultPlan":
        """The plan of ``spec``; ``ValueError`` naming a malformed item."""
        kills, fails, nans, spikes = set(), set(), set(), set()
        for item in (spec or "").split(","):
            if not item:
                continue
            kind, *rest = item.split(":")
            if kind == "kill" and len(rest) == 2 and rest[0] in PHASES:
                kills.add((rest[0], _step(item, rest[1])))
            elif kind == "fail" and len(rest) in (2, 3) and rest[0] in SAVE_PHASES:
                rank = None
                if len(rest) == 3:
                    if not rest[2].isdigit():
                        raise ValueError(f"--test-fault item {item!r}: rank {rest[2]!r} is not an "
                                         f"int >= 0; allowed: {GRAMMAR}")
                    rank = int(rest[2])
                fails.add((rest[0], _step(item, rest[1]), rank))
            elif kind in ("nan", "spike") and len(rest) == 1:
                (nans if kind == "nan" else spikes).add(_step(item, rest[0]))
            else:
                raise ValueError(f"--test-fault item {item!r} is malformed; allowed: {GRAMMAR}")
        return cls(kills=frozenset(kills), fails=frozenset(fails), nans=frozenset(nans),
                   spikes=frozenset(spikes))

    def kill_at(self, phase: str, step: int) -> None:
        """SIGKILLs this process when the plan kills at ``phase`` of ``step``."""
        if (phase, step) in self.kills:
            os.kill(os.getpid(), signal.SIGKILL)

    def at_save(self, phase: str, step: int) -> None:
        """At ``phase`` of the checkpoint of ``step``: the planned kill, or the planned I/O error
        on this rank."""
        self.kill_at(phase, step)
        rank = int(os.environ.get("RANK", "0"))
        if (phase, step, None) in self.fails or (phase, step, rank) in self.fails:
            raise OSError(errno.EIO, f"injected I/O error at {phase} of step {step} on rank {rank}")

    def before_update(self, step: int, grads) -> None:
        """Between step ``step``'s backward and its update; ``grads`` are the gradient tensors."""
        self.kill_at("step", step)
        if step in self.nans and grads:
            grads[0].view(-1)[0] = float("nan")

    def before_step(self, step: int, chunks) -> None:
        """Before step ``step``'s forward: the ``spike`` fault perturbs every weight (seeded)."""
        if step not in self.spikes:
            return
        import torch

        gen = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for chunk in chunks:
                for param in chunk.parameters():
                    param.add_(torch.randn(param.shape, generator=gen).to(param))
