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


@pytest.mark.parametrize("chunk", [7, 64])
def test_masked_per_token_loss_takes_forward_time_grads_for_megatrons_loss_func(chunk, monkeypatch):
    """``loss_mask``: the gradients of ``c * sum(loss * mask)`` are computed in forward (no logits
    block is recomputed in backward) and equal the materialized reference's."""
    from megacpp_mcore.features.mtp import fused_ce

    x, w, labels, _ = _case()
    mask = (torch.arange(labels.numel()) % 5 != 1).float()  # some tokens masked out, others ignored
    ref_loss, ref_gx, ref_gw = _reference(x, w, labels, 0.37 * mask)
    xf, wf = x.clone().requires_grad_(), _marked(w.clone().requires_grad_())
    loss = fused_linear_cross_entropy(xf, wf, labels, loss_mask=mask, chunk=chunk, impl="torch")
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    blocks = []
    original = fused_ce._grad_torch
    monkeypatch.setattr(fused_ce, "_grad_torch", lambda *a: blocks.append(a) or original(*a))
    monkeypatch.setattr(fused_ce, "masked_recomputes", 0)
    gx, gw = torch.autograd.grad(0.37 * (loss * mask).sum(), (xf, wf))  # pretrain_gpt's loss_func
    assert blocks == [] and fused_ce.masked_recomputes == 0  # scaled, not recomputed
    torch.testing.assert_close(gx, ref_gx, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=0)


def test_masked_per_token_loss_used_otherwise_recomputes_exact_grads(monkeypatch):
    """Any other upstream gradient (not ``c * loss_mask``) takes the recompute path: still exact."""
    from megacpp_mcore.features.mtp import fused_ce

    x, w, labels, upstream = _case()
    mask = torch.ones(labels.shape)
    ref_loss, ref_gx, ref_gw = _reference(x, w, labels, upstream)
    xf, wf = x.clone().requires_grad_(), _marked(w.clone().requires_grad_())
    loss = fused_linear_cross_entropy(xf, wf, labels, loss_mask=mask, chunk=16, impl="torch")
    blocks = []
    original = fused_ce._grad_torch
    monkeypatch.setattr(fused_ce, "_grad_torch", lambda *a: blocks.append(a) or original(*a))
    monkeypatch.setattr(fused_ce, "masked_recomputes", 0)
    with pytest.warns(UserWarning, match="recomputed in backward"):
        gx, gw = torch.autograd.grad((loss * upstream).sum(), (xf, wf))
    assert len(blocks) == 4 and fused_ce.masked_recomputes == 1  # ceil(53 / 16) blocks recomputed
    torch.testing.assert_close(gx, ref_gx, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        fused_linear_cross_entropy(xf, wf, labels, loss_mask=mask, token_weights=mask, impl="torch")
    with pytest.raises(ValueError, match="loss_mask must be"):
        fused_linear_cross_entropy(xf, wf, labels, loss_mask=mask[:-1], impl="torch")


def test_masked_loss_deferred_check_scales_without_a_sync_and_raises_for_misuse(monkeypatch):
    """CONTRACT_CHECK "deferred" (CUDA's default): backward scales the forward-time gradients
    without reading its check; a misused loss raises FusedLossContractError at the next masked
    forward (or check_deferred), and nothing is recomputed."""
    from megacpp_mcore.features.mtp import fused_ce

    monkeypatch.setattr(fused_ce, "CONTRACT_CHECK", "deferred")
    monkeypatch.setattr(fused_ce, "_pending_checks", [])
    x, w, labels, upstream = _case()
    mask = (torch.arange(labels.numel()) % 3 != 0).float()
    _, ref_gx, ref_gw = _reference(x, w, labels, 0.25 * mask)
    xf, wf = x.clone().requires_grad_(), _marked(w.clone().requires_grad_())
    loss = fused_linear_cross_entropy(xf, wf, labels, loss_mask=mask, chunk=16, impl="torch")
    gx, gw = torch.autograd.grad(0.25 * (loss * mask).sum(), (xf, wf))
    torch.testing.assert_close(gx, ref_gx, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, ref_gw, atol=1e-5, rtol=0)
    fused_ce.check_deferred(wait=True)  # the contract held
    loss = fused_linear_cross_entropy(xf, wf, labels, loss_mask=mask, chunk=16, impl="torch")
    torch.autograd.grad((loss * upstream).sum(), (xf, wf))  # misuse: wrong gradients, flagged
    with pytest.raises(fused_ce.FusedLossContractError, match="fused_lm_loss=False"):
        fused_linear_cross_entropy(xf, wf, labels, loss_mask=mask, chunk=16, impl="torch")
    assert fused_ce._pending_checks == []
    monkeypatch.setattr(fused_ce, "CONTRACT_CHECK", "later")
    loss = fused_linear_cross_entropy(xf, wf, labels, loss_mask=mask, chunk=16, impl="torch")
    with pytest.raises(ValueError, match="allowed: auto, sync, deferred"):
        torch.autograd.grad(loss.sum(), (xf,))


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
                    "masked_loss", "masked_grad_hidden", "masked_grad_weight", "lookup", "lookup_sp"):
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
        mask = (upstream > -1).float()
        xf, wf = x.clone().requires_grad_(), _marked(w.clone().requires_grad_())
        masked = fused_linear_cross_entropy(xf, wf, labels, loss_mask=mask, chunk=256, impl=impl)
        outs[impl] += (masked, *torch.autograd.grad(0.3 * (masked * mask).sum(), (xf, wf)))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    from megacpp_mcore.features.mtp import fused_ce

    fused_ce.check_deferred(wait=True)  # CUDA: the masked backward's check was queued, and held
    xf, wf = x.clone().requires_grad_(), _marked(w.clone().requires_grad_())
    masked = fused_linear_cross_entropy(xf, wf, labels, loss_mask=mask, chunk=256, impl="triton")
    torch.autograd.grad((masked * upstream).sum(), (xf, wf))  # misuse, flagged without a sync
    with pytest.raises(fused_ce.FusedLossContractError):
        fused_ce.check_deferred(wait=True)


