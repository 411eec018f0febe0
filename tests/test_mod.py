"""Mixture-of-Depths: config validation, exactness against the unwrapped layer and plain-torch
references, loss and budget values, side contracts (MoE aux loss, MoDA seam), TP/SP/PP parity."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch

from megacpp_mcore.features.mod import MoDConfig
from megacpp_mcore.spec.pattern import FeaturePlacement, PatternError, compile_layers
from megacpp_mcore.models.presets import custom_model
from megacpp_mcore.testing import aux_loss_scale

# ----------------------------------------------------------------------------- parity factories
_BASE = dict(pattern="AE", num_layers=4, hidden_size=64, num_attention_heads=4,
             ffn_hidden_size=128, vocab_size=128, seq_length=32, mla=None)


def parity_topk():
    """Every layer top-k at capacity 0.5 (k=16 of 32 tokens), dense E layers."""
    mod = MoDConfig(mode="topk", capacity=0.5, router_aux_loss_weight=0.1)
    return custom_model(**_BASE, moe=None, features={"mod": mod})


def parity_topk_mla():
    """:func:`parity_topk` with MLA on the A layers (the gathered tokens' own positions reach MLA
    as TokenPositions; under SP the route is taken on the gathered sequence)."""
    from megacpp_mcore.models.presets import MLAConfig

    mla = MLAConfig(q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16)
    return parity_topk().replace(mla=mla)


def parity_gateskip_moe():
    """Every layer gateskip with an active sparsity loss (gates start at ~0.88 > budget 0.5)
    and MoE E layers, whose aux loss must keep flowing through the gate."""
    from megacpp_mcore.models.presets import MoEConfig

    mod = MoDConfig(mode="gateskip", sparsity_loss_weight=1.0, budget_start=0.5, budget_end=0.5)
    moe = MoEConfig(num_experts=4, topk=2, ffn_hidden_size=64, shared_expert_size=64)
    return custom_model(**_BASE, moe=moe, features={"mod": mod})


def parity_threshold():
    mod = MoDConfig(mode="threshold", threshold=0.5, router_bias_init=0.0, router_init_std=0.2,
                    sparsity_loss_weight=1.0, budget_start=0.3, budget_end=0.3)
    return custom_model(**_BASE, moe=None, features={"mod": mod})


def run_all(runs: list[dict]) -> list[dict]:
    """Several ``train_run``s in one process (one torchrun launch for all of them). The world
    stays up between runs (only Megatron's parallel state is rebuilt): re-creating the default
    process group under one torchrun store hangs in ``new_group``."""
    from unittest import mock

    from megatron.core import parallel_state

    from megacpp_mcore.train import runtime
    from megacpp_mcore.testing.parity import train_run

    with mock.patch.object(runtime, "shutdown", parallel_state.destroy_model_parallel):
        results = [train_run(**kwargs) for kwargs in runs]
    runtime.shutdown()
    return results



# ------------------------------------------------------------------------------- layer helpers
def _config(*, moe: bool = False, **overrides):
    from megacpp_mcore.train import runtime
    from megacpp_mcore.models.presets import MoEConfig

    moe_cfg = MoEConfig(num_experts=4, topk=2, ffn_hidden_size=64) if moe else None
    model = custom_model(**dict(_BASE, seq_length=16), moe=moe_cfg)
    return runtime.transformer_config(model, runtime.Parallelism(), **overrides)


def _pair(symbol: str, mod: MoDConfig, *, moe: bool = False, features=("mod",)):
    """(unwrapped layer, MoD-wrapped layer) with identical block weights."""
    from megatron.core.transformer.spec_utils import build_module

    from megacpp_mcore.layers.attention import attention_layer_spec
    from megacpp_mcore.spec.backends import get_backend
    from megacpp_mcore.layers.feedforward import feedforward_layer_spec
    from megacpp_mcore.spec.context import ChunkBuild, LayerContext
    from megacpp_mcore.features.mod import mod_layer_spec

    cfg = _config(moe=moe)
    ctx = LayerContext(config=cfg, backend=get_backend("local"), index=0, symbol=symbol,
                       features=frozenset(features), feature_configs={"mod": mod},
                       chunk=ChunkBuild())  # the owner of MoDA's depth buffer, when it is there
    spec = attention_layer_spec(ctx) if symbol == "A" else feedforward_layer_spec(ctx)
    plain = build_module(spec, config=cfg, layer_number=1)
    wrapped = build_module(mod_layer_spec(spec, ctx), config=cfg, layer_number=1)
    missing, unexpected = wrapped.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"mod_router.weight", "mod_router.bias"} and not unexpected
    return plain, wrapped


def _rope(seq: int, dim: int = 16) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(seq).float(), inv)
    return torch.cat([freqs, freqs], -1)[:, None, None, :]  # [s, 1, 1, d]


def _call(layer, x, rope=None):
    out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
    return out


def _set_router(layer, *, std: float | None = None, weight=None, bias: float = 0.0, seed: int = 0):
    with torch.no_grad():
        if weight is None:
            weight = torch.randn(1, layer.mod_router.weight.shape[1],
                                 generator=torch.Generator().manual_seed(seed)) * std
        layer.mod_router.weight.copy_(weight / layer.router_scale)  # `weight` is the effective one
        layer.mod_router.bias.fill_(bias)


def _inputs(seq: int = 16, batch: int = 2, seed: int = 1):
    return torch.randn(seq, batch, 64, generator=torch.Generator().manual_seed(seed))


def test_mod_options_replace_fields_and_refuse_bad_items():
    """``MoDConfig.with_options`` (``train --mod``): fields replaced, ``width`` / ``run`` for the
    None of ``router_scale`` / ``budget_steps``, the placement kept; unknown keys, repeated keys,
    bad numbers and out-of-range values refused with the item and what is allowed."""
    from megacpp_mcore.models.presets import get_preset

    mod = get_preset("nam56r-tiny").features["mod"]
    changed = mod.with_options(" router_scale=width, budget_steps=run ,sparsity_loss_weight=0")
    assert changed.router_scale is None and changed.budget_steps is None and changed.sparsity_loss_weight == 0
    assert changed.placement == mod.placement and changed.mode == mod.mode
    assert mod.with_options("router_scale=0.25").router_multiplier(2048) == 0.25
    assert mod.with_options("") == mod
    for bad, message in (("placement=AE", "allowed keys: mode, capacity"), ("budget_end", "is not key=value"),
                         ("mode=topk,mode=gateskip", "'mode' is given twice"),
                         ("budget_steps=soon", "is not an int or 'run'"),
                         ("threshold=2", "allowed: 0 < threshold < 1"),
                         ("router_scale=-1", "router_scale must be > 0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            mod.with_options(bad)


def test_router_scale_keeps_the_router_at_base_width_speed(single_rank):
    """The router's logit is ``router_scale * w . x`` (``None``: ``128 / h``; default 1): the same
    function of the effective weight at any width, and an Adam step moves the logit
    ``router_scale`` times as far as an unscaled router's (Adam moves each weight ~lr whatever the
    gradient's size), so with ``None`` a 2048-wide router learns at a 128-wide one's speed."""
    assert MoDConfig().router_multiplier(2048) == 1.0
    scaled = MoDConfig(router_scale=None)
    assert scaled.router_multiplier(2048) == 1 / 16 and scaled.router_multiplier(128) == 1.0
    assert MoDConfig(router_scale=0.5).router_multiplier(2048) == 0.5
    x = _inputs()  # h = 64
    moved = {}
    for scale in (None, 1.0):
        torch.manual_seed(0)  # the same block weights
        _, wrapped = _pair("A", MoDConfig(router_scale=scale))
        _set_router(wrapped, std=0.02, bias=0.0)
        before = torch.nn.functional.linear(x, wrapped.router_weight().detach())
        opt = torch.optim.Adam([wrapped.mod_router.weight], lr=1e-3)
        (_call(wrapped, x, _rope(16)) * x).sum().backward()
        opt.step()
        after = torch.nn.functional.linear(x, wrapped.router_weight().detach())
        moved[scale] = (after - before).abs().mean().item()
    assert moved[None] == pytest.approx(2.0 * moved[1.0], rel=1e-3)  # 128 / 64


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, message", [
    (dict(capacity=0), "capacity=0 is out of range"),
    (dict(capacity=-0.5), "capacity=-0.5 is out of range"),
    (dict(capacity=1.5), "allowed: 0 < capacity <= 1"),
    (dict(mode="skip"), "mode='skip' is unknown; allowed: gateskip, threshold, topk"),
    (dict(mode="threshold", threshold=1.0), "threshold=1.0 is out of range"),
    (dict(mode="topk", inference="hard"), "inference='hard' is not available in mode 'topk'"),
    (dict(budget_end=0.0), "budget_end=0.0 is out of range"),
    (dict(budget_steps=-1), "budget_steps=-1 is not allowed; allowed: an int >= 0"),
    (dict(sparsity_loss_weight=-1.0), "sparsity_loss_weight must be >= 0"),
    (dict(allow_on="A"), "allow_on='A': MoD can only be opted in on M, R"),
    (dict(placement="AE"), "placement must be a FeaturePlacement"),
    (dict(router_scale=0.0), "router_scale must be > 0 (or None: 128 / hidden size), got 0.0"),
    (dict(router_scale=-1), "router_scale must be > 0"),
    (dict(router_scale="big"), "router_scale must be a number, got 'big'"),
])
def test_invalid_config_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoDConfig(**kwargs)


def test_placement_refusals_and_opt_in():
    from megacpp_mcore.spec.block import hybrid_block_spec

    on_mamba = MoDConfig(placement=FeaturePlacement(symbols="M"))
    with pytest.raises(PatternError, match="mod cannot attach to symbol class 'M'.*allow_on='M'"):
        compile_layers("AEM", 3, {"mod": on_mamba.placement})
    with pytest.raises(PatternError, match="mod cannot attach to layer 2 is 'M'"):
        compile_layers("AEM", 3, {"mod": FeaturePlacement(layers=(2,))})
    with pytest.raises(PatternError, match="layer 7 is beyond the depth; the model has 4 layers"):
        hybrid_block_spec("AE", num_layers=4, mod=MoDConfig(placement=FeaturePlacement(layers=(7,))))
    with pytest.raises(PatternError, match="layer 9 is beyond the depth"):
        custom_model(**_BASE, moe=None,
                     features={"mod": MoDConfig(placement=FeaturePlacement(layers=(9,)))})
    opted = MoDConfig(placement=FeaturePlacement(symbols="AM"), allow_on="M")
    assert opted.placement.allow_on == "M"
    table = compile_layers("AEM", 3, {"mod": opted.placement})
    assert [sorted(e.features) for e in table] == [["mod"], [], ["mod"]]


def test_budget_schedule_and_topk_count():
    cfg = MoDConfig(budget_start=1.0, budget_end=0.8, budget_steps=100)
    assert [cfg.budget(s) for s in (0, 25, 50, 100, 1000)] == pytest.approx([1.0, 0.95, 0.9, 0.8, 0.8])
    assert MoDConfig(budget_steps=0, budget_end=0.7).budget(0) == 0.7
    topk = MoDConfig(mode="topk", capacity=0.125)
    assert topk.topk_count(4096) == 512 and topk.topk_count(10) == 2 and topk.topk_count(10, 4) == 4


# ------------------------------------------------------------------------- exactness, refs
@pytest.mark.parametrize("symbol, moe", [("A", False), ("E", True)])
def test_gateskip_gate_one_reproduces_unwrapped_exactly(single_rank, symbol, moe):
    plain, wrapped = _pair(symbol, MoDConfig(mode="gateskip"), moe=moe)
    x, rope = _inputs(), _rope(16)
    wrapped.force_gate(1.0)
    assert torch.equal(_call(wrapped, x, rope), _call(plain, x, rope))


def test_topk_capacity_one_reproduces_unwrapped_exactly(single_rank):
    plain, wrapped = _pair("A", MoDConfig(mode="topk", capacity=1.0))
    _set_router(wrapped, std=0.3)
    x, rope = _inputs(), _rope(16)
    wrapped.force_gate(1.0)
    assert torch.equal(_call(wrapped, x, rope), _call(plain, x, rope))
    assert wrapped.megacpp_stats()["fraction_processed"] == 1.0


def test_gateskip_matches_plain_torch_reference(single_rank):
    plain, wrapped = _pair("A", MoDConfig(mode="gateskip"))
    _set_router(wrapped, std=0.3, bias=0.5)
    x, rope = _inputs(), _rope(16)
    gate = torch.sigmoid(x @ wrapped.router_weight().detach().T + 0.5)  # [s, b, 1]
    expected = x + gate * (_call(plain, x, rope) - x)
    torch.testing.assert_close(_call(wrapped, x, rope), expected, atol=1e-5, rtol=1e-5)
    stats = wrapped.megacpp_stats()
    assert stats["gate_mean"] == pytest.approx(gate.mean().item(), abs=1e-6)
    assert stats["fraction_processed"] == 1.0


def test_threshold_unselected_tokens_bit_identical(single_rank):
    plain, wrapped = _pair("E", MoDConfig(mode="threshold", threshold=0.5))
    _set_router(wrapped, std=0.5, bias=0.0)
    x = _inputs()
    gate = torch.sigmoid(x @ wrapped.router_weight().detach().T)  # [s, b, 1]
    keep = (gate >= 0.5).squeeze(-1)
    assert 0 < int(keep.sum()) < keep.numel()
    out = _call(wrapped, x)
    assert torch.equal(out[~keep], x[~keep])
    expected = x + gate * (_call(plain, x) - x)
    torch.testing.assert_close(out[keep], expected[keep], atol=1e-5, rtol=1e-5)
    assert wrapped.megacpp_stats()["fraction_processed"] == pytest.approx(keep.float().mean().item())


def test_topk_matches_per_sequence_gather_reference(single_rank):
    plain, wrapped = _pair("A", MoDConfig(mode="topk", capacity=0.25))
    _set_router(wrapped, std=0.5)
    x, rope = _inputs(), _rope(16)
    out = _call(wrapped, x, rope)
    logits = (x @ wrapped.router_weight().detach().T).squeeze(-1)  # [s, b]
    for b in range(x.shape[1]):
        idx = logits[:, b].topk(4).indices.sort().values  # k = 0.25 * 16
        rest = torch.ones(16, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(out[rest, b], x[rest, b])  # unselected: exactly the input
        sel = x[idx, b:b + 1]  # [k, 1, h], causal order kept
        processed = _call(plain, sel, rope[idx])  # the same block on the gathered tokens
        gate = torch.sigmoid(logits[idx, b])[:, None, None]
        torch.testing.assert_close(out[idx, b:b + 1], sel + gate * (processed - sel),
                                   atol=1e-5, rtol=1e-5)
    assert wrapped.megacpp_stats()["fraction_processed"] == 0.25


def test_topk_attention_takes_per_token_rope_through_flat_view(single_rank, monkeypatch):
    """A top-k ``A`` layer's attention is ``TokenRopeAttention``: its RoPE runs through Megatron's
    ``apply_rotary_pos_emb`` on the ``[k*b, 1, h, d]`` view with ``[k*b, 1, 1, d]`` frequencies, the
    shape TE's fused kernel takes. With ``apply_rope_fusion`` on, a stand-in for the fused kernel
    that accepts only that shape gives the same output as the unfused layer (gateskip layers keep
    upstream's ``SelfAttention``)."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.attention import SelfAttention

    from megacpp_mcore.features.mod import TokenRopeAttention

    plain, wrapped = _pair("A", MoDConfig(mode="topk", capacity=0.25))
    assert type(wrapped.self_attention) is TokenRopeAttention
    assert type(_pair("A", MoDConfig(mode="gateskip"))[1].self_attention) is SelfAttention
    _set_router(wrapped, std=0.5)
    x, rope = _inputs(), _rope(16)
    expected = _call(wrapped, x, rope)
    calls = []

    def fused_stand_in(t, freqs, interleaved=False):
        assert freqs.shape[1:3] == (1, 1) and freqs.shape[0] >= t.shape[0], freqs.shape
        calls.append(tuple(t.shape))
        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", fused_stand_in)
    monkeypatch.setattr(wrapped.config, "apply_rope_fusion", True)
    got = _call(wrapped, x, rope)
    assert calls == [(4 * 2, 1, 4, 16)] * 2  # query and key, k=4 tokens x 2 sequences flattened
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_hard_budget_inference_keeps_top_gates(single_rank):
    cfg = MoDConfig(mode="gateskip", inference="hard", budget_start=1.0, budget_end=0.5,
                    budget_steps=10)
    plain, wrapped = _pair("E", cfg)
    _set_router(wrapped, std=0.5)
    x = _inputs()
    wrapped.megacpp_set_step(10)
    wrapped.eval()
    out = _call(wrapped, x)
    gate = torch.sigmoid(x @ wrapped.router_weight().detach().T).squeeze(-1)  # [s, b]
    keep = torch.zeros_like(gate, dtype=torch.bool).scatter(0, gate.topk(8, dim=0).indices, True)
    assert torch.equal(out[~keep], x[~keep])
    expected = x + gate[..., None] * (_call(plain, x) - x)
    torch.testing.assert_close(out[keep], expected[keep], atol=1e-5, rtol=1e-5)
    assert wrapped.megacpp_stats() == pytest.approx(
        {"gate_mean": gate.mean().item(), "fraction_processed": 0.5,
         "loss_sparsity": 0.01 * (gate.mean().item() - 0.5) ** 2, "budget": 0.5}, abs=1e-6)
    wrapped.train()  # training uses every token (soft gate), same budget
    assert not torch.equal(_call(wrapped, x)[~keep], x[~keep])


def test_topk_causal_inference_decides_per_token(single_rank):
    plain, wrapped = _pair("A", MoDConfig(mode="topk", capacity=0.25, inference="causal"))
    _set_router(wrapped, std=0.5, bias=-0.2)
    x, rope = _inputs(), _rope(16)
    wrapped.eval()
    out = _call(wrapped, x, rope)
    logits = x @ wrapped.router_weight().detach().T - 0.2  # [s, b, 1]
    keep = (logits >= 0).squeeze(-1)  # no look at later tokens: usable for generation
    assert 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(out[~keep], x[~keep])
    expected = x + torch.sigmoid(logits) * (_call(plain, x, rope) - x)
    torch.testing.assert_close(out[keep], expected[keep], atol=1e-5, rtol=1e-5)
    assert wrapped.megacpp_stats()["fraction_processed"] == pytest.approx(keep.float().mean().item())


# ---------------------------------------------------------------------------- losses, grads
def test_gateskip_sparsity_loss_and_gradient_hand_computed(single_rank):
    """The sparsity loss's gradient, hand-computed; scaled by Megatron's aux-loss scale (unset: 1)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    cfg = MoDConfig(mode="gateskip", sparsity_loss_weight=0.5, budget_start=1.0, budget_end=0.6,
                    budget_steps=10)
    _, wrapped = _pair("A", cfg)
    _set_router(wrapped, weight=torch.zeros(1, 64), bias=1.0)  # every gate = sigmoid(1)
    g = 1.0 / (1.0 + math.exp(-1.0))
    x, rope = _inputs(), _rope(16)
    assert MoEAuxLossAutoScaler.main_loss_backward_scale is None  # no schedule ran: scale 1
    wrapped.megacpp_set_step(5)  # budget 0.8 > 0.731: no pressure
    (_call(wrapped, x, rope) * 0).sum().backward()
    assert wrapped.megacpp_stats()["loss_sparsity"] == 0.0
    assert wrapped.mod_router.bias.grad.item() == 0.0
    wrapped.mod_router.bias.grad = None
    wrapped.megacpp_set_step(10)  # budget 0.6: loss 0.5 * (g - 0.6)^2
    (_call(wrapped, x, rope) * 0).sum().backward()  # only the attached MoD loss has gradient
    stats = wrapped.megacpp_stats()
    assert stats["budget"] == pytest.approx(0.6)
    assert stats["loss_sparsity"] == pytest.approx(0.5 * (g - 0.6) ** 2, rel=1e-6)
    # d/db of 0.5 * (mean(sigmoid(b)) - 0.6)^2 = (g - 0.6) * g * (1 - g)
    expected = (g - 0.6) * g * (1 - g)
    assert wrapped.mod_router.bias.grad.item() == pytest.approx(expected, rel=1e-5)
    wrapped.mod_router.bias.grad = None
    with aux_loss_scale(torch.tensor([0.25])):  # as a schedule sets it at 4 micro-batches
        (_call(wrapped, x, rope) * 0).sum().backward()
    assert wrapped.mod_router.bias.grad.item() == pytest.approx(0.25 * expected, rel=1e-5)


def test_topk_router_aux_loss_hand_computed(single_rank):
    """The router BCE's value and gradient, hand-computed, at Megatron's aux-loss scale 0.5."""
    _, wrapped = _pair("A", MoDConfig(mode="topk", capacity=0.25, router_aux_loss_weight=0.3))
    weight = torch.zeros(1, 64)
    weight[0, 0] = 1.0  # logit = x[..., 0]
    _set_router(wrapped, weight=weight, bias=0.0)
    x, rope = _inputs(), _rope(16)
    with aux_loss_scale(torch.tensor([0.5])):
        (_call(wrapped, x, rope) * 0).sum().backward()
    logits = x[..., 0]  # [s, b]
    target = torch.zeros_like(logits).scatter(0, logits.topk(4, dim=0).indices, 1.0)
    p = torch.sigmoid(logits)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    assert wrapped.megacpp_stats()["loss_router_aux"] == pytest.approx(0.3 * bce.item(), rel=1e-5)
    # d/db = scale * 0.3 * mean(sigmoid(l) - target)
    expected = 0.5 * 0.3 * (p - target).mean().item()
    assert wrapped.mod_router.bias.grad.item() == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_moe_aux_loss_flows_when_every_token_skips(single_rank):
    _, wrapped = _pair("E", MoDConfig(mode="threshold", threshold=0.9), moe=True)
    _set_router(wrapped, weight=torch.zeros(1, 64), bias=-5.0)  # gate 0.007 < 0.9: all skip
    x = _inputs().requires_grad_()
    out = _call(wrapped, x)
    assert torch.equal(out, x.detach())
    out.sum().backward()
    assert wrapped.megacpp_stats()["fraction_processed"] == 0.0
    # The block contributes nothing, yet the MoE load-balancing loss still trains its router.
    assert wrapped.mlp.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ MoDA seam
@pytest.mark.parametrize("mode, seen", [("gateskip", 16), ("threshold", 16), ("topk", 4)])
def test_wrapped_attention_positions_seen(single_rank, mode, seen):
    _, wrapped = _pair("A", MoDConfig(mode=mode, capacity=0.25))
    shapes = []
    wrapped.self_attention.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
    _call(wrapped, _inputs(), _rope(16))
    assert shapes == [torch.Size([seen, 2, 64])]
    assert wrapped.attention_sees_all_positions == (seen == 16)


def test_topk_refused_on_moda_layer(single_rank):
    with pytest.raises(ValueError, match="both MoD topk and MoDA.*use MoD mode 'gateskip'"):
        _pair("A", MoDConfig(mode="topk", capacity=0.5), features=("mod", "moda"))
    _pair("A", MoDConfig(mode="gateskip"), features=("mod", "moda"))  # all positions: allowed


@pytest.mark.parametrize("modules, refused", [(["attn", "mamba"], True), ([], True), (["mamba"], False)],
                         ids=["attn+mamba", "whole-layers", "mamba-only"])
def test_cuda_graphs_that_capture_a_mod_layer_are_refused(single_rank, modules, refused):
    """Megatron's per-layer CUDA graphs run a captured layer without its Python forward: MoD's
    gate would be bypassed (the run failed on the H100 with ``bench_stage --fast cuda_graphs=on``)
    and its token budget frozen. A config whose graphs capture attention or MoE layers is refused
    when the MoD layer is built, naming the setting and what is allowed; Mamba-only graphs pass."""
    from megatron.core.transformer.spec_utils import build_module

    from megacpp_mcore.features.mod import mod_layer_spec
    from megacpp_mcore.layers.attention import attention_layer_spec
    from megacpp_mcore.spec.backends import get_backend
    from megacpp_mcore.spec import compat
    from megacpp_mcore.spec.context import ChunkBuild, LayerContext

    cfg = _config()
    cfg.cuda_graph_impl = "transformer_engine"  # set after validation: TE is not on this host
    setattr(cfg, compat.cuda_graph_modules_field(cfg), modules)
    ctx = LayerContext(config=cfg, backend=get_backend("local"), index=0, symbol="A",
                       features=frozenset({"mod"}), feature_configs={"mod": MoDConfig()},
                       chunk=ChunkBuild())
    spec = mod_layer_spec(attention_layer_spec(ctx), ctx)
    if refused:
        with pytest.raises(ValueError, match=r"CUDA graphs \(cuda_graph_impl='transformer_engine'.*"
                                             r"capture only \['mamba'\]"):
            build_module(spec, config=cfg, layer_number=1)
    else:
        build_module(spec, config=cfg, layer_number=1)


def test_only_transformer_layers_are_wrapped():
    from megacpp_mcore.features.mod import MoDLayer, mod_layer_class

    with pytest.raises(ValueError, match="MoD wraps TransformerLayer-based blocks"):
        mod_layer_class(torch.nn.Linear)
    with pytest.raises(ValueError, match="already MoD-wrapped"):
        mod_layer_class(MoDLayer)


def test_kernel_choice_is_made_when_the_layer_is_built(single_rank, monkeypatch):
    """``MoDConfig.kernels`` resolves once, when the layer is built: ``torch`` never takes the
    Triton kernels, ``auto`` takes them where they import and the hidden size fits, ``triton``
    requires them; CPU tensors take the torch formulation whatever the layer resolved to."""
    import sys
    import types

    from megacpp_mcore.features import mod as mod_package
    from megacpp_mcore.features.mod import gate
    from megacpp_mcore.features.mod.topk import TopkRouteIn

    monkeypatch.setattr(gate, "_triton_importable", lambda: "ModuleNotFoundError: no triton")
    assert _pair("A", MoDConfig(kernels="auto"))[1]._triton is False
    with pytest.raises(ImportError, match=r"kernels='triton' needs Triton \(pip install triton\)"):
        _pair("A", MoDConfig(kernels="triton"))
    fake = types.ModuleType("megacpp_mcore.features.mod.kernels")  # stands in for the Triton module
    fake.MAX_HIDDEN = 64
    monkeypatch.setattr(gate, "_triton_importable", lambda: None)
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(mod_package, "kernels", fake, raising=False)
    built = {k: _pair("A", MoDConfig(mode="topk", capacity=0.25, kernels=k))[1]
             for k in ("auto", "triton", "torch")}
    assert {k: (m._triton, m._topk.use_triton) for k, m in built.items()} == {
        "auto": (True, True), "triton": (True, True), "torch": (False, False)}
    fake.MAX_HIDDEN = 32  # hidden 64 no longer fits one row of the kernels
    assert _pair("A", MoDConfig(kernels="auto"))[1]._triton is False
    with pytest.raises(ValueError, match=r"hidden size 64 is wider than the kernels take \(32\)"):
        _pair("A", MoDConfig(kernels="triton"))
    calls = []
    original = TopkRouteIn.apply
    monkeypatch.setattr(TopkRouteIn, "apply", staticmethod(lambda *a: calls.append(a[-1]) or original(*a)))
    _call(built["triton"], _inputs(), _rope(16))
    assert calls == [False]  # use_triton: CPU tensors


# ------------------------------------------------------- aux-loss scale through Megatron's schedule
def _router_grad_after_schedule(chunk, num_microbatches: int) -> float:
    """The last layer's MoD router-bias gradient after Megatron's own
    ``forward_backward_no_pipelining`` over ``num_microbatches`` identical micro-batches whose LM
    loss is masked out (only the auxiliary losses have gradient)."""
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    from megacpp_mcore.train import runtime

    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.zeros(2, 32)}
    chunk.zero_grad()
    forward_backward_no_pipelining(forward_step_func=runtime.gpt_forward_step,
                                   data_iterator=iter([batch] * num_microbatches), model=chunk,
                                   num_microbatches=num_microbatches, seq_length=32, micro_batch_size=2)
    return chunk.decoder.layers[-1].mod_router.bias.grad.item()


@pytest.mark.parametrize("moe", [False, True])
def test_aux_loss_scale_comes_from_megatron_schedule(single_rank, monkeypatch, moe):
    """With the registry's ``aux-loss-scale-without-moe`` applied, Megatron's schedule scales MoD's
    sparsity-loss gradient by ``1 / num_microbatches`` on a dense model as it does (upstream) on an
    MoE one: 1 and 4 identical micro-batches give the hand-computed gradient of one. Without the
    patch a dense model's 4 micro-batches give 4 times that."""
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megacpp_mcore.patches import aux_loss_scale_without_moe as patch
    from megacpp_mcore.patches import registry
    from megacpp_mcore.patches._wrapping import upstream
    from megacpp_mcore.models.presets import MoEConfig
    from megacpp_mcore.train import runtime

    registry.apply_needed([patch.NAME])  # what every entry point does (runtime.initialize too)
    assert patch.applied()
    mod = MoDConfig(mode="gateskip", sparsity_loss_weight=0.5, budget_start=0.6, budget_end=0.6,
                    placement=FeaturePlacement(layers=(3,)))  # the last layer: its output only
    # with MoE, upstream sets the scale itself; its load-balancing loss does not reach the MoD gate
    moe_cfg = MoEConfig(num_experts=4, topk=2, ffn_hidden_size=64) if moe else None
    model = custom_model(**_BASE, moe=moe_cfg, features={"mod": mod})
    (chunk,) = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                   backend="local", wrap_ddp=False)
    assert (chunk.config.num_moe_experts is None) != moe
    _set_router(chunk.decoder.layers[-1], weight=torch.zeros(1, 64), bias=1.0)  # every gate sigmoid(1)
    g = 1.0 / (1.0 + math.exp(-1.0))
    expected = (g - 0.6) * g * (1 - g)  # d/db of 0.5 * (mean(sigmoid(b)) - 0.6)^2
    for n in (1, 4):
        assert _router_grad_after_schedule(chunk, n) == pytest.approx(expected, rel=1e-5), n
    if not moe:  # upstream's own forward_step leaves the scale unset on a dense model
        monkeypatch.setattr(schedules, "forward_step", upstream(schedules.forward_step, patch.NAME))
        monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", None)  # as never set
        assert _router_grad_after_schedule(chunk, 4) == pytest.approx(4 * expected, rel=1e-5)


def test_aux_loss_scale_patch_protocol(monkeypatch):
    """check() probes upstream's forward_step (``needed`` while it skips dense models, also after
    apply), apply() is idempotent, and an upstream that sets the scale reads ``fixed-upstream``."""
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megacpp_mcore.patches import aux_loss_scale_without_moe as patch
    from megacpp_mcore.patches._wrapping import upstream

    original = upstream(schedules.forward_step, patch.NAME)
    monkeypatch.setattr(schedules, "forward_step", original)
    assert patch.check() == "needed" and patch.applied() is False
    assert patch.apply() == [f"{schedules.__name__}.forward_step"]
    assert patch.apply() == [] and patch.applied() is True and patch.check() == "needed"
    assert MoEAuxLossAutoScaler.main_loss_backward_scale is None  # the probe leaves no state

    def fixed(*args, **kwargs):  # an upstream that also scales dense models' aux losses
        result = original(*args, **kwargs)
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / args[3])
        return result

    monkeypatch.setattr(schedules, "forward_step", fixed)
    assert patch.check() == "fixed-upstream"
    monkeypatch.delattr(schedules, "forward_step")
    assert patch.check() == "target-missing" and patch.apply() == []


