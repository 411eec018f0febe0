"""megacpp_mcore.spec.compat: what differs between megatron-core 0.16.1 and 0.17 - 0.19 and how the
package absorbs it. Tests that depend on the installed release say which one they expect (the CI
runs them on 0.16.1 / Python 3.11 and on 0.19.2 / Python 3.12)."""

from __future__ import annotations

import sys

import pytest
import torch
from packaging.version import Version

from megacpp_mcore.spec import compat

MCORE = compat.mcore_version()


def _since(release: str) -> bool:
    """Whether the installed megatron-core is ``release`` or later."""
    return MCORE >= Version(release)


def test_layer_kwargs_forwarding_rules():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    later = {"name": "decoder.layers.3", "pp_layer_offset": 4, "is_mtp_layer": False,
             "add_layer_offset": True}
    # TransformerLayer takes each kwarg from the release that added it (LATER_LAYER_KWARGS); an
    # older layer drops it at its neutral value
    taken = {k: v for k, v in later.items() if _since(compat.LATER_LAYER_KWARGS[k][0])}
    assert compat.layer_kwargs(TransformerLayer, later) == taken  # {} on 0.16, all on 0.18+
    assert compat.layer_kwargs(TransformerLayer, {"hidden_dropout": 0.1}) == {"hidden_dropout": 0.1}
    with pytest.raises(TypeError, match=r"bogus=1 \(unknown to megacpp_mcore\); it takes: .*config"):
        compat.layer_kwargs(TransformerLayer, {"bogus": 1})

    def layer_016(config, submodules, layer_number=1, hidden_dropout=None, pg_collection=None,
                  vp_stage=None):  # TransformerLayer.__init__'s parameters at 0.16.1
        return None

    assert compat.layer_kwargs(layer_016, later) == {}
    with pytest.raises(TypeError, match=r"is_mtp_layer=True \(added to megatron-core layers in 0.17\)"):
        compat.layer_kwargs(layer_016, {"is_mtp_layer": True})
    with pytest.raises(TypeError, match="add_layer_offset=False"):
        compat.layer_kwargs(layer_016, {"add_layer_offset": False})

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
    if not _since("0.17"):  # 0.16's TransformerLayer cannot honour is_mtp_layer=True: refused
        with pytest.raises(TypeError, match="is_mtp_layer=True"):
            build_module(spec, config=config, layer_number=1, is_mtp_layer=True)
    else:  # 0.17+: TransformerLayer takes it (layer number already global: no stage offset)
        mtp_layer = build_module(spec, config=config, layer_number=2, is_mtp_layer=True)
        assert isinstance(mtp_layer, TransformerLayer) and mtp_layer.is_mtp_layer
        assert mtp_layer.layer_number == 2


def test_provider_and_config_names():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megacpp_mcore.spec.backends import LocalBackend
    from megacpp_mcore.layers.norms import LocalNorm

    assert LocalBackend().layer_norm(rms_norm=True, for_qk=False, has_residual=False) is LocalNorm
    assert compat.HETEROGENEOUS_CHECKPOINT_FIELD in TransformerConfig.__dataclass_fields__


def test_installed_release_matches_the_python_version():
    """pyproject's markers: megatron-core 0.16.x on Python < 3.12, 0.17 - 0.19 on 3.12+."""
    import megatron.core

    assert MCORE == Version(megatron.core.__version__)
    if sys.version_info < (3, 12):
        assert MCORE.release[:2] == (0, 16)
    else:
        assert Version("0.17") <= MCORE < Version("0.20")


def test_layer_kwargs_reads_a_dispatcher_new():
    from megacpp_mcore.spec.block import HybridLayer

    later = {"name": "decoder.layers.0", "is_mtp_layer": True}
    assert compat.layer_kwargs(HybridLayer, later) == later  # HybridLayer.__new__ takes **kwargs


