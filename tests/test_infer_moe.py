"""Decoding without host syncs (megacpp_mcore.infer.moe and the decode loop): the sync-free MoE path
equals Megatron's MoE layer (both expert routes, router variants, the expert weight layouts of
SequentialMLP / TE grouped GEMM / legacy GroupedMLP), anything it does not know falls back to
Megatron's layer with one log line, and a decode step reads nothing from the device (a speculative
step reads once). Tiny fp32 models on the local backend."""

from __future__ import annotations

import collections
import contextlib
import logging

import pytest
import torch

from megacpp_mcore.features.mod import MoDConfig
from megacpp_mcore.models.presets import MLAConfig, ModelConfig, MoEConfig
from megacpp_mcore.spec.pattern import FeaturePlacement

VOCAB, HIDDEN = 64, 64


def _gpt(pattern="E", num_layers=1, *, moe=MoEConfig(num_experts=8, topk=2, ffn_hidden_size=32,
                                                     shared_expert_size=32),
         mla=False, mtp=0, features=None, bf16=False, **overrides):
    from megacpp_mcore.train import runtime

    cfg = ModelConfig(name="t", pattern=pattern, num_layers=num_layers, hidden_size=HIDDEN,
                      num_attention_heads=4, num_query_groups=None if mla else 2, ffn_hidden_size=96,
                      vocab_size=VOCAB, seq_length=64, moe=moe, mtp_depth=mtp,
                      mla=MLAConfig(q_lora_rank=None, kv_lora_rank=16, qk_head_dim=16,
                                    qk_pos_emb_head_dim=8, v_head_dim=16) if mla else None,
                      features=features or {})
    config = runtime.transformer_config(cfg, runtime.Parallelism(), bf16=bf16, **overrides)
    (gpt,) = runtime.build_model(cfg, config, backend="local", wrap_ddp=False)
    return gpt.eval()


def _moe_layers(gpt):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in gpt.modules() if isinstance(m, MoELayer)]


ROUTERS = {  # name -> (MoEConfig, config overrides)
    "softmax-top2-shared": (MoEConfig(num_experts=8, topk=2, ffn_hidden_size=32,
                                      shared_expert_size=32), {}),
    "sigmoid-top3-scaled": (MoEConfig(num_experts=8, topk=3, ffn_hidden_size=32,
                                      shared_expert_size=None),
                            {"moe_router_score_function": "sigmoid",
                             "moe_router_topk_scaling_factor": 2.0}),
}


@pytest.mark.parametrize("router", list(ROUTERS))
@torch.no_grad()
def test_sync_free_moe_equals_megatron_layer(single_rank, router):
    """Both expert routes (gathered: top-k experts per token; dense: every expert weighted by the
    router's probabilities) and the size-based choice give Megatron's MoE output within 1e-5 for
    1 .. 24 tokens in several [s, b] shapes; above MAX_TOKENS it is Megatron's layer itself."""
    from megacpp_mcore.infer import moe as moe_module

    moe_cfg, overrides = ROUTERS[router]
    torch.manual_seed(0)
    (layer,) = _moe_layers(_gpt(moe=moe_cfg, **overrides))
    fast, why = moe_module.plan_moe(layer)
    assert why is None and fast is not None
    for s, b in ((1, 1), (2, 1), (3, 1), (1, 4), (3, 8)):
        x = torch.randn(s, b, HIDDEN)
        ref, bias = layer(x)
        assert bias is None
        out, none = fast(x)
        assert none is None
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        probs, _ = layer.router(x)
        shared = layer.shared_experts(x) if layer.shared_experts is not None else 0.0
        for route in (fast.dense, fast.gathered):
            got = route(x.view(s * b, HIDDEN), probs).view_as(ref) + shared
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    big = torch.randn(moe_module.MAX_TOKENS + 1, 1, HIDDEN)
    torch.testing.assert_close(fast(big)[0], layer(big)[0], atol=0, rtol=0)


def test_traffic_counts_calls_and_the_bytes_a_device_would_move():
    """The byte model of megacpp_mcore.infer.traffic on known operators: a GEMM reads both
    operands and writes its output, a view moves nothing, an in-place op is not counted twice,
    a gather reads only what it writes, an in-place scatter moves its source's size."""
    from megacpp_mcore.infer.traffic import Traffic

    w, x = torch.randn(8, 16, 32), torch.randn(1, 16)  # 4-byte elements
    index = torch.tensor([1, 5])
    with Traffic() as t:
        y = x @ w[0]
    assert (t.ops, t.bytes) == (2, 4 * (16 + 16 * 32 + 32))  # select (a view), mm
    with Traffic() as t:
        w.view(8, 512).t()
        y.mul_(2.0)
    assert (t.ops, t.bytes) == (3, 4 * 32)
    with Traffic() as t:
        w[index]
    assert t.bytes == 2 * 4 * 2 * 16 * 32  # the two experts' weights, in and out
    source = torch.ones(2, 16, 32)
    with Traffic() as t:
        w.index_copy_(0, index, source)
    assert t.bytes == 2 * 4 * 2 * 16 * 32  # the source, in and out (not all of w)


