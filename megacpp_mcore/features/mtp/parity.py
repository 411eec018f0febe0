"""Multi-process checks of MTP (torchrun workers for ``megacpp_mcore.testing.dist.run_distributed``).

* :func:`fused_ce_tp_check`: TP ranks each hold a vocab shard; the fused vocab-parallel loss and its
  gradients are compared with ``F.cross_entropy`` on the full, materialized logits.
* :func:`mtp_train_run`: trains an MTP model (single rank saving its initial weights, or a parallel
  layout loading them) and reports losses, where the MTP parameters live and whether the tied
  embedding copies on the first and last pipeline stage are still identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F


def fused_ce_tp_check(*, tokens: int = 40, hidden: int = 16, vocab: int = 64, chunk: int = 7,
                      seed: int = 0) -> dict[str, Any]:
    """Per-rank max errors of the vocab-parallel fused CE (plain TP and SP layouts) vs. reference."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    from megacpp_mcore.patches import registry
    from megacpp_mcore.features.mtp.fused_ce import fused_linear_cross_entropy, vocab_parallel_linear_cross_entropy

    registry.apply_needed()  # megatron's SP mappings allocate on "cuda": the CPU shims (CPU hosts only)
    torch.distributed.init_process_group("gloo")
    group = torch.distributed.new_group(list(range(torch.distributed.get_world_size())))
    tp, rank = group.size(), group.rank()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64).float()
    w = torch.randn(vocab, hidden, generator=g) * 0.5
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[::6] = -100
    upstream = torch.randn(tokens, generator=g)

    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(xr @ wr.t(), labels, ignore_index=-100, reduction="none")
    ref_gx, ref_gw = torch.autograd.grad((ref * upstream).sum(), (xr, wr))

    shard = vocab // tp
    w_local = w[rank * shard:(rank + 1) * shard].clone().requires_grad_()
    set_tensor_model_parallel_attributes(w_local, True, 0, 1)
    xl = x.clone().requires_grad_()
    loss = fused_linear_cross_entropy(xl, w_local, labels, tp_group=group, chunk=chunk, impl="torch")
    gx, gw = torch.autograd.grad((loss * upstream).sum(), (xl, w_local))
    torch.distributed.all_reduce(gx, group=group)  # the TP-region entry mapping does this in models
    out = {
        "loss": (loss - ref).abs().max().item(),
        "grad_hidden": (gx - ref_gx).abs().max().item(),
        "grad_weight": (gw - ref_gw[rank * shard:(rank + 1) * shard]).abs().max().item(),
        "ignored_zero": bool((loss[labels == -100] == 0).all()),
    }

    # Weighted scalar loss (gradients computed in forward).
    xw, ww = x.clone().requires_grad_(), w_local.detach().clone().requires_grad_()
    set_tensor_model_parallel_attributes(ww, True, 0, 1)
    total = fused_linear_cross_entropy(xw, ww, labels, token_weights=upstream, tp_group=group,
                                       chunk=chunk, impl="torch")
    gxw, gww = torch.autograd.grad(total, (xw, ww))
    torch.distributed.all_reduce(gxw, group=group)
    out["weighted_loss"] = abs(float(total) - float((ref * upstream).sum()))
    out["weighted_grad_hidden"] = (gxw - ref_gx).abs().max().item()
    out["weighted_grad_weight"] = (gww - ref_gw[rank * shard:(rank + 1) * shard]).abs().max().item()

    # Model layout under sequence parallelism: [s/tp, b, h] in, [b, s] loss out.
    b, s = 2, tokens // 2
    x3 = x.view(b, s, hidden).transpose(0, 1).contiguous()  # [s, b, h]
    x_sp = x3.chunk(tp, dim=0)[rank].clone().requires_grad_()
    labels_bs = labels.view(b, s)
    loss_sp = vocab_parallel_linear_cross_entropy(x_sp, w_local, labels_bs, tp_group=group,
                                                  sequence_parallel=True, chunk=chunk, impl="torch")
    gx_sp, = torch.autograd.grad((loss_sp * upstream.view(b, s)).sum(), (x_sp,))
    ref_gx3 = ref_gx.view(b, s, hidden).transpose(0, 1).chunk(tp, dim=0)[rank]
    out["sp_loss"] = (loss_sp - ref.detach().view(b, s)).abs().max().item()
    out["sp_grad_hidden"] = (gx_sp - ref_gx3).abs().max().item()
    # The same with a loss mask (FusedLossGPTModel): gradients computed in forward for
    # pretrain_gpt's sum(loss * mask), scaled in backward.
    mask = (torch.arange(tokens) % 5 != 2).float()
    xm, wm = x.clone().requires_grad_(), w.clone().requires_grad_()
    refm = F.cross_entropy(xm @ wm.t(), labels, ignore_index=-100, reduction="none")
    ref_gxm, ref_gwm = torch.autograd.grad(0.7 * (refm * mask).sum(), (xm, wm))
    x_m = x3.chunk(tp, dim=0)[rank].clone().requires_grad_()
    w_m = w_local.detach().clone().requires_grad_()
    set_tensor_model_parallel_attributes(w_m, True, 0, 1)
    loss_m = vocab_parallel_linear_cross_entropy(x_m, w_m, labels_bs, tp_group=group, sequence_parallel=True,
                                                 loss_mask=mask.view(b, s), chunk=chunk, impl="torch")
    gx_m, gw_m = torch.autograd.grad(0.7 * (loss_m.view(-1) * mask).sum(), (x_m, w_m))
    ref_gxm3 = ref_gxm.view(b, s, hidden).transpose(0, 1).chunk(tp, dim=0)[rank]
    out["masked_loss"] = (loss_m - ref.detach().view(b, s)).abs().max().item()
    out["masked_grad_hidden"] = (gx_m - ref_gxm3).abs().max().item()
    out["masked_grad_weight"] = (gw_m - ref_gwm[rank * shard:(rank + 1) * shard]).abs().max().item()
    # The last stage's embedding of rolled-in tokens from the vocab-sharded tied weight.
    from megacpp_mcore.features.mtp.model import _vocab_parallel_lookup

    ids = labels.clamp(min=0).view(b, s)
    full = w[ids].transpose(0, 1)  # [s, b, h]
    plain = _vocab_parallel_lookup(ids, w_local.detach(), tp_group=group, sequence_parallel=False)
    sp = _vocab_parallel_lookup(ids, w_local.detach(), tp_group=group, sequence_parallel=True)
    out["lookup"] = (plain - full).abs().max().item()
    out["lookup_sp"] = (sp - full.chunk(tp, dim=0)[rank]).abs().max().item()
    torch.distributed.destroy_process_group()
    return out


