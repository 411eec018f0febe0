"""FlexiDepth: config validation, placement, exactness against the backbone and plain-torch
references, hard-skip inference, frozen backbone under Megatron's optimizer, usage statistics and
penalty (by hand and through Megatron's schedule), TP/SP/PP parity."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from megacpp_mcore.features.flexidepth import FlexiDepthConfig, usage_summary
from megacpp_mcore.models.presets import custom_model
from megacpp_mcore.spec.pattern import FeaturePlacement, PatternError, compile_layers
from megacpp_mcore.testing import aux_loss_scale

_BASE = dict(pattern="AE", num_layers=4, hidden_size=64, num_attention_heads=4,
             ffn_hidden_size=128, vocab_size=128, seq_length=32, mla=None)


# ----------------------------------------------------------------------------- parity factories
def parity_soft():
    """Every layer FlexiDepth with varied router scores and an active usage penalty; the usage
    sum restarts at layer 2 (the PP=2 chunk start). Hard inference gathers on A and E layers."""
    fd = FlexiDepthConfig(router_bias_init=0.0, router_init_std=0.3, usage_loss_weight=0.05,
                          usage_boundaries=(2,), inference="hard", hard_skip_symbols="AE")
    return custom_model(**_BASE, moe=None, features={"flexidepth": fd})


def parity_mla():
    """:func:`parity_soft` with MLA on the A layers: hard inference hands MLA the kept tokens' own
    positions (TokenPositions), under TP=2+SP on the sequence gathered from its shards."""
    from megacpp_mcore.models.presets import MLAConfig

    mla = MLAConfig(q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16)
    return parity_soft().replace(mla=mla)


def parity_frozen_moe():
    """Frozen backbone on the MoE E layers (the router and adapters train), usage penalty on."""
    from megacpp_mcore.models.presets import MoEConfig

    fd = FlexiDepthConfig(placement=FeaturePlacement(symbols="E"), router_bias_init=0.5,
                          router_init_std=0.3, usage_loss_weight=0.05, usage_boundaries=(2,),
                          freeze_backbone=True, inference="hard")
    moe = MoEConfig(num_experts=4, topk=2, ffn_hidden_size=64, shared_expert_size=64)
    return custom_model(**_BASE, moe=moe, features={"flexidepth": fd})


def parity_moe_route():
    """:func:`parity_frozen_moe` with hard inference masking the skipped tokens' MoE routing
    (``hard_skip_moe="route"``): under TP=2+SP the router sees this rank's shard of the tokens."""
    import dataclasses

    model = parity_frozen_moe()
    fd = dataclasses.replace(model.features["flexidepth"], hard_skip_moe="route")
    return model.replace(features={**model.features, "flexidepth": fd})


def parity_capacity():
    """:func:`parity_soft` with a hard-skip capacity (a fixed gathered length, no host read) that
    the router's kept tokens overflow: the same tokens fit on one rank and under TP=2+SP."""
    import dataclasses

    model = parity_soft()
    fd = dataclasses.replace(model.features["flexidepth"], hard_skip_capacity=0.3)
    return model.replace(features={**model.features, "flexidepth": fd})


def train_and_eval(*, model: str, parallel=None, steps: int = 3, checkpoint: str, checkpoint_mode: str,
                   seed: int = 1234, global_batch: int = 4, micro_batch_size: int = 1):
    """``steps`` training steps (soft), then one hard-inference forward on the next batch;
    per-step losses and grad norms, the eval loss and the layers skipped per token in that
    forward (summed over layers and pipeline stages)."""
    from megatron.core import parallel_state

    from megacpp_mcore.testing.parity import setup_run, synthetic_batches
    from megacpp_mcore.train import runtime
    from megacpp_mcore.train.stats import StatsCollector

    _, model_cfg, dp, chunks, optimizer = setup_run(
        model=model, parallel=parallel, seed=seed, backend="local", checkpoint=checkpoint,
        checkpoint_mode=checkpoint_mode, lr=1e-2)
    dp_rank = parallel_state.get_data_parallel_rank()

    def step(i: int, forward_only: bool = False) -> dict:
        micro = synthetic_batches(seed=seed, step=i, global_batch=global_batch,
                                  seq_length=model_cfg.seq_length, vocab=model_cfg.vocab_size,
                                  dp_rank=dp_rank, dp=dp, micro_batch_size=micro_batch_size)
        return runtime.train_step(chunks, optimizer, micro, num_microbatches=len(micro),
                                  micro_batch_size=micro_batch_size, seq_length=model_cfg.seq_length,
                                  forward_only=forward_only)

    results = [step(i) for i in range(steps)]
    for chunk in chunks:
        chunk.eval()
    stats = StatsCollector(chunks)
    stats.set_step(steps)
    eval_loss = step(steps, forward_only=True)["loss"]
    # per-layer names are local to a pipeline stage: sum this stage's layers, then the stages'
    skipped = torch.tensor([usage_summary(stats.collect())["layers_skipped"]], dtype=torch.float64)
    torch.distributed.all_reduce(skipped, group=parallel_state.get_pipeline_model_parallel_group())
    parallel_state.destroy_model_parallel()
    return {"losses": [r["loss"] for r in results], "grad_norms": [r["grad_norm"] for r in results],
            "eval_loss": eval_loss, "eval_layers_skipped": skipped.item()}


def run_all(runs: list[dict]) -> list[dict]:
    """Several runs in one torchrun launch (the world stays up; only Megatron's state is rebuilt)."""
    from megacpp_mcore.train import runtime

    results = [train_and_eval(**kwargs) for kwargs in runs]
    runtime.shutdown()
    return results


# ------------------------------------------------------------------------------- layer helpers
def _config(*, moe: bool = False, **overrides):
    from megacpp_mcore.models.presets import MoEConfig
    from megacpp_mcore.train import runtime

    moe_cfg = MoEConfig(num_experts=4, topk=2, ffn_hidden_size=64) if moe else None
    model = custom_model(**dict(_BASE, seq_length=16), moe=moe_cfg)
    return runtime.transformer_config(model, runtime.Parallelism(), **overrides)


def _ctx(cfg, symbol, fd, *, index=0, features=("flexidepth",), chunk=None):
    from megacpp_mcore.features.moda import MoDAConfig
    from megacpp_mcore.features.mod import MoDConfig
    from megacpp_mcore.spec.backends import get_backend
    from megacpp_mcore.spec.context import ChunkBuild, LayerContext

    configs = {"flexidepth": fd, "moda": MoDAConfig(placement=FeaturePlacement(symbols="A")),
               "mod": MoDConfig()}
    return LayerContext(config=cfg, backend=get_backend("local"), index=index, symbol=symbol,
                        features=frozenset(features), feature_configs=configs,
                        chunk=chunk if chunk is not None else ChunkBuild())


def _plain_spec(ctx):
    from megacpp_mcore.layers.attention import attention_layer_spec
    from megacpp_mcore.layers.feedforward import feedforward_layer_spec

    return attention_layer_spec(ctx) if ctx.symbol == "A" else feedforward_layer_spec(ctx)


def _pair(symbol: str, fd: FlexiDepthConfig, *, moe: bool = False, features=("flexidepth",), **config):
    """(unwrapped layer, FlexiDepth layer) with identical block weights; random adapter weights
    (drawn on the CPU: the same on every host). ``config``: TransformerConfig overrides."""
    from megatron.core.transformer.spec_utils import build_module

    from megacpp_mcore.features.flexidepth import transform

    cfg = _config(moe=moe, **config)
    ctx = _ctx(cfg, symbol, fd, features=features)
    spec = _plain_spec(ctx)
    plain = build_module(spec, config=cfg, layer_number=1)
    wrapped = build_module(transform(spec, ctx), config=cfg, layer_number=1)
    missing, unexpected = wrapped.load_state_dict(plain.state_dict(), strict=False)
    assert {k.split(".")[0] for k in missing} == {"flexidepth"} and not unexpected
    if fd.adapter != "none":
        with torch.no_grad():
            up = wrapped.flexidepth.up.weight
            up.copy_(torch.empty(up.shape).normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3)))
    return plain, wrapped


