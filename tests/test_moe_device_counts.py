"""``E``'s MoE with the per-expert counts on the device: the grouped GEMM against per-expert
matmuls, the layer against Megatron's own MoE layer and a plain-torch MoE, when the path applies,
and (GPU) TE's grouped experts against TEGroupedMLP on the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megacpp_mcore.layers import moe as device_counts

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

H, FFN, EXPERTS, TOPK = 32, 16, 4, 2


def test_grouped_linear_equals_per_expert_matmuls_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])  # an expert with no rows
    x = torch.randn(int(counts.sum()), 16, generator=g, requires_grad=True)
    weights = [torch.randn(8, 16, generator=g, requires_grad=True) for _ in counts]
    dy = torch.randn(int(counts.sum()), 8, generator=g)
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    y = device_counts.grouped_linear(x, weights, ends)
    got = torch.autograd.grad(y, [x, *weights], dy)
    ref = torch.cat([xe @ w.t() for xe, w in zip(torch.split(x, counts.tolist()), weights)])
    want = torch.autograd.grad(ref, [x, *weights], dy)
    torch.testing.assert_close(y, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert torch.count_nonzero(got[2]) == 0  # the empty expert gets a zero gradient


def test_grouped_linear_keeps_no_stack_of_the_weights_for_backward():
    """The forward saves ``x``, the offsets and the weights themselves (no ``[E, in, out]`` copy);
    frozen weights and an input without gradient get none."""
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([4, 2, 6])
    x = torch.randn(12, 16, generator=g)
    weights = [torch.randn(8, 16, generator=g, requires_grad=i != 1) for i in range(3)]
    ends = torch.cumsum(counts, 0, dtype=torch.int32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = device_counts.grouped_linear(x, weights, ends)
    assert not [t for t in saved if t.dim() == 3]
    assert sum(t.numel() for t in saved) == x.numel() + ends.numel() + sum(w.numel() for w in weights)
    y.backward(torch.ones_like(y))
    assert weights[1].grad is None and x.grad is None
    ref = [xe.sum(0).expand(8, -1) for xe in torch.split(x, counts.tolist())]
    torch.testing.assert_close(weights[0].grad, ref[0])
    torch.testing.assert_close(weights[2].grad, ref[2])


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=1, hidden_size=H, num_attention_heads=4, ffn_hidden_size=64,
                  num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=FFN,
                  moe_token_dispatcher_type="alltoall", gated_linear_unit=True,
                  add_bias_linear=False, activation_func=F.silu, bias_activation_fusion=False,
                  normalization="RMSNorm", use_cpu_initialization=True, moe_aux_loss_coeff=0.0,
                  hidden_dropout=0.0)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


@pytest.fixture
def alltoall_on_cpu(monkeypatch):
    """The device-counts path switched on (the default, set again here). Megatron's alltoall
    dispatcher makes a CUDA stream for its host copies when the first one is built; the
    device-counts path never copies, so on a CPU host a placeholder stands in (both restored after
    the test)."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    monkeypatch.setattr(device_counts, "DEVICE_COUNTS", True)
    if not torch.cuda.is_available():
        monkeypatch.setattr(MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", object())


def _build(spec, config):
    """A module from Megatron's MoE spec: a ``ModuleSpec`` (to 0.17) or a ``partial`` (0.18 on)."""
    import functools

    from megatron.core.transformer.spec_utils import build_module

    return spec(config=config) if isinstance(spec, functools.partial) else build_module(spec, config=config)


def _layers(config, shared=None):
    """Ours (``E``'s spec on the local backend) and Megatron's MoE layer with the allgather
    dispatcher, the same weights."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
    from megacpp_mcore.spec.backends import get_backend
    from megacpp_mcore.spec.context import LayerContext
    from megacpp_mcore.layers.feedforward import feedforward_layer_spec

    ours_spec = feedforward_layer_spec(LayerContext(config=config, backend=get_backend("local"), index=0,
                                                   symbol="E", features=frozenset()))
    torch.manual_seed(0)
    ours = _build(ours_spec.submodules.mlp, config)
    upstream_config = _config(moe_token_dispatcher_type="allgather",
                              **({} if shared is None else {"moe_shared_expert_intermediate_size": shared}))
    plain = get_mlp_module_spec_for_backend(backend=LocalSpecProvider(), num_experts=EXPERTS,
                                            moe_grouped_gemm=False)
    upstream = _build(plain, upstream_config)
    upstream.load_state_dict(ours.state_dict())
    return ours, upstream


def _plain_moe(layer, x):
    """The MoE by hand: the layer's router, then each token through its top-k experts (SwiGLU),
    weighted by the router's probabilities, plus the shared expert."""
    tokens = x.reshape(-1, H)
    probs, routing_map = layer.router(tokens)
    out = torch.zeros_like(tokens)
    for e, expert in enumerate(layer.experts.local_experts):
        w1, w2 = expert.linear_fc1.weight, expert.linear_fc2.weight
        gate, up = torch.chunk(tokens @ w1.t(), 2, dim=-1)
        out = out + (probs[:, e:e + 1] * ((F.silu(gate) * up) @ w2.t())) * routing_map[:, e:e + 1]
    if layer.shared_experts is not None:
        shared = layer.shared_experts(tokens)
        out = out + (shared[0] if isinstance(shared, tuple) else shared)
    return out.view_as(x)


@pytest.mark.parametrize("shared", [None, 24], ids=["routed", "shared"])
def test_layer_equals_megatron_moe_and_a_plain_torch_moe(single_rank, alltoall_on_cpu, shared):
    config = _config(**({} if shared is None else {"moe_shared_expert_intermediate_size": shared}))
    ours, upstream = _layers(config, shared)
    assert type(ours).__name__ == "DeviceCountsMoELayer"
    assert ours.token_dispatcher.counts_on_device

    seen = []
    forward = ours.experts.forward
    ours.experts.forward = lambda x, counts, probs: (seen.append(counts), forward(x, counts, probs))[1]
    x = torch.randn(8, 2, H, generator=torch.Generator().manual_seed(1))
    dy = torch.randn(8, 2, H, generator=torch.Generator().manual_seed(2))
    results = []
    for layer in (ours, upstream):
        xi = x.clone().requires_grad_()
        y = layer(xi)[0]
        y.backward(dy)
        results.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (y, dx, grads), (y_up, dx_up, grads_up) = results
    assert torch.is_tensor(seen[0]) and seen[0].sum() == 16 * TOPK  # the counts, as a tensor
    torch.testing.assert_close(y, y_up)
    torch.testing.assert_close(dx, dx_up)
    assert grads.keys() == grads_up.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_up[name], msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(y, _plain_moe(ours, x).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["expert_parallel", "expert_tp", "capacity", "moe_graphs"])
def test_counts_go_to_the_host_where_the_path_does_not_apply(single_rank, alltoall_on_cpu, change):
    overrides = {"capacity": {"moe_expert_capacity_factor": 1.0}}.get(change, {})
    ours, _ = _layers(_config(**overrides))
    dispatcher = ours.token_dispatcher
    assert isinstance(dispatcher, device_counts.DeviceCountsDispatcher)
    if change == "expert_parallel":
        dispatcher.ep_size = 2
    elif change == "expert_tp":
        dispatcher.tp_size = 2
    elif change == "moe_graphs":
        from megacpp_mcore.spec import compat

        field = compat.cuda_graph_modules_field(dispatcher.config)
        dispatcher.config.cuda_graph_impl = "transformer_engine"
        setattr(dispatcher.config, field, ["moe_router"])
    assert not dispatcher.counts_on_device


def test_with_moe_modules_swaps_layer_and_experts_in_either_spec_form():
    import dataclasses
    import functools

    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megacpp_mcore.spec import compat

    class Experts(SequentialMLP):
        pass

    class Layer(MoELayer):
        pass

    as_spec = ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=ModuleSpec(module=SequentialMLP)))
    got = compat.with_moe_modules(as_spec, Layer, {SequentialMLP: Experts})
    assert got.module is Layer and got.submodules.experts.module is Experts
    as_partial = functools.partial(MoELayer, submodules=MoESubmodules(
        experts=functools.partial(SequentialMLP, submodules="s")))
    got = compat.with_moe_modules(as_partial, Layer, {SequentialMLP: Experts})
    assert got.func is Layer and got.keywords["submodules"].experts.func is Experts
    assert got.keywords["submodules"].experts.keywords == {"submodules": "s"}
    untouched = compat.with_moe_modules(as_spec, Layer, {})
    assert untouched.submodules.experts.module is SequentialMLP
    assert dataclasses.replace(as_spec).module is MoELayer  # the input spec is not changed


