"""MoDA: depth-KV buffer and depth-aware attention (megacpp_mcore.features.moda)."""

from __future__ import annotations

import tempfile
import types

import pytest
import torch

from megacpp_mcore.features.moda import DepthAwareAttention, MoDAConfig, depth_kv_bytes, transform
from megacpp_mcore.features.moda import buffer, depth, sequence
from megacpp_mcore.features.moda.buffer import claim_slot
from megacpp_mcore.features.moda.fast import DepthFlashAttention, fast_depth_attention
from megacpp_mcore.features.moda.reference import reference_depth_attention
from megacpp_mcore.spec.backends import LocalBackend
from megacpp_mcore.spec.context import ChunkBuild
from megacpp_mcore.spec.pattern import FeaturePlacement, PatternError

# 8 layers AAAEAAAE: MoDA on the six A layers; GQA (4 heads, 2 K/V groups). The buffer restarts at
# layer 4, which is also where PP=2 splits, so the single-rank model is the same definition.
MODA_MODEL = {
    "pattern": "AAAE", "num_layers": 8, "hidden_size": 64, "num_attention_heads": 4,
    "num_query_groups": 2, "ffn_hidden_size": 128, "vocab_size": 128, "seq_length": 32,
    "moe": None, "features": {"moda": {"boundaries": [4]}},
}


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                  use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _layers(cfg: MoDAConfig, n: int, config=None, backend=None, **channels) -> list[DepthAwareAttention]:
    """Layers 0..n-1 of one chunk, built by hand (each claims its slot from the chunk's owner)."""
    from megatron.core.transformer.enums import AttnMaskType

    config = config or _config(num_layers=n)
    chunk = ChunkBuild()
    return [DepthAwareAttention(config, i + 1, AttnMaskType.causal, "self", moda=cfg,
                                depth=claim_slot(chunk, config, cfg, i), backend=backend or LocalBackend(),
                                **channels) for i in range(n)]


def _qkv(s=6, b=2, heads=4, groups=2, dk=8, dv=8, dtype=torch.float32, grad=True):
    make = lambda *shape: torch.randn(*shape, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return make(s, b, heads, dk), make(s, b, groups, dk), make(s, b, groups, dv)


# -- config and formula ---------------------------------------------------------------------------


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="kernel='flash'.*allowed: fast, reference"):
        MoDAConfig(kernel="flash")
    with pytest.raises(ValueError, match="cuda_kernel='fa3'; allowed: auto, flash, cudnn, te"):
        MoDAConfig(cuda_kernel="fa3")
    with pytest.raises(ValueError, match="depth_kernel='cuda'; allowed: auto, triton, torch"):
        MoDAConfig(depth_kernel="cuda")
    with pytest.raises(ValueError, match="attention layers only; allowed symbols: 'A'"):
        MoDAConfig(placement=FeaturePlacement(symbols="AE"))
    with pytest.raises(ValueError, match="contributing_layers: -1 is not a layer index"):
        MoDAConfig(contributing_layers=(0, -1))
    with pytest.raises(ValueError, match="detach must be a bool"):
        MoDAConfig(detach="yes")
    cfg = MoDAConfig.from_dict({"placement": {"layers": [0, 4]}, "boundaries": [4]})
    assert cfg.placement.layers == (0, 4) and cfg.boundaries == (4,) and cfg.detach is True


def test_moda_is_refused_on_non_attention_layers():
    from megacpp_mcore.spec.block import hybrid_block_spec

    with pytest.raises(PatternError, match="moda cannot attach to layer 1 is 'E'"):
        hybrid_block_spec("AE", num_layers=4, moda=MoDAConfig(placement=FeaturePlacement(layers=(0, 1))))
    hybrid_block_spec("AE", num_layers=4, moda=MoDAConfig())  # no longer pending


def test_depth_kv_bytes_formula():
    assert depth_kv_bytes(2, 4096, 8, 16, 128, torch.bfloat16) == 2 * 4096 * 8 * 16 * 128 * 2 * 2
    assert depth_kv_bytes(1, 10, 3, 4, 8, torch.float32) == 10 * 3 * 4 * 8 * 4 * 2
    assert depth_kv_bytes(1, 10, 3, 4, 24, torch.float32, v_head_dim=16) == 10 * 3 * 4 * 40 * 4
    with pytest.raises(ValueError, match="n_kv_heads must be an int >= 0"):
        depth_kv_bytes(1, 10, 3, 4.0, 8, torch.float32)


def test_buffer_bytes_from_model_config():
    from megacpp_mcore.models.plan import build_plan
    from megacpp_mcore.testing.parity import model_from_spec

    m = model_from_spec(MODA_MODEL)
    cfg = m.features["moda"]
    # segments [0..3] and [4..7] each hold 3 contributing A layers; 2 K/V groups of 16 channels
    assert cfg.buffer_bytes(m, 2) == depth_kv_bytes(2, 32, 3, 2, 16, torch.bfloat16)
    assert cfg.buffer_bytes(m, 2, tp=2) == depth_kv_bytes(2, 32, 3, 1, 16, torch.bfloat16)
    assert cfg.buffer_bytes(m, 2, tp=4) == depth_kv_bytes(2, 32, 3, 1, 16, torch.bfloat16)
    assert cfg.buffer_bytes(m, 2, pp=2) == cfg.buffer_bytes(m, 2)  # boundary at 4 = stage split
    only = MoDAConfig(contributing_layers=(0, 5), boundaries=(4,))
    expected = depth_kv_bytes(1, 32, 1, 2, 16, torch.bfloat16)
    assert only.buffer_bytes(m.replace(features={"moda": only}), 1) == expected
    with pytest.raises(ValueError, match="names layer 3, which is not a MoDA layer"):
        bad = MoDAConfig(contributing_layers=(3,))
        bad.buffer_bytes(m.replace(features={"moda": bad}), 1)
    plan = build_plan(m, micro_batch=2, tp=2)
    assert plan["memory"]["moda_depth_kv"] == cfg.buffer_bytes(m, 2, tp=2)


