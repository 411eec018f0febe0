"""Generation: plain (one trunk step per token) and speculative (``K`` MTP drafts verified by one
trunk forward over ``K + 1`` positions), through the same session code.

:func:`generate` takes token-id prompts (any lengths; left-padded into one batch), runs the prefill
in one forward, then decodes until every row has ``max_new_tokens`` tokens, emitted a stop token or
reached the model's context. Greedy speculative output is token-identical to plain greedy; sampled
speculative output has the trunk's distribution (:mod:`.sampling`).

Host synchronisation. The host reads from the device only what it must: a speculative step reads
the accepted lengths and the verified tokens in one transfer (the accepted length decides what
runs next); a plain step reads nothing unless stop tokens are given (then each step's tokens are
read to stop rows), so without them the host queues step after step and reads every token at the
end (:class:`Emitter`). With static shapes (``static`` / ``cuda_graphs``) the greedy speculative
step decides what runs next on the device too (:class:`_SpeculativeStep`), so the host queues the
next step before it reads the last one, and with ``cuda_graphs`` every step, plain or speculative,
is one graph replay.

Identity in 16-bit arithmetic. Greedy speculative decoding emits plain greedy's tokens exactly when
both round alike, and a GPU's GEMM rounds a row by the GEMM's shape: a verification's ``K + 1``
rows round unlike a plain step's one, and a near-tie then flips (bf16). ``plain_width=K + 1`` runs
each plain step over the pending token and ``K`` fillers (dropped, as a verification drops rejected
drafts), so every kernel of plain decoding has the verification's shapes; with Mamba verified one
position at a time (``Engine.ssd_verify = "recurrent"``) each position is then computed by the same
operations on the same shapes in both, whichever row of the step it sits in, and the tokens agree
bit for bit. It is not free: graphed at batch 1 on an H100 such steps ran at x0.78 (K = 2) - x0.86
(K = 1) of one-row steps (Mamba's verification form and K more rows through every kernel;
``scripts/bench_generate.py --matched-plain`` times it), so it is opt-in.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from megacpp_mcore.infer.compiled import static_compiled
from megacpp_mcore.infer.engine import Engine, session_capacity
from megacpp_mcore.infer.mtp import MTPDrafter, StaticMTPDrafter
from megacpp_mcore.infer.result import Emitter, Generation
from megacpp_mcore.infer.sampling import Sampling, verify

# The token id of plain_width's filler positions (any id: no later position sees them).
FILLER = 0


class _GraphedStep:
    """A decode step of a static session as a body over fixed input buffers, run eagerly or, with
    ``graphs``, eagerly once on a side stream (the warm-up CUDA graphs need: lazy initialisation,
    workspaces), then captured once and replayed for every later step: one launch per step instead
    of a thousand. The body advances the session's device-side length itself; the host keeps its
    own count. ``warm_up``: the first step is a one-time warm-up even without graphs (it compiles),
    timed on its own (:attr:`warmup_s`) so the rates can leave it out."""

    def __init__(self, session, graphs: bool, warm_up: bool = False):
        self.session, self.graphs, self.graph = session, graphs, None
        self.warms_up = graphs or warm_up
        self.output = None  # the graph's output buffers (what a replay writes)
        self.capture_s = 0.0  # the one-time capture
        self.warmup_s = 0.0  # the warm-up step (a decode step: its result is used)
        self._warm = False

    def _body(self):
        raise NotImplementedError

    def _step(self):
        """This step's body result: computed eagerly, by the warm-up before the capture, or by a
        replay (then the graph's own output buffers, overwritten by the next replay)."""
        if not self.graphs:
            if self._warm or not self.warms_up:
                return self._body()
            device = self.session.engine.device
            t0 = _sync(device)
            result, self._warm = self._body(), True
            self.warmup_s = _sync(device) - t0
            return result
        if self.graph is not None:
            self.graph.replay()
            return self.output
        result, self.graph, self.output, self.warmup_s, self.capture_s = _warm_up_and_capture(
            self._body, self.session)
        return result


class _PlainStep(_GraphedStep):
    """One plain decode step, ``pending [b] -> new tokens [b]``, of a static or dynamic session:
    the forward of the pending token and ``width - 1`` fillers (``generate``'s ``plain_width``)
    whose positions are run and dropped, the commit of the first, the next token. The input
    buffer is reused by every step. Replayed, the host never waits for the device."""

    def __init__(self, engine: Engine, session, sampling: Sampling, generator, graphs: bool, width: int = 1):
        super().__init__(session, graphs)
        self.engine, self.sampling, self.generator = engine, sampling, generator
        self.input = torch.full((session.batch, width), FILLER, dtype=torch.long, device=engine.device)

    def _body(self) -> torch.Tensor:
        hidden = self.session.forward(self.input, keep=self.input.shape[1] > 1)
        self.session.commit(1)
        logits = self.engine.logits(hidden, self.sampling.vocab_limit)[:, 0]  # every row's, as a verification
        return self.sampling.choose(logits, self.generator)[0]

    def __call__(self, pending: torch.Tensor) -> torch.Tensor:
        self.input[:, 0].copy_(pending)
        replay = self.graph is not None
        new = self._step()
        if replay:  # the host's count (the device's advanced in the graph); the buffer is reused
            self.session.length += 1
            return new.clone()
        return new


class _SpeculativeStep(_GraphedStep):
    """One greedy speculative step of a static session with the model's MTP block, entirely on
    the device: drafts (:class:`.mtp.StaticMTPDrafter`), the trunk's verification over ``K + 1``
    positions, the acceptance, the commit of the common accepted prefix (the device's length and
    recurrent states, by device index) and the drafter's bookkeeping; the next pending token stays
    on the device (:attr:`next`). With ``graphs`` the step is captured once and replayed
    (:class:`_GraphedStep`).

    Since nothing the step needs comes from the host, the host queues step ``n + 1`` before it
    reads step ``n``'s result (:meth:`launch` returns a copy to the host in flight, :meth:`read`
    waits for it): the read of each row's accepted count and tokens never leaves the device idle.
    The price is one step computed past the end of generation (its result is never read)."""

    def __init__(self, engine: Engine, session, drafter: MTPDrafter, sampling: Sampling, graphs: bool,
                 compile_speculative: bool = False):
        super().__init__(session, graphs, warm_up=compile_speculative)
        self.engine = engine
        self.sampling = sampling  # greedy (its vocabulary limit applies to drafts and verification)
        self.drafter = StaticMTPDrafter(drafter, compiled=compile_speculative)
        self._settle = static_compiled(self._settle_eager) if compile_speculative else self._settle_eager
        self.input = torch.zeros(session.batch, dtype=torch.long, device=engine.device)
        self.next: torch.Tensor | None = None  # the next pending token [b], on the device
        cuda = engine.device.type == "cuda"
        width = 2 + drafter.k  # accepted count, then the K + 1 verified tokens
        # two pinned host buffers: the step being read and the one queued after it
        self._host = [torch.zeros(session.batch, width, dtype=torch.long, pin_memory=cuda)
                      for _ in range(2)] if cuda else None
        self._turn = 0

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        session, drafter = self.session, self.drafter
        length = session.start_index.clone()  # the pending token's time index, before the commit
        drafts = drafter.draft(self.input, length, self.sampling)  # [b, K]
        hidden = session.forward(torch.cat([self.input[:, None], drafts], dim=1), keep=True)
        logits = self.engine.logits(hidden, self.sampling.vocab_limit)
        return self._settle(length, drafts, hidden, logits)

    def _settle_eager(self, length, drafts, hidden, logits) -> tuple[torch.Tensor, torch.Tensor]:
        """The verification's bookkeeping after the trunk's forward: acceptance, the commit of the
        common accepted prefix (caches by length, recurrent states rolled back by device index),
        the drafter's; returns the step's result and the next pending token."""
        accepted, tokens = verify(self.sampling, logits, drafts, None, None)
        m = accepted.min()  # the common accepted length (0-d, on the device)
        self.session.commit(m + 1)
        self.drafter.accept(length, m, hidden, tokens)
        following = tokens.gather(1, m.view(1, 1).expand(tokens.shape[0], 1))[:, 0]
        return torch.cat([accepted[:, None], tokens], dim=1), following

    def launch(self, pending: torch.Tensor):
        """Queues the step after ``pending`` ``[b]`` (device); returns a handle for :meth:`read`.
        The host's session length is advanced by the caller once it has read the step."""
        self.input.copy_(pending)
        out, self.next = self._step()
        if self._host is None:
            return out.clone(), None
        host, self._turn = self._host[self._turn], 1 - self._turn
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    @staticmethod
    def read(handle) -> list[list[int]]:
        """A launched step's result: per row its accepted count, then the trunk's ``K + 1``
        tokens at the verified positions."""
        values, done = handle
        if done is not None:
            done.synchronize()
        return values.tolist()


def _warm_up_and_capture(body, session):
    """CUDA graphs of a decode step: runs ``body`` once eagerly on a side stream (lazy
    initialisation, workspaces; its result is this step's), then records it (nothing runs,
    nothing advances: the host's session length is put back). Returns (the eager result, the
    graph, the graph's output tensor, the warm-up's seconds, the capture's seconds)."""
    device = session.engine.device
    t0 = _sync(device)
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    length, t1 = session.length, _sync(device)
    with torch.cuda.graph(graph):
        output = body()
    session.length = length
    return result, graph, output, t1 - t0, _sync(device) - t1


def check_graphs(engine: Engine, sampling: Sampling, speculative: int,
                 custom_drafter: bool = False) -> None:
    """``ValueError`` where greedy decoding (plain, or speculative with the model's MTP block)
    cannot replay a CUDA graph per step."""
    if custom_drafter:
        raise ValueError("CUDA graphs of the speculative step draft with the model's MTP block; "
                         "allowed with another drafter: cuda_graphs=False")
    if not sampling.greedy:
        raise ValueError("CUDA graphs of the decode step are built for greedy decoding; "
                         "allowed with sampling: cuda_graphs=False")
    plans = [*engine.plans, *(engine.mtp_plans if speculative else ())]
    syncing = [p.where for p in plans if p.moe_fallback]
    if syncing:  # a host read inside a captured step is an error of the capture
        raise ValueError(f"CUDA graphs: {', '.join(syncing)} run Megatron's MoE layer, which "
                         "reads token counts on the host every step; allowed: models whose "
                         "MoE layers decode without host syncs, or cuda_graphs=False")
    if engine.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; the model is on {engine.device}")


def check_compile_speculative(speculative: int, sampling: Sampling, static: bool,
                              custom_drafter: bool = False) -> None:
    """``ValueError`` where ``compile_speculative`` has no static speculative step to compile for."""
    if not speculative or custom_drafter:
        raise ValueError("compile_speculative compiles the speculative step of the model's MTP "
                         "drafter; allowed: speculative decoding with it (speculative >= 1, no other "
                         f"drafter), got speculative={speculative}"
                         + (" with another drafter" if custom_drafter else ""))
    if not sampling.greedy:
        raise ValueError("compile_speculative compiles the static greedy speculative step; allowed with "
                         "sampling: compile_speculative=False")
    if not static:
        raise ValueError("compile_speculative needs the static speculative step (its shapes never "
                         "change, so each depth compiles once); allowed: static=True or cuda_graphs=True")


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def left_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, P]`` prompt ids right-aligned (pad id 0, never attended) and the pad lengths ``[b]``."""
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, longest - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
    pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long)
    return tokens.to(device), pad.to(device)


def check_prompts(prompts: Sequence[Sequence[int]], context: int) -> None:
    """``ValueError`` for an empty batch, an empty prompt, or one that leaves no room in ``context``
    for a continuation."""
    if not prompts:
        raise ValueError("no prompt given")
    for i, prompt in enumerate(prompts):
        if not len(prompt):
            raise ValueError(f"prompt {i} is empty; give at least one token")
        if len(prompt) >= context:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens, too long for the model's "
                             f"context of {context} (at most {context - 1} leave room to generate)")


@torch.no_grad()
def generate(engine: Engine, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampling: Sampling = Sampling(), speculative: int = 0,
             stop_tokens: Sequence[int] = (), context: int | None = None,
             drafter=None, static: bool = False, cuda_graphs: bool = False,
             compile_speculative: bool = False, plain_width: int = 1) -> Generation:
    """Continues every prompt (token ids) by up to ``max_new_tokens`` tokens.

    ``speculative``: ``K`` drafts per step from the model's MTP block (0: plain decoding);
    ``drafter``: another object with the drafter protocol of :class:`.mtp.MTPDrafter` (tests);
    ``context``: the longest sequence to run (default: the model's ``max_sequence_length``);
    ``static``: the trunk decodes with static shapes after the prefill (:meth:`.engine.Session.make_static`;
    same tokens, attention over the whole capacity; greedy speculative decoding with the model's MTP
    block then runs each step on the device with one read); ``cuda_graphs``: greedy decoding,
    plain or speculative, replays one CUDA graph per step (implies ``static``);
    ``compile_speculative``: the static speculative step's own work (the MTP drafter's block, the
    verification's bookkeeping and rollback) runs through ``torch.compile`` (:mod:`.compiled`;
    the trunk's forward stays eager; fewer kernels per step; the first step compiles and is timed
    as the warm-up); ``plain_width``: plain decoding runs each step over the pending token and
    ``plain_width - 1`` dropped fillers, the shapes of a verification of ``K = plain_width - 1``
    drafts (the module docstring: bf16 identity with speculative decoding).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(plain_width, bool) or not isinstance(plain_width, int) or plain_width < 1:
        raise ValueError(f"plain_width must be an integer >= 1, got {plain_width!r}")
    if compile_speculative:
        check_compile_speculative(speculative, sampling, static or cuda_graphs, custom_drafter=drafter is not None)
    if cuda_graphs:  # before any work
        check_graphs(engine, sampling, speculative, custom_drafter=drafter is not None)
    k = speculative if drafter is None else drafter.k
    if plain_width > 1 and k:
        raise ValueError(f"plain_width={plain_width} shapes plain decoding like a verification; "
                         f"allowed with speculative decoding (K={k}): plain_width=1")
    context = context or engine.model.max_sequence_length
    check_prompts(prompts, context)
    device, batch = engine.device, len(prompts)
    tokens, pad = left_pad(prompts, device)
    longest = tokens.shape[1]
    budget = min(max_new_tokens, context - longest)
    room = max(k, engine.mtp_depth, plain_width - 1)  # the widest step's extra positions
    session = engine.session(batch, session_capacity(longest + budget, room), pad)
    generator = sampling.generator(device)
    result = Generation(tokens=[[] for _ in prompts], stop=["length"] * batch,
                        prompt_lengths=[len(p) for p in prompts], speculative=k,
                        attempted=[0] * k, accepted=[0] * k)
    emitter = Emitter(result, budget, max_new_tokens, stop_tokens)

    t0 = _sync(device)
    hidden = session.forward(tokens)
    session.commit(longest)
    pending, _ = sampling.choose(engine.logits(hidden[-1:], sampling.vocab_limit)[:, 0], generator)  # [b]
    if k and drafter is None:
        drafter = MTPDrafter(engine, session, k)
    if k:
        drafter.start(tokens, hidden)
    emitter.add(pending[:, None])
    spec_step = None
    if static or cuda_graphs:
        session.make_static()
        if k and isinstance(drafter, MTPDrafter) and sampling.greedy:
            spec_step = _SpeculativeStep(engine, session, drafter, sampling, cuda_graphs, compile_speculative)
    plain_step = None if k else _PlainStep(engine, session, sampling, generator, cuda_graphs, plain_width)
    t1 = _sync(device)
    result.prefill_s = t1 - t0
    queued = spec_step.launch(pending) if spec_step is not None and not all(emitter.done) else None
    while not all(emitter.done):
        rows = None
        if spec_step is not None:  # the whole step on the device: queue the next, read this one
            following = spec_step.launch(spec_step.next)
            read = spec_step.read(queued)
            queued = following
            m = min(row[0] for row in read)
            session.advance(m + 1)
            new, rows = None, [row[1:m + 2] for row in read]
        elif k:
            drafts, draft_probs = drafter.draft(pending, sampling, generator)  # [b, K]
            hidden = session.forward(torch.cat([pending[:, None], drafts], dim=1), keep=True)
            logits = engine.logits(hidden, sampling.vocab_limit)
            accepted, tokens = verify(sampling, logits, drafts, draft_probs, generator)
            # the step's one read from the device: each row's accepted count, then its tokens
            read = torch.cat([accepted[:, None], tokens], dim=1).tolist()
            m = min(row[0] for row in read)
            session.commit(m + 1)
            new, rows = tokens[:, :m + 1], [row[1:m + 2] for row in read]  # [b, m + 1]
            drafter.accept(m, hidden[:m + 1], new)
            pending = new[:, -1]
        else:
            new = plain_step(pending)[:, None]  # [b, 1]
            pending = new[:, -1]
        if k:
            for row, done in zip(read, emitter.done):
                if not done:
                    for j in range(min(row[0] + 1, k)):
                        result.attempted[j] += 1
                        result.accepted[j] += j < row[0]
        emitted = emitter.add(new, rows)
        if not result.steps and (plain_step or spec_step) is not None and (plain_step or spec_step).warms_up:
            result.warmup_tokens, result.warmup_steps = emitted, 1  # the first step read is the warm-up
        result.decode_tokens += emitted
        result.steps += 1
    emitter.finish()
    result.decode_s = _sync(device) - t1
    step = plain_step or spec_step
    if step is not None and step.warms_up:
        result.graph_capture_s, result.warmup_s = step.capture_s, step.warmup_s
        result.decode_s = max(result.decode_s - step.capture_s - step.warmup_s, 0.0)
    return result
