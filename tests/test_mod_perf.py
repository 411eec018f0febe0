"""Mixture-of-Depths performance contracts, checked on CPU: top-k layers only compute on the k
selected tokens (attention and MLP), no MoD forward/backward synchronises the host or draws random
numbers (CUDA-graph capturable), gateskip adds few ops and ~no FLOPs, the benchmark harness frees a
variant before timing the next, and TE's backend selection runs once per attention layer with
``patches.te_attention_backend_per_layer``."""

from __future__ import annotations

import ast
import collections
import collections.abc
import gc
import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from megacpp_mcore.features.mod import MoDConfig
from megacpp_mcore.models.presets import custom_model
from megacpp_mcore.testing import aux_loss_scale

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


class _RecordingEnviron(collections.abc.MutableMapping):
    """``os.environ`` that records every variable read through it."""

    def __init__(self, environ):
        self._environ, self.read = environ, []

    def __getitem__(self, key):
        self.read.append(key)
        return self._environ[key]

    def __contains__(self, key):
        self.read.append(key)
        return key in self._environ

    def __setitem__(self, key, value):
        self._environ[key] = value

    def __delitem__(self, key):
        del self._environ[key]

    def __iter__(self):
        return iter(self._environ)

    def __len__(self):
        return len(self._environ)


def _layer(symbol: str, mod: MoDConfig | None, seq: int = SEQ):
    from megatron.core.transformer.spec_utils import build_module

    from megacpp_mcore.train import runtime
    from megacpp_mcore.layers.attention import attention_layer_spec
    from megacpp_mcore.spec.backends import get_backend
    from megacpp_mcore.layers.feedforward import feedforward_layer_spec
    from megacpp_mcore.spec.context import LayerContext
    from megacpp_mcore.features.mod import mod_layer_spec

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
        rope = getattr(rope, "freqs", rope)  # mod._TokenRope -> its [k, b, 1, d] tensor
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


@pytest.mark.parametrize("symbol, bound", [("A", 0.15), ("E", 0.25)])
def test_topk_layer_saves_a_fraction_of_the_activations(single_rank, symbol, bound):
    """The memory side of the FLOP count (deterministic; speed is what ``scripts/bench_mod.py``
    measures): bytes of the distinct activation storages a layer saves for backward (weights
    aside) at capacity 0.125. A top-k layer keeps its block's activations for the k tokens only
    (attention's quadratic part shrinks by (k/T)^2), plus the full-size input once, for the
    one-pass input gradient (measured: A 0.10, E 0.17)."""
    saved = {}
    for name, mod in (("dense", None), ("topk", _TOPK)):
        layer = _layer(symbol, mod)
        weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _step(layer)
        saved[name] = sum(storages.values())
    assert saved["topk"] < bound * saved["dense"], saved


# ------------------------------------------------------------ no host sync, no RNG in forward
@pytest.mark.parametrize("mode, kwargs, train", [
    ("gateskip", dict(sparsity_loss_weight=1.0, budget_start=0.5, budget_end=0.5), True),
    ("gateskip", dict(inference="hard"), False),
    ("threshold", dict(sparsity_loss_weight=1.0), True),
    ("topk", dict(capacity=0.25), True),
    ("topk", dict(capacity=0.25, inference="causal"), False),
])
@pytest.mark.parametrize("symbol", ["A", "E"])
def test_no_host_sync_no_rng_no_environment_in_forward_backward(single_rank, monkeypatch, mode,
                                                              kwargs, train, symbol):
    """Nothing on the forward/backward path synchronises the host, draws random numbers or reads
    an environment variable the unwrapped layer does not read (upstream's linear backward reads
    CUDA_DEVICE_MAX_CONNECTIONS; MoD's kernel choice is made when the layer is built)."""
    reads = {}
    for name, mod in (("dense", None), ("mod", MoDConfig(mode=mode, **kwargs))):
        layer = _layer(symbol, mod)
        layer.train(train)
        _step(layer)  # warm-up outside the probes
        rng = torch.get_rng_state()
        environ = _RecordingEnviron(os.environ)
        monkeypatch.setattr(os, "environ", environ)
        with _Ops() as ops:
            _step(layer, seed=1)
        monkeypatch.undo()
        reads[name] = set(environ.read)
    assert not (set(ops.count) & SYNC_OPS), sorted(set(ops.count) & SYNC_OPS)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn: capturable without RNG state
    assert reads["mod"] <= reads["dense"], reads
    layer.megacpp_stats()  # the statistics are read back here, after the step, not in forward