# --------------------------------------------------------------------- hybrid model, hooks
def test_hybrid_gpt_model_reports_per_layer_stats(single_rank):
    """A GPTModel from the hybrid spec with threshold MoD on layers 1 and 2: each wrapped layer's
    statistics and router gradient equal a plain-torch reference computed from the layer's own
    input ``x`` and output gradient ``dy`` (captured by hooks) and its block output ``f(x)``:
    ``g = sigmoid(x w + b)``, processed where ``g >= 0.5``, and
    ``d router = sum_i g_i (1 - g_i) <dy_i, f(x)_i> [x_i, 1]`` over the processed tokens (the
    sparsity loss is inactive at budget 1)."""
    from megatron.core.models.gpt import GPTModel

    from megacpp_mcore.train import runtime
    from megacpp_mcore.spec.block import hybrid_block_spec
    from megacpp_mcore.features.mod import MoDLayer

    mod = MoDConfig(mode="threshold", placement=FeaturePlacement(layers=(1, 2)))
    model = custom_model(**_BASE, moe=None, features={"mod": mod})
    cfg = runtime.transformer_config(model, runtime.Parallelism())
    gpt = GPTModel(config=cfg, transformer_layer_spec=hybrid_block_spec(
        "AE", backend="local", num_layers=4, mod=mod), vocab_size=128, max_sequence_length=32,
        position_embedding_type="rope")
    wrapped = {n: m for n, m in gpt.named_modules() if hasattr(m, "megacpp_stats")}
    assert sorted(wrapped) == ["decoder.layers.1", "decoder.layers.2"]
    assert all(isinstance(m, MoDLayer) for m in wrapped.values())
    seen, handles = {}, []

    def keep_input(name, module, args, kwargs):
        seen[name] = dict(kwargs)

    def keep_output_grad(name, module, args, kwargs, output):
        output[0].register_hook(lambda grad: seen.__setitem__(name + ":dy", grad))

    for i, (name, m) in enumerate(wrapped.items()):
        _set_router(m, std=0.5, bias=0.0, seed=i)  # gates around 0.5: some tokens skip
        m.megacpp_set_step(0)
        handles += [m.register_forward_pre_hook(functools.partial(keep_input, name), with_kwargs=True),
                    m.register_forward_hook(functools.partial(keep_output_grad, name), with_kwargs=True)]
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = gpt(tokens, torch.arange(32).expand(2, 32), None, labels=tokens)
    assert loss.shape == (2, 32)
    loss.mean().backward()
    for h in handles:
        h.remove()
    for name, m in wrapped.items():
        stats = m.megacpp_stats()
        kwargs, dy = seen[name], seen[name + ":dy"]
        x = kwargs["hidden_states"].detach()  # [s, b, h]
        w, b = m.router_weight().detach(), m.mod_router.bias.detach()  # the effective weight
        gate = torch.sigmoid(x @ w.T + b)  # [s, b, 1]
        keep = gate >= 0.5
        assert 0 < int(keep.sum()) < keep.numel()
        assert stats == pytest.approx({"gate_mean": gate.mean().item(), "budget": 1.0,
                                       "fraction_processed": keep.float().mean().item(),
                                       "loss_sparsity": 0.0}, abs=1e-6)
        m.force_gate(1.0)  # the same routes with gate 1: x + f(x) where processed
        with torch.no_grad():
            f = m(**kwargs)[0] - x
        m.force_gate(None)
        dlogit = keep * (dy * f).sum(-1, keepdim=True) * gate * (1 - gate)  # [s, b, 1]
        # the parameter's gradient carries the router's scale (MoDConfig.router_scale; 1 here)
        torch.testing.assert_close(m.mod_router.weight.grad, m.router_scale * (dlogit * x).sum((0, 1))[None],
                                   rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(m.mod_router.bias.grad, dlogit.sum().reshape(1), rtol=1e-4, atol=1e-8)
        assert m.mod_router.bias.grad.abs().item() > 1e-6  # the LM loss trains the router


def test_mod_on_some_layers_of_one_symbol_checkpoints(single_rank, tmp_path):
    """Pattern 'A' with MoD on layer 0 only: layers differ in parameters, so Megatron must not
    stack them into one checkpoint tensor (hybrid sets hetereogenous_dist_checkpoint)."""
    from megacpp_mcore.train import runtime
    from megacpp_mcore.testing.parity import load_model, save_model

    mod = MoDConfig(placement=FeaturePlacement(layers=(0,)))
    model = custom_model(**dict(_BASE, pattern="A", num_layers=2), moe=None, features={"mod": mod})
    chunks = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                 backend="local")
    save_model(chunks, str(tmp_path))
    router = chunks[0].module.decoder.layers[0].mod_router
    with torch.no_grad():
        router.bias.fill_(7.0)
    load_model(chunks, str(tmp_path))
    assert router.bias.item() == mod.router_bias_init