def test_reset_moe_metrics_lets_a_model_of_another_depth_record():
    """Megatron's aux-loss tracker is sized by the first recording's ``num_layers``; a deeper model
    in the same process raises IndexError unless the tracker is reset (0.18's MoEMetricsTracker
    ignored the old reset: ``get_moe_layer_wise_logging_tracker()`` returns a fresh copy)."""
    from megatron.core.transformer.moe import moe_utils

    def record(layer_number, num_layers):
        moe_utils.save_to_aux_losses_tracker("load_balancing_loss", torch.tensor(1.0), layer_number,
                                             num_layers)

    compat.reset_moe_metrics()
    try:
        record(2, 4)  # a 4-layer model
        with pytest.raises(IndexError):
            record(6, 6)  # a 6-layer model, without a reset
        compat.reset_moe_metrics()
        record(6, 6)
        values = moe_utils.get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
        assert values.tolist() == [0, 0, 0, 0, 0, 1.0]
        getter = moe_utils.get_moe_layer_wise_logging_tracker
        assert (getter() is getter()) == (not _since("0.18"))  # 0.18+: a fresh dict per call
    finally:
        compat.reset_moe_metrics()


def test_megatron_arg_reads_removed_arguments_as_not_asked_for():
    import argparse

    old = argparse.Namespace(use_legacy_models=True, spec=["m", "A"])
    new = argparse.Namespace(spec=["m", "A"])  # core_v0.18+ parsers define no use_legacy_models
    assert compat.megatron_arg(old, "use_legacy_models") is True
    assert compat.megatron_arg(new, "use_legacy_models") is False
    assert compat.megatron_arg(new, "spec") == ["m", "A"]
    with pytest.raises(AttributeError):
        compat.megatron_arg(new, "num_layers")  # not a removed argument: a real mistake


def test_mamba_state_dict_as_conv_module():
    state = {"decoder.layers.2.self_attention.conv1d_weight": 1, "m.conv1d_bias": 2,
             "conv1d_weight": 3, "m.conv1d.weight": 4, "m.in_proj.weight": 5}
    assert compat.mamba_state_dict_as_conv_module(state) == {
        "decoder.layers.2.self_attention.conv1d.weight": 1, "m.conv1d.bias": 2,
        "conv1d.weight": 3, "m.conv1d.weight": 4, "m.in_proj.weight": 5}


@pytest.mark.skipif(not _since("0.19"), reason="MambaMixer holds conv1d_weight/conv1d_bias from "
                    "0.19 (and imports triton, absent with 0.16's CPU torch); the 0.19.2 leg runs this")
