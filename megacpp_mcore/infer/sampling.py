"""Token choice (greedy, temperature / top-p sampling) and speculative verification.

Verification is the standard rule (Leviathan et al. 2023; Chen et al. 2023): with the trunk's
distribution ``p`` and the drafter's ``q`` at a draft position (both after the same temperature and
top-p), draft ``d`` is accepted with probability ``min(1, p(d) / q(d))``; at the first rejection the
token is drawn from ``norm(max(0, p - q))``; when all ``K`` drafts are accepted one more token is
drawn from ``p`` at the position after them. Every emitted token is then distributed exactly as the
trunk's ``p``. Greedy (temperature 0): a draft is accepted iff it is the trunk's argmax, and the
emitted token at the first disagreement is the trunk's argmax, so the output equals plain greedy.

A batch advances by one common length: ``m`` = the smallest accepted count over the rows; each row
emits ``m`` drafts and then its own token at position ``m`` (an accepted draft, the residual draw
or the bonus draw). Whether position ``m`` is emitted was decided by positions before it, so the
rule above still gives every row the trunk's distribution.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sampling:
    """``temperature`` 0 = greedy; ``top_p`` in (0, 1]; ``seed`` seeds the sampling generator;
    ``vocab_limit``: only ids below it are ever chosen (the tokenizer's vocabulary inside a padded
    embedding), ``None`` = all."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    vocab_limit: int | None = None

    def __post_init__(self):
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if self.vocab_limit is not None and self.vocab_limit < 1:
            raise ValueError(f"vocab_limit must be >= 1 or None, got {self.vocab_limit!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    def limit(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_limit is None or self.vocab_limit >= logits.shape[-1]:
            return logits
        return logits.index_fill(-1, torch.arange(self.vocab_limit, logits.shape[-1],
                                                  device=logits.device), float("-inf"))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Sampling distribution ``[..., V]`` (fp32): temperature, then the top-p nucleus."""
        probs = torch.softmax(self.limit(logits.float()) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the strictly more likely tokens
            sorted_p = sorted_p.masked_fill(before >= self.top_p, 0.0)  # keeps at least the top 1
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    def choose(self, logits: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids ``[...]`` from logits ``[..., V]``, and the distribution drawn from (None
        when greedy)."""
        if self.greedy:
            return self.limit(logits).argmax(dim=-1), None
        probs = self.probs(logits)
        return draw(probs, generator), probs


def draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One draw per row of ``probs`` ``[..., V]``."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def verify(sampling: Sampling, logits: torch.Tensor, drafts: torch.Tensor,
           draft_probs: torch.Tensor | None, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks ``K`` drafts against the trunk's logits at the ``K + 1`` verified positions.

    logits ``[b, K + 1, V]`` (position ``j`` predicts the token after ``j`` drafts); drafts
    ``[b, K]``; draft_probs ``[b, K, V]`` (sampling) or None (greedy). Returns ``accepted``
    ``[b]`` (each row's own accepted count) and ``tokens`` ``[b, >= m + 1]``: with ``m`` the common
    accepted length (the smallest count), every row emits ``tokens[:, :m + 1]``.

    Greedy never waits for the device: ``tokens`` is the trunk's argmax at every verified position
    (where a row accepted, that is its draft), and the caller reads ``m`` together with the
    tokens in one transfer. Sampling reads ``m`` here (which residual to draw from).
    """
    b, k = drafts.shape
    rows = torch.arange(b, device=drafts.device)
    if sampling.greedy:
        target = sampling.limit(logits).argmax(dim=-1)  # [b, K + 1]
        agree = target[:, :k] == drafts
        return agree.long().cumprod(dim=1).sum(dim=1), target  # leading agreements
    p = sampling.probs(logits)  # [b, K + 1, V]
    p_draft = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # [b, K]
    q_draft = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    coin = torch.rand(b, k, generator=generator, device=drafts.device)
    ok = coin * q_draft < p_draft  # accept with probability min(1, p/q)
    accepted = ok.long().cumprod(dim=1).sum(dim=1)
    m = int(accepted.min())
    if m == k:  # every row accepted everything: the bonus draw from p after the drafts
        return accepted, torch.cat([drafts, draw(p[:, k], generator)[:, None]], dim=1)
    residual = (p[:, m] - draft_probs[:, m]).clamp(min=0.0)  # [b, V]
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q makes the residual empty, but then the draft is accepted with probability 1
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p[:, m])
    resampled = draw(residual, generator)
    token = torch.where(accepted > m, drafts[rows, m], resampled)
    return accepted, torch.cat([drafts[:, :m], token[:, None]], dim=1)