@pytest.mark.gpu
@gpu
def test_te_grouped_experts_on_device_counts_equal_tegroupedmlp(single_rank, monkeypatch):
    """bf16 on CUDA, the TE backend: our MoE layer (device counts, two ``torch._grouped_mm``)
    against Megatron's TEGroupedMLP layer (host counts) with the same weights, forward and
    backward; the dispatch copies nothing to the host."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend

    from megacpp_mcore.spec import compat

    def config(**kw):
        return _config(bf16=True, params_dtype=torch.bfloat16, moe_grouped_gemm=True,
                       bias_activation_fusion=True, moe_permute_fusion=True,
                       moe_router_dtype="fp32", use_cpu_initialization=False, **kw)

    monkeypatch.setattr(device_counts, "DEVICE_COUNTS", True)
    stock = get_mlp_module_spec_for_backend(backend=TESpecProvider(), num_experts=EXPERTS,
                                            moe_grouped_gemm=True)
    ours_spec = compat.with_moe_modules(stock, device_counts.DeviceCountsMoELayer,
                                        {device_counts.TEGroupedMLP: device_counts.DeviceCountsTEGroupedMLP})
    torch.manual_seed(0)
    ours = _build(ours_spec, config()).cuda()
    upstream = _build(stock, config()).cuda()
    upstream.load_state_dict(ours.state_dict())
    assert ours.experts.takes_device_counts and ours.token_dispatcher.counts_on_device
    x = torch.randn(512, 2, H, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    ours(x.clone())  # compiles Megatron's torch.compile'd fusions (compiling syncs) before the check
    results = []
    for layer in (ours, upstream):
        xi = x.clone().requires_grad_()
        if layer is ours:
            torch.cuda.set_sync_debug_mode("error")  # any host read of a device value raises
        try:
            y = layer(xi)[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        y.backward(dy)
        results.append((y.float(), xi.grad.float(), {n: p.grad.float() for n, p in layer.named_parameters()}))
    (y, dx, grads), (y_up, dx_up, grads_up) = results
    torch.testing.assert_close(y, y_up, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx, dx_up, atol=2e-2, rtol=2e-2)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_up[name], atol=5e-2, rtol=5e-2,
                                   msg=lambda m: f"{name}: {m}")


def test_switched_off_the_layer_keeps_megatron_dispatcher(single_rank, alltoall_on_cpu, monkeypatch):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    monkeypatch.setattr(device_counts, "DEVICE_COUNTS", False)
    ours, _ = _layers(_config())
    assert type(ours.token_dispatcher) is MoEAlltoAllTokenDispatcher


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "megatron_fused"])
def test_weighted_swiglu_is_silu_gate_times_up_times_probs(fused):
    import types

    config = types.SimpleNamespace(bias_activation_fusion=fused, activation_func_fp8_input_store=False)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=g, dtype=torch.bfloat16)
    probs = torch.rand(6, 1, generator=g)
    got = device_counts.weighted_swiglu(x, probs, config)
    gate, up = x.float().chunk(2, dim=-1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.silu(gate) * up * probs, atol=2e-2, rtol=2e-2)


def tp_expert_tp1_run(tp: int) -> dict:
    """(run on ``tp`` gloo ranks by ``run_distributed``) The layer under TP ``tp`` with sequence
    parallelism and expert TP 1 (every expert whole on each rank: the device-counts path applies),
    fixed weights, each rank its sequence shard of one input; the output shard, the input gradient
    shard and the parameter gradients summed over the ranks (what DDP's sync gives)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from megacpp_mcore.patches import cpu_rng_tracker
    from megacpp_mcore.train import runtime

    device_counts.DEVICE_COUNTS = True  # a worker process of its own: no state to restore
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = object()  # as the alltoall_on_cpu fixture
    runtime.initialize(runtime.Parallelism())
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_tensor_parallel_size=1)
    cpu_rng_tracker.model_parallel_cpu_manual_seed(1234)
    config = _config(tensor_model_parallel_size=tp, sequence_parallel=tp > 1, expert_tensor_parallel_size=1)
    layer, _ = _layers(config)
    for i, (name, p) in enumerate(sorted(layer.named_parameters())):
        p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i)) * 0.2)
    rank = torch.distributed.get_rank()
    x = torch.randn(8, 2, H, generator=torch.Generator().manual_seed(1)).chunk(tp)[rank].requires_grad_()
    dy = torch.randn(8, 2, H, generator=torch.Generator().manual_seed(2)).chunk(tp)[rank]
    y = layer(x)[0]
    y.backward(dy)
    grads = {}
    for name, p in sorted(layer.named_parameters()):
        g = p.grad.clone()
        torch.distributed.all_reduce(g)
        grads[name] = g.tolist()
    out = {"on_device": layer.token_dispatcher.counts_on_device, "y": y.tolist(), "dx": x.grad.tolist(),
           "grads": grads}
    runtime.shutdown()
    return out


def test_tp2_sequence_parallel_expert_tp1_equals_one_rank():
    from megacpp_mcore.testing.dist import run_distributed

    (ref,) = run_distributed("tests.test_moe_device_counts:tp_expert_tp1_run", nproc=1, kwargs={"tp": 1})
    ranks = run_distributed("tests.test_moe_device_counts:tp_expert_tp1_run", nproc=2, kwargs={"tp": 2})
    assert ref["on_device"] and all(r["on_device"] for r in ranks)
    for key in ("y", "dx"):
        got = torch.cat([torch.tensor(r[key]) for r in ranks])
        torch.testing.assert_close(got, torch.tensor(ref[key]), msg=lambda m: f"{key}: {m}")
    assert ranks[0]["grads"].keys() == ref["grads"].keys()
    for name, want in ref["grads"].items():
        torch.testing.assert_close(torch.tensor(ranks[0]["grads"][name]), torch.tensor(want),
                                   msg=lambda m: f"{name}: {m}")