def test_fused_loss_model_equals_gpt_models_loss_and_gradients(single_rank):
    """``FusedLossGPTModel`` against ``GPTModel`` with the same weights: per-token loss, and every
    parameter's gradient through pretrain_gpt's ``loss_func`` (``sum(loss * loss_mask)``), with a
    loss mask that drops tokens; tied and untied heads. Under no_grad (an evaluation step) the same
    loss; without labels both return the logits."""
    from megatron.core.models.gpt import GPTModel

    from megacpp_mcore.features.mtp import FusedLossGPTModel, fused_ce
    from megacpp_mcore.models.presets import get_preset
    from megacpp_mcore.spec.block import hybrid_block_spec
    from megacpp_mcore.train.runtime import Parallelism, gpt_model, transformer_config

    model = get_preset("nam56r-tiny").replace(pattern="AE", num_layers=2, hidden_size=64,
                                              num_attention_heads=4, ffn_hidden_size=128,
                                              vocab_size=96, seq_length=16, moe=None, features={},
                                              mla=None, mtp_depth=0)
    config = transformer_config(model, Parallelism())
    spec = hybrid_block_spec("AE", backend="local", num_layers=2)
    g = torch.Generator().manual_seed(3)
    b, s = 2, 16
    tokens = torch.randint(0, 96, (b, s), generator=g)
    labels = torch.randint(0, 96, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.25).float()
    pos = torch.arange(s).expand(b, s)
    for tied in (False, True):
        built = {}
        for fused in (False, True):
            torch.manual_seed(11)
            built[fused] = gpt_model(config, spec, vocab_size=96, max_sequence_length=s,
                                     pre_process=True, post_process=True, fused_lm_loss=fused,
                                     share_embeddings_and_output_weights=tied,
                                     position_embedding_type="rope")
        assert type(built[False]) is GPTModel and type(built[True]) is FusedLossGPTModel
        built[True].load_state_dict(built[False].state_dict())
        out = {}
        recomputes = fused_ce.masked_recomputes
        for fused, gpt in built.items():
            loss = gpt(tokens, pos, None, labels=labels, loss_mask=mask)
            (0.5 * (loss.view(-1).float() * mask.view(-1)).sum()).backward()
            out[fused] = loss.detach(), {n: p.grad for n, p in gpt.named_parameters()}
            with torch.no_grad():
                assert gpt(tokens, pos, None).shape == (b, s, 96)  # logits without labels
                # an evaluation step (pretrain_gpt's --eval-iters): the same loss, no gradients
                evaluated = gpt(tokens, pos, None, labels=labels, loss_mask=mask)
                assert not evaluated.requires_grad
                torch.testing.assert_close(evaluated, loss.detach(), atol=1e-6, rtol=1e-6)
        assert fused_ce.masked_recomputes == recomputes  # the gradients came from forward
        torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
        assert out[True][0].shape == (b, s)
        for name, grad in out[False][1].items():
            torch.testing.assert_close(out[True][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