def test_upstream_mamba_mixer_checkpoint_keys_equal_ours(single_rank, monkeypatch):
    """0.19's MambaMixer (conv parameters, no conv1d module) and our TorchMambaMixer write the same
    dist-checkpoint keys, and its torch state dict loads into ours after the conv renaming.
    MambaMixer's constructor runs on CPU with mamba_ssm's availability flag forced (its kernels
    are not called) and its CUDA allocations redirected by the cpu-device-redirect proxy."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.ssm import mamba_mixer
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megacpp_mcore.layers.mixers import mamba
    from megacpp_mcore.patches import cpu_device_redirect
    from megacpp_mcore.spec import backends
    from megacpp_mcore.testing.parity import model_from_spec
    from megacpp_mcore.train import runtime

    model = model_from_spec({"pattern": "MR", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                             "ffn_hidden_size": 128, "vocab_size": 128, "seq_length": 24, "moe": None,
                             "mla": None})
    config = runtime.transformer_config(model, runtime.Parallelism(), use_mamba_mem_eff_path=False)
    spec = mamba.mixer_spec(config, backends.get_backend("local"))
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    ours = build_module(spec, config=config, layer_number=1, pg_collection=pgs)
    monkeypatch.setattr(mamba_mixer, "HAVE_MAMBA_SSM", True)
    monkeypatch.setattr(mamba_mixer, "torch", cpu_device_redirect._TorchProxy())
    upstream = build_module(ModuleSpec(module=mamba_mixer.MambaMixer, params=spec.params,
                                       submodules=spec.submodules),
                            config=config, layer_number=1, pg_collection=pgs)

    def storage_keys(mixer):
        keys = set()
        for value in mixer.sharded_state_dict(prefix="m.").values():
            keys |= {t.key for t in (value.build() if hasattr(value, "build") else [value])}
        return keys

    assert {"conv1d_weight", "conv1d_bias"} <= {n for n, _ in upstream.named_parameters()}
    # upstream's gated norm is mamba_ssm's (a stand-in here): every other key is the same
    assert storage_keys(upstream) == storage_keys(ours) - {"m.norm.weight"}
    assert {"m.conv1d.weight.x", "m.conv1d.bias.C"} <= storage_keys(upstream)
    renamed = compat.mamba_state_dict_as_conv_module(upstream.state_dict())
    missing, unexpected = ours.load_state_dict(renamed, strict=False)
    assert (missing, unexpected) == (["norm.weight"], [])
    torch.testing.assert_close(ours.conv1d.weight, upstream.conv1d_weight)


def test_checkpoints_keep_the_common_file_older_releases_read(single_rank, tmp_path):
    """0.19 stores the common (non-tensor) state inside the torch_dist files; 0.16 - 0.18 read it
    from common.pt. After ``write_legacy_common_file`` every release finds it there (the
    cross-release round trip in tests/test_cross_version.py loads such checkpoints both ways)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    weight = torch.arange(6.0).reshape(2, 3)
    state = {"w": ShardedTensor.from_rank_offsets("w", weight), "step": 7, "signature": {"pattern": "AEMR"}}
    dist_checkpointing.save(state, str(tmp_path))
    upstream_wrote = (tmp_path / "common.pt").exists()
    assert upstream_wrote == (not _since("0.19"))  # common_strategy (and common.pt) gone in 0.19
    assert compat.write_legacy_common_file(str(tmp_path)) == (not upstream_wrote)
    assert compat.write_legacy_common_file(str(tmp_path)) is False  # idempotent
    common = torch.load(tmp_path / "common.pt", weights_only=True)
    assert common == {"step": 7, "signature": {"pattern": "AEMR"}}
    assert dist_checkpointing.load_common_state_dict(str(tmp_path)) == common
    loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.empty(2, 3))},
                                     str(tmp_path))
    torch.testing.assert_close(loaded["w"], weight)


@pytest.mark.parametrize("q_lora_rank", [None, 16])
def test_mla_norms_as_specified(q_lora_rank):
    """The spec's MLA projections and norms, for 0.19's resolver hook: no Q norm without a Q
    latent (0.16 - 0.18 never build one then), everything else as given."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.multi_latent_attention import (
        MLASelfAttention,
        MLASelfAttentionSubmodules,
    )
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from megacpp_mcore.layers.norms import LocalNorm
    from megacpp_mcore.spec.backends import LocalBackend

    config = MLATransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                  q_lora_rank=q_lora_rank, kv_lora_rank=32, qk_head_dim=16,
                                  qk_pos_emb_head_dim=8, v_head_dim=16, qk_layernorm=True)
    backend = LocalBackend()
    sub = MLASelfAttentionSubmodules(linear_q_proj=backend.column_parallel_linear(),
                                     linear_proj=backend.row_parallel_linear(),  # required in 0.19
                                     **backend.mla_projections(latent_norm=True))
    got = compat.mla_norms_as_specified(config, sub)
    assert got["kv_layernorm"] is LocalNorm and got["linear_q_proj"] is sub.linear_q_proj
    assert got["q_layernorm"] is (IdentityOp if q_lora_rank is None else LocalNorm)
    assert (got["linear_q_up_proj"], got["linear_kv_up_proj"]) == (sub.linear_q_up_proj, sub.linear_kv_up_proj)
    # the hook exists from 0.19 on, where upstream's own resolution rejects this local spec
    assert hasattr(MLASelfAttention, compat.MLA_NORM_HOOK) == _since("0.19")
    if _since("0.19") and q_lora_rank is None:
        from megatron.core.transformer.mla_qk_norm_config import QKNormConfigResolver

        with pytest.raises(ValueError, match="q_lora_rank is None"):
            QKNormConfigResolver(config, sub).resolve()
