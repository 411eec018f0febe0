"""megacpp_mcore.spec.compat: later-version constructor kwargs reach our adapters without breaking 0.16."""

from __future__ import annotations

import pytest

from megacpp_mcore.spec import compat


def test_layer_kwargs_forwarding_rules():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    later = {"name": "decoder.layers.3", "pp_layer_offset": 4, "is_mtp_layer": False,
             "add_layer_offset": True}
    assert compat.layer_kwargs(TransformerLayer, later) == {}  # 0.16 layer: all neutral, dropped
    assert compat.layer_kwargs(TransformerLayer, {"hidden_dropout": 0.1}) == {"hidden_dropout": 0.1}
    with pytest.raises(TypeError, match=r"is_mtp_layer=True \(added to megatron-core layers in 0.17\)"):
        compat.layer_kwargs(TransformerLayer, {"is_mtp_layer": True})
    with pytest.raises(TypeError, match="add_layer_offset=False"):
        compat.layer_kwargs(TransformerLayer, {"add_layer_offset": False})
    with pytest.raises(TypeError, match=r"bogus=1 \(unknown to megacpp_mcore\); it takes: config"):
        compat.layer_kwargs(TransformerLayer, {"bogus": 1})

    def takes_everything(config, **kwargs):
        return None

    def takes_name(config, name=None):
        return None

    assert compat.layer_kwargs(takes_everything, later) == later
    assert compat.layer_kwargs(takes_name, later) == {"name": "decoder.layers.3"}


def test_global_layer_index(single_rank):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=4, hidden_size=8, num_attention_heads=1)
    assert compat.global_layer_index(config, 3, vp_stage=None, pp_rank=0) == 2
    assert compat.global_layer_index(config, 3, vp_stage=None, pp_rank=0, add_layer_offset=False,
                                     pp_layer_offset=2) == 2
    assert compat.global_layer_index(config, 1, vp_stage=None, pp_rank=0, is_mtp_layer=True) == 0


def test_hybrid_layer_accepts_later_kwargs(single_rank):
    """megatron-core >= 0.18 passes ``name=``/``pp_layer_offset=``; 0.16 layers must still build."""
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megacpp_mcore.train import runtime
    from megacpp_mcore.spec.block import hybrid_block_spec
    from megacpp_mcore.models.presets import custom_model

    model = custom_model(pattern="AE", num_layers=4, mla=None)
    config = runtime.transformer_config(model, runtime.Parallelism())
    spec = hybrid_block_spec("AE", backend="local")
    layer = build_module(spec, config=config, layer_number=2, pg_collection=None, vp_stage=None,
                         name="decoder.layers.1", pp_layer_offset=0, add_layer_offset=True)
    assert isinstance(layer, TransformerLayer) and layer.layer_number == 2
    assert type(layer.self_attention).__name__ == "IdentityOp" != type(layer.mlp).__name__  # an E layer
    with pytest.raises(TypeError, match="is_mtp_layer=True"):
        build_module(spec, config=config, layer_number=1, is_mtp_layer=True)


def test_provider_and_config_names():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megacpp_mcore.spec.backends import LocalBackend
    from megacpp_mcore.layers.norms import LocalNorm

    assert LocalBackend().layer_norm(rms_norm=True, for_qk=False, has_residual=False) is LocalNorm
    assert compat.HETEROGENEOUS_CHECKPOINT_FIELD in TransformerConfig.__dataclass_fields__
    assert compat.mcore_version().release[:2] == (0, 16)


def test_layer_kwargs_reads_a_dispatcher_new():
    from megacpp_mcore.spec.block import HybridLayer

    later = {"name": "decoder.layers.0", "is_mtp_layer": True}
    assert compat.layer_kwargs(HybridLayer, later) == later  # HybridLayer.__new__ takes **kwargs