def test_segments_follow_pipeline_chunks():
    cfg = MoDAConfig(boundaries=(6,))
    pp2 = _config(num_layers=8, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    assert buffer.chunk_starts(pp2) == [0, 4]
    assert [(r.start, r.stop) for r in cfg.segments(8, buffer.chunk_starts(pp2))] == [(0, 4), (4, 6), (6, 8)]
    vp = _config(num_layers=8, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                 pipeline_dtype=torch.float32)
    assert buffer.chunk_starts(vp) == [0, 2, 4, 6]


# -- fast path versus reference -------------------------------------------------------------------


@pytest.mark.parametrize("n,dk,dv,attached", [
    (0, 8, 8, False),   # first layer: no depth keys yet
    (3, 8, 8, False),
    (3, 8, 8, True),
    (2, 24, 16, True),  # MLA shape: k_channels = qk_head_dim + qk_pos_emb_head_dim != v_channels
])
def test_fast_path_equals_reference(n, dk, dv, attached):
    torch.manual_seed(n + dk)
    q, k, v = _qkv(dk=dk, dv=dv)
    ks = [torch.randn_like(k).requires_grad_() for _ in range(n)]
    vs = [torch.randn(*v.shape).requires_grad_() for _ in range(n)]
    kd, vd = (torch.stack(ks, 3), torch.stack(vs, 3)) if n else (None, None)
    ref = reference_depth_attention(q, k, v, kd, vd, scale=dk ** -0.5)
    fast = fast_depth_attention(q, k, v, None if kd is None else kd.detach(),
                                None if vd is None else vd.detach(), scale=dk ** -0.5,
                                attached=[t for pair in zip(ks, vs) for t in pair] if attached else ())
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    grad_out = torch.randn_like(ref)
    inputs = [q, k, v, *ks, *vs]
    g_ref = torch.autograd.grad(ref, inputs, grad_out)
    g_fast = torch.autograd.grad(fast, inputs, grad_out, allow_unused=True)
    for i, (a, b) in enumerate(zip(g_ref, g_fast)):
        if i >= 3 and not attached:
            assert b is None  # detached: depth K/V receive nothing
        else:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_fast_path_in_row_chunks_equals_reference(monkeypatch):
    import functools

    monkeypatch.setattr(depth, "row_chunks", functools.partial(depth.row_chunks, budget=2000))
    assert len(list(depth.row_chunks(24, 400))) == 5
    torch.manual_seed(3)
    q, k, v = _qkv()
    kd, vd = torch.randn(6, 2, 2, 2, 8, requires_grad=True), torch.randn(6, 2, 2, 2, 8, requires_grad=True)
    ref = reference_depth_attention(q, k, v, kd, vd, scale=0.35)
    fast = fast_depth_attention(q, k, v, kd.detach(), vd.detach(), scale=0.35,
                                attached=[kd[:, :, :, 0], vd[:, :, :, 0], kd[:, :, :, 1], vd[:, :, :, 1]])
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    for a, b in zip(torch.autograd.grad(ref.sum(), [q, k, v, kd, vd]),
                    torch.autograd.grad(fast.sum(), [q, k, v, kd, vd])):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def _fake_te_fused():
    """TE's fused_attn_fwd / fused_attn_bwd conventions (sbhd in/out, GQA native, softmax stats
    [b, np, s, 1], aux = [stats, rng_state]) on top of PyTorch's CPU flash kernel: checks our side of
    the ``cuda_kernel="te"`` path (layouts, merged statistics handed to the backward) on CPU."""
    import types

    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    calls = []

    def heads(x, r):
        return x.repeat_interleave(r, dim=2).permute(1, 2, 0, 3)

    def check(sq, skv, cu_q, cu_kv, q, kwargs):
        s, b = q.shape[:2]
        assert sq == skv == s and cu_q is cu_kv and cu_q.dtype == torch.int32
        assert cu_q.tolist() == list(range(0, (b + 1) * s, s))
        assert kwargs == dict(attn_scale=kwargs["attn_scale"], dropout=0.0, qkv_layout="sbhd_sbhd_sbhd",
                              attn_bias_type="no_bias", attn_mask_type="causal")

    def fwd(is_training, sq, skv, cu_q, cu_kv, q, k, v, fake_dtype, backend, **kwargs):
        check(sq, skv, cu_q, cu_kv, q, kwargs)
        assert is_training and fake_dtype == q.dtype and backend == "arbitrary"
        r = q.shape[2] // k.shape[2]
        out, lse = flash(heads(q, 1), heads(k, r), heads(v, r), 0.0, True, scale=kwargs["attn_scale"])
        calls.append("fwd")
        return out.permute(2, 0, 1, 3).contiguous(), [lse.unsqueeze(-1).contiguous(), torch.zeros(2)]

    def bwd(sq, skv, cu_q, cu_kv, q, k, v, o, d_o, fake_dtype, dqkv_dtype, aux, backend, **kwargs):
        check(sq, skv, cu_q, cu_kv, q, kwargs)
        s, b, h, d = q.shape
        g = k.shape[2]
        stats, rng = aux
        assert stats.shape == (b, h, s, 1) and stats.is_contiguous() and rng.shape == (2,)
        assert dqkv_dtype == "te-" + str(d_o.dtype) and backend == "arbitrary"
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            heads(d_o, 1), heads(q, 1), heads(k, h // g), heads(v, h // g), heads(o, 1), stats[..., 0],
            0.0, True, scale=kwargs["attn_scale"])
        dk = dk.permute(2, 0, 1, 3).reshape(s, b, g, h // g, d).sum(3)
        dv = dv.permute(2, 0, 1, 3).reshape(s, b, g, h // g, d).sum(3)
        calls.append("bwd")
        return dq.permute(2, 0, 1, 3).contiguous(), dk, dv, None

    return types.SimpleNamespace(fwd=fwd, bwd=bwd, backend="arbitrary", calls=calls,
                                 dtypes={torch.float32: "te-torch.float32"})


@pytest.mark.parametrize("n,attached", [(0, False), (3, False), (2, True)])
def test_te_kernel_path_equals_reference(monkeypatch, n, attached):
    fake = _fake_te_fused()
    monkeypatch.setattr(sequence, "te_fused", lambda: fake)
    torch.manual_seed(n)
    q, k, v = _qkv()
    ks = [torch.randn_like(k).requires_grad_() for _ in range(n)]
    vs = [torch.randn_like(v).requires_grad_() for _ in range(n)]
    kd, vd = (torch.stack(ks, 3), torch.stack(vs, 3)) if n else (None, None)
    ref = reference_depth_attention(q, k, v, kd, vd, scale=0.3)
    fast = DepthFlashAttention.apply(
        q, k, v, None if kd is None else kd.detach(), None if vd is None else vd.detach(), 0.3,
        "te-fused-cuda", "torch", *([t for pair in zip(ks, vs) for t in pair] if attached else []))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    inputs = [q, k, v, *ks, *vs] if attached else [q, k, v]
    grad = torch.randn_like(ref)
    for a, b_ in zip(torch.autograd.grad(ref, inputs, grad), torch.autograd.grad(fast, inputs, grad)):
        torch.testing.assert_close(b_, a, atol=1e-5, rtol=0)
    assert fake.calls == ["fwd", "bwd"]
    monkeypatch.undo()
    from megacpp_mcore.spec import backends

    with backends.override_detection(te=None), pytest.raises(backends.BackendUnavailable,
                                                             match="install transformer-engine"):
        sequence.te_fused()
    with pytest.raises(ValueError, match="K head dim 24 != V head dim 16"):
        q2, k2, v2 = _qkv(dk=24, dv=16)
        DepthFlashAttention.apply(q2, k2, v2, None, None, 0.3, "te-fused-cuda", "torch")


def test_reference_masks_the_future():
    q, k, v = _qkv(grad=False)
    out = reference_depth_attention(q, k, v, scale=0.3)
    k2, v2 = k.clone(), v.clone()
    k2[3:], v2[3:] = 7.0, -7.0
    torch.testing.assert_close(reference_depth_attention(q, k2, v2, scale=0.3)[:3], out[:3])


# -- the module and its buffer --------------------------------------------------------------------


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("kernel", ["fast", "reference"])
def test_buffer_bytes_and_fresh_buffer_per_micro_batch(kernel, groups):
    layers = _layers(MoDAConfig(kernel=kernel), 3, _config(num_layers=3, num_query_groups=groups))
    assert [(lay.reads, lay.slot) for lay in layers] == [(0, 0), (1, 1), (2, 2)]
    buffer = layers[0].buffer
    assert all(lay.buffer is buffer for lay in layers)

    def micro_batch(seed):
        torch.manual_seed(seed)
        outs = [lay(*_qkv(groups=groups), None) for lay in layers]
        return outs, buffer.key
    outs1, key1 = micro_batch(1)
    assert buffer.allocated_bytes == depth_kv_bytes(2, 6, 3, groups, 8, torch.float32)
    assert key1.shape == (6, 2, groups, 3, 8)
    outs2, key2 = micro_batch(2)
    assert key2 is not key1  # cleared per micro-batch: a fresh buffer
    # Both micro-batches in flight (as in a pipeline schedule) still backprop.
    sum(o.sum() for o in outs1 + outs2).backward()
    assert layers[0].megacpp_stats() == {"moda_depth_keys": 0.0,
                                         "moda_buffer_bytes": float(buffer.allocated_bytes)}
    assert layers[2].megacpp_stats() == {"moda_depth_keys": 2.0}
    assert layers[0].observed_kernel == ("aten-flash-cpu" if kernel == "fast" else "reference")


def test_bare_placement_layers_share_a_buffer_first_composes_backend(single_rank):
    """Through the ``core_attention`` seam: layers given one chunk share its buffer, and the first
    (no depth keys yet) runs the core attention it was handed."""
    from megatron.core.transformer.enums import AttnMaskType

    from megacpp_mcore.spec.context import LayerContext

    config = _config(num_layers=3)
    built, chunk, backend = [], ChunkBuild(), LocalBackend()
    for i in range(3):
        ctx = LayerContext(config=config, backend=backend, index=i, symbol="A", features=frozenset({"moda"}),
                           feature_configs={"moda": FeaturePlacement(symbols="A")}, chunk=chunk)
        built.append(transform(backend.core_attention(), ctx)(
            config=config, layer_number=i + 1, attn_mask_type=AttnMaskType.causal, attention_type="self",
            cp_comm_type=None, softmax_scale=None, pg_collection=None))
    assert all(b.buffer is built[0].buffer for b in built)
    assert [b.reads for b in built] == [0, 1, 2]
    torch.manual_seed(0)
    inputs = [_qkv() for _ in built]
    outs = [lay(*qkv, None) for lay, qkv in zip(built, inputs)]
    assert [lay.observed_kernel for lay in built] == ["backend:DotProductAttention"] + ["aten-flash-cpu"] * 2
    depth_k = torch.stack([k for _, k, _ in inputs[:2]], dim=3)
    depth_v = torch.stack([v for _, _, v in inputs[:2]], dim=3)
    for i, out in enumerate(outs):
        q, k, v = inputs[i]
        ref = reference_depth_attention(q, k, v, depth_k[:, :, :, :i] if i else None,
                                        depth_v[:, :, :, :i] if i else None, scale=8 ** -0.5)
        torch.testing.assert_close(out, ref.reshape(out.shape), atol=1e-5, rtol=0)


def test_non_contributing_layers_do_not_push():
    layers = _layers(MoDAConfig(contributing_layers=(0, 2)), 4)
    assert [(lay.reads, lay.slot) for lay in layers] == [(0, 0), (1, None), (1, 1), (2, None)]
    for lay in layers:
        lay(*_qkv(grad=False), None)
    assert layers[0].buffer.allocated_bytes == depth_kv_bytes(2, 6, 2, 2, 8, torch.float32)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("kernel", ["fast", "reference"])
def test_detached_by_default_attached_when_asked(detach, kernel):
    cfg = MoDAConfig(detach=detach, kernel=kernel) if not detach else MoDAConfig(kernel=kernel)
    first, second = _layers(cfg, 2)
    torch.manual_seed(0)
    q0, k0, v0 = _qkv()
    q1, k1, v1 = _qkv()
    first(q0, k0, v0, None)
    second(q1, k1, v1, None).sum().backward()
    if detach:
        assert k0.grad is None and v0.grad is None  # nothing flows through the buffer
        return
    expected = torch.autograd.grad(
        reference_depth_attention(q1, k1, v1, k0[:, :, :, None], v0[:, :, :, None], scale=8 ** -0.5).sum(),
        [k0, v0])
    assert k0.grad.abs().sum() > 0
    torch.testing.assert_close(k0.grad, expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(v0.grad, expected[1], atol=1e-5, rtol=0)


def test_mla_shaped_core_attention():
    config = _config(num_layers=2, num_query_groups=None)
    first, second = _layers(MoDAConfig(), 2, config, k_channels=24, v_channels=16)
    q0, k0, v0 = _qkv(heads=4, groups=4, dk=24, dv=16)
    q1, k1, v1 = _qkv(heads=4, groups=4, dk=24, dv=16)
    first(q0, k0, v0, None)
    out = second(q1, k1, v1, None)
    assert out.shape == (6, 2, 4 * 16)
    assert second.softmax_scale == pytest.approx(24 ** -0.5)
    ref = reference_depth_attention(q1, k1, v1, k0[:, :, :, None], v0[:, :, :, None], scale=24 ** -0.5)
    torch.testing.assert_close(out, ref.reshape(6, 2, 64), atol=1e-5, rtol=0)
    assert first.buffer.allocated_bytes == depth_kv_bytes(2, 6, 2, 4, 24, torch.float32, v_head_dim=16)


def test_refuses_unsupported_settings():
    with pytest.raises(ValueError, match="MoDA layer 0: unsupported recompute_granularity='full'"):
        _layers(MoDAConfig(), 1, _config(recompute_granularity="full", recompute_method="uniform",
                                         recompute_num_layers=1))
    with pytest.raises(ValueError, match="unsupported recompute_granularity='selective'"):
        _layers(MoDAConfig(), 1, _config(recompute_granularity="selective"))
    _layers(MoDAConfig(), 1, _config(recompute_granularity="selective", recompute_modules=["mlp"]))
    with pytest.raises(ValueError, match="attention dropout > 0"):
        _layers(MoDAConfig(), 1, _config(attention_dropout=0.1))
    buf = buffer.DepthKVBuffer(segment=range(0, 2), detach=True)
    buf.register(0, True), buf.register(1, True)
    buf.begin()
    buf.push(0, *_qkv(grad=False)[1:])
    with pytest.raises(ValueError, match=r"slot 1 pushes \(4, 2, 2, 8\)"):  # e.g. MoD top-k dropping tokens
        buf.push(1, *_qkv(s=4, grad=False)[1:])


def test_slots_are_claimed_once_in_order_from_an_explicit_owner():
    """A layer's place comes from the chunk being built: no chunk is refused (no hidden registry to
    fall back on), a layer claiming again or out of order is refused (no guessing of a new build),
    and separate chunks never share a buffer."""
    config = _config(num_layers=4)
    with pytest.raises(ValueError, match="MoDA layer 0: LayerContext.chunk is None"):
        claim_slot(None, config, MoDAConfig(), 0)
    cfg = MoDAConfig(boundaries=(2,))
    chunk = ChunkBuild()
    slots = [claim_slot(chunk, config, cfg, i) for i in range(4)]
    assert [(d.buffer.segment, d.reads, d.slot, d.starts_micro_batch) for d in slots] == [
        (range(0, 2), 0, 0, True), (range(0, 2), 1, 1, False),
        (range(2, 4), 0, 0, True), (range(2, 4), 1, 1, False)]
    with pytest.raises(RuntimeError, match="layer 1 registered after layer 1"):
        claim_slot(chunk, config, cfg, 1)
    assert claim_slot(ChunkBuild(), config, cfg, 1).buffer is not slots[0].buffer


def test_chunk_cursor_starts_a_chunk_at_each_first_layer():
    """HybridLayer's start-of-chunk signal: Megatron builds a chunk's layers as layer_number 1..n."""
    from megacpp_mcore.spec.context import ChunkCursor

    cursor = ChunkCursor()
    first = [cursor.for_layer(n) for n in (1, 2, 3)]
    second = [cursor.for_layer(n) for n in (1, 2)]
    assert all(c is first[0] for c in first) and all(c is second[0] for c in second)
    assert first[0] is not second[0]


# -- memory: what a MoDA layer holds for backward ---------------------------------------------------


def _megatron_like_qkv(s, b, heads, groups, d, dtype=torch.bfloat16):
    """q, k, v as Megatron's SelfAttention hands them over: one fused projection output
    ``[s, b, g, (r + 2) d]`` split per group; q and k pass RoPE (new tensors), v stays a view."""
    r = heads // groups
    mixed = torch.randn(s, b, groups, (r + 2) * d, dtype=dtype, requires_grad=True)
    q = mixed[..., : r * d].reshape(s, b, heads, d) * 1.0
    k = mixed[..., r * d: (r + 1) * d] * 1.0
    v = mixed[..., (r + 1) * d:]
    return mixed, q, k, v


def _pinned_bytes_saved(fn) -> tuple[torch.Tensor, int]:
    """(fn(), bytes of the distinct storages autograd saved for backward while fn ran)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("groups", [4, 2])
def test_moda_layer_saves_no_more_than_plain_attention(groups):
    """A depth-reading layer holds exactly what a plain fused attention (TE) holds for backward:
    contiguous q, k, v, the output and the fp32 log-sum-exp; the depth keys cost only the buffer.
    (Saving Megatron's value view pinned the whole fused QKV tensor: +2 [s, b, np, d] per layer,
    1.75 GiB at seq 16384 on the H200 benchmark.)"""
    s, b, heads, d = 128, 2, 4, 16
    layers = _layers(MoDAConfig(), 3, _config(num_layers=3, num_query_groups=groups, hidden_size=heads * d))
    unit_q, unit_kv = s * b * heads * d * 2, s * b * groups * d * 2
    plain = 2 * unit_q + 2 * unit_kv + s * b * heads * 4  # q, out, k, v (bf16) + lse (fp32)
    held = []
    for lay in layers:
        torch.manual_seed(lay.layer_index)
        mixed, q, k, v = _megatron_like_qkv(s, b, heads, groups, d)
        out, pinned = _pinned_bytes_saved(lambda: lay(q, k, v, None))
        assert pinned == plain, (lay.reads, pinned, plain)
        held.append((mixed, out))
    assert [lay.reads for lay in layers] == [0, 1, 2]
    # the buffer (not saved through autograd) is the only other MoDA cost, and equals the formula
    assert layers[0].buffer.allocated_bytes == depth_kv_bytes(b, s, 3, groups, d, torch.bfloat16)
    sum(out.float().sum() for _, out in held).backward()  # and it still backprops into mixed
    assert all(mixed.grad is not None and mixed.grad.abs().sum() > 0 for mixed, _ in held)


def test_attached_buffer_does_not_pin_the_fused_qkv():
    s, b, heads, d = 64, 2, 4, 16
    first, second = _layers(MoDAConfig(detach=False), 2, _config(num_layers=2, hidden_size=heads * d))
    mixed, q, k, v = _megatron_like_qkv(s, b, heads, heads, d)
    first(q, k, v, None)
    attached = first.buffer.attached
    assert len(attached) == 2
    assert all(t.untyped_storage().data_ptr() != mixed.untyped_storage().data_ptr() for t in attached)
    mixed2, q2, k2, v2 = _megatron_like_qkv(s, b, heads, heads, d)
    second(q2, k2, v2, None).float().sum().backward()
    assert mixed.grad is not None and mixed.grad[..., 2 * d:].abs().sum() > 0  # V grad via the buffer


def test_depth_merge_uses_no_full_width_fp32_copies(monkeypatch):
    """The depth math reads q / depth K/V / dO / O in their own dtype through ``_bmm_acc`` (fp32
    accumulation): no ``.to(float32)`` of [rows, n, d] or [rows, r, d] operands on the fast path."""
    calls = []
    real = depth.bmm_acc

    def spy(a, b_):
        calls.append((a.dtype, b_.dtype))
        return real(a, b_)

    monkeypatch.setattr(depth, "bmm_acc", spy)
    s, b, heads, groups, d, n = 32, 2, 4, 2, 16, 3
    q, k, v = _qkv(s=s, b=b, heads=heads, groups=groups, dk=d, dv=d, dtype=torch.bfloat16)
    kd = torch.randn(s, b, groups, n, d, dtype=torch.bfloat16)
    vd = torch.randn(s, b, groups, n, d, dtype=torch.bfloat16)
    out = fast_depth_attention(q, k, v, kd, vd, scale=d ** -0.5)
    out.float().sum().backward()
    # forward: scores; backward: scores, rowsum(dO*O), dP (all bf16 x bf16); the depth output and
    # dQ are in-place baddbmm_ into the bf16 output / dQ (see test_depth_path_full_size_passes)
    assert calls == [(torch.bfloat16, torch.bfloat16)] * 4
    ref = reference_depth_attention(q.float(), k.float(), v.float(), kd.float(), vd.float(), scale=d ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


class _FullSizeOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op, dtype, in_place) of every aten op whose output has at least ``full`` elements;
    ``_bmm_acc`` is replaced by a stand-in for CUDA's ``bmm(out_dtype=float32)`` (CPU upcasts)."""

    def __init__(self, full):
        super().__init__()
        self.full, self.ops, self.paused = full, [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        alias = func._schema.returns[0].alias_info if func._schema.returns else None
        if alias is not None and not alias.is_write:  # a view: no pass over memory
            return out
        if not self.paused and isinstance(out, torch.Tensor) and out.numel() >= self.full:
            self.ops.append((func.__name__, out.dtype, alias is not None))
        return out


@pytest.mark.parametrize("attached", [False, True])
def test_depth_path_full_size_passes(monkeypatch, attached):
    """Per depth-reading layer, the depth math makes TWO full-size ([s, b, np, d]) passes in forward
    (reweight the sequence output, add P @ V_depth; both in place in the output dtype) and ONE in
    backward (dQ += dS @ K_depth, in place); no full-size fp32 intermediate, no copy of q/dO/O."""
    s, b, heads, groups, d, n = 64, 2, 4, 2, 16, 5
    full = s * b * heads * d
    mode = _FullSizeOps(full)

    def bmm_acc(a, b_):  # what CUDA runs: one bf16 x bf16 -> fp32 kernel, not recorded as copies
        mode.paused = True
        try:
            out = torch.bmm(a.float(), b_.float())
        finally:
            mode.paused = False
        assert attached or out.numel() < full, "a full-size fp32 product"
        return out

    monkeypatch.setattr(depth, "bmm_acc", bmm_acc)
    q = torch.randn(s, b, heads, d, dtype=torch.bfloat16)  # contiguous, as the Function saves it
    kd = torch.randn(s, b, groups, n, d, dtype=torch.bfloat16)
    vd = torch.randn(s, b, groups, n, d, dtype=torch.bfloat16)
    seq_out = torch.randn(s, b, heads, d, dtype=torch.bfloat16)
    seq_lse = torch.randn(s, b, heads)
    with mode:
        out, lse = depth.merge_depth(q, kd, vd, seq_out, seq_lse, d ** -0.5)
    assert out.data_ptr() == seq_out.data_ptr()
    assert mode.ops == [("mul_.Tensor", torch.bfloat16, True), ("baddbmm_.default", torch.bfloat16, True)]
    dout = torch.randn(s, b, heads, d, dtype=torch.bfloat16)
    dquery = torch.randn(s, b, heads, d, dtype=torch.bfloat16)
    mode.ops = []
    with mode:
        ddk, ddv = depth.depth_backward(q, kd, vd, out, lse, dout, d ** -0.5, dquery, want_kv=attached)
    # attached: plus the depth-K/V gradients [s, b, g, n, d] themselves (fp32, cast per slot later)
    alloc = [("empty.memory_format", torch.float32, False)] * 2 if attached else []
    extra = [("copy_.default", torch.float32, True)] * 2 if attached else []
    assert mode.ops == alloc + [("baddbmm_.default", torch.bfloat16, True)] + extra
    assert (ddk is not None) == attached


def _fake_fused(calls):
    """A stand-in for megacpp_mcore.features.moda.kernels (CPU): the torch path, recording calls."""

    def merge_forward(q, kd, vd, seq_out, seq_lse, scale):
        calls.append("fwd")
        return depth.merge_depth(q, kd, vd, seq_out, seq_lse, scale)

    def merge_backward_dq(q, kd, vd, out, lse, dout, scale, dquery):
        calls.append("bwd")
        depth.depth_backward(q, kd, vd, out, lse, dout, scale, dquery, want_kv=False)

    return types.SimpleNamespace(merge_forward=merge_forward, merge_backward_dq=merge_backward_dq)


_INTERPRETED_KERNEL_CHECK = """
import torch
from megacpp_mcore.features.moda import depth, kernels as moda_triton
torch.manual_seed(0)
# heads, groups, dk, dv, buffer slots, depth keys read, dtype
for h, g, dk, dv, slots, n, dt in [(4, 4, 16, 16, 5, 5, torch.float32), (4, 4, 16, 16, 5, 2, torch.float32),
                                   (4, 4, 16, 16, 1, 1, torch.float32),
                                   (8, 2, 32, 32, 4, 4, torch.float32), (4, 4, 24, 16, 3, 2, torch.float32),
                                   (4, 2, 16, 16, 3, 3, torch.float16)]:
    s, b, tol = 24, 2, (1e-5 if dt == torch.float32 else 4e-3)
    q, so, do, dq0 = (torch.randn(s, b, h, x, dtype=dt) for x in (dk, dv, dv, dk))
    kd = torch.randn(s, b, g, slots, dk, dtype=dt)[:, :, :, :n]
    vd = torch.randn(s, b, g, slots, dv, dtype=dt)[:, :, :, :n]
    sl = torch.randn(s, b, h) + 2
    ro, rl = depth.merge_depth(q.float(), kd.float(), vd.float(), so.float().clone(), sl, dk ** -0.5)
    o, lse = moda_triton.merge_forward(q, kd, vd, so.clone(), sl, dk ** -0.5)
    torch.testing.assert_close(o.float(), ro, atol=tol, rtol=0)
    torch.testing.assert_close(lse, rl, atol=1e-5, rtol=0)
    rdq, dq = dq0.float().clone(), dq0.clone()
    depth.depth_backward(q.float(), kd.float(), vd.float(), ro, rl, do.float(), dk ** -0.5, rdq, want_kv=False)
    moda_triton.merge_backward_dq(q, kd, vd, ro.to(dt).contiguous(), rl, do, dk ** -0.5, dq)
    torch.testing.assert_close(dq.float(), rdq, atol=tol, rtol=0)
print("ok")
"""


def test_fused_triton_depth_kernels_in_interpreter_match_torch_path():
    """The Triton kernels (megacpp_mcore.features.moda.kernels), run by triton's CPU interpreter
    (TRITON_INTERPRET=1, a fresh process: read when the kernels are decorated), equal the torch path:
    strided buffer views (n < slots), one depth key, GQA, a head dim that is not a power of two,
    fp16. This (with its CUDA twin below) is the kernels' correctness check; production runs them
    unchecked. Needs triton installed."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED_KERNEL_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_fused_depth_kernel_selection_without_triton(monkeypatch):
    """Without triton: 'auto' uses the torch path, 'triton' is refused naming what is allowed; CPU
    tensors and 'torch' never use the fused kernels."""
    monkeypatch.setattr(depth, "load_kernels", lambda: ImportError("No module named 'triton'"))
    cuda_like = types.SimpleNamespace(is_cuda=True)
    assert depth.fused_kernels("auto", cuda_like) is None
    with pytest.raises(ValueError, match="depth_kernel='triton'.*allowed here: 'auto' or 'torch'"):
        depth.fused_kernels("triton", cuda_like)
    monkeypatch.setattr(depth, "load_kernels", lambda: "kernels")
    assert depth.fused_kernels("auto", cuda_like) == "kernels"
    assert depth.fused_kernels("torch", cuda_like) is None
    assert depth.fused_kernels("triton", torch.zeros(1)) is None


@pytest.mark.parametrize("depth_kernel,attached", [("auto", False), ("triton", False), ("torch", False),
                                                   ("auto", True)])
def test_fused_depth_kernels_run_unchecked_where_selected(monkeypatch, depth_kernel, attached):
    """Where the fused kernels are selected they run on every call, forward and backward, with no
    comparison against the torch path inside the run (that check is a test, above, and the
    benchmark's); 'torch' never calls them, and the attached backward (depth-K/V grads, which the
    fused kernel does not compute) takes the torch path. The layer records which kernel ran."""
    calls = []
    monkeypatch.setattr(depth, "fused_kernels",
                        lambda kind, q: None if kind == "torch" else _fake_fused(calls))
    # the second layer only reads (no push), so it can run twice on one micro-batch
    first, second = _layers(MoDAConfig(depth_kernel=depth_kernel, detach=not attached,
                                       contributing_layers=(0,)), 2)
    torch.manual_seed(0)
    (q0, k0, v0), (q1, k1, v1) = _qkv(), _qkv()
    first(q0, k0, v0, None)
    for _ in range(2):
        out = second(q1, k1, v1, None)
        grads = torch.autograd.grad(out.sum(), [q1, k0] if attached else [q1])
    ref = reference_depth_attention(q1, k1, v1, k0[:, :, :, None], v0[:, :, :, None], scale=8 ** -0.5)
    torch.testing.assert_close(out, ref.reshape(out.shape), atol=1e-5, rtol=0)
    ref_grads = torch.autograd.grad(ref.sum(), [q1, k0] if attached else [q1])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    fused = depth_kernel != "torch"
    if not fused:
        assert calls == []
    else:
        assert calls == (["fwd"] * 2 if attached else ["fwd", "bwd"] * 2)
    assert second.observed_depth_kernel == ("triton" if fused else "torch")
    assert first.observed_depth_kernel is None  # no depth keys: no depth part


# -- a whole model: buffer bytes observed, TP and PP parity ---------------------------------------


def test_model_buffer_matches_formula(single_rank):
    from megacpp_mcore.train import runtime
    from megacpp_mcore.testing.parity import model_from_spec, synthetic_batches

    m = model_from_spec(MODA_MODEL)
    config = runtime.transformer_config(m, runtime.Parallelism())
    (gpt,) = runtime.build_model(m, config, backend="local", wrap_ddp=False)
    (batch,) = synthetic_batches(seed=0, step=0, global_batch=2, seq_length=32, vocab=128, dp_rank=0,
                                 dp=1, micro_batch_size=2)
    loss = gpt(batch["tokens"], torch.arange(32)[None].expand(2, 32), None, labels=batch["labels"])
    loss.sum().backward()
    cores = [mod for mod in gpt.modules() if isinstance(mod, DepthAwareAttention)]
    assert [c.reads for c in cores] == [0, 1, 2, 0, 1, 2]
    # no depth keys yet: the backend's own core attention, then the depth-aware fast path
    assert [c.observed_kernel for c in cores] == ["backend:DotProductAttention"] + ["aten-flash-cpu"] * 2 + [
        "backend:DotProductAttention"] + ["aten-flash-cpu"] * 2
    starters = [c for c in cores if c.starts_micro_batch]
    assert [c.layer_index for c in starters] == [0, 4]
    expected = m.features["moda"].buffer_bytes(m, 2, dtype=torch.float32)
    assert [c.megacpp_stats()["moda_buffer_bytes"] for c in starters] == [expected, expected]


class _Run:
    """One model's own config, chunks and optimizer, built from a fixed seed (local backend)."""

    def __init__(self, model, seed: int):
        from megacpp_mcore.patches import cpu_rng_tracker
        from megacpp_mcore.train import runtime

        cpu_rng_tracker.model_parallel_cpu_manual_seed(seed)  # same initial weights every build
        self.model, self.seed = model, seed
        self.config = runtime.transformer_config(model, runtime.Parallelism())
        self.chunks = runtime.build_model(model, self.config, backend="local")
        self.optimizer = runtime.build_optimizer(self.chunks, lr=3e-3)
        self.cores = [m for c in self.chunks for m in c.modules() if isinstance(m, DepthAwareAttention)]

    def step(self, step: int) -> float:
        from megacpp_mcore.testing.parity import synthetic_batches
        from megacpp_mcore.train import runtime

        micro = synthetic_batches(seed=self.seed, step=step, global_batch=4,
                                  seq_length=self.model.seq_length, vocab=self.model.vocab_size,
                                  dp_rank=0, dp=1, micro_batch_size=2)
        return runtime.train_step(self.chunks, self.optimizer, micro, num_microbatches=2,
                                  micro_batch_size=2, seq_length=self.model.seq_length)["loss"]


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="bit-exact comparison on the CPU; GPU kernels may reorder reductions")
def test_two_moda_models_trained_interleaved_match_each_alone(single_rank):
    """Two MoDA models built in one process from ONE MoDAConfig object (different depths, widths and
    segments) and trained with alternating optimizer steps give exactly the losses each gives
    alone; each allocates exactly its own formula's buffer and no buffer is shared. The short model
    is built first: its only MoDA layer has index 0, the deep model's first layer too (a registry
    keyed by config and guessing a new build from the layer index would merge them)."""
    from megacpp_mcore.testing.parity import model_from_spec

    shared = MoDAConfig(boundaries=(4,))
    short = model_from_spec({"pattern": "AE", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                             "num_query_groups": 2, "ffn_hidden_size": 64, "vocab_size": 128,
                             "seq_length": 16, "moe": None})
    models = {"short": short.replace(features={"moda": shared}),
              "deep": model_from_spec(MODA_MODEL).replace(features={"moda": shared})}
    seeds = {"short": 11, "deep": 22}
    steps = 3
    alone = {}
    for name, model in models.items():
        run = _Run(model, seeds[name])
        alone[name] = [run.step(i) for i in range(steps)]
        del run
    runs = {name: _Run(model, seeds[name]) for name, model in models.items()}
    together = {name: [] for name in models}
    for i in range(steps):
        for name, run in runs.items():
            together[name].append(run.step(i))
    assert together == alone
    assert alone["short"] != alone["deep"]
    assert [len(run.cores) for run in runs.values()] == [1, 6]
    buffers = {name: {id(c.buffer) for c in run.cores} for name, run in runs.items()}
    assert len(buffers["short"]) == 1 and len(buffers["deep"]) == 2
    assert buffers["short"].isdisjoint(buffers["deep"])
    for name, run in runs.items():
        expected = shared.buffer_bytes(run.model, 2, dtype=run.config.params_dtype)
        assert [c.megacpp_stats()["moda_buffer_bytes"] for c in run.cores if c.starts_micro_batch] == [
            expected] * len(buffers[name]), name


@pytest.mark.distributed
def test_tp2_sp_and_pp2_match_single_rank():
    from megacpp_mcore.testing.dist import run_distributed
    from megacpp_mcore.testing.parity import train_run

    target = "megacpp_mcore.testing.parity:train_run"
    with tempfile.TemporaryDirectory(prefix="megacpp-moda-") as ckpt:
        # the single-rank reference runs in this process (one launch fewer), saving its weights
        ref = train_run(model=MODA_MODEL, steps=3, checkpoint=ckpt, checkpoint_mode="save")
        runs = {
            name: run_distributed(target, nproc=2, kwargs=dict(
                model=MODA_MODEL, parallel=parallel, steps=3, checkpoint=ckpt, checkpoint_mode="load"))
            for name, parallel in (("tp2-sp", {"tp": 2, "sp": True}), ("pp2", {"pp": 2}))
        }
    assert ref["losses"][-1] < ref["losses"][0]  # it trains
    for name, ranks in runs.items():
        for rank in ranks:
            assert rank["losses"] == pytest.approx(ref["losses"], abs=1e-5), name
            assert rank["grad_norms"] == pytest.approx(ref["grad_norms"], abs=1e-5), name


# -- GPU --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_kernel,dk,dv", [
    ("flash", 128, 128), ("flash", 192, 128), ("cudnn", 128, 128), ("cudnn", 192, 128),
    ("te", 128, 128),  # TE's fused attention (the cuDNN kernel base TE layers run); equal head dims
])
def test_cuda_fast_path_matches_reference_bf16(dk, dv, cuda_kernel):
    torch.manual_seed(0)
    s, b, heads, groups, n = 512, 2, 8, 4, 3
    make = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_()  # noqa: E731
    q, k, v = make(s, b, heads, dk), make(s, b, groups, dk), make(s, b, groups, dv)
    kd, vd = make(s, b, groups, n, dk), make(s, b, groups, n, dv)
    ref = reference_depth_attention(q, k, v, kd, vd, scale=dk ** -0.5)
    fast = fast_depth_attention(q, k, v, kd.detach(), vd.detach(), scale=dk ** -0.5,
                                attached=[t for j in range(n) for t in (kd[:, :, :, j], vd[:, :, :, j])],
                                cuda_kernel=cuda_kernel)
    torch.testing.assert_close(fast.float(), ref.float(), atol=2e-2, rtol=2e-2)
    grad_out = torch.randn_like(ref)
    for a, b_ in zip(torch.autograd.grad(ref, [q, k, v, kd, vd], grad_out),
                     torch.autograd.grad(fast, [q, k, v, kd, vd], grad_out)):
        torch.testing.assert_close(b_.float(), a.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with Transformer Engine")
@pytest.mark.parametrize("cuda_kernel", ["flash", "cudnn", "te", "auto"])
def test_te_model_with_moda_trains_and_reports_buffer(cuda_kernel):
    """... with every sequence kernel; the default ("auto") runs TE's fused attention, and the fused
    Triton depth kernels run (checked against the torch path) where triton imports."""
    from megacpp_mcore.train import runtime
    from megacpp_mcore.testing.parity import model_from_spec, synthetic_batches

    spec = dict(MODA_MODEL, hidden_size=256, seq_length=256,
                features={"moda": {"boundaries": [4], "cuda_kernel": cuda_kernel}})
    m = model_from_spec(spec)
    runtime.initialize(runtime.Parallelism(), seed=1234)
    try:
        config = runtime.transformer_config(m, runtime.Parallelism())  # bf16 on CUDA
        chunks = runtime.build_model(m, config, backend="te")
        optimizer = runtime.build_optimizer(chunks, lr=1e-3)
        losses = []
        for step in range(4):
            micro = synthetic_batches(seed=0, step=step, global_batch=2, seq_length=256, vocab=128,
                                      dp_rank=0, dp=1, micro_batch_size=2)
            losses.append(runtime.train_step(chunks, optimizer, iter(micro), num_microbatches=1,
                                             micro_batch_size=2, seq_length=256)["loss"])
        assert losses[-1] < losses[0]
        cores = [mod for mod in chunks[0].modules() if isinstance(mod, DepthAwareAttention)]
        expected_kernel = ("te-fused-cuda" if cuda_kernel in ("te", "auto")
                           else f"aten-{cuda_kernel}-cuda")
        assert {c.observed_kernel for c in cores if c.reads} == {expected_kernel}
        assert {c.observed_kernel for c in cores if not c.reads} == {"backend:TEDotProductAttention"}
        expected = m.features["moda"].buffer_bytes(m, 2, dtype=torch.bfloat16)
        assert [c.megacpp_stats()["moda_buffer_bytes"] for c in cores if c.starts_micro_batch] == [expected] * 2
        if not isinstance(depth.load_kernels(), ImportError):
            assert {c.observed_depth_kernel for c in cores if c.reads} == {"triton"}
    finally:
        runtime.shutdown()


def test_mla_model_with_moda_pushes_mla_shaped_kv_and_trains(single_rank):
    """MoDA through the MLA seam: depth K carries qk_head_dim + rope dims, V carries v_head_dim."""
    from megacpp_mcore.train import runtime
    from megacpp_mcore.testing.parity import model_from_spec, synthetic_batches

    spec = dict(MODA_MODEL,
                mla={"q_lora_rank": None, "kv_lora_rank": 32, "qk_head_dim": 16,
                     "qk_pos_emb_head_dim": 8, "v_head_dim": 16})
    m = model_from_spec(spec)
    config = runtime.transformer_config(m, runtime.Parallelism())
    (gpt,) = runtime.build_model(m, config, backend="local", wrap_ddp=False)
    cores = [mod for mod in gpt.modules() if isinstance(mod, DepthAwareAttention)]
    assert len(cores) == 6
    optimizer = torch.optim.Adam(gpt.parameters(), lr=3e-3)
    losses = []
    for step in range(4):
        (batch,) = synthetic_batches(seed=0, step=0, global_batch=2, seq_length=32, vocab=128,
                                     dp_rank=0, dp=1, micro_batch_size=2)
        loss = gpt(batch["tokens"], torch.arange(32)[None].expand(2, 32), None,
                   labels=batch["labels"]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert cores[-1].observed_kernel == "aten-flash-cpu"
    per_layer = depth_kv_bytes(2, 32, 1, 4, 24, torch.float32, v_head_dim=16)  # K 24 + V 16 channels
    expected = m.features["moda"].buffer_bytes(m, 2, dtype=torch.float32)
    assert expected % per_layer == 0
    starters = [c for c in cores if c.starts_micro_batch]
    assert [c.megacpp_stats()["moda_buffer_bytes"] for c in starters] == [expected, expected]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_depth_math_accumulates_in_fp32_without_upcast_copies():
    """``_bmm_acc`` on bf16 CUDA operands runs torch.bmm(out_dtype=float32) (no fp32 copies of the
    depth K/V) and matches the fp32 product of the same bf16 values."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(4096, 1, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(4096, 128, 7, device="cuda", dtype=torch.bfloat16, generator=g)
    got = depth.bmm_acc(a, b)
    assert got.dtype == torch.float32
    assert depth.native_fp32_bmm(a, b), "torch.bmm(out_dtype=float32) is unavailable: depth math upcasts"
    torch.testing.assert_close(got, torch.bmm(a.float(), b.float()), atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads,groups,dk,dv,slots,n", [
    (16, 16, 128, 128, 7, 7),  # the benchmark's shapes (reads every slot)
    (16, 16, 128, 128, 7, 3),  # the first n slots of a larger buffer (a strided view)
    (8, 2, 128, 128, 4, 4),  # GQA: 4 heads per depth group
    (8, 8, 192, 128, 3, 2),  # MLA head dims (not powers of two / unequal)
])
def test_cuda_fused_triton_depth_kernels_match_torch_path(heads, groups, dk, dv, slots, n):
    """moda_triton's merge forward and dQ backward equal the batched-matmul path (bf16, fp32 math)."""
    moda_triton = pytest.importorskip("megacpp_mcore.features.moda.kernels")
    s, b = 1024, 2
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    q, seq_out, dout = rnd(s, b, heads, dk), rnd(s, b, heads, dv), rnd(s, b, heads, dv)
    kd, vd = rnd(s, b, groups, slots, dk)[:, :, :, :n], rnd(s, b, groups, slots, dv)[:, :, :, :n]
    seq_lse = torch.randn(s, b, heads, device="cuda", generator=g) + 3
    ref_out, ref_lse = depth.merge_depth(q, kd, vd, seq_out.clone(), seq_lse, dk ** -0.5)
    out, lse = moda_triton.merge_forward(q, kd, vd, seq_out.clone(), seq_lse, dk ** -0.5)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    dq0 = rnd(s, b, heads, dk)
    ref_dq, dq = dq0.clone(), dq0.clone()
    depth.depth_backward(q, kd, vd, ref_out, ref_lse, dout, dk ** -0.5, ref_dq, want_kv=False)
    moda_triton.merge_backward_dq(q, kd, vd, ref_out, ref_lse, dout, dk ** -0.5, dq)
    torch.testing.assert_close(dq.float(), ref_dq.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_moda_layer_memory_at_4096():
    """At the benchmark's shapes (seq 4096, batch 2, 16 heads of 128), a layer reading 7 depth keys
    keeps exactly what a layer reading 1 keeps (output, contiguous V, fp32 lse) and its transient
    peaks stay within the 256 MiB chunk budget of the depth math."""
    s, b, heads, d = 4096, 2, 16, 128
    config = _config(num_layers=8, num_query_groups=heads, hidden_size=heads * d, num_attention_heads=heads)
    from megacpp_mcore.spec.backends import get_backend

    layers = _layers(MoDAConfig(), 8, config, backend=get_backend("auto"))  # TE's kernel where TE is
    unit = s * b * heads * d * 2
    # compile the fused depth kernels (and warm the sequence kernels) before the measurement
    q0 = torch.randn(64, 2, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kd0 = torch.randn(64, 2, 4, 2, 128, device="cuda", dtype=torch.bfloat16)
    fast_depth_attention(q0, q0[:, :, :2], q0[:, :, :2], kd0, kd0, scale=0.1).sum().backward()
    held, stats = [], {}
    for lay in layers:
        torch.manual_seed(lay.layer_index)
        mixed = torch.randn(s, b, heads, 3 * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        q, k, v = mixed[..., :d] * 1.0, mixed[..., d: 2 * d] * 1.0, mixed[..., 2 * d:]
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = lay(q, k, v, None)
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before
        if lay.layer_index == 0:
            kept -= lay.buffer.allocated_bytes  # the first push allocates the buffer
        stats[lay.reads] = (kept, torch.cuda.max_memory_allocated() - before)
        held.append((mixed, out))
    assert stats[7][0] == stats[1][0]
    assert abs(stats[7][0] - (2 * unit + s * b * heads * 4)) <= 2**20  # out + V copy + lse
    assert stats[7][1] - stats[1][1] <= 256 * 2**20 + 2**20
    peaks = {}
    for (mixed, out), lay in reversed(list(zip(held, layers))):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        peaks[lay.reads] = torch.cuda.max_memory_allocated() - before
    assert peaks[7] - peaks[1] <= 256 * 2**20 + 2**20
