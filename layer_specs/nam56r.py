"""Ready spec objects for ``pretrain_gpt.py --spec layer_specs.nam56r <ATTR>`` (megatron-core 0.16.1
takes an object here, not a function). Depth, pipeline stage and backend are resolved lazily from the
TransformerConfig the block is built with, so the same object serves any ``--num-layers`` and
parallel layout.

* ``NAM56R``: the flagship pattern ``AEMEAEMEAEMR`` with MLA on every ``A`` layer (pass
  ``--multi-latent-attention``, the MLA dims and ``--qk-layernorm`` so Megatron builds the package's
  MLA config: ``launch_pretrain.preset_args("nam56r")`` lists them) and the shipped
  MoD (``gateskip`` on the ``A``/``E`` layers from index 4 on, token budget 1.0 -> 0.8 over the
  run: ``megacpp_mcore.models.presets.shipped_mod``).
* ``NAM56R_DENSE``: ``NAM56R`` without MoD (preset ``nam56r-dense``), the ablation baseline.
* ``NAM56R_DENSE_ATTENTION``: the same pattern and MoD with standard (non-MLA) attention.
* ``AE``: attention/feed-forward alternation only (``A`` and ``E``), the pattern of a plain GPT.
* ``NAM56R_UPSTREAM_SYMBOLS``: ``AEMEAEMEAEMM``, NAM56R on the symbols upstream's own hybrid also
  has (standard attention, ``M`` in place of ``R``): the structure ``scripts/bench_stage.py`` runs
  against ``pretrain_mamba.py --hybrid-override-pattern '*EME*EME*EMM'``.
"""

from megacpp_mcore.spec.block import hybrid_block_spec
from megacpp_mcore.models.presets import get_preset

_PRESET = get_preset("nam56r")

NAM56R = hybrid_block_spec(_PRESET.pattern, backend="auto", **_PRESET.feature_configs)
NAM56R_DENSE = hybrid_block_spec(_PRESET.pattern, backend="auto",
                                 **get_preset("nam56r-dense").feature_configs)
NAM56R_DENSE_ATTENTION = hybrid_block_spec(_PRESET.pattern, backend="auto", **_PRESET.features)
AE = hybrid_block_spec("AE", backend="auto")
NAM56R_UPSTREAM_SYMBOLS = hybrid_block_spec("AEMEAEMEAEMM", backend="auto")

__all__ = ["NAM56R", "NAM56R_DENSE", "NAM56R_DENSE_ATTENTION", "AE", "NAM56R_UPSTREAM_SYMBOLS"]
