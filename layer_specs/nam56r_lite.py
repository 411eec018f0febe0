"""NAM56R-lite for ``pretrain_gpt.py --spec layer_specs.nam56r_lite <ATTR>`` (megatron-core 0.16.1).

The single-GPU sibling of NAM56R: pattern ``AEMEAEMEAEMR`` tiled to the depth Megatron is given
(``--num-layers 12`` for the preset: 3 A, 5 E, 3 M, 1 R), MoE ``E`` layers, MLA on every ``A``
and the shipped MoD (``gateskip`` on the ``A``/``E`` layers from index 2 on, token budget
1.0 -> 0.8 over the run, i.e. over ``--train-iters``).
Each object is a ready ``ModuleSpec`` (0.16.x takes no callables); the depth, the pipeline stage
and the backend are resolved per layer when Megatron builds the block, from its TransformerConfig.

Objects:

* ``NAM56R_LITE``: the preset as shipped (backend ``auto``: TE on a CUDA host with Transformer
  Engine, else local);
* ``NAM56R_LITE_DENSE``: the same without MoD (preset ``nam56r-lite-dense``), the ablation
  baseline;
* ``NAM56R_LITE_LOCAL``: the same on Megatron-Core's torch modules (the parity reference);
* ``NAM56R_LITE_AE``: attention (no MLA) and MoE only, pattern ``AE``: the trunk without the
  mixers, for A/B runs against Megatron's own GPT spec.

Dimensions, MoE and MLA sizes come from ``pretrain_gpt.py`` flags; ``recipes/nam56r_lite_1xh200.sh``
passes the preset's (``megacpp_mcore.upstream.launch_pretrain.preset_args("nam56r-lite")``). MTP is not
part of a layer spec: ``python -m megacpp_mcore.upstream.launch_pretrain`` adds the package's shared-block
MTP (``--megacpp-mtp-depth``), which Megatron-LM 0.16.1's own builder cannot.
"""

from megacpp_mcore.spec.block import hybrid_block_spec
from megacpp_mcore.models.presets import get_preset

PRESET = get_preset("nam56r-lite")

NAM56R_LITE = hybrid_block_spec(PRESET.pattern, backend="auto", **PRESET.feature_configs)
NAM56R_LITE_DENSE = hybrid_block_spec(PRESET.pattern, backend="auto",
                                      **get_preset("nam56r-lite-dense").feature_configs)
NAM56R_LITE_LOCAL = hybrid_block_spec(PRESET.pattern, backend="local", **PRESET.feature_configs)
NAM56R_LITE_AE = hybrid_block_spec("AE", backend="auto")

__all__ = ["NAM56R_LITE", "NAM56R_LITE_DENSE", "NAM56R_LITE_LOCAL", "NAM56R_LITE_AE"]
