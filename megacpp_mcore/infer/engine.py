"""The trained GPT model as a decoder: :class:`Engine` (the model's parts, planned once) and
:class:`Session` (the inference state of one batch: caches, recurrent states, committed length).

A session runs the trunk over new positions (:meth:`Session.forward`: prefill in one forward, then
incremental steps) and keeps them (:meth:`Session.commit`), possibly fewer than it ran: speculative
decoding verifies ``K + 1`` positions and commits the accepted prefix, which leaves every cache and
recurrent state as if the rejected positions had never been seen. Everything is read from the
model's own modules (embedding, layers, final norm, output layer), so a checkpoint written by
``megacpp-mcore train`` generates unchanged, on either backend.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from megacpp_mcore.infer.context import StepContext
from megacpp_mcore.infer.layers import LayerPlan, UnsupportedForInference, new_state, plan_layer, run_layer
from megacpp_mcore.infer.mixers import VERIFY_STATES, DeviceCount
from megacpp_mcore.train.runtime import unwrap_model


_log = logging.getLogger(__name__)


# Session capacities are multiples of this (see session_capacity).
CAPACITY_STEP = 64


def session_capacity(length: int, k: int) -> int:
    """The positions a generation's session holds: ``length`` (prompt and new tokens), room for
    the last verification's ``k + 1`` positions and for one more step (the step on the device is
    queued before the previous one is read, so one runs past the end), rounded up to
    :data:`CAPACITY_STEP`. ``decode.generate`` passes the model's MTP depth as ``k`` whatever it
    drafts, so plain and speculative decoding of the same prompts get one capacity: a static step
    attends over the whole capacity, and equal capacities give its softmax and its value sum the
    same reduction length (speculative decoding can then emit plain's tokens in bf16 too). The
    rounding lets sessions of nearby lengths share shapes (compiled steps, captured graphs)."""
    need = length + 2 * (k + 1)
    return -(-need // CAPACITY_STEP) * CAPACITY_STEP


class Engine:
    """A trained (MTP)GPTModel prepared for decoding: one plan per trunk layer, the MTP block's
    plans when it has one. The model is put in eval mode; its parameters are not touched."""

    def __init__(self, model):
        model = unwrap_model(model)
        if not (model.pre_process and model.post_process):
            raise UnsupportedForInference("inference runs the whole model in one process "
                                          "(pipeline parallel size 1)")
        config = model.config
        if config.tensor_model_parallel_size != 1 or config.context_parallel_size != 1:
            raise UnsupportedForInference(
                f"inference runs at tensor/context parallel size 1, got tp="
                f"{config.tensor_model_parallel_size} cp={config.context_parallel_size}")
        model.eval()
        self.model, self.config = model, config
        self.plans: list[LayerPlan] = [plan_layer(layer, f"layer {i}")
                                       for i, layer in enumerate(model.decoder.layers)]
        block = getattr(model, "mtp_block", None)
        self.mtp_depth = model.mtp_config.depth if block is not None else 0
        self.mtp_plans = (plan_layer(block.attention, "MTP block attention"),
                          plan_layer(block.feedforward, "MTP block feed-forward")) if block else ()
        fallbacks = [f"{p.where} ({p.moe_fallback})" for p in (*self.plans, *self.mtp_plans)
                     if p.moe_fallback]
        if fallbacks:  # one line: these MoE layers sync the host once per decode step each
            _log.warning("inference: Megatron's MoE layer (host syncs every step) for %s",
                         "; ".join(fallbacks))
        # RoPE of standard attention (GPTModel's); MLA layers hold their own
        self.rotary = getattr(model, "rotary_pos_emb", None)
        param = next(model.parameters())
        self.device, self.dtype = param.device, config.params_dtype
        self.vocab_size = model.vocab_size
        self.ssd_verify = "quadratic"  # Mamba's verification states: mixers.VERIFY_STATES
        # the vocabulary-limited head's GEMM in fp32 (logits); False: in the model's dtype
        self.fp32_head = True

    # ----------------------------------------------------------------------------- model parts
    def embed(self, tokens: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """``[b, s]`` token ids -> ``[s, b, h]`` with the model's embedding."""
        return self.model.embedding(input_ids=tokens, position_ids=ctx.positions)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        norm = getattr(self.model.decoder, "final_layernorm", None)
        return hidden if norm is None else norm(hidden)

    def output_weight(self) -> torch.Tensor | None:
        model = self.model
        return model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None

    def logits(self, hidden: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
        """Final-normed ``[s, b, h]`` -> fp32 logits ``[b, s, V]`` through the output layer.

        With ``vocab`` (a sampling's ``vocab_limit``): the logits of the ids below it only,
        ``[b, s, vocab]``, from the first ``vocab`` rows of the output weight. Decoding chooses no
        id above the tokenizer's, and a decode step is bound by reading weights: the byte
        tokenizer's 257 ids inside nam56r-lite's padded 32,768 read 1/128 of the head.

        Those rows' GEMM runs in fp32 (``fp32_head``; one small cast of the rows per call): bf16
        logits are rounded to 8 bits of mantissa (steps of 1/16 near 10), so two candidates a
        hair apart become an exact tie or swap at the last rounding, and greedy decoding then
        turns on how a GEMM of another shape rounded (a verification's K + 1 rows against a
        plain step's one). In fp32 only a margin below the hidden state's own rounding can
        swap. The whole head (``vocab`` None) runs as the model's output layer does."""
        layer, tied = self.model.output_layer, self.output_weight()
        weight = layer.weight if tied is None else tied
        if vocab is None or vocab >= weight.shape[0]:
            logits, _ = layer(hidden, weight=tied)
        else:
            bias = getattr(layer, "bias", None)
            weight, bias = weight[:vocab], None if bias is None else bias[:vocab]
            if self.fp32_head and hidden.dtype != torch.float64:
                hidden, weight = hidden.float(), weight.float()
                bias = None if bias is None else bias.float()
            logits = F.linear(hidden, weight, bias)
        return logits.transpose(0, 1).float()

    def session(self, batch: int, max_length: int, pad: torch.Tensor | None = None) -> "Session":
        """A fresh session of ``batch`` rows for ``max_length`` time steps (left padding ``pad``)."""
        return Session(self, batch, max_length, pad)

    @torch.no_grad()
    def full_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's ordinary full-sequence forward ``[b, s] -> [b, s, V]`` (the reference the
        cached path must reproduce)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.model(tokens, positions, None).float()


class Session:
    """Inference state of one batch: per-layer caches / recurrent states and the committed length.

    ``forward(tokens, keep=...)`` runs the new positions after the committed ones;
    ``commit(n)`` keeps the first ``n`` of them (``n < s`` needs ``keep=True``).

    ``make_static()`` switches to static shapes (:mod:`.context`): the committed length also lives
    on the device (``start_index``, advanced by ``commit`` in place), forwards attend over the whole
    capacity and recurrent states are updated in place, so a forward + commit of ``s`` positions
    runs the same kernels on the same buffers at every step (what a CUDA graph replays).
    """

    def __init__(self, engine: Engine, batch: int, max_length: int, pad: torch.Tensor | None):
        self.engine, self.batch, self.max_length = engine, batch, max_length
        device = engine.device
        self.pad = (torch.zeros(batch, dtype=torch.long, device=device) if pad is None
                    else pad.to(device=device, dtype=torch.long))
        self.states = [new_state(p, batch, max_length, engine.dtype, device) for p in engine.plans]
        if engine.ssd_verify not in VERIFY_STATES:
            raise ValueError(f"inference: ssd_verify={engine.ssd_verify!r}; allowed: {', '.join(VERIFY_STATES)}")
        for plan, state in zip(engine.plans, self.states):
            if plan.mixer == "mamba":
                state.verify = engine.ssd_verify
        self.length = 0
        self._pending = 0  # positions run by the last forward and not yet committed
        self.tables: dict = {}  # StepContext's per-session tables (rotary, key ranks)
        self.start_index: torch.Tensor | None = None  # static shapes: the committed length

    @property
    def static(self) -> bool:
        return self.start_index is not None

    def make_static(self) -> None:
        """Static shapes from now on (class docstring); the committed length is copied to the
        device once here."""
        if self._pending:
            raise RuntimeError("inference: make_static between a forward and its commit")
        if self.start_index is None:
            self.start_index = torch.tensor(self.length, dtype=torch.long, device=self.engine.device)
            for state in self.states:
                if hasattr(state, "in_place"):
                    state.in_place = True

    def context(self, start: int, s: int, start_index: torch.Tensor | None = None,
                time: torch.Tensor | None = None) -> StepContext:
        """Step context of ``s`` positions from ``start`` on this session's timeline; with
        ``start_index`` (the device's copy of ``start``; ``time``: its ``start_index + 0 .. s - 1``
        when the caller has it) static shapes, else dynamic (the MTP drafter's caches run on
        these)."""
        return StepContext(start, s, self.pad, self.tables, self.max_length, start_index, time)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, *, keep: bool = False) -> torch.Tensor:
        """Runs ``tokens`` ``[b, s]`` at the next ``s`` time steps; returns the final-normed hidden
        states ``[s, b, h]`` (what the output layer and the MTP block read). ``keep``: recurrent
        layers keep per-position states, so that :meth:`commit` may keep fewer than ``s``."""
        if self._pending:
            raise RuntimeError("inference: forward before the previous forward was committed")
        engine = self.engine
        ctx = self.context(self.length, tokens.shape[1], self.start_index)
        hidden = engine.embed(tokens, ctx)
        for plan, state in zip(engine.plans, self.states):
            hidden = run_layer(plan, hidden, state, ctx, rotary=engine.rotary, keep=keep)
        self._pending = tokens.shape[1]
        return engine.final_norm(hidden)

    def commit(self, n: int | torch.Tensor) -> None:
        """Keeps the first ``n`` positions of the last forward: caches are truncated to them (by
        length) and recurrent states take their value at the ``n``-th position.

        ``n`` may be a 0-d device tensor (static sessions; ``1 <= n <= s``, not checked): then only
        the device's length advances, and the host adds ``n`` to ``length`` once it has read it
        (:meth:`advance`), so a speculative step commits without waiting for the device."""
        s = self._pending
        on_device = isinstance(n, torch.Tensor)
        if on_device and not self.static:
            raise RuntimeError("inference: a device-side commit needs a static session")
        if not on_device and not 0 <= n <= s:
            raise ValueError(f"inference: commit({n}) of a {s}-position forward")
        count = DeviceCount(n, s) if on_device else n  # derived once for every layer
        for state in self.states:
            if hasattr(state, "commit"):
                state.commit(count, s)
        if not on_device:
            self.length += n
        if self.static:
            self.start_index.add_(n)
        self._pending = 0

    def advance(self, n: int) -> None:
        """The host's count after a device-side :meth:`commit` of ``n`` positions."""
        self.length += n

    def recurrent_snapshot(self) -> list[dict[str, torch.Tensor] | None]:
        """Copies of every recurrent layer's conv window and state (tests compare rollbacks)."""
        return [s.snapshot() if hasattr(s, "snapshot") else None for s in self.states]