# ------------------------------------------------------------------------- TP / SP / PP parity
@pytest.mark.distributed
def test_parallel_parity_tp_sp_and_pp(tmp_path):
    """One 1-rank launch (four MoD models, initial weights saved) and one 2-rank launch (TP=2+SP
    for all four, PP=2 for topk, topk on MLA and gateskip+MoE): losses and grad norms match."""
    from megacpp_mcore.testing.dist import run_distributed

    models = ["tests.test_mod:parity_topk", "tests.test_mod:parity_gateskip_moe",
              "tests.test_mod:parity_threshold", "tests.test_mod:parity_topk_mla"]
    ckpts = []
    for i in range(len(models)):
        (tmp_path / str(i)).mkdir()
        ckpts.append(str(tmp_path / str(i)))
    (refs,) = run_distributed("tests.test_mod:run_all", nproc=1, kwargs={"runs": [
        dict(model=m, steps=3, checkpoint=c, checkpoint_mode="save") for m, c in zip(models, ckpts)]})
    layouts = [(i, {"tp": 2, "sp": True}) for i in range(4)] + [(0, {"pp": 2}), (1, {"pp": 2}), (3, {"pp": 2})]
    ranks = run_distributed("tests.test_mod:run_all", nproc=2, kwargs={"runs": [
        dict(model=models[i], parallel=par, steps=3, checkpoint=ckpts[i], checkpoint_mode="load")
        for i, par in layouts]})
    for j, (i, par) in enumerate(layouts):
        for rank in ranks:
            got = rank[j]
            assert got["losses"] == pytest.approx(refs[i]["losses"], abs=1e-5), (models[i], par)
            assert got["grad_norms"] == pytest.approx(refs[i]["grad_norms"], rel=1e-5), (models[i], par)
    assert refs[0]["losses"][2] < refs[0]["losses"][0]  # it trains


