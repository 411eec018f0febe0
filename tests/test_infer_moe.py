"""Decoding without host syncs (megacpp_mcore.infer.moe and the decode loop): the sync-free MoE path
equals Megatron's MoE layer (both expert routes, router variants, the expert weight layouts of
SequentialMLP / TE grouped GEMM / legacy GroupedMLP), anything it does not know falls back to
Megatron's layer with one log line, and a decode step reads nothing from the device (a speculative
step reads once). Tiny fp32 models on the local backend."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megacpp_mcore.features.mod import MoDConfig
from megacpp_mcore.models.presets import MLAConfig, ModelConfig, MoEConfig
from megacpp_mcore.spec.pattern import FeaturePlacement
from scripts_module import load_script

VOCAB, HIDDEN = 64, 64


def _gpt(pattern="E", num_layers=1, *, moe=MoEConfig(num_experts=8, topk=2, ffn_hidden_size=32,
                                                     shared_expert_size=32),
         mla=False, mtp=0, features=None, bf16=False, backend="local", **overrides):
    from megacpp_mcore.train import runtime

    cfg = ModelConfig(name="t", pattern=pattern, num_layers=num_layers, hidden_size=HIDDEN,
                      num_attention_heads=4, num_query_groups=None if mla else 2, ffn_hidden_size=96,
                      vocab_size=VOCAB, seq_length=64, moe=moe, mtp_depth=mtp,
                      mla=MLAConfig(q_lora_rank=None, kv_lora_rank=16, qk_head_dim=16,
                                    qk_pos_emb_head_dim=8, v_head_dim=16) if mla else None,
                      features=features or {})
    config = runtime.transformer_config(cfg, runtime.Parallelism(), bf16=bf16, **overrides)
    (gpt,) = runtime.build_model(cfg, config, backend=backend, wrap_ddp=False)
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


@pytest.mark.parametrize("router", list(ROUTERS))
@torch.no_grad()
def test_grouped_route_equals_megatron_layer_at_any_length(single_rank, router):
    """The grouped route (rows sorted by expert, one grouped GEMM per projection with device
    offsets) gives Megatron's MoE output within 1e-5 (fp32) from 1 token to a prefill's 300,
    with experts no token chose; the probe at planning accepts it."""
    from megacpp_mcore.infer import moe as moe_module

    moe_cfg, overrides = ROUTERS[router]
    torch.manual_seed(1)
    (layer,) = _moe_layers(_gpt(moe=moe_cfg, **overrides))
    fast, why = moe_module.plan_moe(layer)
    assert why is None and fast.grouped_ok
    for s, b in ((1, 1), (3, 2), (150, 2)):  # one token: k of 8 experts chosen, the rest empty
        x = torch.randn(s, b, HIDDEN)
        torch.testing.assert_close(fast.run(x, "grouped"), layer(x)[0], atol=1e-5, rtol=0)


@torch.no_grad()
def test_sync_free_moe_layers_make_a_long_forward_read_nothing(single_rank):
    """Inside ``sync_free_moe_layers`` a model's eval forward over 2 x 48 tokens (MLA, MoE,
    Mamba layers) equals its forward with Megatron's MoE layers within 1e-5 and reads nothing
    from the device (Megatron's dropless layer reads its per-expert counts in every MoE layer);
    the layers are Megatron's again on exit."""
    from megacpp_mcore.infer.moe import SyncFreeMoELayer, sync_free_moe_layers

    torch.manual_seed(2)
    gpt = _gpt("AEME", 4, mla=True)
    tokens = torch.randint(0, VOCAB, (2, 48))
    positions = torch.arange(48)[None].expand(2, -1)
    want = gpt(tokens, positions, None)
    counter = collections.Counter()
    with sync_free_moe_layers(gpt) as report:
        assert list(report.values()) == [None, None]
        assert sum(isinstance(m, SyncFreeMoELayer) for m in gpt.modules()) == 2
        with _counting_reads(counter):
            got = gpt(tokens, positions, None)
    assert sum(counter.values()) == 0, counter
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not any(isinstance(m, SyncFreeMoELayer) for m in gpt.modules())
    with _counting_reads(counter):
        gpt(tokens, positions, None)
    assert sum(counter.values()) > 0  # Megatron's layers read their counts


@pytest.mark.parametrize("router", list(ROUTERS) + ["softmax-pre", "sigmoid-expert-bias", "groups"])
@torch.no_grad()
def test_few_kernel_routing_equals_the_router_module(single_rank, router, caplog):
    """The decode path's own top-k routing (the router's gating, then top-k, softmax or sigmoid,
    scatter) gives the router module's eval probabilities for the plain settings (softmax
    after or before the top-k, sigmoid with scaling or an expert bias); expert groups keep the
    module; a routing that differs from the module on the planning probe is dropped with one log
    line and the module routes."""
    from megacpp_mcore.infer import moe as moe_module

    moe_cfg, overrides = ROUTERS.get(router, ROUTERS["softmax-top2-shared"])
    if router == "softmax-pre":
        overrides = {"moe_router_pre_softmax": True}
    elif router == "sigmoid-expert-bias":
        overrides = {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True}
    elif router == "groups":
        overrides = {"moe_router_num_groups": 2, "moe_router_group_topk": 1}
    torch.manual_seed(3)
    (layer,) = _moe_layers(_gpt(moe=moe_cfg, **overrides))
    if router == "sigmoid-expert-bias":
        layer.router.expert_bias.copy_(torch.randn_like(layer.router.expert_bias))
    fast, why = moe_module.plan_moe(layer)
    assert why is None
    if router == "groups":
        assert fast.router is None
        return
    assert fast.router is not None
    for tokens in (1, 3, 40):
        x = torch.randn(tokens, 1, HIDDEN)
        # to the last bit but for the order of a top-k sum (0.19 takes the top k unsorted in eval)
        torch.testing.assert_close(fast.router(x), layer.router(x)[0], atol=1e-6, rtol=1e-6)
    broken = moe_module._TopKRouting.of(layer.router)
    broken.scale = 3.0  # not the module's routing any more
    with caplog.at_level(logging.WARNING, logger=moe_module.__name__):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(moe_module._TopKRouting, "of", classmethod(lambda cls, r: broken))
            fast, why = moe_module.plan_moe(layer)
    assert why is None and fast.router is None
    assert "few-kernel routing differs" in caplog.text


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
    # by owner: a labelled tensor's reads count for its label, a gather's figure for its
    # labelled input's, the rest (activations) for "other"; the parts add up to the total
    owners = {w.untyped_storage().data_ptr(): "experts"}
    with Traffic(owners) as t:
        y = x @ w[0]
        w[index]
    assert t.by_owner == {"experts": 4 * 16 * 32 + 2 * 4 * 2 * 16 * 32, "other": 4 * (16 + 32)}
    assert sum(t.by_owner.values()) == t.bytes


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
    weights, and so does our DeviceCountsTEGroupedMLP (TE's layout; before it was known, every
    GPU-trained checkpoint decoded through Megatron's layer and refused CUDA graphs); an unknown
    expert class or a mis-shaped weight is named."""
    from megacpp_mcore.infer.moe import stacked_expert_weights
    from megacpp_mcore.layers.moe import DeviceCountsTEGroupedMLP

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
        # ours, what `E` builds on TE by default: TEGroupedMLP's parameters
        "device counts": _fake(DeviceCountsTEGroupedMLP.__name__,
                               linear_fc1=_fake("TEGroupedLinear", **fc1),
                               linear_fc2=_fake("TEGroupedLinear", **fc2)),
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


def test_moe_route_takes_the_sparse_kernel_while_it_reads_fewer_experts(single_rank):
    """With the Triton kernel (CUDA) the sparse route reads each chosen expert once: it wins over
    gathering (~3 reads per chosen expert) and over the dense route until the tokens' choices
    could cover every expert (a tie goes to the dense route), and never above its tile of tokens;
    narrowing the routes (a benchmark's on/off) keeps the torch routes' choice."""
    from megacpp_mcore.infer import moe as moe_module

    torch.manual_seed(0)
    (layer,) = _moe_layers(_gpt())  # 8 experts, top-2
    fast, _ = moe_module.plan_moe(layer)
    assert not fast.kernel  # CPU tensors: the torch routes
    assert [fast.route(n) for n in (1, 2, 4, 5)] == ["gathered", "dense", "dense", "dense"]
    fast.kernel = True  # as on CUDA; the kernel is opt-in
    assert fast.routes == moe_module.DEFAULT_ROUTES and fast.route(1) == "gathered"
    fast.routes = moe_module.ROUTES
    assert [fast.route(n) for n in (1, 2, 3, 4, 5)] == ["sparse"] * 3 + ["dense"] * 2
    assert fast.route(moe_module.KERNEL_MAX_TOKENS + 1) == "dense"
    fast.routes = ("dense", "gathered")
    assert [fast.route(n) for n in (1, 2)] == ["gathered", "dense"]
    fast.routes = ("sparse",)
    assert fast.route(1) == "sparse" and fast.route(moe_module.KERNEL_MAX_TOKENS + 1) == "dense"


@pytest.mark.triton
def test_sparse_expert_kernel_interpreted_equals_torch():
    """The sparse route's Triton kernel under Triton's CPU interpreter: expert_gemm equals the
    per-expert products of the used experts and zeros elsewhere (an input shared by all experts
    and one per expert; 1, 3, 17 and 64 tokens: tiles of 16, 32 and 64 rows; split K with a
    ragged last block; N not a multiple of the block), and the sparse route equals the dense route
    (itself checked against Megatron's layer above) on 8 experts top-2."""
    code = textwrap.dedent("""
        import torch
        from megacpp_mcore.infer.moe import KERNEL_MAX_TOKENS, SyncFreeMoE
        from megacpp_mcore.infer.moe_triton import MAX_TOKENS, expert_gemm
        assert MAX_TOKENS == KERNEL_MAX_TOKENS
        g = torch.Generator().manual_seed(0)
        for E, n, K, N, shared, split in [(4, 1, 32, 48, True, 1), (4, 3, 100, 70, False, 1),
                                          (5, 17, 130, 64, True, 2), (3, 64, 64, 96, False, 3)]:
            w = torch.randn(E, K, N, generator=g)
            a = torch.randn(1 if shared else E, n, K, generator=g)
            used = torch.tensor([e % 2 == 1 for e in range(E)])
            out = expert_gemm(a, w, used, split_k=split)
            ref = torch.matmul(a, w) * used[:, None, None]
            assert out.shape == (E, n, N)
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
        for bad in ({"block_n": 48}, {"block_k": 8}, {"split_k": 0}):
            try:
                expert_gemm(a, w, used, **bad)
            except ValueError as exc:
                assert str(list(bad.values())[0]) in str(exc)
            else:
                raise AssertionError(bad)
        fast = SyncFreeMoE.__new__(SyncFreeMoE)
        fast.kernel_options = {"block_n": 32, "split_k": 2}
        fast.w1 = torch.randn(8, 64, 64, generator=g) / 8
        fast.w2 = torch.randn(8, 32, 64, generator=g) / 6
        for n in (1, 3, 5):
            x = torch.randn(n, 64, generator=g)
            scores = torch.randn(n, 8, generator=g).softmax(-1)
            top = scores.topk(2, dim=-1)
            probs = torch.zeros(n, 8).scatter(1, top.indices, top.values)
            torch.testing.assert_close(fast.sparse(x, probs), fast.dense(x, probs), atol=1e-5, rtol=0)
        print("TRITON-INTERPRET-OK")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "TRITON-INTERPRET-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_bench_moe_decode_cpu_smoke(tmp_path, capsys):
    """scripts/bench_moe_decode.py --cpu-smoke: the torch routes agree with the dense one, the
    picked route is SyncFreeMoE's, bad flags name the value."""
    import json

    bench = load_script("bench_moe_decode")
    out = tmp_path / "moe.json"
    assert bench.main(["--cpu-smoke", "--tokens", "1,3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["tokens"]) for r in rows] == [("tiny", 1), ("tiny", 3)]
    assert all(r["gathered_max_err"] < 1e-5 and r["dense_max_err"] == 0 for r in rows)
    assert all(r["picked"] == "dense" for r in rows)  # 4 experts top-2: gathering never reads less
    assert "| tiny | fp32 | 3 |" in capsys.readouterr().out
    for bad, named in ((["--shapes", "huge"], "'huge'"), (["--tokens", "0"], "[0]"),
                       (["--kernel-configs", "64x64"], "'64x64'")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(bad)
        assert exit_info.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.gpu
@torch.no_grad()
def test_sparse_route_on_cuda_equals_dense_and_replays_in_a_graph(single_rank):
    """On a CUDA device with Triton: the planned layer takes the sparse kernel at decode sizes; it
    equals Megatron's layer (fp32, TF32 off) like the torch routes, and a CUDA graph of it
    replays the routing of new inputs (nothing read on the host)."""
    from megacpp_mcore.infer import moe as moe_module

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    (layer,) = _moe_layers(_gpt().cuda())
    fast, why = moe_module.plan_moe(layer)
    assert why is None and fast.kernel, "the sparse kernel failed its probe on CUDA"
    fast.routes = moe_module.ROUTES  # opted in
    for tokens in (1, 2, 3, 24):
        assert fast.route(tokens) == ("sparse" if 2 * tokens < 8 else "dense")
        x = torch.randn(tokens, 1, HIDDEN, device="cuda")
        ref, _ = layer(x)
        torch.testing.assert_close(fast.run(x, "sparse"), ref, atol=1e-5, rtol=0)
    static = torch.randn(2, 1, HIDDEN, device="cuda")
    fast.run(static, "sparse")  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fast.run(static, "sparse")
    for seed in (1, 2):
        torch.manual_seed(seed)
        static.copy_(torch.randn_like(static))
        graph.replay()
        torch.testing.assert_close(out, layer(static)[0], atol=1e-5, rtol=0)


@pytest.mark.gpu
@torch.no_grad()
def test_te_experts_as_built_for_training_take_the_sync_free_route(single_rank):
    """What `E` builds on TE for training (our DeviceCountsTEGroupedMLP under DeviceCountsMoELayer)
    is planned onto the sync-free route, probe passed: a GPU-trained checkpoint decodes without
    host syncs and in CUDA graphs (before its expert class was known, every such checkpoint
    decoded through Megatron's layer and `--cuda-graphs` refused it)."""
    from megacpp_mcore.infer import moe as moe_module

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    (layer,) = _moe_layers(_gpt(bf16=True, backend="te").cuda())
    assert type(layer.experts).__name__ == "DeviceCountsTEGroupedMLP"
    fast, why = moe_module.plan_moe(layer)
    assert why is None and fast is not None, why


@pytest.mark.gpu
@torch.no_grad()
def test_grouped_route_on_cuda_bf16_equals_megatron_and_replays_in_a_graph(single_rank):
    """On a CUDA device, bf16 (torch's grouped GEMM kernel): the grouped route passes its planning
    probe, equals Megatron's layer at 1 .. 4096 tokens within bf16 rounding, and a CUDA graph of
    it replays new inputs (no host read: the per-expert counts stay on the device)."""
    from megacpp_mcore.infer import moe as moe_module

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    (layer,) = _moe_layers(_gpt(bf16=True).cuda())
    fast, why = moe_module.plan_moe(layer)
    assert why is None and fast.grouped_ok, "the grouped route failed its probe on CUDA"
    for tokens in (1, 24, 4096):
        x = torch.randn(tokens, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
        ref, _ = layer(x)
        got = fast.run(x, "grouped")
        assert float((got.float() - ref.float()).norm() / ref.float().norm()) < 2e-2, tokens
    static = torch.randn(512, 2, HIDDEN, device="cuda", dtype=torch.bfloat16)
    fast.run(static, "grouped")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fast.run(static, "grouped")
    for seed in (1, 2):
        torch.manual_seed(seed)
        static.copy_(torch.randn_like(static))
        graph.replay()
        want = fast.run(static, "grouped")
        assert torch.equal(out, want)
