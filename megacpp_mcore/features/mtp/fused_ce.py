"""Chunked, vocab-parallel fused linear cross-entropy: ``CE(hidden @ W^T, labels)`` per token without
ever building the ``[tokens x vocab]`` logits.

Tokens are processed in chunks of ``chunk`` rows; only one ``[chunk x vocab_shard]`` logits block is
alive at a time, in forward and (recomputed) in backward. Under tensor parallelism each rank owns a
contiguous vocabulary shard of ``W`` (``partition_dim=0``, as Megatron's ``VocabParallelEmbedding``
and the output ``ColumnParallelLinear``), and the softmax statistics are combined over the TP group:
max (all-reduce MAX), sum of exponentials and target logit (all-reduce SUM). The hidden-state
gradient this function returns is the rank's partial sum over its vocab shard; callers enter the TP
region through Megatron's mappings (:func:`vocab_parallel_linear_cross_entropy` does), whose backward
reduces it, exactly as the output ``ColumnParallelLinear`` does.

Two entry points: the per-token loss (logits blocks recomputed in backward, for any upstream
gradient), and the weighted scalar loss ``sum_t w_t * CE_t`` used by MTP, whose gradients are
computed in forward while each block is live (the three GEMMs of an unfused head, no recompute) and
only scaled in backward.

Two implementations of the per-chunk softmax epilogue: ``torch`` (any device) and ``triton`` (CUDA;
one program per row streams the vocab shard in blocks, and the backward kernel turns the logits
block into its gradient in place). The GEMMs are cuBLAS/torch in both.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from megacpp_mcore.features.mtp.core import missing_shard_markers

IMPLS = ("auto", "torch", "triton")
# Backward passes of the masked per-token loss that had to recompute their gradients (the loss was
# not used as c * sum(loss * loss_mask)); the first one warns.
masked_recomputes = 0
# How the masked loss's backward checks that its gradient is c * loss_mask: "sync" reads the check on
# the host at once and recomputes exactly when it fails; "deferred" queues it (a pinned copy and an
# event, no host sync in the middle of the backward) and check_deferred() raises for a failed one
# later, at the next masked forward at the latest; "auto": deferred for CUDA tensors, else sync.
CONTRACT_CHECK = "auto"
CONTRACT_CHECKS = ("auto", "sync", "deferred")
_pending_checks: list = []  # (event or None, host bool tensor), oldest first


class FusedLossContractError(RuntimeError):
    """The masked per-token loss was used other than as ``c * sum(loss * loss_mask)``."""


def _queue_check(ok: torch.Tensor) -> None:
    host = torch.empty((), dtype=torch.bool, pin_memory=ok.is_cuda)
    host.copy_(ok, non_blocking=ok.is_cuda)
    event = None
    if ok.is_cuda:
        event = torch.cuda.Event()
        event.record()
    _pending_checks.append((event, host))


def check_deferred(wait: bool = False) -> None:
    """Reads the queued gradient checks that have completed (all of them with ``wait``) and raises
    :class:`FusedLossContractError` for a failed one: the step it belonged to applied wrong
    gradients, so the run must not go on."""
    while _pending_checks and (wait or _pending_checks[0][0] is None or _pending_checks[0][0].query()):
        event, host = _pending_checks.pop(0)
        if event is not None:
            event.synchronize()
        if not bool(host):
            _pending_checks.clear()
            raise FusedLossContractError(
                "fused cross-entropy: a masked per-token loss was used other than as c * sum(loss * "
                "loss_mask) (Megatron's loss_func), so the gradients it returned, computed in forward "
                "for that use, were wrong; use the model with fused_lm_loss=False (launcher: "
                "--megacpp-fused-lm-loss off) for this loss, or set fused_ce.CONTRACT_CHECK = 'sync' "
                "(exact, with one host sync per backward)")
# Logits block budget per chunk; bounds the extra memory independently of the vocab size. The torch
# epilogue makes fp32 temporaries of the block, the Triton one works in place on the GEMM output.
CHUNK_BYTES = {"torch": 256 * 2**20, "triton": 2**30}


def _group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _group_rank(group) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def check_vocab_parallel_weight(weight: torch.Tensor, tp_size: int) -> None:
    """Refuses an output weight whose shard markers are missing or do not say "vocab shard"."""
    missing = missing_shard_markers(weight)
    if missing:
        raise ValueError(
            f"vocab-parallel cross-entropy: the output weight (shape {tuple(weight.shape)}) lacks the "
            f"tensor-parallel attributes {missing}; it was probably cast or copied without them. Cast "
            "with megacpp_mcore.features.mtp.cast_keeping_shard_markers(weight, dtype)."
        )
    if tp_size > 1 and not (weight.tensor_model_parallel and weight.partition_dim == 0
                            and weight.partition_stride == 1):
        raise ValueError(
            "vocab-parallel cross-entropy under TP="
            f"{tp_size} needs a vocab-sharded weight (tensor_model_parallel=True, partition_dim=0, "
            f"partition_stride=1); got tensor_model_parallel={weight.tensor_model_parallel}, "
            f"partition_dim={weight.partition_dim}, partition_stride={weight.partition_stride}"
        )


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA when Triton imports, else ``torch``; refuses unknown names."""
    if impl not in IMPLS:
        raise ValueError(f"fused cross-entropy impl {impl!r}; allowed: {', '.join(IMPLS)}")
    if impl == "torch":
        return impl
    from megacpp_mcore.spec import backends

    if impl == "triton":
        backends.require("triton", "the Triton fused cross-entropy")
        if device.type != "cuda":
            raise ValueError(f"impl='triton' needs CUDA tensors, got device {device}")
        return impl
    return "triton" if device.type == "cuda" and backends.detect().triton else "torch"