@pytest.mark.parametrize("experts,topk", [(8, 2), (12, 3), (16, 4)])
@torch.no_grad()
def test_sync_free_moe_takes_the_route_that_moves_fewer_bytes(single_rank, experts, topk):
    """Decode is bound by reading weights: for 1 .. 4 tokens the route the layer takes moves at
    most the bytes of the other one (the gathered route copies the chosen experts' weights before
    its GEMMs read them; it is cheaper for one token only here)."""
    from megacpp_mcore.infer import moe as moe_module
    from megacpp_mcore.infer.traffic import Traffic

    torch.manual_seed(0)
    (layer,) = _moe_layers(_gpt(moe=MoEConfig(num_experts=experts, topk=topk, ffn_hidden_size=32,
                                              shared_expert_size=32)))
    fast, why = moe_module.plan_moe(layer)
    assert why is None
    chosen = []
    for tokens in (1, 2, 3, 4):
        x = torch.randn(tokens, HIDDEN)
        probs, _ = layer.router(x[:, None])
        moved = {}
        for route in ("gathered", "dense"):
            with Traffic() as traffic:
                getattr(fast, route)(x, probs)
            moved[route] = traffic.bytes
        chosen.append(fast.route(tokens))
        assert moved[chosen[-1]] <= min(moved.values()), (tokens, moved)
    assert chosen[0] == "gathered" and chosen[-1] == "dense"  # both routes are exercised


def _fake(name: str, **modules_and_params) -> torch.nn.Module:
    """A module of class ``name`` holding the given submodules / parameters."""
    fake = type(name, (torch.nn.Module,), {})()
    for key, value in modules_and_params.items():
        if isinstance(value, torch.nn.Module):
            fake.add_module(key, value)
        else:
            fake.register_parameter(key, torch.nn.Parameter(value.clone()))
    return fake


def test_expert_weight_layouts_read_alike(single_rank):
    """TE's grouped linear (weight0..weight{E-1}, or one [E, out, in] weight) and the legacy
    GroupedMLP (expert-major weight1 [h, E*F1] / weight2 [E*f, h]) stack to SequentialMLP's
    weights; an unknown expert class or a mis-shaped weight is named."""
    from megacpp_mcore.infer.moe import stacked_expert_weights

    torch.manual_seed(1)
    (layer,) = _moe_layers(_gpt())
    E = layer.config.num_moe_experts
    w1, w2 = stacked_expert_weights(layer.experts, E, HIDDEN)  # [E, h, 2f], [E, f, h]
    assert w1.shape == (E, HIDDEN, 64) and w2.shape == (E, 32, HIDDEN)
    torch.testing.assert_close(w1[3], layer.experts.local_experts[3].linear_fc1.weight.t())
    fc1 = {f"weight{e}": w1[e].t() for e in range(E)}
    fc2 = {f"weight{e}": w2[e].t() for e in range(E)}
    layouts = {
        "TEGroupedMLP": _fake("TEGroupedMLP", linear_fc1=_fake("TEGroupedLinear", **fc1),
                              linear_fc2=_fake("TEGroupedLinear", **fc2)),
        "single grouped": _fake("TEGroupedMLP",
                                linear_fc1=_fake("TEGroupedLinear", weight=w1.transpose(1, 2)),
                                linear_fc2=_fake("TEGroupedLinear", weight=w2.transpose(1, 2))),
        "GroupedMLP": _fake("GroupedMLP", weight1=w1.reshape(HIDDEN, -1),
                            weight2=w2.reshape(-1, HIDDEN)),
    }
    for name, experts in layouts.items():
        got1, got2 = stacked_expert_weights(experts, E, HIDDEN)
        assert torch.equal(got1, w1) and torch.equal(got2, w2), name
    with pytest.raises(ValueError, match="OtherMLP is not one of"):
        stacked_expert_weights(_fake("OtherMLP"), E, HIDDEN)
    transposed = _fake("TEGroupedMLP", linear_fc1=_fake("TEGroupedLinear", **fc1),
                       linear_fc2=_fake("TEGroupedLinear", **{k: v.t() for k, v in fc2.items()}))
    with pytest.raises(ValueError, match="do not make a SwiGLU MLP"):
        stacked_expert_weights(transposed, E, HIDDEN)