# ----------------------------------------------------------------------- gateskip overhead
@pytest.mark.parametrize("symbol", ["A", "E"])
def test_gateskip_adds_few_ops_and_no_flops(single_rank, symbol):
    """Per layer fwd+bwd the gate costs: router GEMV (+ its two backward GEMMs and bias sum),
    sigmoid, gate mean (one reduction), the gated residual as ONE addcmul (replacing the
    bias-dropout-add), and the sparsity pressure folded into the sigmoid's backward (no zeros for
    the statistics output's grad, the loss scale riding on the add)."""
    counts, flops = {}, {}
    for name, mod in (("dense", None), ("gateskip", _GATESKIP)):
        layer = _layer(symbol, mod)
        _step(layer)
        with _Ops() as ops, FlopCounterMode(display=False) as counter:
            _step(layer, seed=1)
        counts[name], flops[name] = ops.compute_ops(), counter.get_total_flops()
    # 20 before the gate-op trims (MoDConfig.router_scale other than 1 adds a [1, h] product and
    # its backward)
    assert counts["gateskip"] - counts["dense"] <= 17, counts
    assert flops["gateskip"] < 1.01 * flops["dense"], flops


@pytest.mark.parametrize("symbol", ["A", "E"])
def test_topk_layer_op_overhead_is_bounded(single_rank, symbol):
    """Per topk layer fwd+bwd, on top of the block itself: router, topk+sort, gathers/scatter of
    the k tokens (and of their rotary embeddings), the gate with the router's BCE folded into its
    backward (selected gates saved, one scatter_add), the gated residual."""
    counts = {}
    for name, mod in (("dense", None), ("topk", _TOPK)):
        layer = _layer(symbol, mod)
        _step(layer)
        with _Ops() as ops:
            _step(layer, seed=1)
        counts[name] = ops.compute_ops()
    print("topk op overhead", counts["topk"] - counts["dense"])
    assert counts["topk"] - counts["dense"] <= 27, counts  # 30 before the _TopkGate trim