def _rope(seq: int, dim: int = 16) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(seq).float(), inv)
    return torch.cat([freqs, freqs], -1)[:, None, None, :]  # [s, 1, 1, d]


def _call(layer, x, rope=None):
    out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)
    return out


def _set_router(layer, *, std: float = 0.0, bias: float = 0.0, seed: int = 0):
    with torch.no_grad():
        weight = torch.randn(1, 64, generator=torch.Generator().manual_seed(seed)) * std
        layer.flexidepth.router.weight.copy_(weight)
        layer.flexidepth.router.bias.fill_(bias)


def _inputs(seq: int = 16, batch: int = 2, seed: int = 1):
    return torch.randn(seq, batch, 64, generator=torch.Generator().manual_seed(seed))


def _branch_reference(layer, x):
    """Plain torch: (score g [s, b, 1], skip path P(x) [s, b, h]) from the layer's weights."""
    br = layer.flexidepth
    z = F.rms_norm(x, (64,), br.norm.weight.detach(), 1e-5)
    g = torch.sigmoid(z @ br.router.weight.detach().T + br.router.bias.detach())
    if br.kind == "none":
        return g, x
    inner = z @ br.down.weight.detach().T
    inner = F.gelu(inner) if br.kind == "mlp" else inner
    return g, x + inner @ br.up.weight.detach().T


# ------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, message", [
    (dict(adapter="lora"), "adapter='lora' is unknown; allowed: mlp, linear, none"),
    (dict(adapter_rank=0), "adapter_rank=0 is invalid; allowed: an int >= 1"),
    (dict(threshold=1.0), "threshold=1.0 is out of range; allowed: 0 < threshold < 1"),
    (dict(threshold="0.5"), "threshold must be a number, got '0.5'"),
    (dict(usage_loss_weight=-1.0), "usage_loss_weight=-1.0 is out of range; allowed: >= 0"),
    (dict(training="hard"), "training='hard' is unknown; allowed: soft"),
    (dict(inference="causal"), "inference='causal' is unknown; allowed: soft, hard"),
    (dict(forced_route="half"), "forced_route='half' is unknown; allowed: full, skip, None"),
    (dict(usage_boundaries=(2, -1)), r"usage_boundaries=\(2, -1\) is invalid"),
    (dict(hard_skip_symbols="X"), "hard_skip_symbols='X' is invalid; allowed: a string of the symbols"),
    (dict(allow_on="A"), "allow_on='A': FlexiDepth can only be opted in on M, R"),
    (dict(freeze_backbone=1), "freeze_backbone=1 must be a bool"),
    (dict(placement="AE"), "placement must be a FeaturePlacement"),
    (dict(hard_skip_capacity=0.0), r"hard_skip_capacity=0.0 is invalid; allowed: None .* or a fraction 0 < c <= 1"),
    (dict(hard_skip_capacity=1.5), "hard_skip_capacity=1.5 is invalid"),
    (dict(hard_skip_capacity="half"), "hard_skip_capacity='half' is invalid"),
])
def test_invalid_config_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlexiDepthConfig(**kwargs)


def test_options_string_makes_the_config():
    """``megacpp-mcore train --flexidepth OPTIONS``: key=value items, placement keys, ':' lists."""
    fd = FlexiDepthConfig.from_options("layers=1:3, usage_loss_weight=1e-3,inference=hard,adapter_rank=8")
    assert fd == FlexiDepthConfig(placement=FeaturePlacement(layers=(1, 3)), usage_loss_weight=1e-3,
                                  inference="hard", adapter_rank=8)
    assert FlexiDepthConfig.from_options("") == FlexiDepthConfig()
    assert FlexiDepthConfig.from_options("skip_first=2,usage_boundaries=4:2").placement == FeaturePlacement(
        symbols="AE", skip_first=2)
    assert FlexiDepthConfig.from_options("usage_boundaries=4:2").usage_boundaries == (2, 4)
    assert FlexiDepthConfig.from_options("inference=hard,hard_skip_capacity=0.6").hard_skip_capacity == 0.6


@pytest.mark.parametrize("text, message", [
    ("rank=4", "option 'rank=4' is not key=value with a known key; allowed keys: symbols, layers"),
    ("threshold", "option 'threshold' is not key=value"),
    ("adapter_rank=x", "option adapter_rank='x' is not an int"),
    ("threshold=high", "option threshold='high' is not a number"),
    ("layers=1:a", "option layers='1:a' is not ':'-separated ints"),
    ("adapter=mlp,adapter=linear", "option 'adapter' is given twice"),
    ("forced_route=full", "option 'forced_route=full' is not key=value with a known key"),
    ("threshold=1.5", "threshold=1.5 is out of range"),
])
def test_bad_options_string_refused(text, message):
    with pytest.raises(ValueError, match=message):
        FlexiDepthConfig.from_options(text)


def test_placement_guard_and_refused_combinations(single_rank):
    from megacpp_mcore.spec.block import hybrid_block_spec

    with pytest.raises(PatternError, match="flexidepth cannot attach to symbol class 'M'.*allow_on='M'"):
        compile_layers("AEMR", 4, {"flexidepth": FlexiDepthConfig(placement=FeaturePlacement(symbols="M")).placement})
    with pytest.raises(PatternError, match="flexidepth cannot attach to layer 3 is 'R'"):
        compile_layers("AEMR", 4, {"flexidepth": FeaturePlacement(layers=(3,))})
    with pytest.raises(PatternError, match="layer 7 is beyond the depth; the model has 4 layers"):
        hybrid_block_spec("AE", num_layers=4, flexidepth=FlexiDepthConfig(placement=FeaturePlacement(layers=(7,))))
    opted = FlexiDepthConfig(placement=FeaturePlacement(symbols="ER"), allow_on="R")
    assert [sorted(e.features) for e in compile_layers("AEMR", 4, {"flexidepth": opted.placement})] == [
        [], ["flexidepth"], [], ["flexidepth"]]
    with pytest.raises(ValueError, match=r"layer 0 \('A'\) carries both MoD and FlexiDepth"):
        _pair("A", FlexiDepthConfig(), features=("flexidepth", "mod"))
    with pytest.raises(ValueError, match="carries MoDA and FlexiDepth hard skip.*drop 'A' from hard_skip"):
        _pair("A", FlexiDepthConfig(inference="hard", hard_skip_symbols="AE"), features=("flexidepth", "moda"))
    with pytest.raises(ValueError, match="full activation recomputation"):
        from megatron.core.transformer.spec_utils import build_module

        from megacpp_mcore.features.flexidepth import transform

        cfg = _config(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        ctx = _ctx(cfg, "E", FlexiDepthConfig())
        build_module(transform(_plain_spec(ctx), ctx), config=cfg, layer_number=1)


@pytest.mark.parametrize("modules, refused", [(["attn", "mamba"], True), ([], True), (["mamba"], False)],
                         ids=["attn+mamba", "whole-layers", "mamba-only"])
def test_cuda_graphs_that_capture_a_flexidepth_layer_are_refused(single_rank, modules, refused):
    """Megatron's per-layer CUDA graphs run a captured layer without its Python forward, so the
    router and the adapter would be skipped and the block would train alone, silently: a config
    whose graphs capture attention or MoE layers is refused when the FlexiDepth layer is built,
    naming the setting and what is allowed; Mamba-only graphs pass."""
    from megatron.core.transformer.spec_utils import build_module

    from megacpp_mcore.features.flexidepth import transform
    from megacpp_mcore.spec import compat

    cfg = _config()
    cfg.cuda_graph_impl = "transformer_engine"  # set after validation: TE is not on this host
    setattr(cfg, compat.cuda_graph_modules_field(cfg), modules)
    ctx = _ctx(cfg, "A", FlexiDepthConfig())
    spec = transform(_plain_spec(ctx), ctx)
    if refused:
        with pytest.raises(ValueError, match=r"FlexiDepth on layer 1: CUDA graphs \(cuda_graph_impl="
                                             r"'transformer_engine'.*capture only \['mamba'\]"):
            build_module(spec, config=cfg, layer_number=1)
    else:
        build_module(spec, config=cfg, layer_number=1)


def test_only_transformer_layers_are_wrapped():
    from megacpp_mcore.features.flexidepth import FlexiDepthLayer, flexidepth_layer_class

    with pytest.raises(ValueError, match="FlexiDepth wraps TransformerLayer-based blocks"):
        flexidepth_layer_class(torch.nn.Linear)
    with pytest.raises(ValueError, match="already FlexiDepth-wrapped"):
        flexidepth_layer_class(FlexiDepthLayer)


def test_spec_places_exactly_on_intended_layers(single_rank):
    from megacpp_mcore.features.flexidepth import FlexiDepthLayer
    from megacpp_mcore.train import runtime

    for fd, expected in [(FlexiDepthConfig(placement=FeaturePlacement(layers=(1, 4, 5))), [1, 4, 5]),
                         (FlexiDepthConfig(placement=FeaturePlacement(symbols="E")), [1, 3, 5, 7])]:
        model = custom_model(**dict(_BASE, pattern="AEME", num_layers=8), moe=None,
                             features={"flexidepth": fd})
        (gpt,) = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                     backend="local", wrap_ddp=False)
        carried = [i for i, layer in enumerate(gpt.decoder.layers) if isinstance(layer, FlexiDepthLayer)]
        assert carried == expected
        assert [e.index for e in model.layer_table() if "flexidepth" in e.features] == expected


