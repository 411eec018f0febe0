"""Text generation with a trained model, and its shared MTP block as a self-speculative drafter.

Modules, in the order data flows:

* :mod:`.checkpoint`: a ``megacpp-mcore train`` checkpoint -> the model it holds (signature ->
  ModelConfig, model weights only);
* :mod:`.engine`: :class:`Engine` (the model's embedding, layers, final norm and output layer,
  planned once) and :class:`Session` (one batch's inference state: prefill in one forward, then
  incremental steps; ``commit(n)`` keeps a prefix of the last forward);
* :mod:`.layers`: one layer over new positions (norms, bias-dropout-add, MoD's per-token gate)
  around the cached mixers of :mod:`.attention` (K/V cache; MLA's latent cache; MoDA's depth K/V
  of the new positions, :mod:`.context`) and :mod:`.mixers` (Mamba-2 / M2RNN conv + recurrent
  state, with per-position states for rollback), and MoE layers through :mod:`.moe` (Megatron's
  router and experts without a host sync at decode sizes);
* :mod:`.mtp`: :class:`MTPDrafter`, the trained shared block with one attention cache per depth;
* :mod:`.sampling`: greedy / temperature / top-p and the speculative verification rule;
* :mod:`.decode`: :func:`generate`, plain and speculative decoding through the same session code
  (without stop tokens a plain step never waits for the device; a speculative step waits once);
  :mod:`.compiled`: ``torch.compile`` of the static speculative step's own work (the drafter, the
  verification's bookkeeping) when ``generate(..., compile_speculative=True)`` asks for it.

Everything reads the trained modules' own parameters, so checkpoints load unchanged; CPU paths use
Megatron's local modules, GPU paths whatever the te backend built.
"""

from megacpp_mcore.infer.decode import Generation, generate
from megacpp_mcore.infer.engine import Engine, Session
from megacpp_mcore.infer.layers import UnsupportedForInference
from megacpp_mcore.infer.mtp import MTPDrafter
from megacpp_mcore.infer.sampling import Sampling

__all__ = ["Engine", "Generation", "MTPDrafter", "Sampling", "Session", "UnsupportedForInference",
           "generate"]
