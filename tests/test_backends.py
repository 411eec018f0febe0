"""The backend seam: one detection, `auto` resolution, and build-time errors saying what to install."""

from __future__ import annotations

import pytest

from megacpp_mcore.spec import backends


def test_auto_is_local_without_te_or_cuda():
    with backends.override_detection(te=None, cuda=False):
        assert backends.resolve_backend_name("auto") == "local"
        assert backends.get_backend("auto").name == "local"


def test_auto_is_te_when_te_imports_on_cuda():
    with backends.override_detection(te="2.11.0", cuda=True):
        assert backends.resolve_backend_name("auto") == "te"


def test_te_without_te_says_what_to_install():
    with backends.override_detection(te=None, cuda=False):
        with pytest.raises(backends.BackendUnavailable) as info:
            backends.get_backend("te")
    message = str(info.value)
    assert "pip install 'megacpp-mcore[te]'" in message and "no CUDA device" in message


def test_te_without_cuda_names_the_missing_device():
    with backends.override_detection(te="2.11.0", cuda=False):
        with pytest.raises(backends.BackendUnavailable, match="no CUDA device"):
            backends.resolve_backend_name("te")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; allowed: auto, te, local"):
        backends.resolve_backend_name("tensorrt")


def test_detection_runs_once():
    assert backends.detect() is backends.detect()


def test_missing_optional_package_raises_at_request():
    with backends.override_detection(mamba_ssm=None):
        with pytest.raises(ImportError, match="needs the optional package 'mamba_ssm'"):
            backends.require("mamba_ssm", "the fast Mamba path")


def test_broken_optional_package_names_its_import_error():
    # Installed but failing to import (e.g. a missing compiled extension): the reason is in the
    # message, not "install it", which would send the user after a package they already have.
    broken = (("mamba_ssm", "ImportError: libfoo.so: cannot open shared object file"),)
    with backends.override_detection(mamba_ssm=None, import_errors=broken):
        with pytest.raises(backends.BackendUnavailable, match=r"installed but does not import.*libfoo"):
            backends.require("mamba_ssm", "the 'M' block")


def test_local_backend_norm_supports_sequence_parallel():
    from megacpp_mcore.layers.norms import LocalNorm

    assert backends.LocalBackend().layer_norm() is LocalNorm


def test_local_experts_are_sequential_whatever_the_config_asks(single_rank):
    """The local backend never builds upstream's local ``GroupedMLP`` (it needs the separate
    grouped_gemm package, absent on the H200 where ``--backend local`` with MoE failed to build):
    an ``E`` layer built from a config with ``moe_grouped_gemm=True`` holds a ``SequentialMLP``;
    TE keeps the request."""
    import dataclasses

    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import build_module

    from megacpp_mcore.layers.feedforward import feedforward_layer_spec
    from megacpp_mcore.models.presets import get_preset
    from megacpp_mcore.spec.context import ChunkBuild, LayerContext
    from megacpp_mcore.train import runtime

    model = get_preset("nam56r-tiny")
    config = dataclasses.replace(runtime.transformer_config(model, runtime.Parallelism()), moe_grouped_gemm=True)
    ctx = LayerContext(config=config, backend=backends.get_backend("local"), index=1, symbol="E",
                       features=frozenset(), feature_configs={}, chunk=ChunkBuild())
    layer = build_module(feedforward_layer_spec(ctx), config=config, layer_number=2)
    assert type(layer.mlp.experts) is SequentialMLP
    assert backends.provider("local").moe_grouped_gemm(True) is False
    assert backends.provider("te").moe_grouped_gemm(True) is True