# ------------------------------------------------------------------------- exactness, refs
@pytest.mark.parametrize("symbol, moe", [("A", False), ("E", True)])
@pytest.mark.parametrize("inference", ["soft", "hard"])
def test_forced_full_is_the_backbone_bit_for_bit(single_rank, symbol, moe, inference):
    plain, wrapped = _pair(symbol, FlexiDepthConfig(forced_route="full", inference=inference,
                                                    hard_skip_symbols="AE"), moe=moe)
    x, rope = _inputs(), _rope(16)
    assert torch.equal(_call(wrapped, x, rope), _call(plain, x, rope))  # training
    wrapped.eval(), plain.eval()
    assert torch.equal(_call(wrapped, x, rope), _call(plain, x, rope))
    assert wrapped.megacpp_stats()["skip_rate"] == 0.0


@pytest.mark.parametrize("adapter", ["mlp", "linear", "none"])
def test_forced_skip_is_the_adapter_path(single_rank, adapter):
    fd = FlexiDepthConfig(adapter=adapter, adapter_rank=8)
    plain, wrapped = _pair("E", fd)
    added = sum(p.numel() for p in wrapped.parameters()) - sum(p.numel() for p in plain.parameters())
    assert added == fd.added_params(64) == 64 + 65 + (0 if adapter == "none" else 2 * 64 * 8)
    assert FlexiDepthConfig().rank(64) == 4 and FlexiDepthConfig().added_params(64, "LayerNorm") == 705
    wrapped.force_route("skip")
    x = _inputs()
    out = _call(wrapped, x)
    _, skip = _branch_reference(wrapped, x)
    if adapter == "none":
        assert torch.equal(out, x)
    else:
        torch.testing.assert_close(out, skip, atol=1e-6, rtol=1e-6)
        assert not torch.allclose(out, x)
    assert wrapped.megacpp_stats()["skip_rate"] == 1.0


def test_moe_aux_loss_flows_when_every_token_skips(single_rank):
    """Forced skip in training: the block still runs (static shapes) and its output stays in the
    graph with weight 0, so the MoE load-balancing loss keeps training the MoE router."""
    _, wrapped = _pair("E", FlexiDepthConfig(forced_route="skip"), moe=True)
    x = _inputs().requires_grad_()
    out = _call(wrapped, x)
    torch.testing.assert_close(out, _branch_reference(wrapped, x.detach())[1], atol=1e-6, rtol=1e-6)
    out.sum().backward()
    assert wrapped.mlp.router.weight.grad.abs().sum() > 0