def default_chunk(vocab_shard: int, impl: str = "torch", dtype: torch.dtype = torch.float32) -> int:
    """Tokens per chunk so that one ``[chunk, vocab_shard]`` block fits :data:`CHUNK_BYTES`."""
    elem = 4 if impl == "torch" else torch.tensor([], dtype=dtype).element_size()
    return max(64, min(16384, CHUNK_BYTES[impl] // (elem * vocab_shard)))


# --------------------------------------------------------------------------------------- epilogues
def _stats_torch(logits: torch.Tensor, local_labels: torch.Tensor, in_shard: torch.Tensor):
    """Per-row (max, sum exp(x - max), target logit or 0) of a ``[c, V]`` logits block."""
    logits = logits.float()
    row_max = logits.amax(dim=-1)
    sumexp = torch.exp(logits - row_max[:, None]).sum(dim=-1)
    target = logits.gather(1, local_labels.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
    return row_max, sumexp, torch.where(in_shard, target, torch.zeros_like(target))


def _grad_torch(logits, lse, local_labels, in_shard, scale) -> torch.Tensor:
    """``(softmax - onehot) * scale[:, None]`` of a ``[c, V]`` block, in the block's dtype."""
    probs = torch.exp(logits.float() - lse[:, None])
    rows = torch.nonzero(in_shard).squeeze(1)
    probs[rows, local_labels[rows]] -= 1.0
    return (probs * scale[:, None]).to(logits.dtype)


def _epilogue(impl: str):
    if impl == "triton":
        from megacpp_mcore.features.mtp import _triton_ce

        return _triton_ce.row_stats, _triton_ce.row_grad
    return _stats_torch, _grad_torch


# ------------------------------------------------------------------------------------ autograd
def _accumulate_wgrad(acc: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor, first: bool) -> None:
    """``acc (=|+=) dlogits.T @ h`` in the weight dtype: one GEMM per chunk (fp32 accumulation inside
    cuBLAS, one rounding per chunk; chunks are few because a chunk spans up to 1 GiB of logits).
    The first chunk writes ``acc`` (allocated empty: no fill and no read of a zero ``C``)."""
    if first:
        torch.mm(dlogits.t(), h, out=acc)
    else:
        acc.addmm_(dlogits.t(), h)


def _grad_buffers(hidden: torch.Tensor, weight: torch.Tensor, needs) -> tuple:
    """(grad_hidden, grad_weight) to fill block by block, None where ``needs`` says no; the weight's
    is allocated empty (the first block writes it) unless there is no block at all."""
    grad_hidden = torch.empty_like(hidden) if needs[0] else None
    grad_weight = None
    if needs[1]:
        grad_weight = torch.empty_like(weight) if hidden.shape[0] else torch.zeros_like(weight)
    return grad_hidden, grad_weight


def _add_block_grads(dlogits, weight, h, start, grad_hidden, grad_weight) -> None:
    """One block's share of the gradients: its rows of ``dlogits @ W`` (partial over this rank's
    vocab shard) and ``dlogits^T @ h`` into the weight's."""
    if grad_hidden is not None:
        torch.mm(dlogits, weight, out=grad_hidden[start:start + h.shape[0]])
    if grad_weight is not None:
        _accumulate_wgrad(grad_weight, dlogits, h, first=start == 0)


def _shard_labels(labels, ignore_index, vocab_shard, tp_group):
    vocab_start = _group_rank(tp_group) * vocab_shard
    valid = labels != ignore_index
    local = labels - vocab_start
    in_shard = valid & (local >= 0) & (local < vocab_shard)
    return valid, torch.where(in_shard, local, torch.zeros_like(local)), in_shard


def _chunk_lse(logits, local, in_shard, stats, tp_group):
    """(log-sum-exp, target logit) of one ``[c, V_shard]`` block, combined over the TP group."""
    row_max, sumexp, target = stats(logits, local, in_shard)
    if _group_size(tp_group) > 1:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
        packed = torch.stack([sumexp * torch.exp(row_max - global_max), target])
        dist.all_reduce(packed, group=tp_group)
        row_max, (sumexp, target) = global_max, packed
    return row_max + torch.log(sumexp), target


def _blocks(hidden, weight, local, in_shard, weights, tp_group, chunk, impl, grads):
    """One pass over the ``[chunk, V_shard]`` logits blocks: per-token (lse, target logit) and,
    where ``grads`` asks, the gradients of ``sum_t weights[t] * CE_t`` computed while each block is
    live (``dlogits @ W`` and ``dlogits^T @ h``: the two backward GEMMs of an unfused head)."""
    stats, grad_fn = _epilogue(impl)
    n = hidden.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    target = torch.empty(n, dtype=torch.float32, device=hidden.device)
    grad_hidden, grad_weight = _grad_buffers(hidden, weight, grads)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h = hidden[start:end]
        logits = h @ weight.t()  # [c, V_shard]
        lse[start:end], target[start:end] = _chunk_lse(logits, local[start:end], in_shard[start:end],
                                                       stats, tp_group)
        if not any(grads):
            continue
        dlogits = grad_fn(logits, lse[start:end], local[start:end], in_shard[start:end],
                          weights[start:end])
        del logits
        _add_block_grads(dlogits, weight, h, start, grad_hidden, grad_weight)
    return lse, target, grad_hidden, grad_weight


def _recomputed_grads(hidden, weight, lse, local, in_shard, scale, chunk, impl, needs):
    """Gradients for a per-token upstream gradient ``scale`` known only in backward: each logits
    block recomputed (one more GEMM per block than an unfused head)."""
    _, grad_fn = _epilogue(impl)
    grad_hidden, grad_weight = _grad_buffers(hidden, weight, needs)
    for start in range(0, hidden.shape[0], chunk):
        end = min(start + chunk, hidden.shape[0])
        h = hidden[start:end]
        dlogits = grad_fn(h @ weight.t(), lse[start:end], local[start:end], in_shard[start:end],
                          scale[start:end])
        _add_block_grads(dlogits, weight, h, start, grad_hidden, grad_weight)
    return grad_hidden, grad_weight


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """hidden [N, h], weight [V_shard, h], labels [N] -> per-token loss [N] (fp32, 0 where ignored).

    Logits blocks are recomputed in backward (the per-token upstream gradient is unknown in forward).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, tp_group, ignore_index, chunk, impl):
        valid, local, in_shard = _shard_labels(labels, ignore_index, weight.shape[0], tp_group)
        lse, target, _, _ = _blocks(hidden, weight, local, in_shard, None, tp_group, chunk, impl,
                                    (False, False))
        ctx.save_for_backward(hidden, weight, lse, local, in_shard, valid)
        ctx.chunk, ctx.impl = chunk, impl
        return torch.where(valid, lse - target, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, lse, local, in_shard, valid = ctx.saved_tensors
        scale = torch.where(valid, grad_loss.float(), torch.zeros_like(lse))
        gh, gw = _recomputed_grads(hidden, weight, lse, local, in_shard, scale, ctx.chunk, ctx.impl,
                                   ctx.needs_input_grad[:2])
        return gh, gw, None, None, None, None, None


class _FusedLinearCrossEntropyMasked(torch.autograd.Function):
    """hidden [N, h], weight [V_shard, h], labels [N], loss_mask [N] -> per-token loss [N] (fp32).

    For a loss consumed as ``c * sum_t loss_t * loss_mask_t`` (Megatron's ``loss_func``; ``c`` is
    whatever the schedule scales by), whose per-token upstream gradient is ``c * loss_mask``: the
    gradients for ``c = 1`` are computed in forward while each logits block is live (no recompute;
    the three GEMMs of an unfused head) and backward scales them by ``c``. Backward checks that the
    gradient it gets has that form (:data:`CONTRACT_CHECK`): on the host at once, recomputing the
    blocks exactly when it fails (CPU), or queued without a host sync and raised on later by
    :func:`check_deferred` (CUDA).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_mask, tp_group, ignore_index, chunk, impl, grads):
        check_deferred()  # an earlier backward's queued check, where it has completed
        valid, local, in_shard = _shard_labels(labels, ignore_index, weight.shape[0], tp_group)
        mask = torch.where(valid, loss_mask.float(), torch.zeros_like(loss_mask, dtype=torch.float32))
        lse, target, gh, gw = _blocks(hidden, weight, local, in_shard, mask, tp_group, chunk, impl, grads)
        ctx.save_for_backward(hidden, weight, lse, local, in_shard, valid, mask, gh, gw)
        ctx.chunk, ctx.impl = chunk, impl
        return torch.where(valid, lse - target, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, lse, local, in_shard, valid, mask, gh, gw = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        grad = torch.where(valid, grad_loss.float(), torch.zeros_like(lse))
        c = (grad * mask).sum() / (mask * mask).sum().clamp(min=1e-30)
        have = (gh is not None or not needs[0]) and (gw is not None or not needs[1])
        if CONTRACT_CHECK not in CONTRACT_CHECKS:
            raise ValueError(f"fused_ce.CONTRACT_CHECK={CONTRACT_CHECK!r}; allowed: {', '.join(CONTRACT_CHECKS)}")
        deferred = CONTRACT_CHECK == "deferred" or (CONTRACT_CHECK == "auto" and grad.is_cuda)
        if have:
            ok = torch.isclose(grad, c * mask, rtol=1e-5, atol=0.0).all()
            if deferred:
                _queue_check(ok)
            if deferred or bool(ok):
                # out of place: a retained graph's second backward must find the c = 1 gradients
                return (gh * c.to(gh.dtype) if needs[0] else None, gw * c.to(gw.dtype) if needs[1] else None,
                        None, None, None, None, None, None, None)
        global masked_recomputes
        masked_recomputes += 1
        if masked_recomputes == 1:
            warnings.warn("fused cross-entropy: the per-token loss was not consumed as c * sum(loss * "
                          "loss_mask), so its gradients are recomputed in backward (exact, one more GEMM "
                          "per logits block than upstream's head); said once per process", stacklevel=2)
        gh, gw = _recomputed_grads(hidden, weight, lse, local, in_shard, grad, ctx.chunk, ctx.impl, needs)
        return gh, gw, None, None, None, None, None, None, None


class _FusedLinearCrossEntropyLoss(torch.autograd.Function):
    """hidden [N, h], weight [V_shard, h], labels [N], token_weights [N] -> sum_t w_t * CE_t (fp32).

    The loss is a scalar, so its gradients are known in forward up to the one upstream scalar: they
    are computed while each logits block is live (no recompute; the three GEMMs of an unfused head)
    and backward only scales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weights, tp_group, ignore_index, chunk, impl,
                grads):
        valid, local, in_shard = _shard_labels(labels, ignore_index, weight.shape[0], tp_group)
        weights = torch.where(valid, token_weights.float(), torch.zeros_like(token_weights, dtype=torch.float32))
        lse, target, grad_hidden, grad_weight = _blocks(hidden, weight, local, in_shard, weights,
                                                        tp_group, chunk, impl, grads)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return ((lse - target) * weights).sum()

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.float()
        gh = (grad_hidden * scale).to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * scale).to(grad_weight.dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    token_weights: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    tp_group=None,
    ignore_index: int = -100,
    chunk: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """CE of ``hidden @ weight.T`` against ``labels`` without materializing the logits.

    Returns the per-token loss ``[N]`` (fp32, 0 at ``ignore_index``), or, with ``token_weights``
    ``[N]``, the scalar ``sum_t token_weights[t] * CE_t`` whose gradients are computed in forward.
    ``loss_mask`` ``[N]`` (per-token loss only): the loss will be consumed as ``c * sum_t loss_t *
    loss_mask_t`` (Megatron's ``loss_func``), so the gradients are computed in forward for the
    mask and scaled by ``c`` in backward; another use of the loss recomputes them (exact, slower).
    ``hidden`` ``[N, h]`` must already be replicated over ``tp_group`` (use
    :func:`vocab_parallel_linear_cross_entropy` from ``[s, b, h]`` model activations); ``weight``
    ``[V / tp, h]`` is this rank's vocab shard and must carry Megatron's shard markers.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"fused_linear_cross_entropy: hidden must be [N, h] and labels [N]; got hidden "
            f"{tuple(hidden.shape)}, labels {tuple(labels.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"fused_linear_cross_entropy: weight must be [V_shard, {hidden.shape[1]}], got {tuple(weight.shape)}"
        )
    for name, per_token in (("token_weights", token_weights), ("loss_mask", loss_mask)):
        if per_token is not None and per_token.shape != labels.shape:
            raise ValueError(
                f"fused_linear_cross_entropy: {name} must be [N] = {tuple(labels.shape)}, got "
                f"{tuple(per_token.shape)}"
            )
    if token_weights is not None and loss_mask is not None:
        raise ValueError("fused_linear_cross_entropy: pass token_weights (a weighted scalar loss) or "
                         "loss_mask (a per-token loss), not both")
    tp = _group_size(tp_group)
    check_vocab_parallel_weight(weight, tp)
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"fused_linear_cross_entropy: hidden dtype {hidden.dtype} != weight dtype {weight.dtype}; "
            "cast the weight with cast_keeping_shard_markers"
        )
    impl = resolve_impl(impl, hidden.device)
    chunk = chunk or default_chunk(weight.shape[0], impl, hidden.dtype)
    # Gradients are computed in forward only where autograd will ask for them (not under no_grad).
    grads = tuple(torch.is_grad_enabled() and t.requires_grad for t in (hidden, weight))
    if loss_mask is not None:
        return _FusedLinearCrossEntropyMasked.apply(hidden, weight, labels.long(), loss_mask, tp_group,
                                                    ignore_index, chunk, impl, grads)
    if token_weights is None:
        return _FusedLinearCrossEntropy.apply(hidden, weight, labels.long(), tp_group,
                                              ignore_index, chunk, impl)
    return _FusedLinearCrossEntropyLoss.apply(hidden, weight, labels.long(), token_weights,
                                              tp_group, ignore_index, chunk, impl, grads)


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group,
    sequence_parallel: bool,
    token_weights: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Model-layout entry: hidden ``[s(/tp under SP), b, h]``, labels ``[b, s]`` -> loss ``[b, s]``
    (or, with ``token_weights`` ``[b, s]``, the weighted scalar sum; ``loss_mask`` ``[b, s]``: see
    :func:`fused_linear_cross_entropy`).

    Enters the TP region like the output ``ColumnParallelLinear``: all-gather of the sequence shards
    under SP (reduce-scatter in backward), identity with an all-reduce in backward otherwise.
    """
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    check_vocab_parallel_weight(weight, _group_size(tp_group))
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True,
                                                      group=tp_group)
    elif _group_size(tp_group) > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    if labels.shape != (b, s):
        raise ValueError(f"labels must be [b, s] = [{b}, {s}], got {tuple(labels.shape)}")
    for name, per_token in (("token_weights", token_weights), ("loss_mask", loss_mask)):
        if per_token is not None and per_token.shape != (b, s):
            raise ValueError(f"{name} must be [b, s] = [{b}, {s}], got {tuple(per_token.shape)}")
    token_weights, loss_mask = (None if t is None else t.t().reshape(s * b) for t in (token_weights, loss_mask))
    loss = fused_linear_cross_entropy(
        hidden.reshape(s * b, h), weight, labels.t().reshape(s * b), token_weights=token_weights,
        loss_mask=loss_mask, tp_group=tp_group, ignore_index=ignore_index, chunk=chunk, impl=impl,
    )
    return loss if token_weights is not None else loss.view(s, b).t().contiguous()  # [b, s], as GPTModel
