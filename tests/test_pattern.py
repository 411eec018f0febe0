"""The pattern compiler: expansion, pipeline segments and feature-placement guards."""

from __future__ import annotations

import pytest

from megacpp_mcore.spec.pattern import (
    FeaturePlacement,
    PatternError,
    compile_layers,
    expand_pattern,
    stage_lengths,
    symbol_counts,
)


def test_nam56r_counts():
    symbols = expand_pattern("AEMEAEMEAEMR", 52)
    assert len(symbols) == 52
    assert symbol_counts(symbols) == {"A": 13, "E": 22, "M": 13, "R": 4}


def test_tiling_and_truncation():
    assert "".join(expand_pattern("AEM", 7)) == "AEMAEMA"
    assert "".join(expand_pattern("AEMEAEMEAEMR", 5)) == "AEMEA"


def test_segments_keep_order_and_split_stages():
    assert "".join(expand_pattern("AEM|EAR", 6)) == "AEMEAR"
    assert stage_lengths("AE|AEAE|A", 7, pp=3) == [2, 4, 1]
    assert stage_lengths("AE", 8, pp=4) == [2, 2, 2, 2]
    table = compile_layers("AE|MR", 4, pp=2)
    assert [e.stage for e in table] == [0, 0, 1, 1]


def test_placement_by_symbol_and_index():
    table = compile_layers(
        "AEMEAEMEAEMR", 12,
        {"mla": FeaturePlacement(symbols="A"), "mod": FeaturePlacement(layers=(1, 3))},
    )
    assert [e.index for e in table if "mla" in e.features] == [0, 4, 8]
    assert [e.index for e in table if "mod" in e.features] == [1, 3]


def test_mod_on_mixers_needs_opt_in():
    table = compile_layers("AM", 2, {"mod": FeaturePlacement(symbols="AM", allow_on="M")})
    assert all("mod" in e.features for e in table)


# (pattern, num_layers, features, pp, expected message fragment)
MALFORMED = [
    ("", 4, None, 1, "empty"),
    ("aem", 3, None, 1, "uppercase"),
    ("AEX", 3, None, 1, "'X' at position 2"),
    ("AE M", 3, None, 1, "' ' at position 2"),
    ("A*E", 3, None, 1, "'*' at position 1"),  # a Megatron hybrid symbol, not ours
    ("AE-", 3, None, 1, "'-' at position 2"),
    ("|AE", 2, None, 1, "segment 0 is empty"),
    ("AE|", 2, None, 1, "segment 1 is empty"),
    ("AE||EA", 4, None, 1, "segment 1 is empty"),
    ("AE|EA", 5, None, 1, "2+2=4 layers, but num_layers is 5"),
    ("AE|EA", 3, None, 1, "num_layers is 3"),
    ("AE", 0, None, 1, "num_layers must be >= 1"),
    ("AE", -2, None, 1, "num_layers must be >= 1"),
    ("AE", 2.0, None, 1, "num_layers must be an int"),
    ("AE", True, None, 1, "num_layers must be an int"),
    (None, 2, None, 1, "pattern must be a str"),
    ("AE", 6, None, 4, "not divisible by pipeline size 4"),
    ("AE|EA", 4, None, 3, "defines 2 pipeline stages but the pipeline size is 3"),
    ("AE", 4, None, 0, "pipeline size must be an int >= 1"),
    ("AEM", 3, {"mla": FeaturePlacement(symbols="E")}, 1, "mla cannot attach to symbol class 'E'"),
    ("AEM", 3, {"mla": FeaturePlacement(layers=(2,))}, 1, "layer 2 is 'M'"),
    ("AEM", 3, {"moda": FeaturePlacement(symbols="M")}, 1, "moda cannot attach to symbol class 'M'"),
    ("AEMR", 4, {"moda": FeaturePlacement(layers=(3,))}, 1, "layer 3 is 'R'"),
    ("AEM", 3, {"mod": FeaturePlacement(symbols="M")}, 1, "pass allow_on='M'"),
    ("AEMR", 4, {"mod": FeaturePlacement(layers=(3,))}, 1, "layer 3 is 'R'"),
    ("AE", 4, {"mod": FeaturePlacement(layers=(4,))}, 1, "layer 4 is beyond the depth"),
    ("AE", 4, {"mla": FeaturePlacement(layers=(10,))}, 1, "valid indices 0..3"),
    ("AE", 4, {"mla": FeaturePlacement(symbols="A", allow_on="E")}, 1, "can never attach to"),
    ("AE", 4, {"warp": FeaturePlacement(symbols="A")}, 1, "unknown feature 'warp'"),
    ("AE", 4, {"mla": "A"}, 1, "expected a FeaturePlacement"),
]


@pytest.mark.parametrize("pattern,num_layers,features,pp,fragment", MALFORMED)
def test_malformed_inputs_are_refused(pattern, num_layers, features, pp, fragment):
    with pytest.raises(PatternError) as info:
        compile_layers(pattern, num_layers, features, pp=pp)
    assert fragment in str(info.value)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(symbols="Q"), "unknown symbol 'Q'"),
    (dict(symbols="a"), "unknown symbol 'a'"),
    (dict(layers=(-1,)), "-1 is not a layer index"),
    (dict(layers=(1.5,)), "1.5 is not a layer index"),
    (dict(layers=(2, 2)), "lists layer 2 more than once"),
    (dict(layers="12"), "must be a sequence of ints"),
    (dict(allow_on="Z"), "unknown symbol 'Z'"),
])
def test_bad_placements_are_refused(kwargs, fragment):
    with pytest.raises(PatternError) as info:
        FeaturePlacement(**kwargs)
    assert fragment in str(info.value)


def test_pattern_error_is_value_error():
    assert issubclass(PatternError, ValueError)


def test_every_feature_has_a_placement_rule_and_a_seam():
    """The feature table and the placement guards name the same features; the composer's order."""
    from megacpp_mcore.features import FEATURE_NAMES, FEATURES, SEAMS, Feature, get_feature
    from megacpp_mcore.spec.pattern import FEATURE_RULES

    assert sorted(FEATURE_RULES) == sorted(FEATURE_NAMES) == ["flexidepth", "mla", "mod", "moda"]
    assert [(f.name, f.seam) for f in FEATURES] == [
        ("mla", "self_attention"), ("moda", "core_attention"), ("mod", "layer"),
        ("flexidepth", "layer")]
    assert SEAMS == ("self_attention", "core_attention", "layer")
    assert get_feature("mod").config_type().__name__ == "MoDConfig"
    assert get_feature("flexidepth").config_type().__name__ == "FlexiDepthConfig"
    with pytest.raises(KeyError, match="unknown feature 'wings'"):
        get_feature("wings")
    with pytest.raises(ValueError, match="unknown seam 'mlp'"):
        Feature("x", seam="mlp", config_type=object, transform=lambda spec, ctx: spec)


def test_heterogeneous_tables():
    from megacpp_mcore.spec.pattern import heterogeneous

    assert not heterogeneous(compile_layers("A", 4))
    assert heterogeneous(compile_layers("AE", 4))
    assert heterogeneous(compile_layers("A", 4, {"mod": FeaturePlacement(layers=(0,))}))