def test_soft_mode_matches_plain_torch_reference_and_its_router_gradient(single_rank):
    plain, wrapped = _pair("A", FlexiDepthConfig(usage_loss_weight=0.0))
    _set_router(wrapped, std=0.5, bias=0.2)
    x, rope = _inputs(), _rope(16)
    dy = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(9))
    out = _call(wrapped, x, rope)
    (out * dy).sum().backward()
    full = _call(plain, x, rope).detach()
    router = wrapped.flexidepth.router
    w = router.weight.detach().clone().requires_grad_()
    b = router.bias.detach().clone().requires_grad_()
    z = F.rms_norm(x, (64,), wrapped.flexidepth.norm.weight.detach(), 1e-5)
    g = torch.sigmoid(z @ w.T + b)
    _, skip = _branch_reference(wrapped, x)
    expected = g * full + (1 - g) * skip
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)
    (expected * dy).sum().backward()
    torch.testing.assert_close(router.weight.grad, w.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(router.bias.grad, b.grad, atol=1e-5, rtol=1e-4)
    assert wrapped.flexidepth.down.weight.grad.abs().sum() > 0  # the adapter trains


def _hard_e_layer():
    """(unwrapped, hard FlexiDepth E layer in eval with a varied router, input, the list of the
    shapes its MLP is called with)."""
    plain, wrapped = _pair("E", FlexiDepthConfig(inference="hard"))
    _set_router(wrapped, std=0.5)
    wrapped.eval()
    x = _inputs()
    shapes = []
    wrapped.mlp.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    return plain, wrapped, x, shapes


def test_hard_skip_runs_the_block_on_kept_tokens_only(single_rank):
    """E layer: the MLP sees [k, b, h] with k the larger per-sequence kept count; the output equals
    the soft formula with hard gates (B(x) where kept, P(x) elsewhere)."""
    plain, wrapped, x, shapes = _hard_e_layer()
    with torch.no_grad():
        out = _call(wrapped, x)
        g, skip = _branch_reference(wrapped, x)
        keep = g >= 0.5
        expected = torch.where(keep, _call(plain, x), skip)
    counts = keep.squeeze(-1).sum(0)
    assert 0 < int(counts.max()) < 16 and shapes == [(int(counts.max()), 2, 64)]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # the skipped rows are the branch's own skip path, bit for bit
        own = wrapped.flexidepth.skip_path(x, wrapped.flexidepth.project(x)[1])
    assert torch.equal(out[~keep.squeeze(-1)], own[~keep.squeeze(-1)])
    stats = wrapped.megacpp_stats()
    assert stats["skip_rate"] == pytest.approx(1 - keep.float().mean().item())
    assert stats["score_mean"] == pytest.approx(g.mean().item(), rel=1e-6)
    _set_router(wrapped, bias=-10.0)  # every token skips: the block does not run at all
    with torch.no_grad():
        out = _call(wrapped, x)
        assert torch.equal(out, wrapped.flexidepth.skip_path(x, wrapped.flexidepth.project(x)[1]))
        torch.testing.assert_close(out, _branch_reference(wrapped, x)[1], atol=1e-6, rtol=1e-6)
    assert len(shapes) == 1


def test_kept_ranks_is_the_cumulative_kept_count_along_each_sequence():
    """The capacity's effective mask ranks kept positions with a scan along contiguous memory:
    the cumulative count of ``mask.cumsum(0)`` for ``[s, b]`` masks of any density (none kept,
    all kept, one sequence)."""
    from megacpp_mcore.features.flexidepth.dispatch import kept_ranks

    g = torch.Generator().manual_seed(0)
    for s, b, p in ((4096, 8, 0.4), (7, 3, 0.0), (7, 3, 1.0), (33, 1, 0.5)):
        mask = torch.rand(s, b, generator=g) < p
        ranks = kept_ranks(mask)
        assert ranks.shape == (s, b) and ranks.dtype == torch.int32
        assert torch.equal(ranks.long(), mask.cumsum(0))


def test_kept_first_orders_like_a_stable_sort_on_the_skipped_flag():
    """The route's order (kept positions first, then the others, each in sequence order) equals
    ``torch.sort(~mask, stable=True)`` along each sequence, for the exact mask and for a
    capacity's effective mask with its clamped ranks (any density, one sequence, one position)."""
    from megacpp_mcore.features.flexidepth.dispatch import kept_first, kept_ranks

    g = torch.Generator().manual_seed(0)
    for s, b, p in ((4096, 8, 0.4), (7, 3, 0.0), (7, 3, 1.0), (33, 1, 0.5), (1, 2, 0.5)):
        mask = torch.rand(s, b, generator=g) < p
        for longest in (None, 1, s // 2, s):
            ranks = kept_ranks(mask)
            kept = mask if longest is None else mask & (ranks <= longest)
            ranks = ranks if longest is None else ranks.clamp(max=longest)
            want = torch.sort((~kept).to(torch.int32), dim=0, stable=True).indices
            assert torch.equal(kept_first(kept, ranks), want), (s, b, p, longest)


def test_hard_skip_capacity_runs_a_fixed_length_without_a_host_read(single_rank):
    """``hard_skip_capacity``: the block's input has ``ceil(c * s)`` positions whatever the router
    keeps and the forward reads nothing on the host; each sequence's first kept tokens up to the
    capacity take the block, its later kept ones the skip path (counted as skipped); a capacity
    of 1 gives the exact output. Set on a layer that does not gather: refused."""
    plain, wrapped, x, shapes = _hard_e_layer()
    with torch.no_grad():
        exact = _call(wrapped, x)
        g, skip = _branch_reference(wrapped, x)
        full = _call(plain, x)
    keep = (g >= 0.5).squeeze(-1)  # [s, b]
    k = int(keep.sum(0).min()) - 1  # below every sequence's kept count: each loses its last ones
    assert k >= 1 and wrapped.hard_skip_capacity is None
    for capacity, length in ((1.0, 16), ((k - 0.5) / 16, k)):
        wrapped.set_hard_skip_capacity(capacity)
        wrapped.megacpp_set_step(0)
        shapes.clear()
        with torch.no_grad(), _HostSyncs() as syncs:
            out = _call(wrapped, x)
        fits = keep & (keep.cumsum(0) <= length)
        assert shapes == [(length, 2, 64)] and syncs.seen == []
        torch.testing.assert_close(out, torch.where(fits[..., None], full, skip), atol=1e-6, rtol=1e-6)
        assert wrapped.megacpp_stats()["skip_rate"] == pytest.approx(1 - fits.float().mean().item())
        if capacity == 1.0:
            assert torch.equal(out, exact)
        else:
            assert not fits.equal(keep)  # the capacity did cut
    with pytest.raises(ValueError, match="hard_skip_capacity=1.2 is invalid"):
        wrapped.set_hard_skip_capacity(1.2)
    _, selecting = _pair("E", FlexiDepthConfig(inference="hard", hard_skip_symbols="A"))
    with pytest.raises(ValueError, match="applies to a layer whose hard skip gathers"):
        selecting.set_hard_skip_capacity(0.5)


def test_hard_skip_route_mode_sends_the_skipped_tokens_to_no_expert(single_rank):
    """``hard_skip_moe="route"`` on a MoE ``E`` layer: no gathering; the output equals the
    unwrapped layer's where kept and the skip path elsewhere (the gathering mode's output); the
    experts receive top-k rows per kept token only; training and soft inference route as before."""
    plain, wrapped = _pair("E", FlexiDepthConfig(inference="hard", hard_skip_moe="route"), moe=True)
    _, gathering = _pair("E", FlexiDepthConfig(inference="hard"), moe=True)
    assert wrapped.routes_kept and not wrapped.gathers and gathering.gathers and not gathering.routes_kept
    gathering.load_state_dict(wrapped.state_dict())
    for layer in (wrapped, gathering):
        _set_router(layer, std=0.5)
    rows = []
    wrapped.mlp.experts.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    x = _inputs()
    with torch.no_grad():
        wrapped.eval()
        gathering.eval()
        _, keep, skip = wrapped.route(x, bookkeeping=False)
        want = torch.where(keep, _call(plain, x), skip)
        got = _call(wrapped, x)
        kept = int(keep.sum())
        assert 0 < kept < keep.numel()
        assert rows == [2 * kept]  # top-2 of the kept tokens only
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(got, _call(gathering, x), atol=1e-6, rtol=0)
        wrapped.train()
        _call(wrapped, x)  # training: every token routed
        assert rows[-1] == 2 * keep.numel()
    # only E layers with routed experts route; elsewhere "route" gathers as before
    _, dense = _pair("E", FlexiDepthConfig(inference="hard", hard_skip_moe="route"))
    assert dense.gathers and not dense.routes_kept
    with pytest.raises(ValueError, match="hard_skip_moe='scatter' is unknown; allowed: gather, route"):
        FlexiDepthConfig(hard_skip_moe="scatter")
    assert FlexiDepthConfig.from_options("inference=hard,hard_skip_moe=route").hard_skip_moe == "route"


@pytest.mark.gpu
def test_hard_skip_on_cuda_reads_the_count_without_a_stream_sync(single_rank):
    """On a CUDA device the gathering layer's one host read is the kept count's copy into pinned
    memory (an event wait, not a synchronising CUDA call: torch's sync debug mode raises on
    those), and the output equals the same layer's on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # built in fp32 on the CPU (a CUDA host's default is bf16 on the device), then moved
    plain, wrapped = _pair("E", FlexiDepthConfig(inference="hard"), bf16=False, use_cpu_initialization=True,
                           masked_softmax_fusion=False)
    _set_router(wrapped, std=0.5)
    wrapped.eval()
    x = _inputs()
    with torch.no_grad():
        want = _call(wrapped, x)
        wrapped.cuda()
        x = x.cuda()  # a copy from pageable host memory synchronises: before the check
        _call(wrapped, x)  # warm-up: lazy CUDA initialisation may synchronise
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = _call(wrapped, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("columns", [
    ("none", "all", "alternate", "last"),  # k = s: one sequence keeps every token
    ("none", "alternate", "last", "first3"),  # k = 4 < s: the shorter sequences padded
    ("none", "none", "none", "none"),  # k = 0: nothing to process
])
def test_skip_dispatcher_route_dispatch_combine_equal_reference(columns):
    """Non-SP dispatcher on hand-made keep masks (a sequence with no kept token, all kept,
    padding): dispatch hands each sequence's kept tokens in order, combine gives a row-wise
    block's outputs at exactly the kept rows and the skip path ``x + update`` at every other one
    (padding targets included), bit for bit; without an adapter, ``x`` there."""
    from megacpp_mcore.features.flexidepth import SkipDispatcher

    s, h = 8, 16
    patterns = {"none": [False] * s, "all": [True] * s, "alternate": [i % 2 == 0 for i in range(s)],
                "last": [i == s - 1 for i in range(s)], "first3": [i < 3 for i in range(s)]}
    keep = torch.tensor([patterns[c] for c in columns]).T.unsqueeze(-1)  # [s, b, 1]
    x = torch.randn(s, len(columns), h, generator=torch.Generator().manual_seed(0))
    update = x * 0.5 - 1.0  # the adapter's update, distinct from x and from the block's output
    dispatcher = SkipDispatcher(None, sequence_parallel=False)
    route = dispatcher.route(x, keep)
    counts = keep.squeeze(-1).sum(0)
    assert route.idx.shape == (int(counts.max()), len(columns))
    tokens = dispatcher.dispatch(route)  # [k, b, h]
    for j in range(len(columns)):
        kept = keep[:, j, 0].nonzero().squeeze(-1)
        assert torch.equal(tokens[:len(kept), j], x[kept, j])
    out = dispatcher.combine(route, tokens * 3.0 + 1.0, x, update)  # a row-wise "block"
    assert torch.equal(out, torch.where(keep, x * 3.0 + 1.0, x + update))
    assert torch.equal(dispatcher.combine(route, tokens * 3.0 + 1.0, x, None), torch.where(keep, x * 3.0 + 1.0, x))
    with pytest.raises(ValueError, match="x holds 7 rows; the route has 8"):
        dispatcher.combine(route, tokens, x[1:], None)


def _combine_cases(device: str):
    """(dtype, src, processed, x, update or None) cases of the one-pass combine: kept rows from
    ``processed`` by ``src`` (-1: skipped), a width that is not a power of two."""
    g = torch.Generator().manual_seed(0)
    rows, b, k, h = 6, 3, 4, 48
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, b, h, generator=g).to(dtype)
        update = torch.randn(rows, b, h, generator=g).to(dtype)
        processed = torch.randn(k * b, h, generator=g).to(dtype)
        src = torch.randint(-1, k * b, (rows, b), generator=g)
        for upd in (update, None):
            yield dtype, *(t if t is None else t.to(device) for t in (src, processed, x, upd))


@pytest.mark.triton
def test_combine_kernel_under_the_triton_interpreter_equals_the_torch_form():
    """The one-pass combine's Triton kernel (``TRITON_INTERPRET=1`` on CPU tensors) equals the
    torch formulation: kept rows bit for bit (copies); skipped rows ``x + update`` summed in fp32,
    bit for bit in fp32 and within one bf16 step in bf16 (the interpreter truncates to bf16
    where the GPU rounds to nearest like torch: the GPU test checks those bit for bit)."""
    code = textwrap.dedent("""
        import torch
        from megacpp_mcore.features.flexidepth import combine_triton
        from tests.test_flexidepth import _combine_cases
        for dtype, src, processed, x, upd in _combine_cases("cpu"):
            skip = x if upd is None else x + upd
            kept = (src >= 0).unsqueeze(-1)
            want = torch.where(kept, processed[src.clamp(min=0)], skip)
            got = combine_triton.combine(src, processed, x, upd)
            if dtype == torch.float32 or upd is None:
                assert torch.equal(got, want), (dtype, upd is None)
            else:
                assert torch.equal(got[kept.expand_as(got)], want[kept.expand_as(want)])
                step = want.float().abs() * 2.0 ** -7 + 1e-30  # one bf16 step at most
                assert ((got.float() - want.float()).abs() <= step).all()
        print("COMBINE-INTERPRET-OK")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "COMBINE-INTERPRET-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.triton
def test_route_kernel_under_the_triton_interpreter_equals_the_torch_route():
    """A capacity route's one Triton kernel (``TRITON_INTERPRET=1`` on CPU tensors) gives the torch
    route's effective mask, gather index (the first ``k`` rows of the kept-first order), its flat
    rows and this rank's source rows, for masks of any density, capacities below and at the
    sequence, several chunks (s > CHUNK), and a rank's slice of the sequence as under SP."""
    code = textwrap.dedent("""
        import math, torch
        from megacpp_mcore.features.flexidepth import route_triton
        from megacpp_mcore.features.flexidepth.dispatch import SkipDispatcher
        route_triton.CHUNK = 16
        g = torch.Generator().manual_seed(0)
        for s, b, p in ((40, 3, 0.4), (33, 2, 0.0), (33, 2, 1.0), (7, 1, 0.5)):
            mask = torch.rand(s, b, 1, generator=g) < p
            for capacity in (0.1, 0.5, 1.0):
                for start, rows in ((0, s), (s // 2, s - s // 2)):
                    want = SkipDispatcher(None, sequence_parallel=False, capacity=capacity).start(mask[..., 0:1].expand(s, b, 1), mask)
                    longest = min(s, math.ceil(capacity * s))
                    eff, idx, flat, src = route_triton.route(mask[..., 0], longest, longest, start, rows)
                    assert torch.equal(eff.unsqueeze(-1), want.keep), (s, b, p, capacity)
                    assert torch.equal(idx, want.order[:longest]), (s, b, p, capacity)
                    assert torch.equal(flat, idx * b + torch.arange(b))
                    assert torch.equal(src, want.src[start:start + rows] if rows < s else want.src), (s, b, p, capacity, start)
        print("ROUTE-INTERPRET-OK")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "ROUTE-INTERPRET-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.gpu
def test_route_kernel_on_cuda_equals_the_torch_route(monkeypatch):
    """On a CUDA device a capacity route's Triton kernel (taken outside autograd) equals the torch
    route (taken under autograd) at nam56r-lite's shape, 4096 x 8, several chunks."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from megacpp_mcore.features.flexidepth import dispatch
    from megacpp_mcore.features.flexidepth.dispatch import SkipDispatcher

    monkeypatch.setattr(dispatch, "ROUTE_KERNEL", True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for p in (0.05, 0.5, 0.95):
        keep = torch.rand(4096, 8, 1, device="cuda", generator=g) < p
        x = torch.zeros(4096, 8, 1, device="cuda")
        dispatcher = SkipDispatcher(None, sequence_parallel=False, capacity=0.5)
        with torch.no_grad():
            fused = dispatcher.route(x, keep)
        with torch.enable_grad():
            plain = dispatcher.route(x, keep)
        assert fused.flat is not None and plain.flat is None
        assert torch.equal(fused.keep, plain.keep) and torch.equal(fused.idx, plain.idx)
        assert torch.equal(fused.src, plain.src)
        assert torch.equal(fused.flat, plain.idx * 8 + torch.arange(8, device="cuda"))


@pytest.mark.gpu
def test_combine_kernel_on_cuda_equals_the_torch_form_bit_for_bit():
    """On a CUDA device the one-pass combine equals torch's ``where(kept, processed[src], x +
    update)`` bit for bit in fp32 and bf16 (the sum in fp32, rounded to nearest once)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from megacpp_mcore.features.flexidepth import combine_triton

    for dtype, src, processed, x, upd in _combine_cases("cuda"):
        skip = x if upd is None else x + upd
        want = torch.where((src >= 0).unsqueeze(-1), processed[src.clamp(min=0)], skip)
        assert torch.equal(combine_triton.combine(src, processed, x, upd), want), (dtype, upd is None)


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that read device data on the host (a device synchronisation on
    CUDA): scalar reads, ``nonzero``-like ops and boolean-mask indexing."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "masked_scatter", "is_nonzero",
               "equal", "unique", "_unique2", "unique_consecutive", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        indices = args[1] if name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
        if name in self.SYNCING or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("gather", [True, False])
def test_hard_eval_forward_reads_the_device_once_per_gathering_layer(single_rank, monkeypatch, gather):
    """One eval forward of a hard E layer with a plain MLP: exactly one host read (the kept count
    that sizes the block's input) when it gathers, none when it selects rows."""
    _, wrapped = _pair("E", FlexiDepthConfig(inference="hard", hard_skip_symbols="E" if gather else "A"))
    _set_router(wrapped, std=0.5)
    wrapped.eval()
    x = _inputs()
    reads = []
    for method in ("tolist", "numpy", "cpu", "item"):  # host reads that bypass the dispatcher
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _f=original, _m=method, **k:
                            (reads.append(_m), _f(self, *a, **k))[1])
    with torch.no_grad(), _HostSyncs() as syncs:
        _call(wrapped, x)
    monkeypatch.undo()
    assert wrapped.gathers == gather
    assert syncs.seen + reads == (["_local_scalar_dense"] if gather else [])
    assert 0 < wrapped.megacpp_stats()["skip_rate"] < 1  # statistics still recorded


def test_hard_skip_on_attention_gathers_per_sequence_or_selects(single_rank):
    """A layer: gathering (A in hard_skip_symbols) runs attention on each sequence's kept tokens at
    their own positions; without it the block runs on every token and rows are selected."""
    x, rope = _inputs(), _rope(16)
    for gather in (True, False):
        plain, wrapped = _pair("A", FlexiDepthConfig(inference="hard", hard_skip_symbols="AE" if gather else "E"))
        _set_router(wrapped, std=0.5)
        wrapped.eval(), plain.eval()
        shapes = []
        wrapped.self_attention.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
        with torch.no_grad():
            out = _call(wrapped, x, rope)
            g, skip = _branch_reference(wrapped, x)
            keep = (g >= 0.5).squeeze(-1)  # [s, b]
            own = wrapped.flexidepth.skip_path(x, wrapped.flexidepth.project(x)[1])
            assert torch.equal(out[~keep], own[~keep])  # the branch's skip path, bit for bit
            torch.testing.assert_close(out[~keep], skip[~keep], atol=1e-6, rtol=1e-6)
            if not gather:
                assert shapes == [(16, 2, 64)]
                assert torch.equal(out[keep], _call(plain, x, rope)[keep])
                continue
            assert shapes == [(int(keep.sum(0).max()), 2, 64)]
            for j in range(2):  # kept tokens of sequence j, alone, at their positions
                pos = keep[:, j].nonzero().squeeze(-1)
                ref = _call(plain, x[pos, j:j + 1], rope[pos])
                torch.testing.assert_close(out[pos, j], ref[:, 0], atol=1e-5, rtol=1e-5)


def test_moda_on_a_soft_layer_sees_all_positions(single_rank):
    _, wrapped = _pair("A", FlexiDepthConfig(inference="hard"), features=("flexidepth", "moda"))
    shapes = []
    wrapped.self_attention.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    _call(wrapped, _inputs(), _rope(16))
    wrapped.eval()
    with torch.no_grad():
        _call(wrapped, _inputs(), _rope(16))
    assert not wrapped.gathers and shapes == [(16, 2, 64)] * 2


# ---------------------------------------------------------------------- usage: stats, penalty
def _chunk_pair(fd: FlexiDepthConfig):
    """Two E layers (global 0 and 1) of one chunk: one usage segment."""
    from megatron.core.transformer.spec_utils import build_module

    from megacpp_mcore.features.flexidepth import transform
    from megacpp_mcore.spec.context import ChunkBuild

    cfg, chunk = _config(), ChunkBuild()
    layers = []
    for i in range(2):
        ctx = _ctx(cfg, "E", fd, index=i, chunk=chunk)
        layers.append(build_module(transform(_plain_spec(ctx), ctx), config=cfg, layer_number=i + 1))
    return layers


def test_usage_statistics_and_penalty_hand_computed(single_rank):
    """Scores g1 (from x) and g2 (from layer 1's output): per-layer skip rate and score mean, the
    segment's penalty w * mean((g1 + g2)^2) on its last layer, and the router-bias gradients
    ``2 w sum_t S_t g_t (1 - g_t) / N`` (LM gradient masked out, the layers' graphs cut between
    them so each bias sees its own score's term), at aux-loss scales 1 and 0.25."""
    w = 0.3
    layers = _chunk_pair(FlexiDepthConfig(usage_loss_weight=w))
    for i, layer in enumerate(layers):
        _set_router(layer, std=0.5, bias=0.1 * i, seed=i)
    x = _inputs()
    h1 = _call(layers[0], x)
    out = _call(layers[1], h1.detach())  # no path from layer 2's score back into layer 1's router
    (h1 * 0).sum().backward()
    (out * 0).sum().backward()
    g1, _ = _branch_reference(layers[0], x)
    g2, _ = _branch_reference(layers[1], h1.detach())
    total = g1 + g2
    stats = [layer.megacpp_stats() for layer in layers]
    for g, s in zip((g1, g2), stats):
        assert s["skip_rate"] == pytest.approx((g < 0.5).float().mean().item())
        assert s["score_mean"] == pytest.approx(g.mean().item(), rel=1e-6)
    assert 0 < stats[0]["skip_rate"] < 1 and "loss_usage" not in stats[0]
    assert stats[1]["loss_usage"] == pytest.approx(w * total.square().mean().item(), rel=1e-6)
    for layer, g in zip(layers, (g1, g2)):
        expected = (2 * w * total * g * (1 - g)).sum().item() / total.numel()
        assert layer.flexidepth.router.bias.grad.item() == pytest.approx(expected, rel=1e-5)
        layer.flexidepth.router.bias.grad = None
        layer.megacpp_set_step(1)
    with aux_loss_scale(torch.tensor([0.25])):  # as a schedule sets it at 4 micro-batches
        h1 = _call(layers[0], x)
        (_call(layers[1], h1.detach()) * 0).sum().backward()
        (h1 * 0).sum().backward()
    expected = (2 * w * total * g1 * (1 - g1)).sum().item() / total.numel()
    assert layers[0].flexidepth.router.bias.grad.item() == pytest.approx(0.25 * expected, rel=1e-5)
    summary = usage_summary({f"decoder.layers.{i}.{k}": v for i, s in enumerate(stats) for k, v in s.items()},
                            num_layers=4)
    skipped = stats[0]["skip_rate"] + stats[1]["skip_rate"]
    assert summary == pytest.approx({"flexidepth_layers": 2, "layers_skipped": skipped,
                                     "mean_layers_used": 4 - skipped, "overall_skip_rate": skipped / 4})


def test_usage_report_of_logged_statistics():
    """The loop's bookkeeping from per-layer statistics (as StatsCollector names them): per-layer
    skip rates by global index, the penalty summed over segments, mean layers used of the depth."""
    from megacpp_mcore.features.flexidepth import format_usage, usage_report

    stats = {"decoder.layers.10.skip_rate": 0.5, "decoder.layers.2.skip_rate": 0.25, "decoder.layers.2.score_mean": 0.7,
             "decoder.layers.2.loss_usage": 0.01, "decoder.layers.10.loss_usage": 0.02, "decoder.layers.4.gate_mean": 0.9}
    report = usage_report(stats, num_layers=12)
    per_layer = report.pop("skip_rate_per_layer")
    assert report == pytest.approx({"flexidepth_layers": 2, "layers_skipped": 0.75, "mean_layers_used": 11.25,
                                    "overall_skip_rate": 0.0625, "usage_loss": 0.03})
    assert list(per_layer.items()) == [("2", 0.25), ("10", 0.5)]
    report["skip_rate_per_layer"] = per_layer
    assert format_usage(report) == ("flexidepth layers used 11.25/12 skip 6.2% usage loss 0.03 "
                                    "(skip per layer 2:0.25 10:0.50)")


def test_usage_boundaries_split_the_sum():
    from megacpp_mcore.features.flexidepth.usage import UsageLedger

    ledger = UsageLedger((3,))
    slots = [ledger.register(i) for i in (0, 2, 3, 5)]
    assert [(s.segment.start, s.first, s.last) for s in slots] == [
        (0, True, False), (0, False, True), (3, True, False), (3, False, True)]
    with pytest.raises(RuntimeError, match="layer 4 registered after layer 5"):
        ledger.register(4)


def test_skip_rate_heatmap_is_written(tmp_path):
    from megacpp_mcore.train.heatmap import write_usage_heatmaps

    history = [{"decoder.layers.1.skip_rate": 0.1 * i, "decoder.layers.3.skip_rate": 0.2} for i in range(3)]
    written = write_usage_heatmaps(history, tmp_path / "run")
    assert list(written) == ["skip_rate"] and (tmp_path / "run.skip_rate.png").read_bytes()[:4] == b"\x89PNG"


def _router_bias_grads(chunk, num_microbatches: int) -> list[float]:
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    from megacpp_mcore.train import runtime

    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "labels": tokens, "loss_mask": torch.zeros(2, 32)}
    chunk.zero_grad()
    forward_backward_no_pipelining(forward_step_func=runtime.gpt_forward_step,
                                   data_iterator=iter([batch] * num_microbatches), model=chunk,
                                   num_microbatches=num_microbatches, seq_length=32, micro_batch_size=2)
    return [layer.flexidepth.router.bias.grad.item() for layer in chunk.decoder.layers[2:]]


def test_usage_penalty_scale_comes_from_megatron_schedule(single_rank):
    """Through Megatron's own ``forward_backward_no_pipelining`` (the registry's
    ``aux-loss-scale-without-moe`` applied, as every entry point does), 1 and 4 identical
    micro-batches give the hand-computed penalty gradient of one: constant scores
    ``g_l = sigmoid(b_l)`` on layers 2 and 3 give ``dL/db_l = 2 w (g_2 + g_3) g_l (1 - g_l)``."""
    from megacpp_mcore.patches import aux_loss_scale_without_moe as patch
    from megacpp_mcore.patches import registry
    from megacpp_mcore.train import runtime

    registry.apply_needed([patch.NAME])
    fd = FlexiDepthConfig(usage_loss_weight=0.5, placement=FeaturePlacement(layers=(2, 3)))
    model = custom_model(**_BASE, moe=None, features={"flexidepth": fd})
    (chunk,) = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                   backend="local", wrap_ddp=False)
    biases = (1.0, -0.5)
    for layer, bias in zip(chunk.decoder.layers[2:], biases):
        _set_router(layer, bias=bias)
    g = [1.0 / (1.0 + math.exp(-b)) for b in biases]
    expected = [2 * 0.5 * sum(g) * gl * (1 - gl) for gl in g]
    for n in (1, 4):
        assert _router_bias_grads(chunk, n) == pytest.approx(expected, rel=1e-5), n


# ------------------------------------------------------------------------- frozen backbone
def test_frozen_backbone_stays_while_router_and_adapter_move(single_rank):
    from megacpp_mcore.testing.parity import synthetic_batches
    from megacpp_mcore.train import runtime

    fd = FlexiDepthConfig(freeze_backbone=True, router_bias_init=0.0, usage_loss_weight=0.01)
    model = custom_model(**_BASE, moe=None, features={"flexidepth": fd})
    chunks = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                 backend="local")
    optimizer = runtime.build_optimizer(chunks, lr=1e-2)
    layers = chunks[0].module.decoder.layers
    named = {n: p for n, p in layers.named_parameters()}
    before = {n: p.detach().clone() for n, p in named.items()}
    embedding = chunks[0].module.embedding.word_embeddings.weight
    embedding_before = embedding.detach().clone()
    trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all((id(p) in trainable) == (".flexidepth." in n) for n, p in named.items())
    for step in range(3):
        micro = synthetic_batches(seed=1, step=step, global_batch=2, seq_length=32, vocab=128,
                                  dp_rank=0, dp=1, micro_batch_size=1)
        runtime.train_step(chunks, optimizer, micro, num_microbatches=2, micro_batch_size=1, seq_length=32)
    for n, p in named.items():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (".flexidepth." in n), n
    assert not torch.equal(embedding.detach(), embedding_before)  # the rest is not the feature's


def test_forward_backward_and_hard_inference_read_no_environment(single_rank, monkeypatch):
    """Training forward/backward and a hard-skip eval forward of a FlexiDepth model (with MoDA on
    its A layers) read no environment variable."""
    import os

    from megacpp_mcore.features.moda import MoDAConfig
    from megacpp_mcore.train import runtime
    from tests.test_architecture import _RecordingEnviron

    fd = FlexiDepthConfig(router_bias_init=0.0, router_init_std=0.3, inference="hard")
    model = custom_model(**_BASE, moe=None, features={
        "flexidepth": fd, "moda": MoDAConfig(placement=FeaturePlacement(symbols="A"))})
    (gpt,) = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                 backend="local", wrap_ddp=False)
    tokens = torch.randint(0, 128, (2, 32))
    recording = _RecordingEnviron(os.environ)
    monkeypatch.setattr(os, "environ", recording)
    gpt(tokens, torch.arange(32).expand(2, -1), None, labels=tokens).float().mean().backward()
    gpt.eval()
    with torch.no_grad():
        gpt(tokens, torch.arange(32).expand(2, -1), None, labels=tokens)
    assert recording.reads == []
    assert 0 < gpt.decoder.layers[1].megacpp_stats()["skip_rate"] < 1  # E layers really route


