"""Shared-block MTP: helpers, the model against a plain-torch reference, placement and parallel parity."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megacpp_mcore.features.mtp import MTPConfig, cast_keeping_shard_markers, roll_and_mask, step_weights

TINY_MTP = {
    "pattern": "AE", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
    "ffn_hidden_size": 128, "vocab_size": 128, "seq_length": 32, "moe": None, "mtp_depth": 2,
}


# ----------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("decay", [0.3, 0.5, 1.0])
def test_step_weights_sum_to_one_and_decay(depth, decay):
    w = step_weights(depth, decay)
    assert w.shape == (depth,) and w.dtype == torch.float32
    assert abs(float(w.sum()) - 1.0) < 1e-6
    expected = torch.tensor([decay ** k for k in range(depth)], dtype=torch.float64)
    torch.testing.assert_close(w.double(), expected / expected.sum(), atol=1e-7, rtol=0)
    if decay < 1 and depth > 1:
        assert torch.all(w[1:] < w[:-1])
    else:
        assert torch.all(w == w[0])


@pytest.mark.parametrize("depth,decay", [(0, 0.5), (True, 0.5), (2, 0.0), (2, 1.5), (2.0, 0.5)])
def test_step_weights_refuse_bad_input(depth, decay):
    with pytest.raises(ValueError, match="depth|decay"):
        step_weights(depth, decay)


@pytest.mark.parametrize("shift", [0, 1, 3, 7])
def test_roll_and_mask_matches_explicit_slicing(shift):
    g = torch.Generator().manual_seed(shift)
    ids = torch.randint(0, 100, (3, 7), generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    for tensor, fill in ((ids, -100), (ids.float(), 0.0), (mask, False)):
        out = roll_and_mask(tensor, shift, fill)
        assert out.shape == tensor.shape and out.dtype == tensor.dtype
        expected = torch.cat(
            [tensor[:, shift:], torch.full((3, shift), fill, dtype=tensor.dtype)], dim=1
        )
        assert torch.equal(out, expected)


def test_roll_and_mask_refuses_bad_shift():
    with pytest.raises(ValueError, match="shift=8 exceeds the sequence length 7"):
        roll_and_mask(torch.zeros(2, 7), 8, 0)
    with pytest.raises(ValueError, match="shift must be an int >= 0"):
        roll_and_mask(torch.zeros(2, 7), -1, 0)


@pytest.mark.parametrize("kwargs,match", [
    ({"depth": 0}, "depth"), ({"depth": 9}, "depth"), ({"decay": 0.0}, "decay"),
    ({"loss_scale": -1.0}, "loss_scale"), ({"chunk_tokens": 0}, "chunk_tokens"),
    ({"fused_ce_impl": "cuda"}, "allowed: 'auto', 'torch', 'triton'"),
])
def test_mtp_config_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MTPConfig(**kwargs)


# ----------------------------------------------------------------------------------- model
def _build(spec: dict, *, backend: str = "local"):
    from megacpp_mcore.train import runtime
    from megacpp_mcore.testing.parity import model_from_spec

    model_cfg = model_from_spec(spec)
    par = runtime.Parallelism()
    config = runtime.transformer_config(model_cfg, par)
    (chunk,) = runtime.build_model(model_cfg, config, backend=backend, wrap_ddp=False)
    return model_cfg, chunk


def test_shared_block_has_one_blocks_parameters_for_any_depth(single_rank):
    from megacpp_mcore.features.mtp.block import SharedMTPBlock
    from megacpp_mcore.features.mtp.model import MTPGPTModel
    from megacpp_mcore.models.accounting import embedding_params

    counts = set()
    for depth in (1, 3):
        model_cfg, model = _build(dict(TINY_MTP, mtp_depth=depth))
        assert isinstance(model, MTPGPTModel)
        blocks = [m for m in model.modules() if isinstance(m, SharedMTPBlock)]
        assert len(blocks) == 1
        n = sum(p.numel() for p in blocks[0].parameters())
        assert n == embedding_params(model_cfg)["mtp_shared_block"]  # the plan counts what we build
        counts.add(n)
    assert len(counts) == 1
    _, plain = _build(dict(TINY_MTP, mtp_depth=0))
    assert not isinstance(plain, MTPGPTModel)


def test_moe_shared_block_trains_and_matches_plan_count(single_rank):
    from megacpp_mcore.models.accounting import embedding_params

    moe = {"num_experts": 4, "topk": 2, "ffn_hidden_size": 64, "shared_expert_size": 64}
    model_cfg, model = _build(dict(TINY_MTP, moe=moe))
    n = sum(p.numel() for p in model.mtp_block.parameters())
    assert n == embedding_params(model_cfg)["mtp_shared_block"]
    assert type(model.mtp_block.feedforward.mlp).__name__ == "DeviceCountsMoELayer"
    b, s = 2, model_cfg.seq_length
    tokens = torch.randint(0, model_cfg.vocab_size, (b, s))
    from megatron.core.transformer.moe import moe_utils

    def step():
        moe_utils.clear_aux_losses_tracker()
        model.zero_grad()
        out = model(tokens, torch.arange(s).expand(b, s), None, labels=tokens)
        out.mean().backward()
        logged = {k: v["values"].clone() for k, v in moe_utils.get_moe_layer_wise_logging_tracker().items()}
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, logged

    grads, logged = step()
    router = model.mtp_block.feedforward.mlp.router.weight
    assert router.grad is not None and router.grad.abs().max() > 0
    assert set(model.mtp_block.megacpp_stats()) == {"loss", "loss_depth1", "loss_depth2"}
    # the block recomputed in backward: the same gradients (the router's load-balancing loss
    # included) and the load-balancing loss logged once per depth, not again by the recompute
    model.mtp_config = dataclasses.replace(model.mtp_config, recompute=True)
    stored, stored_logged = step()
    assert set(stored) == set(grads) and logged.keys() == stored_logged.keys() == {"load_balancing_loss"}
    for name in grads:
        torch.testing.assert_close(stored[name], grads[name], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(stored_logged["load_balancing_loss"], logged["load_balancing_loss"])


def _reference_mtp(model, hidden, tokens, labels, mask, rope, cfg: MTPConfig):
    """Plain torch: explicit slicing instead of roll-and-mask, materialized logits + F.cross_entropy."""
    blk = model.mtp_block
    weight = model.output_layer.weight
    b, s = tokens.shape
    total, per_depth = 0.0, []
    raw = torch.tensor([cfg.decay ** k for k in range(cfg.depth)])
    for k in range(1, cfg.depth + 1):
        ids_k = torch.cat([tokens[:, k:], torch.zeros(b, k, dtype=tokens.dtype)], dim=1)
        emb = weight[ids_k].transpose(0, 1)  # [s, b, h]; untied: MTP embeds with the head weight
        x = F.linear(torch.cat([blk.enorm(emb), blk.hnorm(hidden)], -1), blk.eh_proj)
        x = blk.attention(x, attention_mask=None, rotary_pos_emb=rope)[0]
        hidden = blk.feedforward(x, attention_mask=None)[0]
        logits = model.decoder.final_layernorm(hidden)[: s - k] @ weight.t()  # [s-k, b, V]
        ce = F.cross_entropy(logits.transpose(0, 1).reshape(-1, weight.shape[0]),
                             labels[:, k:].reshape(-1), reduction="none")
        m = mask[:, k:].reshape(-1)
        per_depth.append((ce * m).sum() / m.sum())
        total = total + raw[k - 1] / raw.sum() * per_depth[-1]
    return cfg.loss_scale * total, per_depth


def test_mtp_loss_and_gradients_match_plain_torch_reference(single_rank, monkeypatch):
    model_cfg, model = _build(TINY_MTP)
    cfg = model.mtp_config
    g = torch.Generator().manual_seed(7)
    b, s = 2, model_cfg.seq_length
    tokens = torch.randint(0, model_cfg.vocab_size, (b, s), generator=g)
    labels = torch.randint(0, model_cfg.vocab_size, (b, s), generator=g)
    mask = (torch.rand(b, s, generator=g) > 0.2).float()
    pos = torch.arange(s).expand(b, s)

    def run(loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def ours():
        out = model(tokens, pos, None, labels=labels, loss_mask=mask)
        assert out.shape == (b, s)  # per-token LM loss, like GPTModel
        return (out * mask).sum() / mask.sum()

    model.mtp_block.megacpp_set_step(0)
    grads = run(ours)
    stats = model.mtp_block.megacpp_stats()

    captured = {}

    def keep_hidden(module, args, out):
        captured["hidden"] = out  # returns None: the output is not replaced

    hook = model.decoder.register_forward_hook(keep_hidden)
    rope = model.rotary_pos_emb(s)
    ref_values = {}

    def reference():
        with monkeypatch.context() as m:  # LM loss only; MTP added below by hand
            m.setattr(model, "mtp_loss", lambda *a, **k: torch.zeros(()))
            out = model(tokens, pos, None, labels=labels, loss_mask=mask)
        total, per_depth = _reference_mtp(model, captured["hidden"], tokens, labels, mask, rope, cfg)
        ref_values.update(total=float(total), per_depth=[float(x) for x in per_depth])
        return (out * mask).sum() / mask.sum() + total

    ref_grads = run(reference)
    hook.remove()
    assert abs(stats["loss"] - ref_values["total"]) < 1e-5
    for k, value in enumerate(ref_values["per_depth"], start=1):
        assert abs(stats[f"loss_depth{k}"] - value) < 1e-5
    assert set(grads) == set(ref_grads)
    assert grads["mtp_block.eh_proj"].abs().max() > 0  # the MTP loss reaches the block
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=0, msg=name)

    # Recomputing the shared block in backward (opt-in; off by default) changes no gradient.
    import dataclasses

    assert not cfg.recompute
    model.mtp_config = dataclasses.replace(cfg, recompute=True)
    stored = run(ours)
    model.mtp_config = cfg
    for name in grads:
        torch.testing.assert_close(stored[name], grads[name], atol=1e-6, rtol=0, msg=name)

    # Without labels the model returns logits (upstream 0.16.1 MTP fails here).
    logits = model(tokens, pos, None)
    assert logits.shape == (b, s, model_cfg.vocab_size)


def test_shard_markers_survive_casts_and_markerless_weight_is_refused(single_rank):
    from megacpp_mcore.features.mtp.core import SHARD_MARKERS
    from megacpp_mcore.features.mtp.fused_ce import vocab_parallel_linear_cross_entropy

    _, model = _build(dict(TINY_MTP, tie_embeddings=True))
    weight = model.shared_embedding_or_output_weight()
    present = [name for name in SHARD_MARKERS if hasattr(weight, name)]
    assert {"tensor_model_parallel", "partition_dim", "partition_stride",
            "is_embedding_or_output_parameter"} <= set(present)
    bf16 = cast_keeping_shard_markers(weight, torch.bfloat16)
    fp32 = cast_keeping_shard_markers(bf16, torch.float32)
    for cast, dtype in ((bf16, torch.bfloat16), (fp32, torch.float32)):
        assert cast.dtype == dtype
        for name in present:
            assert getattr(cast, name) == getattr(weight, name), name
    hidden = torch.randn(8, 2, weight.shape[1])
    labels = torch.randint(0, weight.shape[0], (2, 8))
    kwargs = dict(tp_group=model.pg_collection.tp, sequence_parallel=False, impl="torch")
    vocab_parallel_linear_cross_entropy(hidden.bfloat16(), bf16, labels, **kwargs)  # accepted
    with pytest.raises(ValueError, match="lacks the tensor-parallel attributes"):
        vocab_parallel_linear_cross_entropy(hidden.bfloat16(), weight.to(torch.bfloat16), labels, **kwargs)


def test_model_refuses_conflicting_setups(single_rank):
    import dataclasses

    from megatron.core.models.gpt import GPTModel

    from megacpp_mcore.train import runtime
    from megacpp_mcore.spec.block import hybrid_block_spec
    from megacpp_mcore.features.mtp import MTPGPTModel
    from megacpp_mcore.testing.parity import model_from_spec

    model_cfg = model_from_spec(TINY_MTP)
    config = runtime.transformer_config(model_cfg, runtime.Parallelism())
    spec = hybrid_block_spec("AE", backend="local")
    common = dict(config=config, transformer_layer_spec=spec, vocab_size=128,
                  max_sequence_length=32, position_embedding_type="rope")
    with pytest.raises(ValueError, match="not both"):
        MTPGPTModel(**common, mtp=MTPConfig(), mtp_block_spec=spec)
    with pytest.raises(ValueError, match="mtp must be an MTPConfig"):
        MTPGPTModel(**common, mtp={"depth": 2})
    # A last stage without the input embedding (PP > 1, untied) reads the output head weight only.
    last = MTPGPTModel(**common, mtp=MTPConfig(), pre_process=False, post_process=True)
    assert last.mtp_block is not None and not hasattr(last, "embedding")
    assert last._head_weight() is last.output_layer.weight
    with pytest.raises(ValueError, match="switches on upstream MTP"):
        MTPGPTModel(**dict(common, config=dataclasses.replace(config, mtp_num_layers=1)),
                    mtp=MTPConfig())
    assert isinstance(MTPGPTModel(**common, mtp=None), GPTModel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the TE backend and Triton need a CUDA GPU")
def test_te_backend_block_and_triton_ce_match_torch_ce(single_rank):
    import dataclasses

    model_cfg, model = _build(dict(TINY_MTP, hidden_size=256, num_attention_heads=4,
                                   vocab_size=4096, seq_length=256), backend="te")
    assert "TE" in type(model.mtp_block.attention.self_attention.linear_qkv).__name__
    b, s = 2, model_cfg.seq_length
    tokens = torch.randint(0, model_cfg.vocab_size, (b, s), device="cuda")
    labels = torch.randint(0, model_cfg.vocab_size, (b, s), device="cuda")
    mask = torch.ones(b, s, device="cuda")
    pos = torch.arange(s, device="cuda").expand(b, s)
    results = {}
    for impl in ("torch", "triton"):
        model.mtp_config = dataclasses.replace(model.mtp_config, fused_ce_impl=impl)
        model.zero_grad(set_to_none=True)
        model.mtp_block.megacpp_set_step(0)
        out = model(tokens, pos, None, labels=labels, loss_mask=mask)
        ((out.float() * mask).sum() / mask.sum()).backward()
        grad = model.mtp_block.eh_proj.grad
        grad = grad if grad is not None else model.mtp_block.eh_proj.main_grad
        results[impl] = (model.mtp_block.megacpp_stats(), grad.float().clone())
    (stats_t, grad_t), (stats_k, grad_k) = results["torch"], results["triton"]
    for key in stats_t:
        assert abs(stats_t[key] - stats_k[key]) < 2e-2 * max(1.0, abs(stats_t[key])), key
    assert torch.isfinite(grad_k).all()
    torch.testing.assert_close(grad_k, grad_t, atol=5e-3, rtol=5e-2)


# ----------------------------------------------------------------------------------- parallel
@pytest.fixture(scope="module")
def parallel_runs():
    """One reference run (1 rank) and PP=2 / TP=2+SP runs loading its initial weights (TP=2+SP
    also with the MTP block recomputed in backward)."""
    import tempfile

    from megacpp_mcore.testing.dist import run_distributed

    target = "megacpp_mcore.features.mtp.parity:mtp_train_run"
    model = dict(TINY_MTP, tie_embeddings=True)
    with tempfile.TemporaryDirectory(prefix="megacpp-mtp-") as ckpt:
        (ref,) = run_distributed(target, nproc=1, kwargs=dict(
            model=model, checkpoint=ckpt, checkpoint_mode="save"))
        runs = {
            name: run_distributed(target, nproc=2, kwargs=dict(
                model=model, parallel=par, checkpoint=ckpt, checkpoint_mode="load", **extra))
            for name, par, extra in (("pp2", {"pp": 2}, {}), ("tp2sp", {"tp": 2, "sp": True}, {}),
                                     ("tp2sp_recompute", {"tp": 2, "sp": True}, {"mtp_recompute": True}))
        }
    return ref, runs


def _close(a, b, tol=1e-5):
    return all(abs(x - y) <= tol for x, y in zip(a, b)) and len(a) == len(b)


@pytest.mark.distributed
def test_pp2_mtp_on_last_stage_only_and_loss_matches_single_rank(parallel_runs):
    ref, runs = parallel_runs
    first, last = sorted(runs["pp2"], key=lambda r: r["pp_rank"])
    assert first["mtp_params"] == [] and last["mtp_params"] == ref["mtp_params"] != []
    for rank in (first, last):
        assert _close(rank["losses"], ref["losses"]), (rank["losses"], ref["losses"])
        assert _close(rank["grad_norms"], ref["grad_norms"], 1e-5)
    assert ref["losses"][-1] < ref["losses"][0]
    for step_ref, step_last in zip(ref["mtp_losses"], last["mtp_losses"]):
        (a,), (b,) = step_ref, step_last
        assert a.keys() == b.keys() == {"loss", "loss_depth1", "loss_depth2"}
        assert _close(list(a.values()), [b[k] for k in a])


@pytest.mark.distributed
def test_pp2_tied_embedding_identical_on_first_and_last_stage(parallel_runs):
    _, runs = parallel_runs
    for rank in runs["pp2"]:
        assert rank["embedding_diff"] == 0.0  # after 3 optimizer steps


@pytest.mark.distributed
@pytest.mark.parametrize("run", ["tp2sp", "tp2sp_recompute"])
def test_tp2_sp_mtp_matches_single_rank(parallel_runs, run):
    ref, runs = parallel_runs
    for rank in runs[run]:
        assert rank["mtp_params"] == ref["mtp_params"]
        assert _close(rank["losses"], ref["losses"]), (rank["losses"], ref["losses"])
        (a,), (b,) = ref["mtp_losses"][-1], rank["mtp_losses"][-1]
        assert _close(list(a.values()), [b[k] for k in a])