@pytest.mark.parametrize("scale", [1.0, 0.25, "tensor"])
@pytest.mark.parametrize("budget", [0.3, 0.95])
def test_sparsity_gate_gradient_matches_plain_torch(scale, budget):
    """_SparsityGate's folded backward == autograd of ``lm(gate) + s * w * relu(mean - budget)^2``
    (float and tensor loss scales; the pressure is active at budget 0.3, inactive at 0.95)."""
    from megacpp_mcore.features.mod.gate import SparsityGate

    s = torch.tensor([0.5]) if scale == "tensor" else scale
    w = 0.7
    logits = torch.randn(16, 3, 1, generator=torch.Generator().manual_seed(3)) + 0.5
    up = torch.randn(16, 3, 1, generator=torch.Generator().manual_seed(4))
    with aux_loss_scale(s):
        a = logits.clone().requires_grad_()
        gate, mean = SparsityGate.apply(a, w, budget, None)
        (gate * up).sum().backward()
    b = logits.clone().requires_grad_()
    ref = torch.sigmoid(b)
    ((ref * up).sum() + (s * w * torch.relu(ref.mean() - budget) ** 2).sum()).backward()
    assert not mean.requires_grad and mean.item() == pytest.approx(ref.mean().item(), abs=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    if budget < 0.5:
        assert not torch.allclose(b.grad, torch.sigmoid(logits) * (1 - torch.sigmoid(logits)) * up)


def _max_rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute error relative to the largest reference value (float64)."""
    expected = expected.detach().double()
    return (got.detach().double() - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)


def _gateskip_reference(x, out, weight, bias, loss_weight, budget, scale, up):
    """Plain torch: router Linear, sigmoid gate, gated residual and the sparsity loss as a graph."""
    gate = torch.sigmoid(torch.nn.functional.linear(x, weight, bias))
    y = x + gate * out
    loss = (y * up).sum() + (scale * loss_weight * torch.relu(gate.mean() - budget) ** 2).sum()
    return y, gate.mean(), loss


@pytest.mark.parametrize("scale", [1.0, 0.25, "tensor"])
@pytest.mark.parametrize("budget", [0.3, 0.95])
def test_fused_gateskip_matches_plain_torch(scale, budget):
    """_FusedGateSkip (router read at the residual seam, router input-gradient folded into dx,
    sparsity loss on the gate's backward) == autograd of the plain formulation, float64."""
    from megacpp_mcore.features.mod.gate import FusedGateSkip

    s = torch.tensor([0.5], dtype=torch.float64) if scale == "tensor" else scale
    g = torch.Generator().manual_seed(7)
    x, out, up = (torch.randn(16, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    weight = torch.randn(1, 8, generator=g, dtype=torch.float64) * 0.3
    bias = torch.tensor([0.4], dtype=torch.float64)
    with aux_loss_scale(s):
        ours = [t.clone().requires_grad_() for t in (x, out, weight, bias)]
        y, mean = FusedGateSkip.apply(*ours, 0.7, budget, None, False)
        (y * up).sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, out, weight, bias)]
    y_ref, mean_ref, loss = _gateskip_reference(*ref, 0.7, budget, s, up)
    loss.backward()
    assert not mean.requires_grad
    torch.testing.assert_close(mean, mean_ref.detach())
    torch.testing.assert_close(y, y_ref.detach())
    for name, a, b in zip(("x", "out", "weight", "bias"), ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)
    if budget < 0.5:  # the sparsity pressure is active and changes the router's gradient
        no_loss = [t.clone().requires_grad_() for t in (x, out, weight, bias)]
        _gateskip_reference(*no_loss, 0.0, budget, 1.0, up)[2].backward()
        assert not torch.allclose(ours[2].grad, no_loss[2].grad)


def test_gateskip_split_layers_take_the_fused_seam(single_rank, monkeypatch):
    """Split A and E layers route through FusedGateSkip (one residual seam); a forced gate, the
    hard-budget eval and threshold mode keep the router-before-block path."""
    from megacpp_mcore.features.mod.gate import FusedGateSkip

    calls = []
    original = FusedGateSkip.apply
    monkeypatch.setattr(FusedGateSkip, "apply",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    for symbol in "AE":
        layer = _layer(symbol, _GATESKIP)
        _step(layer)
        assert len(calls) == 1, symbol
        layer.force_gate(1.0)
        _step(layer)
        layer.force_gate(None)
        _step(layer.eval())  # eval, soft gates: fused as well
        assert len(calls) == 2, symbol
        calls.clear()
    _step(_layer("A", MoDConfig(mode="gateskip", inference="hard")).eval())
    _step(_layer("A", MoDConfig(mode="threshold")))
    assert calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [2048, 1000])
def test_fused_gateskip_triton_matches_float64_reference(dtype, hidden):
    """The Triton kernels of _FusedGateSkip (and, as a control, its torch formulation on the same
    device) == the plain float64 autograd reference on the same inputs, within the rounding of
    the activation dtype (max error relative to the largest reference value)."""
    from megacpp_mcore.features.mod.gate import FusedGateSkip

    g = torch.Generator(device="cuda").manual_seed(0)
    x, out, up = (torch.randn(1030, 2, hidden, device="cuda", generator=g).to(dtype) for _ in range(3))
    weight = (torch.randn(1, hidden, device="cuda", generator=g) * 0.02).to(dtype)
    bias = torch.tensor([1.0], device="cuda", dtype=dtype)
    names = ("y", "mean", "dx", "dout", "dweight", "dbias")
    results = {}
    with aux_loss_scale(torch.tensor([0.5], device="cuda")):
        for use_triton in (True, False):
            leaves = [t.clone().requires_grad_() for t in (x, out, weight, bias)]
            y, mean = FusedGateSkip.apply(*leaves, 3.0, 0.2, None, use_triton)
            (y.double() * up.double()).sum().backward()
            results[use_triton] = [y, mean] + [t.grad for t in leaves]
    ref = [t.double().requires_grad_() for t in (x, out, weight, bias)]
    y_ref, mean_ref, loss = _gateskip_reference(*ref, 3.0, 0.2, 0.5, up.double())
    loss.backward()
    expected = [y_ref.detach(), mean_ref.detach()] + [t.grad for t in ref]
    # the torch control rounds dy * out to the activation dtype before its row sums (and may use
    # TF32 GEMMs); the kernels accumulate in fp32
    tols = {True: {torch.bfloat16: 1e-2, torch.float32: 1e-5},
            False: {torch.bfloat16: 2e-2, torch.float32: 1e-3}}
    for use_triton, got in results.items():
        for name, a, b in zip(names, got, expected):
            err = _max_rel_err(a, b)
            assert err <= tols[use_triton][dtype], (f"triton={use_triton}", name, err)


def _topk_route(x, weight, bias, mat, k, aux_weight, fused, use_triton=False, scale=1.0):
    """A top-k routed toy layer: ``y = x`` except the top-k rows ``x + g * tanh(x @ mat)``, and
    the loss term of the router's BCE (``scale * aux_weight * BCE(logits, onehot(idx))``) that the
    fused function applies in its backward (None for the fused path)."""
    from megacpp_mcore.features.mod.topk import TopkHandoff, TopkRouteIn, TopkRouteOut

    hidden = x.shape[-1]
    if fused:
        handoff = TopkHandoff()
        selected, gate, idx, logits = TopkRouteIn.apply(x, weight, bias, k, aux_weight, handoff, use_triton)
        aux = None
    else:
        logits = torch.nn.functional.linear(x, weight, bias)
        idx = logits.detach().squeeze(-1).topk(k, dim=0, sorted=False).indices.sort(dim=0).values
        selected = x.gather(0, idx.unsqueeze(-1).expand(-1, -1, hidden))
        gate = torch.sigmoid(logits).gather(0, idx.unsqueeze(-1))
        target = torch.zeros_like(logits).scatter_(0, idx.unsqueeze(-1), 1.0)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        aux = (scale * aux_weight * bce).sum()  # a [1] tensor scale: a 0-d loss
    processed = selected + gate * torch.tanh(selected @ mat)
    if fused:
        return TopkRouteOut.apply(x, processed, idx, handoff), logits, aux
    return x.scatter(0, idx.unsqueeze(-1).expand(-1, -1, hidden), processed), logits, aux


@pytest.mark.parametrize("aux_weight, scale", [(0.3, 1.0), (0.3, "tensor"), (0.0, 1.0)])
def test_topk_route_matches_plain_torch(aux_weight, scale):
    """TopkRouteIn/TopkRouteOut (input gradient formed in one pass from the handed-over dy, the
    gate's gradient and the router BCE folded into it) == autograd of router + gather + sigmoid +
    scatter + BCE, float64 (float and tensor loss scales); unselected rows pass through exactly."""
    s = torch.tensor([0.5], dtype=torch.float64) if scale == "tensor" else scale
    g = torch.Generator().manual_seed(11)
    x, up = (torch.randn(32, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    weight = torch.randn(1, 8, generator=g, dtype=torch.float64)
    bias = torch.tensor([0.1], dtype=torch.float64)
    mat = torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.5
    grads, outs = [], []
    with aux_loss_scale(s):
        for fused in (True, False):
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias, mat)]
            y, logits, aux = _topk_route(*leaves, 4, aux_weight, fused, scale=s)
            loss = (y * up).sum()
            (loss if aux is None else loss + aux).backward()
            grads.append([t.grad for t in leaves])
            outs.append((y.detach(), logits.detach()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    unselected = (outs[0][0] == x).all(-1)
    assert unselected.sum() == (32 - 4) * 3  # exactly the k=4 rows per sequence changed
    for name, a, b in zip(("x", "weight", "bias", "mat"), *grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with Triton")
@pytest.mark.parametrize("scale", [1.0, "tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [2048, 1000])
def test_topk_route_triton_matches_float64_reference(dtype, hidden, scale):
    """The Triton router GEMV and one-pass input gradient (gate and router-BCE gradients formed in
    the kernel) == float64 autograd of the plain formulation on the same inputs and the same routes
    (max error relative to the largest value)."""
    s = torch.tensor([0.5], device="cuda") if scale == "tensor" else scale
    g = torch.Generator(device="cuda").manual_seed(1)
    x, up = (torch.randn(1024, 2, hidden, device="cuda", generator=g).to(dtype) for _ in range(2))
    weight = (torch.randn(1, hidden, device="cuda", generator=g) * 0.02).to(dtype)
    bias = torch.tensor([0.5], device="cuda", dtype=dtype)
    mat = (torch.randn(hidden, hidden, device="cuda", generator=g) / hidden ** 0.5).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, mat)]
    with aux_loss_scale(s):
        y, logits, _ = _topk_route(*leaves, 128, 30.0, True, use_triton=True)
        (y.double() * up.double()).sum().backward()
    # the float64 reference on the routes the kernel chose (ties in bf16 logits may order differently)
    ref = [t.double().requires_grad_() for t in (x, weight, bias, mat)]
    y_ref, logits_ref, aux = _topk_route(*ref, 128, 30.0, False,
                                         scale=s.double() if scale == "tensor" else s)
    ((y_ref * up.double()).sum() + aux).backward()
    tol = {torch.bfloat16: 2e-2, torch.float32: 1e-4}[dtype]
    for name, a, b in zip(("y", "logits", "dx", "dweight", "dbias", "dmat"),
                          [y, logits] + [t.grad for t in leaves], [y_ref, logits_ref] + [t.grad for t in ref]):
        err = _max_rel_err(a, b)
        assert err <= tol, (name, err)


# ------------------------------------------------------------------------ benchmark harness
def test_bench_frees_each_variant_before_the_next(single_rank, monkeypatch, tmp_path):
    """The previous variant (model, grads, Adam state) must be gone when the next one is built:
    it used to stay alive through a reference cycle and inflate the next variant's peak memory.
    Ratios measured on CPU mean nothing, so the top-k target is set out of reach of failing: the
    harness must then report success (exit 0) with every variant and its ratio written out."""
    from megatron.core.models.gpt import GPTModel

    gc.collect()  # models of earlier tests in this process
    before = sum(isinstance(o, GPTModel) for o in gc.get_objects())

    from megacpp_mcore.train import runtime

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
    monkeypatch.setattr(bench_mod, "TARGETS", {"topk": math.inf})
    out = tmp_path / "bench.json"
    code = bench_mod.main(["--cpu-smoke", "--blocks", "1", "--hidden", "32", "--heads", "4",
                           "--ffn", "64", "--vocab", "64", "--seq", "16", "--batch", "1",
                           "--warmup", "1", "--steps", "1", "--variants", "upstream-dense,dense,topk",
                           "--mod-kernels", "torch", "--out", str(out)])
    assert code == 0
    assert alive == [before] * 3
    results = json.loads(out.read_text())
    assert list(results["variants"]) == ["upstream-dense", "dense", "topk"]
    assert [v["mod_layers"] for v in results["variants"].values()] == [0, 0, 2]  # block 0: A and E
    assert results["args"]["mod_kernels"] == "torch"
    assert 0 < results["ratios"]["topk"]["ratio_vs_dense"] < math.inf and results["ratios"]["topk"]["ok"]


# ------------------------------------------------------------------------------------- GPU
_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device with TE")


def test_lazy_statistics_fold_without_set_step(single_rank):
    """Statistics stay on device as recorded tensors; without megacpp_set_step (a stock loop) they
    are folded every MoDStats.FOLD_AT forwards, so memory stays bounded and the means stay exact."""
    layer = _layer("E", MoDConfig(mode="gateskip", sparsity_loss_weight=0.5, budget_start=0.6,
                                  budget_end=0.6))
    with torch.no_grad():
        layer.mod_router.weight.zero_()
    gates = []
    fold_at = layer._stats.FOLD_AT
    for i in range(fold_at + 6):
        with torch.no_grad():
            layer.mod_router.bias.fill_(0.01 * i)
        _step(layer, batch=1, seed=i)
        gates.append(1.0 / (1.0 + math.exp(-0.01 * i)))  # every token's gate this forward
        assert layer._stats.pending("gate_mean") == (i + 1) % fold_at  # folded at fold_at
    stats = layer.megacpp_stats()
    assert stats["gate_mean"] == pytest.approx(sum(gates) / len(gates), rel=1e-6)
    losses = [0.5 * max(g - 0.6, 0.0) ** 2 for g in gates]
    assert stats["loss_sparsity"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert stats["fraction_processed"] == 1.0 and stats["budget"] == 0.6


# ------------------------------------------------- TE backend selection: one cache per layer
_TE_VERSION = "2.11.0"
_TE_CACHE = Path.home() / ".cache" / "megacpp_mcore" / "wheels"
_DPA = "transformer_engine/pytorch/attention/dot_product_attention/dot_product_attention.py"


def _te_wheel() -> Path | None:
    """TE's pure-Python wheel (the code under test is TE's own selection code): from the cache,
    else downloaded once from the package index with pip (no install)."""
    cached = sorted(_TE_CACHE.glob(f"transformer_engine-{_TE_VERSION}-py3-none-any.whl"))
    if cached:
        return cached[0]
    _TE_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "-d", str(_TE_CACHE), f"transformer-engine=={_TE_VERSION}"],
        check=False, capture_output=True, timeout=300,
    )
    cached = sorted(_TE_CACHE.glob(f"transformer_engine-{_TE_VERSION}-py3-none-any.whl"))
    return cached[0] if cached else None


def _real_dpa_source() -> str | None:
    """TE's real ``dot_product_attention.py``: the installed one, else the TE 2.11 wheel."""
    try:
        from transformer_engine.pytorch.attention.dot_product_attention import dot_product_attention
        return inspect.getsource(dot_product_attention)
    except ImportError:
        pass
    wheel_path = _te_wheel()
    if wheel_path is not None:
        with zipfile.ZipFile(wheel_path) as wheel:
            return wheel.read(_DPA).decode()
    return None


def _cache_fragment(source: str) -> tuple[str, str]:
    """From TE's source: the module-level ``_attention_backends = {...}`` and, from
    ``DotProductAttention.forward``, the statements from ``global _attention_backends`` through the
    backend-selection ``if`` (the code that decides whether ``get_attention_backend`` runs)."""
    tree = ast.parse(source)
    init = next(n for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", None) == "_attention_backends")
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DotProductAttention")
    forward = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    for block in ast.walk(forward):
        body = getattr(block, "body", None)
        if not isinstance(body, list):
            continue
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.Global) and "_attention_backends" in stmt.names:
                selection = body[i + 1]
                lines = source.splitlines()[stmt.lineno - 1:selection.end_lineno]
                return ast.get_source_segment(source, init), textwrap.dedent("\n".join(lines))
    raise AssertionError("TE's DotProductAttention.forward has no `global _attention_backends`")


def _fake_te(tmp_path, monkeypatch, source: str):
    """A ``transformer_engine`` package whose DotProductAttention.forward runs TE's REAL cache and
    selection code (extracted from ``source``) around a counting ``get_attention_backend``;
    ``MegatronLikeDPA`` calls it through ``super().forward`` as Megatron's TEDotProductAttention does."""
    init, fragment = _cache_fragment(source)
    pkg = tmp_path / "transformer_engine" / "pytorch" / "attention" / "dot_product_attention"
    pkg.mkdir(parents=True)
    for part in (pkg, *pkg.parents):
        if part == tmp_path:
            break
        (part / "__init__.py").write_text("")
    (pkg / "utils.py").write_text(textwrap.dedent('''
        import dataclasses
        calls = []

        @dataclasses.dataclass(eq=True)
        class AttentionParams:
            max_seqlen_q: int = 1
            is_training: bool = True
            fp8_meta: dict = None  # real TE passes a dict here on every call

        def get_attention_backend(params):
            calls.append(params.max_seqlen_q)
            flash = params.max_seqlen_q > 64
            return flash, "fa-" + str(params.max_seqlen_q), not flash, 1, False, None
    '''))
    body = textwrap.indent(fragment, " " * 8)
    (pkg / "dot_product_attention.py").write_text(
        "import logging\nfrom . import utils as dpa_utils\n\n"
        + init + "\n\n\ndef is_in_onnx_export_mode():\n    return False\n\n\n"
        "class DotProductAttention:\n"
        "    def __init__(self):\n        self.logger = logging.getLogger('fake-te')\n"
        "        self.training = True\n\n"
        "    def forward(self, seq):\n"
        "        attention_params = dpa_utils.AttentionParams(\n"
        "            max_seqlen_q=seq, is_training=self.training, fp8_meta={'recipe': None})\n"
        + body + "\n"
        "        return use_flash_attention, flash_attention_backend, use_fused_attention\n\n\n"
        "class MegatronLikeDPA(DotProductAttention):\n"
        "    def forward(self, seq):\n        return super().forward(seq)\n")
    for name in [m for m in sys.modules if m.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    from transformer_engine.pytorch.attention.dot_product_attention import dot_product_attention, utils

    return utils, dot_product_attention


def _drop_fake_te():
    for name in [m for m in sys.modules if m.startswith("transformer_engine")]:
        sys.modules.pop(name)


def test_te_backend_per_layer_patch_on_te_real_selection_code(tmp_path, monkeypatch):
    """TE 2.11's own cache/selection code: dense and top-k attention layers alternate; upstream
    re-selects on every call, with the patch each layer selects once for its shape."""
    source = _real_dpa_source()
    assert source is not None, f"needs Transformer Engine installed or its {_TE_VERSION} wheel (pip download into {_TE_CACHE})"
    from megacpp_mcore.patches import te_attention_backend_per_layer as patch

    utils, dpa = _fake_te(tmp_path, monkeypatch, source)
    try:
        assert patch.check() == "needed" and patch.applied() is False
        dense, topk = dpa.MegatronLikeDPA(), dpa.MegatronLikeDPA()
        upstream = [(dense.forward(512), topk.forward(64)) for _ in range(4)]
        assert utils.calls == [512, 64] * 4  # upstream: a full re-selection on every call
        shared = dpa._attention_backends
        assert patch.apply() == [f"{dpa.__name__}.DotProductAttention.forward"]
        assert patch.apply() == [] and patch.applied() is True  # idempotent
        utils.calls.clear()
        patched = [(dense.forward(512), topk.forward(64)) for _ in range(4)]
        assert patched == upstream  # the same selections
        assert utils.calls == [512, 64]  # once per layer
        assert dpa._attention_backends is shared  # the module global is restored after each call
        topk.training = False  # any change of the parameters still re-selects, per layer
        topk.forward(64), dense.forward(512), topk.forward(64)
        assert utils.calls == [512, 64, 64]
        assert patch.check() == "needed"  # the probe looks behind our wrapper
    finally:
        _drop_fake_te()


def test_te_backend_per_layer_patch_restores_global_on_error(tmp_path, monkeypatch):
    source = _real_dpa_source()
    assert source is not None, f"needs Transformer Engine installed or its {_TE_VERSION} wheel (pip download into {_TE_CACHE})"
    from megacpp_mcore.patches import te_attention_backend_per_layer as patch

    utils, dpa = _fake_te(tmp_path, monkeypatch, source)
    try:
        shared = dpa._attention_backends
        patch.apply()
        monkeypatch.setattr(utils, "get_attention_backend", lambda params: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            dpa.DotProductAttention().forward(8)
        assert dpa._attention_backends is shared
    finally:
        _drop_fake_te()


def test_te_backend_per_layer_patch_status_when_forward_no_longer_reads_the_global(tmp_path, monkeypatch):
    source = _real_dpa_source()
    assert source is not None, f"needs Transformer Engine installed or its {_TE_VERSION} wheel (pip download into {_TE_CACHE})"
    from megacpp_mcore.patches import te_attention_backend_per_layer as patch

    _, dpa = _fake_te(tmp_path, monkeypatch, source)
    try:
        dpa.DotProductAttention.forward = lambda self, seq: None  # the cache moved (an upstream fix)
        assert patch.check() == "fixed-upstream" and patch.apply() == []
        del dpa._attention_backends
        assert patch.check() == "target-missing"
    finally:
        _drop_fake_te()


@pytest.mark.gpu
@_NO_CUDA
def test_te_topk_and_dense_attention_select_backend_once_per_layer(single_rank, monkeypatch):
    """Real TE: a dense and a top-k attention layer alternate; with the patch TE's backend
    selection (``dpa_utils.get_attention_backend``, the name TE's forward calls) runs once per
    layer, not on every call."""
    from megatron.core.transformer.spec_utils import build_module
    from transformer_engine.pytorch.attention.dot_product_attention import utils

    from megacpp_mcore.train import runtime
    from megacpp_mcore.layers.attention import attention_layer_spec
    from megacpp_mcore.spec.backends import get_backend
    from megacpp_mcore.spec.context import LayerContext
    from megacpp_mcore.features.mod import mod_layer_spec
    from megacpp_mcore.patches import _wrapping
    from megacpp_mcore.patches import te_attention_backend_per_layer as patch

    calls = []
    fn = utils.get_attention_backend

    def counting(params, *args, **kwargs):
        calls.append(params.max_seqlen_q)
        return fn(params, *args, **kwargs)

    monkeypatch.setattr(utils, "get_attention_backend", counting)
    assert patch.check() == "needed"
    # Entry points (runtime.initialize, used by earlier tests in this process) apply the patch:
    # start from upstream's forward; monkeypatch restores whatever was there afterwards.
    from transformer_engine.pytorch.attention.dot_product_attention import dot_product_attention

    dpa_cls = dot_product_attention.DotProductAttention
    monkeypatch.setattr(dpa_cls, "forward", _wrapping.upstream(dpa_cls.forward, patch.NAME))
    assert patch.applied() is False
    model = custom_model(pattern="AE", num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
                         ffn_hidden_size=4 * HIDDEN, vocab_size=128, seq_length=SEQ, mla=None,
                         moe=None)
    cfg = runtime.transformer_config(model, runtime.Parallelism(), apply_rope_fusion=False)
    layers = []
    for mod in (None, _TOPK):
        ctx = LayerContext(config=cfg, backend=get_backend("te"), index=0, symbol="A",
                           features=frozenset({"mod"} if mod else ()),
                           feature_configs={"mod": mod} if mod else {})
        spec = attention_layer_spec(ctx)
        layers.append(build_module(mod_layer_spec(spec, ctx) if mod else spec, config=cfg,
                                   layer_number=1).cuda())
    rope = _rope().cuda()

    def run(rounds):
        for _ in range(rounds):
            for layer in layers:
                x = torch.randn(SEQ, 2, HIDDEN, device="cuda", dtype=cfg.params_dtype,
                                requires_grad=True)
                layer(hidden_states=x, attention_mask=None, rotary_pos_emb=rope)[0].sum().backward()

    run(3)
    assert len(calls) >= 6, calls  # upstream: the alternation re-selects on every call
    calls.clear()
    assert patch.apply() and patch.applied() is True
    run(4)
    assert sorted(calls) == sorted({SEQ, _TOPK.topk_count(SEQ)}), calls  # once per layer