# ------------------------------------------------------------------------------------- GPU
_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with TE")


def _te_layer(mode: str, apply_rope_fusion: bool = False, **mod_kwargs):
    from megatron.core.transformer.spec_utils import build_module

    from megacpp_mcore.layers.attention import attention_layer_spec
    from megacpp_mcore.spec.backends import get_backend
    from megacpp_mcore.spec.context import LayerContext
    from megacpp_mcore.features.mod import mod_layer_spec

    cfg = _config(apply_rope_fusion=apply_rope_fusion)
    mod = MoDConfig(mode=mode, **mod_kwargs)
    ctx = LayerContext(config=cfg, backend=get_backend("te"), index=0, symbol="A",
                       features=frozenset({"mod"}), feature_configs={"mod": mod})
    return build_module(mod_layer_spec(attention_layer_spec(ctx), ctx), config=cfg,
                        layer_number=1).cuda()


@pytest.mark.gpu
@_NO_CUDA
def test_gateskip_forward_captures_in_cuda_graph(single_rank):
    from megatron.core import tensor_parallel

    # CUDA graphs need Megatron's graph-safe RNG tracker (TE's attention forks it even at p=0).
    tensor_parallel.model_parallel_cuda_manual_seed(1234, use_cudagraphable_rng=True,
                                                    force_reset_rng=True)
    layer = _te_layer("gateskip").eval()
    rope = _rope(16).cuda()
    static_x = _inputs().cuda().to(layer.mod_router.weight.dtype)
    from megacpp_mcore.testing.cudagraph import capture

    with torch.no_grad():
        graph, static_out = capture(lambda: _call(layer, static_x, rope))
        static_x.copy_(_inputs(seed=7).cuda())
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, _call(layer, static_x, rope), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@_NO_CUDA
def test_te_topk_unselected_exact_and_backward(single_rank):
    layer = _te_layer("topk", capacity=0.25)
    x = _inputs().cuda().to(layer.mod_router.weight.dtype).requires_grad_()
    out = _call(layer, x, _rope(16).cuda())
    unchanged = (out.detach() == x.detach()).all(-1)  # [s, b]
    assert unchanged.sum(0).tolist() == [12, 12]  # 16 - k tokens per sequence pass through exactly
    out.float().sum().backward()
    assert layer.mod_router.weight.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.gpu
