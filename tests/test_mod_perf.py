"""Mixture-of-Depths performance contracts, checked on CPU: top-k layers only compute on the k
selected tokens (attention and MLP), no MoD forward/backward synchronises the host or draws random
numbers (CUDA-graph capturable), gateskip adds few ops and ~no FLOPs, the benchmark harness frees a
variant before timing the next, and the TE backend-selection memo patch."""

from __future__ import annotations

import collections
import gc
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from megacpp_mcore.mod import MoDConfig
from megacpp_mcore.presets import custom_model

SEQ, HIDDEN, HEADS = 256, 64, 4
ROOT = Path(__file__).resolve().parents[1]
# aten ops that copy a device value to the host (.item(), bool(), .tolist()) or whose output shape
# depends on data: each one is a host synchronisation on CUDA.
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique",
            "aten._unique2", "aten.is_nonzero", "aten.equal", "aten.item", "aten.repeat_interleave"}
VIEW_OPS = {"aten.view", "aten._unsafe_view", "aten.t", "aten.expand", "aten.unsqueeze",
            "aten.squeeze", "aten.alias", "aten.as_strided", "aten.transpose", "aten.permute",
            "aten.split", "aten.slice", "aten.select", "aten.detach"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def compute_ops(self) -> int:
        return sum(n for op, n in self.count.items() if op not in VIEW_OPS)


def _layer(symbol: str, mod: MoDConfig | None, seq: int = SEQ):
    from megatron.core.transformer.spec_utils import build_module

    from megacpp_mcore import runtime
    from megacpp_mcore.attention import attention_layer_spec
    from megacpp_mcore.backends import get_backend
    from megacpp_mcore.feedforward import feedforward_layer_spec
    from megacpp_mcore.layer_context import LayerContext
    from megacpp_mcore.mod import mod_layer_spec

    model = custom_model(pattern="AE", num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
                         ffn_hidden_size=4 * HIDDEN, vocab_size=128, seq_length=seq, mla=None,
                         moe=None)
    cfg = runtime.transformer_config(model, runtime.Parallelism())
    ctx = LayerContext(config=cfg, backend=get_backend("local"), index=0, symbol=symbol,
                       features=frozenset({"mod"} if mod else ()),
                       feature_configs={"mod": mod} if mod else {})
    spec = attention_layer_spec(ctx) if symbol == "A" else feedforward_layer_spec(ctx)
    if mod is not None:
        spec = mod_layer_spec(spec, ctx)
    torch.manual_seed(0)
    return build_module(spec, config=cfg, layer_number=1)


def _rope(seq: int = SEQ, dim: int = HIDDEN // HEADS) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(seq).float(), inv)
    return torch.cat([freqs, freqs], -1)[:, None, None, :]


def _step(layer, *, batch: int = 2, seed: int = 0, seq: int = SEQ):
    x = torch.randn(seq, batch, HIDDEN, generator=torch.Generator().manual_seed(seed),
                    requires_grad=True)
    out, _ = layer(hidden_states=x, attention_mask=None, rotary_pos_emb=_rope(seq))
    if out.requires_grad:
        out.sum().backward()
    return out


_TOPK = MoDConfig(mode="topk", capacity=0.125)
_GATESKIP = MoDConfig(mode="gateskip", sparsity_loss_weight=1.0, budget_start=0.5, budget_end=0.5)


# ------------------------------------------------------------------------ top-k skips the work
def test_topk_inner_attention_and_mlp_see_only_k_tokens(single_rank):
    k = _TOPK.topk_count(SEQ)  # 32 of 256
    seen = collections.defaultdict(list)
    attn, mlp = _layer("A", _TOPK), _layer("E", _TOPK)
    for name, module in [("qkv", attn.self_attention.linear_qkv),
                         ("core", attn.self_attention.core_attention),
                         ("proj", attn.self_attention.linear_proj),
                         ("fc1", mlp.mlp.linear_fc1), ("fc2", mlp.mlp.linear_fc2)]:
        module.register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(tuple(args[0].shape)))
    rope_shapes = []
    original = attn.self_attention.forward

    def spy(*args, **kwargs):
        rope = kwargs["rotary_pos_emb"]
        rope_shapes.append(tuple((rope[0] if isinstance(rope, tuple) else rope).shape))
        return original(*args, **kwargs)

    attn.self_attention.forward = spy
    _step(attn)
    _step(mlp)
    assert seen["qkv"][0][0] == seen["proj"][0][0] == k  # [k, b, ...]: k tokens, not the sequence
    assert seen["core"][0][0] == k
    assert seen["fc1"] == [(k, 2, HIDDEN)] and seen["fc2"][0][0] == k
    assert rope_shapes == [(k, 2, 1, HIDDEN // HEADS)]  # per-token rotary of the k positions only


@pytest.mark.parametrize("symbol, bound", [("A", 0.08), ("E", 0.16)])
def test_topk_layer_flops_are_a_fraction_of_dense(single_rank, symbol, bound):
    """Forward+backward FLOPs at capacity 0.125: the MLP pays ~k/T (plus the router), attention
    less than that (its quadratic part shrinks by (k/T)^2)."""
    flops = {}
    for name, mod in (("dense", None), ("topk", _TOPK)):
        layer = _layer(symbol, mod)
        with FlopCounterMode(display=False) as counter:
            _step(layer)
        flops[name] = counter.get_total_flops()
    assert flops["topk"] < bound * flops["dense"], flops


def test_topk_layer_is_several_times_cheaper_in_time(single_rank):
    """Wall time on CPU (one thread, best of 5, seq 1024 so that the work, not per-op overhead,
    dominates): the measurable side of the FLOP count."""
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = {}
    try:
        for name, mod in (("dense", None), ("topk", _TOPK)):
            layer, best = _layer("A", mod, seq=1024), float("inf")
            for _ in range(5):
                start = time.perf_counter()
                _step(layer, batch=1, seq=1024)
                best = min(best, time.perf_counter() - start)
            times[name] = best
    finally:
        torch.set_num_threads(threads)
    assert times["topk"] * 3 < times["dense"], times


# ------------------------------------------------------------ no host sync, no RNG in forward
@pytest.mark.parametrize("mode, kwargs, train", [
    ("gateskip", dict(sparsity_loss_weight=1.0, budget_start=0.5, budget_end=0.5), True),
    ("gateskip", dict(inference="hard"), False),
    ("threshold", dict(sparsity_loss_weight=1.0), True),
    ("topk", dict(capacity=0.25), True),
    ("topk", dict(capacity=0.25, inference="causal"), False),
])
@pytest.mark.parametrize("symbol", ["A", "E"])
def test_no_host_sync_and_no_rng_in_forward_backward(single_rank, mode, kwargs, train, symbol):
    layer = _layer(symbol, MoDConfig(mode=mode, **kwargs))
    layer.train(train)
    _step(layer)  # warm-up outside the probes
    rng = torch.get_rng_state()
    with _Ops() as ops:
        _step(layer, seed=1)
    assert not (set(ops.count) & SYNC_OPS), sorted(set(ops.count) & SYNC_OPS)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn: capturable without RNG state
    layer.megacpp_stats()  # the statistics are read back here, after the step, not in forward


# ----------------------------------------------------------------------- gateskip overhead
@pytest.mark.parametrize("symbol", ["A", "E"])
def test_gateskip_adds_few_ops_and_no_flops(single_rank, symbol):
    """Per layer fwd+bwd the gate costs: router GEMV (+ its two backward GEMMs and bias sum),
    sigmoid, gate sum, the gated residual as ONE addcmul (replacing the bias-dropout-add), and the
    sparsity pressure folded into the sigmoid's backward."""
    counts, flops = {}, {}
    for name, mod in (("dense", None), ("gateskip", _GATESKIP)):
        layer = _layer(symbol, mod)
        _step(layer)
        with _Ops() as ops, FlopCounterMode(display=False) as counter:
            _step(layer, seed=1)
        counts[name], flops[name] = ops.compute_ops(), counter.get_total_flops()
    assert counts["gateskip"] - counts["dense"] <= 20, counts
    assert flops["gateskip"] < 1.01 * flops["dense"], flops


# ------------------------------------------------------------------------ benchmark harness
def test_bench_frees_each_variant_before_the_next(single_rank, monkeypatch):
    """The previous variant (model, grads, Adam state) must be gone when the next one is built:
    it used to stay alive through a reference cycle and inflate the next variant's peak memory."""
    from megatron.core.models.gpt import GPTModel

    gc.collect()  # models of earlier tests in this process
    before = sum(isinstance(o, GPTModel) for o in gc.get_objects())

    from megacpp_mcore import runtime

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import bench_mod

    alive = []
    build = bench_mod._build

    def counting_build(args, variant):
        alive.append(sum(isinstance(o, GPTModel) for o in gc.get_objects()))
        return build(args, variant)

    monkeypatch.setattr(bench_mod, "_build", counting_build)
    monkeypatch.setattr(runtime, "initialize", lambda *a, **k: 0)
    monkeypatch.setattr(runtime, "shutdown", lambda: None)
    code = bench_mod.main(["--cpu-smoke", "--blocks", "1", "--hidden", "32", "--heads", "4",
                           "--ffn", "64", "--vocab", "64", "--seq", "16", "--batch", "1",
                           "--warmup", "1", "--steps", "1", "--variants", "upstream-dense,dense,topk"])
    assert code in (0, 1)  # ratios on CPU mean nothing; the harness ran every variant
    assert alive == [before] * 3


# ------------------------------------------------------------------------------------- GPU
_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with TE")


def test_lazy_statistics_fold_without_set_step(single_rank):
    """Statistics stay on device as recorded tensors; without megacpp_set_step (a stock loop) they
    are folded every _FOLD_AT forwards, so memory stays bounded and the means stay exact."""
    import math

    layer = _layer("E", MoDConfig(mode="gateskip", sparsity_loss_weight=0.5, budget_start=0.6,
                                  budget_end=0.6))
    with torch.no_grad():
        layer.mod_router.weight.zero_()
    gates = []
    for i in range(layer._FOLD_AT + 6):
        with torch.no_grad():
            layer.mod_router.bias.fill_(0.01 * i)
        _step(layer, batch=1, seed=i)
        gates.append(1.0 / (1.0 + math.exp(-0.01 * i)))  # every token's gate this forward
        assert len(layer._pending.get("gate_mean", [])) < layer._FOLD_AT
    stats = layer.megacpp_stats()
    assert stats["gate_mean"] == pytest.approx(sum(gates) / len(gates), rel=1e-6)
    losses = [0.5 * max(g - 0.6, 0.0) ** 2 for g in gates]
    assert stats["loss_sparsity"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert stats["fraction_processed"] == 1.0 and stats["budget"] == 0.6