# ------------------------------------------------------------------------- TP / SP / PP parity
@pytest.mark.distributed
def test_parallel_parity_tp_sp_and_pp(tmp_path):
    """One 1-rank launch (initial weights saved) and one 2-rank launch (TP=2+SP and PP=2 for both
    models): training losses, grad norms and the hard-skip eval loss match."""
    from megacpp_mcore.testing.dist import run_distributed

    models = ["tests.test_flexidepth:parity_soft", "tests.test_flexidepth:parity_frozen_moe",
              "tests.test_flexidepth:parity_mla", "tests.test_flexidepth:parity_moe_route",
              "tests.test_flexidepth:parity_capacity"]
    ckpts = []
    for i in range(len(models)):
        (tmp_path / str(i)).mkdir()
        ckpts.append(str(tmp_path / str(i)))
    (refs,) = run_distributed("tests.test_flexidepth:run_all", nproc=1, kwargs={"runs": [
        dict(model=m, checkpoint=c, checkpoint_mode="save") for m, c in zip(models, ckpts)]})
    layouts = [(0, {"tp": 2, "sp": True}), (1, {"tp": 2, "sp": True}), (0, {"pp": 2}), (1, {"pp": 2}),
               (2, {"tp": 2, "sp": True}), (2, {"pp": 2}), (3, {"tp": 2, "sp": True}), (4, {"tp": 2, "sp": True})]
    ranks = run_distributed("tests.test_flexidepth:run_all", nproc=2, kwargs={"runs": [
        dict(model=models[i], parallel=par, checkpoint=ckpts[i], checkpoint_mode="load")
        for i, par in layouts]})
    for j, (i, par) in enumerate(layouts):
        for rank in ranks:
            got = rank[j]
            assert got["losses"] == pytest.approx(refs[i]["losses"], abs=1e-5), (models[i], par)
            assert got["grad_norms"] == pytest.approx(refs[i]["grad_norms"], rel=1e-5), (models[i], par)
            assert got["eval_loss"] == pytest.approx(refs[i]["eval_loss"], abs=1e-5), (models[i], par)
            assert got["eval_layers_skipped"] == pytest.approx(refs[i]["eval_layers_skipped"], abs=1e-6)
    assert refs[0]["losses"][2] < refs[0]["losses"][0]  # it trains
    # the same trained model with the capacity: its kept tokens overflow it, so more skip
    assert refs[4]["losses"] == refs[0]["losses"]
    assert refs[4]["eval_layers_skipped"] > refs[0]["eval_layers_skipped"]
    assert 0.2 < refs[0]["eval_layers_skipped"] < 3.8 and 0.1 < refs[1]["eval_layers_skipped"] < 1.9
    assert 0.2 < refs[2]["eval_layers_skipped"] < 3.8  # MLA layers gathered too
    assert refs[3]["eval_loss"] == pytest.approx(refs[1]["eval_loss"], abs=1e-5)  # route = gather


