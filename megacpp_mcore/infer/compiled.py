"""``torch.compile`` for the static speculative step's own work: the MTP drafter's block
(:class:`.mtp.StaticMTPDrafter`) and the verification's bookkeeping (:class:`.decode._SpeculativeStep`:
acceptance, the rollback commit of the recurrent states, the drafter's indices). The trunk's
forward stays eager, so the verified logits are the eager ones; a decode step replayed as a CUDA
graph at batch 1 pays per kernel, and Inductor fuses the elementwise work of these parts into a
few kernels.

Shapes are static: each session shape (batch, capacity, K) compiles once per function, and later
sessions of that shape reuse the code (the compiled code's guards must hold no per-session object:
:class:`.context.RopeTable` lookups are keyed by the table's order for that reason).
"""

from __future__ import annotations

import torch

# Past torch's default of 8 compiled versions per function it would run the function eagerly
# without saying so (a benchmark sweeping batches, K and lengths reaches it); the limit is raised
# while a compiled part runs.
COMPILED_SHAPES = 256


def static_compiled(fn):
    """``fn`` through ``torch.compile(dynamic=False)``, run with :data:`COMPILED_SHAPES` as the
    recompilation limit."""
    compiled = torch.compile(fn, dynamic=False)

    def run(*args):
        with torch._dynamo.config.patch(recompile_limit=COMPILED_SHAPES):
            return compiled(*args)

    return run
