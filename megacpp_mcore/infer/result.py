"""What :func:`.decode.generate` returns (:class:`Generation`: tokens, timings, acceptance) and how
a decode step's tokens reach it (:class:`Emitter`: stop tokens, budgets, one read at the end)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch


@dataclasses.dataclass
class Generation:
    """Result of :func:`generate`: per row the new token ids and why the row stopped, timings, and
    for speculative decoding the acceptance statistics."""

    tokens: list[list[int]]
    stop: list[str]  # "length" | "stop_token" | "context"
    prompt_lengths: list[int]
    speculative: int
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0  # trunk forwards after the prefill
    decode_tokens: int = 0  # tokens emitted by those steps (all rows, until each row stopped)
    attempted: list[int] = dataclasses.field(default_factory=list)  # per draft position
    accepted: list[int] = dataclasses.field(default_factory=list)
    # The one-time setup of a static step, not counted in decode_s: with CUDA graphs the capture,
    # and the warm-up step before it (run eagerly; with compile_speculative it also compiles). Its
    # tokens are emitted and counted in decode_tokens and steps, but the rates leave the warm-up
    # step out (steady_steps, decode_tokens_per_s), for plain and speculative decoding alike.
    graph_capture_s: float = 0.0
    warmup_s: float = 0.0
    warmup_steps: int = 0  # 0 or 1
    warmup_tokens: int = 0

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def steady_steps(self) -> int:
        """Steps after the prefill that ``decode_s`` times (all of them, less the warm-up)."""
        return self.steps - self.warmup_steps

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps ``decode_s`` times (steady state: a static
        step's one-time warm-up and capture are left out, for plain and speculative decoding
        alike)."""
        tokens = self.decode_tokens - self.warmup_tokens
        return tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def acceptance(self) -> list[float]:
        """Per draft position ``j``: accepted / attempted, where position ``j`` is attempted when
        drafts ``1 .. j-1`` of that row were accepted (so position 1 is the plain acceptance rate
        and later positions are conditional on the earlier ones)."""
        return [a / t if t else float("nan") for a, t in zip(self.accepted, self.attempted)]

    @property
    def mean_accepted(self) -> float:
        """Accepted drafts per verification step and row."""
        rows = self.attempted[0] if self.attempted else 0
        return sum(self.accepted) / rows if rows else float("nan")

    def summary(self) -> dict:
        """JSON-able timings and statistics (no token lists)."""
        out = {"speculative": self.speculative, "prompt_tokens": self.prompt_lengths,
               "new_tokens": self.new_tokens, "prefill_s": self.prefill_s,
               "decode_s": self.decode_s, "graph_capture_s": self.graph_capture_s,
               "warmup_s": self.warmup_s, "warmup_steps": self.warmup_steps,
               "warmup_tokens": self.warmup_tokens,
               "steps": self.steps, "steady_steps": self.steady_steps, "decode_tokens": self.decode_tokens,
               "decode_tokens_per_s": self.decode_tokens_per_s, "stop": self.stop}
        if self.speculative:
            out.update(acceptance_per_position=self.acceptance, attempted=self.attempted,
                       accepted=self.accepted, mean_accepted=self.mean_accepted)
        return out


class Emitter:
    """The rows' new tokens as the steps produce them, ``[b, n]`` per step (the same ``n`` for
    every row), into ``result.tokens`` / ``result.stop``; a row stops at ``budget`` tokens or
    before its first stop token.

    With stop tokens each step's tokens are read on the host at once. Without, only the rows'
    common length decides when they stop, which the host knows: the tokens stay where they are
    (device tensors, or host rows a speculative step has read anyway) until :meth:`finish`."""

    def __init__(self, result: Generation, budget: int, max_new_tokens: int,
                 stop_tokens: Sequence[int]):
        self.result, self.budget = result, budget
        self.stop_tokens = frozenset(stop_tokens)
        self.limit = "length" if budget == max_new_tokens else "context"
        self.done = [False] * len(result.tokens)
        self.length = 0  # tokens per row so far (without stop tokens: the same for every row)
        self._held: list = []  # without stop tokens: [b, n] device tensors or host rows, in order

    def add(self, new: torch.Tensor | None, rows: list[list[int]] | None = None) -> int:
        """Emits ``new`` ``[b, n]`` (``rows``: the same ids, when already on the host; then
        ``new`` may be None); returns
        how many tokens the rows still running emitted."""
        if not self.stop_tokens:
            n = new.shape[1] if rows is None else len(rows[0])
            count = min(n, self.budget - self.length) * sum(not d for d in self.done)
            self._held.append(new if rows is None else rows)
            self.length += n
            if self.length >= self.budget:
                self.done = [True] * len(self.done)
                self.result.stop = [self.limit] * len(self.done)
            return count
        count, result = 0, self.result
        for row, ids in enumerate(new.tolist() if rows is None else rows):
            for token in ids:
                if self.done[row]:
                    break
                if token in self.stop_tokens:
                    self.done[row], result.stop[row] = True, "stop_token"
                    break
                result.tokens[row].append(token)
                count += 1
                if len(result.tokens[row]) >= self.budget:
                    self.done[row], result.stop[row] = True, self.limit
        return count

    def finish(self) -> None:
        """Reads the held tokens (one transfer for all device tensors) into ``result.tokens``."""
        on_device = [chunk for chunk in self._held if isinstance(chunk, torch.Tensor)]
        read = torch.cat(on_device, dim=1).tolist() if on_device else []  # [b][all device ids]
        at = 0
        for chunk in self._held:
            if isinstance(chunk, torch.Tensor):
                n = chunk.shape[1]
                chunk, at = [ids[at:at + n] for ids in read], at + n
            for row, ids in enumerate(chunk):
                self.result.tokens[row].extend(ids)
        self._held = []
        for row in self.result.tokens:
            del row[self.budget:]