def test_bench_script_cpu_smoke(tmp_path, monkeypatch, capsys):
    """scripts/bench_flexidepth.py on CPU with a tiny model: the calibrated skip rate is reached on
    every FlexiDepth layer, the E layers gather, the ratio is reported (timings mean nothing on CPU)."""
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_flexidepth

    out = tmp_path / "bench.json"
    assert bench_flexidepth.main(["--cpu-smoke", "--skip-rate", "0.25", "--profile", "3", "--traffic",
                                  "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["gathering_layers"] == [1, 3] and result["ratio"] > 0
    # the bytes outside the block of each FlexiDepth layer: the gathering ones copy whole rows to
    # the block and back (index_select, index_copy_ onto the skip path's rows), no full-size select
    traffic = result["overhead_traffic"]
    assert sorted(traffic) == ["0", "1", "2", "3"] and all(t["passes"] > 0 for t in traffic.values())
    for layer in ("1", "3"):
        ops = traffic[layer]["by_op"]
        assert ops["index_select"] > 0.2 and ops["index_copy_"] > 0.2  # index-sized ops are ~0
        # no full-size select or scatter (3 passes / 2 passes); the route's index-sized ones
        # ([s, b] and [k * b] int64: a few 64ths of a pass at h=64)
        assert ops.get("where", 0.0) < 0.2 and ops.get("scatter_", 0.0) < 0.2 and "gather" not in ops
        # the skip path's add: x and the update read, the sum written once
        assert ops["add"] == pytest.approx(3.0, abs=0.15)
        # the router's norm folds into the router + down GEMM: its rstd reads the input once and
        # writes nothing of its size; that GEMM reads it once more, the update's GEMM writes once
        assert "rms_norm" not in ops and ops["linalg_vector_norm"] == pytest.approx(1.0, abs=0.05)
        assert 2.0 <= ops["mm"] < 2.5
    profiled = result["profile"]  # one profiled forward each: the hard path calls more operators
    assert profiled["hard"]["aten_calls"] > profiled["dense"]["aten_calls"] > 0
    assert all(len(profiled[m]["top"]) == 3 and profiled[m]["device_ms"] == 0 for m in ("dense", "hard"))  # CPU
    # the operators the hard path adds, by how much their self time grows: the dispatcher's are new
    added = {e["op"]: e for e in profiled["hard_minus_dense"]}
    assert len(added) == 3 and all(e["ms_added"] == e["ms_hard"] - e["ms_dense"] for e in added.values())
    grown = [e["ms_added"] for e in profiled["hard_minus_dense"]]
    assert grown == sorted(grown, reverse=True)
    assert result["timing"] == "interleaved"
    for name in ("dense", "hard"):  # --cpu-smoke: 2 timed forwards each, after the warm-up
        spread, times = result["spread_s"][name], result["times_s"][name]
        assert len(times) == len(result["host_times_s"][name]) == 2
        assert spread["min"] == min(times) <= spread["median"] <= spread["max"] == max(times)
    assert all(abs(rate - 0.25) <= 2 / 128 for rate in result["skip_rate_per_layer"].values())
    assert result["routing_layers"] == []
    table = result["layer_times"]  # every decoder layer and the head, timed in both models
    assert [(r["part"], r["symbol"]) for r in table["rows"]] == [("0", "A"), ("1", "E"), ("2", "A"), ("3", "E"),
                                                                ("head", "head")]
    assert all(r["dense_ms"] > 0 and r["hard_ms"] > 0 for r in table["rows"])
    assert table["dense_sum_ms"] == pytest.approx(sum(r["dense_ms"] for r in table["rows"]))
    # every layer carries FlexiDepth at 0.25: the bound scales the four layers, not the head
    head = table["rows"][-1]["dense_ms"]
    assert table["scaled_bound"] == pytest.approx(
        (0.75 * (table["dense_sum_ms"] - head) + head) / table["dense_sum_ms"], abs=0.02)
    # the MoE E layers routing the skipped tokens to no expert instead of gathering
    assert bench_flexidepth.main(["--cpu-smoke", "--skip-rate", "0.25", "--hard-skip-moe", "route",
                                  "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["gathering_layers"], result["routing_layers"], result["hard_skip_moe"]) == ([], [1, 3], "route")
    with pytest.raises(SystemExit) as exc:
        bench_flexidepth.main(["--cpu-smoke", "--skip-rate", "1.0"])
    assert exc.value.code == 2
    # per-layer rates, as a FlexiDepth run's receipt records what it trained to (layers 0..3 here)
    receipt = tmp_path / "receipt.json"
    receipt.write_text(json.dumps({"stats": {"flexidepth": {"skip_rate_per_layer": {"1": 0.5, "3": 0.75}}}}))
    for spec in (str(receipt), "1:0.5,3:0.75"):
        assert bench_flexidepth.main(["--cpu-smoke", "--skip-rate", "0.25", "--skip-rates", spec,
                                      "--out", str(out)]) == 0
        rates = json.loads(out.read_text())["skip_rate_per_layer"]
        for layer, want in {"0": 0.25, "1": 0.5, "2": 0.25, "3": 0.75}.items():
            assert abs(rates[layer] - want) <= 2 / 128, (layer, rates)
    # a fixed gathered length per layer: its calibrated kept fraction plus a margin
    assert bench_flexidepth.main(["--cpu-smoke", "--skip-rates", "1:0.5,3:0.75", "--hard-skip-capacity",
                                  "kept+0.05", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["hard_skip_capacity"] == pytest.approx({"1": 0.55, "3": 0.30})
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        bench_flexidepth.main(["--cpu-smoke", "--hard-skip-capacity", "1.5"])
    assert exc.value.code == 2 and "--hard-skip-capacity '1.5'; allowed" in capsys.readouterr().err
    for bad, message in (("1:x", "is not INDEX:RATE"), ("7:0.5", "names layers [7], which carry no"),
                         ("1:1.5", "rate 1.5"), (str(tmp_path / "bench.json"), "not a receipt")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            bench_flexidepth.main(["--cpu-smoke", "--skip-rates", bad])
        assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("feature", ["flexidepth-hard", "mod-topk"])
def test_gathers_on_mla_attention_rotate_at_own_positions(single_rank, feature):
    """A per-token gather on an MLA ``A`` layer hands MLA the gathered tokens' own positions
    (``TokenPositions``: MLA builds its rotary table from the length it is given, so without them
    the kept tokens would be rotated as positions 0..k-1; ``test_mla`` checks the rotation against
    the plain-torch MLA): per sequence, its kept positions in order, out of the whole length. MLA's
    fused RoPE (one table for the sequence) is refused at build time, naming the switch."""
    from megacpp_mcore.features.mod import MoDConfig
    from megacpp_mcore.layers.mla import TokenPositions
    from megacpp_mcore.models.presets import MLAConfig
    from megacpp_mcore.train import runtime

    mla = MLAConfig(q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16)
    if feature == "mod-topk":
        features = {"mod": MoDConfig(mode="topk", capacity=0.5, placement=FeaturePlacement(symbols="AE"))}
    else:
        features = {"flexidepth": FlexiDepthConfig(inference="hard", hard_skip_symbols="AE",
                                                   router_init_std=0.5)}
    model = custom_model(**{**_BASE, "mla": mla}, moe=None, features=features)
    owner = "MoD topk" if feature == "mod-topk" else "FlexiDepth hard skip"
    # (the local backend refuses MLA's fused RoPE itself, before any feature: the guard alone)
    from types import SimpleNamespace

    from megacpp_mcore.features.mod.rope import check_gather

    fused = SimpleNamespace(symbol="A", index=0, has=lambda name: name == "mla",
                            config=SimpleNamespace(apply_rope_fusion=True))
    with pytest.raises(ValueError, match=rf"layer 0 \('A'\) uses MLA with fused RoPE .* and {owner}: "
                                         r".*--no-rope-fusion"):
        check_gather(fused, owner)
    check_gather(SimpleNamespace(**{**vars(fused), "config": SimpleNamespace(apply_rope_fusion=False)}), owner)
    # context parallelism: each rank holds a slice of the sequence the route gathers from
    with pytest.raises(ValueError, match=rf"uses {owner} with context_parallel_size=2: .*allowed: "
                                         r"context_parallel_size=1"):
        check_gather(SimpleNamespace(symbol="E", index=1, has=lambda name: False,
                                     config=SimpleNamespace(context_parallel_size=2)), owner)
    # ... and the layer transforms ask it (a config is enough: the refusal comes before any build)
    import dataclasses

    from megacpp_mcore.features.flexidepth import transform
    from megacpp_mcore.features.mod import mod_layer_spec

    ctx = _ctx(_config(context_parallel_size=2), "E", features[next(iter(features))]
               if feature == "flexidepth-hard" else FlexiDepthConfig())
    plain = _plain_spec(ctx)
    with pytest.raises(ValueError, match="context_parallel_size=2"):
        if feature == "mod-topk":
            mod_layer_spec(plain, dataclasses.replace(ctx, features=frozenset({"mod"}), feature_configs={
                "mod": features["mod"]}))
        else:
            transform(plain, ctx)
    (chunk,) = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                   backend="local", wrap_ddp=False)
    chunk.eval()
    seen = []
    attention = chunk.decoder.layers[0].self_attention
    attention.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["rotary_pos_emb"]),
                                        with_kwargs=True)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = chunk(tokens, torch.arange(32).expand_as(tokens), None)
    assert torch.isfinite(out).all()
    (rope,) = seen
    assert isinstance(rope, TokenPositions) and rope.length == 32
    k = rope.index.shape[0]
    assert 0 < k < 32
    for b in range(2):  # each sequence's positions ascend (causal order), within the sequence
        row = rope.index[:, b]
        kept = row[: int((row[1:] > row[:-1]).long().cumprod(0).sum()) + 1]
        assert torch.equal(kept, kept.sort().values) and int(row.max()) < 32 and len(kept) > 1