@_NO_CUDA
def test_te_topk_fused_rope_matches_unfused(single_rank):
    """A top-k layer with TE's fused RoPE (applied to the gathered tokens as a flat [k*b] sequence)
    == the same layer with Megatron's unfused RoPE on the [k, b, 1, d] embeddings: outputs and
    gradients."""
    layers = [_te_layer("topk", apply_rope_fusion=fused, capacity=0.25) for fused in (False, True)]
    layers[1].load_state_dict(layers[0].state_dict())
    results = []
    for layer in layers:
        _set_router(layer, std=0.5)
        x = _inputs().cuda().to(layer.mod_router.weight.dtype).requires_grad_()
        out = _call(layer, x, _rope(16).cuda())
        out.float().square().sum().backward()
        results.append((out.detach().float(), x.grad.float(), layer.mod_router.weight.grad.float()))
    for name, a, b in zip(("out", "dx", "drouter"), *results):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=name)


def test_per_token_gathers_refuse_inputs_they_cannot_follow():
    """MoD top-k and FlexiDepth's hard skip gather tokens: positional inputs and per-sequence
    inputs (an explicit mask, packed sequences, an inference cache, ...) are refused by name."""
    from megacpp_mcore.features.mod.rope import UNGATHERABLE_INPUTS, check_gatherable

    check_gatherable((), {"rotary_pos_emb": object(), "attention_mask": None}, "MoD topk", 3)
    with pytest.raises(TypeError, match="MoD topk layers take the layer inputs as keywords"):
        check_gatherable((object(),), {}, "MoD topk", 3)
    for name in UNGATHERABLE_INPUTS:
        with pytest.raises(ValueError, match=f"FlexiDepth hard skip on layer 5 cannot gather '{name}'"):
            check_gatherable((), {name: object()}, "FlexiDepth hard skip", 5)