def _session_logits(engine, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill of ``prefill`` tokens, then single steps."""
    session = engine.session(tokens.shape[0], tokens.shape[1])
    out = []
    for start, n in [(0, prefill)] + [(t, 1) for t in range(prefill, tokens.shape[1])]:
        out.append(engine.logits(session.forward(tokens[:, start:start + n])))
        session.commit(n)
    return torch.cat(out, dim=1)


def test_unknown_layouts_fall_back_with_one_log_line(single_rank, caplog, monkeypatch):
    """An expert class the stacking does not know, and a layout read wrongly (caught by the probe
    against Megatron's layer when the engine is planned), keep Megatron's layer: one warning
    line for the engine naming each layer and why, and decoding still equals the full forward."""
    from megacpp_mcore.infer import Engine
    from megacpp_mcore.infer import moe as moe_module

    torch.manual_seed(2)
    gpt = _gpt("AE", 4)
    first, second = _moe_layers(gpt)
    first.experts.__class__ = type("OtherMLP", (type(first.experts),), {})
    real = moe_module.stacked_expert_weights
    monkeypatch.setattr(moe_module, "stacked_expert_weights",  # experts in the wrong order
                        lambda *a: tuple(w.flip(0) for w in real(*a)))
    with caplog.at_level(logging.WARNING, logger="megacpp_mcore.infer.engine"):
        engine = Engine(gpt)
    (record,) = [r for r in caplog.records if r.name == "megacpp_mcore.infer.engine"]
    assert "OtherMLP is not one of" in record.getMessage()
    assert "differs from Megatron's layer on a probe" in record.getMessage()
    assert [p.moe for p in engine.plans if p.has_mlp] == [None, None]
    assert "layer 1 (" in record.getMessage() and "layer 3 (" in record.getMessage()
    tokens = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(_session_logits(engine, tokens, 9), engine.full_logits(tokens),
                               atol=1e-5, rtol=0)


def test_bf16_layers_keep_the_sync_free_path(single_rank):
    """In bf16 the probe's tolerance admits the rounding of differently blocked GEMMs (the path
    is not silently dropped) and the output stays within bf16 rounding of Megatron's."""
    from megacpp_mcore.infer.moe import plan_moe

    torch.manual_seed(3)
    (layer,) = _moe_layers(_gpt(bf16=True))
    fast, why = plan_moe(layer)
    assert why is None, why
    x = torch.randn(2, 3, HIDDEN, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x)[0].float(), layer(x)[0].float(), atol=2e-2, rtol=2e-2)


# Tensor methods that make the host wait for the device (on CUDA); called from Python by our code
# and Megatron's, so patching them counts every such read in a step.
_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "nonzero", "numpy")


@contextlib.contextmanager
def _counting_reads(counter: collections.Counter):
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def counted(name, method):
        def read(self, *args, **kwargs):
            counter[name] += 1
            return method(self, *args, **kwargs)
        return read

    try:
        for name, method in saved.items():
            setattr(torch.Tensor, name, counted(name, method))
        yield counter
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_decode_steps_read_the_device_once_per_verification(single_rank):
    """Whole-pattern model (MLA, MoE, Mamba, M2RNN, MoD gateskip, MTP depth 2): a plain decode
    step reads nothing from the device (the tokens are read once, at the end), a speculative step
    reads exactly once (the accepted lengths with the verified tokens), counted as the difference
    between two run lengths; with stop tokens a plain step reads its tokens (one read)."""
    from megacpp_mcore.infer import Engine, generate

    torch.manual_seed(4)
    engine = Engine(_gpt("AEMR", 4, mla=True, mtp=2, features={
        "mod": MoDConfig(placement=FeaturePlacement(symbols="AE"))}))
    prompts = [list(range(1, 9)), list(range(5, 10))]
    for k, stop, per_step in ((0, (), 0), (1, (), 1), (2, (), 1), (0, (VOCAB - 1,), 1)):
        reads, steps = [], []
        for new_tokens in (4, 10):
            counter = collections.Counter()
            with _counting_reads(counter):
                run = generate(engine, prompts, max_new_tokens=new_tokens, speculative=k,
                               stop_tokens=stop)
            reads.append(sum(counter.values()))
            steps.append(run.steps)
        assert steps[1] > steps[0]
        assert reads[1] - reads[0] == per_step * (steps[1] - steps[0]), (k, stop, reads, steps)
