"""layer_specs/: every exported object loads through megatron-core's own ``import_module`` (what
``pretrain_gpt.py --spec MODULE ATTR`` calls) and builds a GPTModel whose layers follow the pattern."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

import layer_specs
from megacpp_mcore.spec import block as hybrid
from megacpp_mcore.models.presets import MLAConfig, get_preset


def _exported() -> list[tuple[str, str]]:
    pairs = []
    for info in pkgutil.iter_modules(layer_specs.__path__):
        module = importlib.import_module(f"layer_specs.{info.name}")
        assert hasattr(module, "__all__"), f"layer_specs.{info.name} must list its objects in __all__"
        pairs += [(module.__name__, attr) for attr in module.__all__]
    return pairs


EXPORTED = _exported()


def _build(spec, *, num_layers: int):
    """GPTModel on CPU with ``spec`` as transformer_layer_spec, tiny NAM56R dimensions."""
    from megatron.core.models.gpt import GPTModel

    from megacpp_mcore.train import runtime

    sub = spec.submodules
    tiny = get_preset("nam56r-tiny")
    model = tiny.replace(
        pattern=sub.pattern.replace("|", ""), num_layers=num_layers, seq_length=32, vocab_size=128,
        # the spec's own MLA dims (the seam refuses a config that disagrees with them)
        mla=(sub.features["mla"] if isinstance(sub.features.get("mla"), MLAConfig) else tiny.mla)
        if "mla" in sub.features else None,
        features={k: v for k, v in sub.features.items() if k != "mla"},
    )
    config = runtime.transformer_config(model, runtime.Parallelism())
    gpt = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=model.vocab_size,
                   max_sequence_length=model.seq_length, position_embedding_type="rope")
    return gpt, model


def _check_layers(gpt, pattern: str, num_layers: int) -> None:
    from megatron.core.transformer.identity_op import IdentityOp

    expanded = hybrid.expand_pattern(pattern, num_layers)
    layers = gpt.decoder.layers
    assert len(layers) == num_layers
    for layer, symbol in zip(layers, expanded):
        if symbol == "A":
            assert not isinstance(layer.self_attention, IdentityOp) and isinstance(layer.mlp, IdentityOp)
        if symbol == "E":
            assert isinstance(layer.self_attention, IdentityOp) and not isinstance(layer.mlp, IdentityOp)


def test_layer_specs_export_ready_objects():
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import BaseTransformerLayer

    assert ("layer_specs.nam56r_lite", "NAM56R_LITE") in EXPORTED
    for module_name, attr in EXPORTED:
        obj = getattr(importlib.import_module(module_name), attr)
        assert isinstance(obj, ModuleSpec) and issubclass(obj.module, BaseTransformerLayer), (
            f"{module_name}.{attr} is not a ready layer ModuleSpec (megatron-core 0.16 takes no callables)"
        )
        assert obj.submodules.num_layers is None, "the depth comes from pretrain_gpt's --num-layers"


@pytest.mark.parametrize("module_name,attr", EXPORTED)
def test_loads_through_megatron_import_module(module_name, attr):
    from megatron.core.transformer import spec_utils

    # upstream's own function (unpatched here), exactly as gpt_builders calls it with args.spec
    loaded = spec_utils.import_module([module_name, attr])
    assert loaded is getattr(importlib.import_module(module_name), attr)


@pytest.mark.parametrize("module_name,attr", EXPORTED)
def test_builds_and_runs_exported_object_as_is(module_name, attr, single_rank):
    """The exported object unchanged (every symbol and feature it names), at a full pattern period."""
    from megatron.core.transformer import spec_utils

    spec = spec_utils.import_module([module_name, attr])
    pattern = spec.submodules.pattern
    num_layers = 12 if "|" not in pattern else len(pattern.replace("|", ""))
    gpt, model = _build(spec, num_layers=num_layers)
    _check_layers(gpt, pattern, num_layers)
    from megacpp_mcore.features.mod import MoDLayer

    # MoD (the presets' default) exactly on the layers the spec's table gives it
    assert [isinstance(layer, MoDLayer) for layer in gpt.decoder.layers] == [
        "mod" in entry.features for entry in spec.submodules.table(num_layers)]
    tokens = torch.randint(0, model.vocab_size, (2, model.seq_length))
    positions = torch.arange(model.seq_length).expand(2, -1)
    loss = gpt(tokens, positions, None, labels=tokens)
    assert loss.shape == (2, model.seq_length) and torch.isfinite(loss).all()


def test_lite_backends_and_pattern():
    from layer_specs import nam56r_lite

    assert nam56r_lite.NAM56R_LITE.submodules.pattern == get_preset("nam56r-lite").pattern
    assert nam56r_lite.NAM56R_LITE.submodules.backend == "auto"
    assert nam56r_lite.NAM56R_LITE_LOCAL.submodules.backend == "local"
    assert set(nam56r_lite.NAM56R_LITE.submodules.features) == {"mla", "mod"}
    assert set(nam56r_lite.NAM56R_LITE_DENSE.submodules.features) == {"mla"}
    assert nam56r_lite.NAM56R_LITE_AE.submodules.features == {}