def _stage_embedding_diff(chunks: list) -> float | None:
    """Max |first-stage embedding - last-stage tied copy| (PP > 1 and tied weights), else None."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return None
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    module = chunks[0 if first else -1].module
    if not module.share_embeddings_and_output_weights:
        return None
    weight = module.shared_embedding_or_output_weight().detach().float().clone()
    group = parallel_state.get_pipeline_model_parallel_group()
    peers = [torch.empty_like(weight) for _ in range(group.size())]
    torch.distributed.all_gather(peers, weight, group=group)
    return (peers[0] - peers[-1]).abs().max().item()


def mtp_train_run(*, model: dict[str, Any], parallel: dict[str, Any] | None = None, steps: int = 3,
                  seed: int = 1234, global_batch: int = 4, micro_batch_size: int = 1,
                  lr: float = 1e-3, checkpoint: str | None = None,
                  checkpoint_mode: str = "none", mtp_recompute: bool = False) -> dict[str, Any]:
    """Like :func:`megacpp_mcore.testing.parity.train_run`, plus MTP placement, MTP losses and the
    tied-embedding check after training; ``mtp_recompute``: the MTP block recomputed in backward."""
    from megatron.core import parallel_state

    from megacpp_mcore.train import runtime
    from megacpp_mcore.testing.parity import setup_run, synthetic_batches

    par, model_cfg, dp, chunks, optimizer = setup_run(
        model=model, parallel=parallel, seed=seed, backend="local", checkpoint=checkpoint,
        checkpoint_mode=checkpoint_mode, lr=lr)
    dp_rank = parallel_state.get_data_parallel_rank()
    for module in (m for c in chunks for m in c.module.modules() if hasattr(m, "mtp_config")):
        module.mtp_config = dataclasses.replace(module.mtp_config, recompute=mtp_recompute)
    blocks = [m for c in chunks for m in c.module.modules() if hasattr(m, "megacpp_stats")]
    losses, grad_norms, mtp_losses = [], [], []
    for step in range(steps):
        for block in blocks:
            block.megacpp_set_step(step)
        micro = synthetic_batches(seed=seed, step=step, global_batch=global_batch,
                                  seq_length=model_cfg.seq_length, vocab=model_cfg.vocab_size,
                                  dp_rank=dp_rank, dp=dp, micro_batch_size=micro_batch_size)
        result = runtime.train_step(chunks, optimizer, iter(micro), num_microbatches=len(micro),
                                    micro_batch_size=micro_batch_size,
                                    seq_length=model_cfg.seq_length)
        losses.append(result["loss"])
        grad_norms.append(result["grad_norm"])
        mtp_losses.append([b.megacpp_stats() for b in blocks])
    names = [n for c in chunks for n, _ in c.module.named_parameters()]
    out = {
        "losses": losses,
        "grad_norms": grad_norms,
        "mtp_losses": mtp_losses,
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "mtp_params": sorted(n for n in names if n.startswith("mtp")),
        "embedding_diff": _stage_embedding_diff(chunks),
        "parallel": dataclasses.asdict(par),
    }
    runtime.shutdown()
    return out
