"""Fused linear cross-entropy: loss and gradients against F.cross_entropy on materialized logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megacpp_mcore.features.mtp import cast_keeping_shard_markers
from megacpp_mcore.features.mtp.fused_ce import default_chunk, fused_linear_cross_entropy, resolve_impl


def _marked(weight: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(weight, True, 0, 1)
    return weight


def _case(tokens=53, hidden=24, vocab=97, seed=0, ignore_every=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.3
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::ignore_every] = -100
    upstream = torch.randn(tokens, generator=g)
    return x, w, labels, upstream


def _reference(x, w, labels, upstream):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy(x @ w.t(), labels, ignore_index=-100, reduction="none")
    gx, gw = torch.autograd.grad((loss * upstream).sum(), (x, w))
    return loss.detach(), gx, gw


@pytest.mark.parametrize("chunk", [1, 8, 53, 1000])
def test_loss_and_grads_match_materialized_logits(chunk):
    x, w, labels, upstream = _case()
    ref_loss, ref_gx, ref_gw = _reference(x, w, labels, upstream)
    xf, wf = x.clone().requires_grad_(), _marked(w.clone().requires_grad_())
    loss = fused_linear_cross_entropy(xf, wf, labels, chunk=chunk, impl="torch")
    gx, gw = torch.autograd.grad((loss * upstream).sum(), (xf, wf))
    assert loss.dtype == torch.float32 and loss.shape == labels.shape
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx, ref_gx, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=0)
    ignored = labels == -100
    assert torch.all(loss[ignored] == 0)
    assert torch.all(gx[ignored] == 0)  # ignored tokens contribute no gradient


@pytest.mark.parametrize("chunk", [5, 64])
def test_weighted_scalar_loss_grads_computed_in_forward_match_reference(chunk, monkeypatch):
    from megacpp_mcore.features.mtp import fused_ce

    x, w, labels, upstream = _case()
    token_weights = upstream.abs()  # any per-token weights, e.g. mask / count
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = (F.cross_entropy(xr @ wr.t(), labels, ignore_index=-100, reduction="none") * token_weights).sum()
    ref_gx, ref_gw = torch.autograd.grad(2.5 * ref, (xr, wr))
    xf, wf = x.clone().requires_grad_(), _marked(w.clone().requires_grad_())
    loss = fused_linear_cross_entropy(xf, wf, labels, token_weights=token_weights, chunk=chunk,
                                      impl="torch")
    assert loss.shape == () and loss.dtype == torch.float32
    gx, gw = torch.autograd.grad(2.5 * loss, (xf, wf))  # backward scales the forward-time grads
    torch.testing.assert_close(loss, ref.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(gx, ref_gx, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=0)
    calls = []
    monkeypatch.setattr(fused_ce, "_grad_torch", lambda *a: calls.append(a))
    with torch.no_grad():  # no gradient work without autograd (e.g. forward-only evaluation)
        value = fused_linear_cross_entropy(x, wf, labels, token_weights=token_weights, impl="torch")
    assert abs(float(value) - float(ref)) < 1e-4 and calls == []


def test_all_ignored_gives_zero_loss_and_grads():
    x, w, labels, upstream = _case()
    labels[:] = -100
    xf, wf = x.clone().requires_grad_(), _marked(w.clone().requires_grad_())
    loss = fused_linear_cross_entropy(xf, wf, labels, chunk=16, impl="torch")
    gx, gw = torch.autograd.grad((loss * upstream).sum(), (xf, wf))
    assert loss.abs().max() == 0 and gx.abs().max() == 0 and gw.abs().max() == 0


def test_bf16_close_to_fp32_reference():
    x, w, labels, upstream = _case(vocab=300)
    ref_loss, _, _ = _reference(x, w, labels, upstream)
    wb = cast_keeping_shard_markers(_marked(w.clone()), torch.bfloat16)
    loss = fused_linear_cross_entropy(x.bfloat16(), wb, labels, chunk=16, impl="torch")
    torch.testing.assert_close(loss, ref_loss, atol=0.1, rtol=0.02)


def test_never_materializes_full_logits(monkeypatch):
    """Every logits block the torch epilogue sees has at most ``chunk`` rows."""
    from megacpp_mcore.features.mtp import fused_ce

    seen = []
    original = fused_ce._stats_torch

    def spy(logits, *args):
        seen.append(tuple(logits.shape))
        return original(logits, *args)

    monkeypatch.setattr(fused_ce, "_stats_torch", spy)
    x, w, labels, _ = _case(tokens=50)
    fused_linear_cross_entropy(x, _marked(w.clone()), labels, chunk=16, impl="torch")
    assert seen == [(16, 97), (16, 97), (16, 97), (2, 97)]
    assert default_chunk(131072) * 131072 * 4 <= fused_ce.CHUNK_BYTES["torch"]


def test_refuses_weight_without_shard_markers():
    x, w, labels, _ = _case()
    with pytest.raises(ValueError, match="lacks the tensor-parallel attributes"):
        fused_linear_cross_entropy(x, w, labels, impl="torch")
    plain_cast = _marked(w.clone()).to(torch.float64)  # a plain cast drops the markers
    with pytest.raises(ValueError, match="cast_keeping_shard_markers"):
        fused_linear_cross_entropy(x.double(), plain_cast, labels, impl="torch")


def test_refuses_bad_shapes_dtypes_and_impl():
    x, w, labels, _ = _case()
    w = _marked(w.clone())
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(x, w, labels[:-1], impl="torch")
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_cross_entropy(x, w[:, :-1], labels, impl="torch")
    with pytest.raises(ValueError, match="dtype"):
        fused_linear_cross_entropy(x.double(), w, labels, impl="torch")
    with pytest.raises(ValueError, match="allowed: auto, torch, triton"):
        resolve_impl("cuda", torch.device("cpu"))
    assert resolve_impl("auto", torch.device("cpu")) == "torch"


@pytest.mark.distributed
def test_tp2_vocab_parallel_matches_full_logits():
    from megacpp_mcore.testing.dist import run_distributed

    results = run_distributed("megacpp_mcore.features.mtp.parity:fused_ce_tp_check", nproc=2)
    for rank in results:
        assert rank["ignored_zero"]
        for key in ("loss", "grad_hidden", "grad_weight", "sp_loss", "sp_grad_hidden",
                    "weighted_loss", "weighted_grad_hidden", "weighted_grad_weight",
                    "lookup", "lookup_sp"):
            assert rank[key] < 1e-5, (key, rank)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_torch_path(dtype):
    x, w, labels, upstream = _case(tokens=1000, hidden=256, vocab=32768 + 17)
    x, w, labels, upstream = x.cuda().to(dtype), w.cuda().to(dtype), labels.cuda(), upstream.cuda()
    outs = {}
    for impl in ("torch", "triton"):
        xf, wf = x.clone().requires_grad_(), _marked(w.clone().requires_grad_())
        loss = fused_linear_cross_entropy(xf, wf, labels, chunk=128, impl=impl)
        outs[impl] = (loss, *torch.autograd.grad((loss * upstream).sum(), (xf, wf)))
        xf, wf = x.clone().requires_grad_(), _marked(w.clone().requires_grad_())
        total = fused_linear_cross_entropy(xf, wf, labels, token_weights=upstream.abs(), chunk=300,
                                           impl=impl)
        outs[impl] += (total, *torch.autograd.grad(total, (xf, wf)))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(a.float(), b.float(), **tol)
