"""Ready spec objects for ``pretrain_gpt.py --spec layer_specs.nam56r <ATTR>`` (megatron-core 0.16.1
takes an object here, not a function). Depth, pipeline stage and backend are resolved lazily from the
TransformerConfig the block is built with, so the same object serves any ``--num-layers`` and
parallel layout.

* ``NAM56R``: the flagship pattern ``AEMEAEMEAEMR`` with MLA on every ``A`` layer (pass
  ``--multi-latent-attention`` and the MLA dims so Megatron builds an MLA config).
* ``NAM56R_DENSE_ATTENTION``: the same pattern with standard (non-MLA) attention.
* ``AE``: attention/feed-forward alternation only (``A`` and ``E``), the pattern of a plain GPT.
"""

from megacpp_mcore.spec.block import hybrid_block_spec
from megacpp_mcore.models.presets import get_preset

_PRESET = get_preset("nam56r")

NAM56R = hybrid_block_spec(_PRESET.pattern, backend="auto", mla=_PRESET.mla)
NAM56R_DENSE_ATTENTION = hybrid_block_spec(_PRESET.pattern, backend="auto")
AE = hybrid_block_spec("AE", backend="auto")

__all__ = ["NAM56R", "NAM56R_DENSE_ATTENTION", "AE"]
