"""Process-group setup, model construction and the training step, through megatron-core.

Everything here is shared by ``megacpp-mcore train``, the parity tests and the benchmarks:
:func:`initialize` (the patch registry, torch.distributed + Megatron parallel state + seeds),
:func:`transformer_config`, :func:`build_model` (GPTModel chunks from the hybrid spec, wrapped in
Megatron's DDP), :func:`build_optimizer` and :func:`train_step` (Megatron's forward-backward
schedule, then the optimizer).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from megacpp_mcore.models.plan import check_split
from megacpp_mcore.models.presets import ModelConfig
from megacpp_mcore.spec import compat
from megacpp_mcore.train.fast_paths import FastPaths


@dataclasses.dataclass(frozen=True, kw_only=True)
class Parallelism:
    """Tensor / pipeline / expert parallel sizes; data parallel is what remains of the world."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    vp: int | None = None  # virtual pipeline stages per rank (interleaved 1F1B)
    sp: bool = False

    def __post_init__(self):
        for name in ("tp", "pp", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Parallelism.{name} must be an int >= 1, got {value!r}")
        if self.vp is not None and (self.vp < 2 or self.pp < 2):
            raise ValueError(
                f"Parallelism.vp={self.vp}: virtual pipeline needs vp >= 2 and pp >= 2 (pp={self.pp})"
            )
        if self.sp and self.tp == 1:
            raise ValueError("Parallelism.sp=True needs tp >= 2 (sequence parallel splits over TP)")

    def data_parallel(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks; raises naming the sizes when they do not divide."""
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp}"
            )
        dp = world_size // model_parallel
        if (dp * self.tp) % self.ep:
            raise ValueError(
                f"expert parallel size {self.ep} must divide dp*tp = {dp}*{self.tp} "
                f"(world {world_size}, tp {self.tp}, pp {self.pp})"
            )
        return dp

    def check_model(self, model: ModelConfig) -> None:
        """Refuses sizes that cannot hold ``model`` (heads, layers, experts)."""
        check_split(model, tp=self.tp, ep=self.ep)  # heads over TP, experts over EP
        stages = self.pp * (self.vp or 1)
        if "|" not in model.pattern and model.num_layers % stages:
            raise ValueError(
                f"pp={self.pp}" + (f" x vp={self.vp}" if self.vp else "")
                + f" does not divide num_layers={model.num_layers}"
            )
        if model.moe is not None and self.tp > 1 and not self.sp:
            raise ValueError("MoE with tp > 1 requires sequence parallelism (sp=True) in megatron-core")


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize(par: Parallelism, *, seed: int = 1234) -> int:
    """Starts torch.distributed (env:// under torchrun, else a 1-rank loopback world), Megatron's
    parallel state and the seeds. Returns the data-parallel size."""
    from megatron.core import parallel_state, tensor_parallel

    from megacpp_mcore.patches import cpu_rng_tracker, registry

    cuda = torch.cuda.is_available()
    # the one registry every entry point applies: CPU shims only here on a host without CUDA,
    # Transformer Engine's patches where TE is installed, the rest everywhere they are needed
    registry.apply_needed(host="cuda" if cuda else "cpu")
    if not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        kwargs: dict[str, Any] = dict(backend="nccl" if cuda else "gloo",
                                      timeout=datetime.timedelta(minutes=10))
        if "RANK" not in os.environ:
            kwargs.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        torch.distributed.init_process_group(**kwargs)
    world = torch.distributed.get_world_size()
    dp = par.data_parallel(world)
    compat.reset_moe_metrics()  # process-global, sized by the first model's depth
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vp,
        expert_model_parallel_size=par.ep,
    )
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        cpu_rng_tracker.model_parallel_cpu_manual_seed(seed)
    return dp


def shutdown() -> None:
    from megatron.core import parallel_state

    compat.reset_moe_metrics()  # process-global, sized by the first model's depth
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def fused_rope_available() -> bool:
    """Whether Megatron's ``apply_rope_fusion`` can run here: a CUDA device and TE's fused RoPE
    (``rope_utils.fused_apply_rotary_pos_emb``, set when Transformer Engine imports)."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.models.common.embeddings import rope_utils

    return getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None


#: what ``TransformerConfig(moe_permute_fusion=True)`` imports from ``moe_utils`` (TE >= 2.1 sets them)
FUSED_PERMUTE_OPS = ("fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
                     "fused_sort_chunks_by_index_with_probs", "fused_unpermute")


def fused_permute_available() -> bool:
    """Whether Megatron's ``moe_permute_fusion`` can run here: a CUDA device and every one of TE's
    fused permutation ops in ``moe_utils`` (absent or ``None`` without Transformer Engine)."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.transformer.moe import moe_utils

    return all(getattr(moe_utils, name, None) is not None for name in FUSED_PERMUTE_OPS)


def fast_path_kwargs(model: ModelConfig, fast: FastPaths | None = None) -> dict[str, Any]:
    """The kernel-path fields of ``model``'s TransformerConfig on this host (fused residual add,
    RoPE fusion (MLA's via YaRN at factor 1), MambaMixer's fused path where causal_conv1d is
    installed, MoE dispatcher and fusions, CUDA graphs, FP8): ``fast`` (default ``FastPaths()``,
    this host's defaults) against what this host has. Raises ``ValueError`` naming a switch
    that asks for a kernel the host lacks."""
    from megacpp_mcore.spec.backends import fused_conv_available

    return (fast or FastPaths()).config_kwargs(
        model, cuda=torch.cuda.is_available(), fused_rope=model.mla is None and fused_rope_available(),
        fused_conv="M" in model.pattern and fused_conv_available(),
        fused_permute=model.moe is not None and fused_permute_available())


def transformer_config(model: ModelConfig, par: Parallelism, *, bf16: bool | None = None,
                       fast: FastPaths | None = None, **overrides):
    """The ``TransformerConfig`` for ``model`` under ``par`` (RMSNorm, SwiGLU, no biases, RoPE).

    ``fast``: the kernel-path switches (:class:`~megacpp_mcore.train.fast_paths.FastPaths`; the
    default reproduces this host's defaults); ``overrides`` are set last, as given."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megacpp_mcore.spec import compat
    from megacpp_mcore.spec.block import pipeline_split_kwargs
    from megacpp_mcore.spec.pattern import heterogeneous
    from megacpp_mcore.layers.mixers.dims import mixer_config_kwargs

    par.check_model(model)
    cuda = torch.cuda.is_available()
    bf16 = cuda if bf16 is None else bf16
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vp,
        expert_model_parallel_size=par.ep,
        sequence_parallel=par.sp,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not cuda,
        # Per-micro-batch mean (pretrain_gpt.py's default). With per-token loss, megatron-core 0.16
        # scales the MoE aux-loss gradient by the local token count, which under SP is 1/TP of the
        # global count: aux gradients would shrink by TP and TP=2 would not match TP=1.
        calculate_per_token_loss=False,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=cuda,
        persist_layer_norm=False,
        # Batched isend/irecv over gloo mis-delivers in the interleaved 1F1B steady state (losses
        # drift from the single-rank run); separate send/recv ops are exact.
        batch_p2p_comm=cuda,
    )
    kwargs.update(pipeline_split_kwargs(model.pattern, model.num_layers))
    kwargs.update(mixer_config_kwargs(model))  # mamba_* sizes of the M block
    if model.moe is not None:
        kwargs.update(
            num_moe_experts=model.moe.num_experts,
            moe_router_topk=model.moe.topk,
            moe_ffn_hidden_size=model.moe.ffn_hidden_size,
            moe_shared_expert_intermediate_size=model.moe.shared_expert_size,
            moe_aux_loss_coeff=model.moe.aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss",
            moe_grouped_gemm=cuda and model.moe.grouped_gemm,
            moe_router_dtype="fp32",
        )
    if model.mla is not None:
        from megacpp_mcore.layers import mla

        kwargs.update(mla.transformer_config_kwargs(model.mla))
    if heterogeneous(model.layer_table()):
        # per-layer checkpoint keys for a stack of mixed layer kinds (the model builder owns this
        # setting; HybridLayer refuses a mixed stack without it)
        kwargs[compat.HETEROGENEOUS_CHECKPOINT_FIELD] = True
    kwargs.update(fast_path_kwargs(model, fast))
    kwargs.update(overrides)
    if kwargs.get("multi_latent_attention"):
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig(**kwargs)
    return TransformerConfig(**kwargs)


def gpt_model(config, layer_spec, *, vocab_size: int, max_sequence_length: int, pre_process: bool,
              post_process: bool, vp_stage: int | None = None, mtp=None, fused_lm_loss: bool = False,
              **gpt_kwargs):
    """The one GPTModel builder of the package (``train``, the tests, benchmarks and the
    ``pretrain_gpt.py`` launcher all build through it): one model chunk from ``layer_spec``.

    ``mtp``: a :class:`megacpp_mcore.features.mtp.MTPConfig` with ``depth > 0`` builds
    ``MTPGPTModel`` (shared-block MTP, on the last pipeline stage only); ``fused_lm_loss``: the LM
    loss through the fused linear cross-entropy (``FusedLossGPTModel``, no logits built); neither: a
    plain GPTModel. ``gpt_kwargs`` go to the GPTModel constructor as they are (rotary, tied
    embeddings, ...).
    """
    from megatron.core.models.gpt import GPTModel

    model_cls, extra = GPTModel, {}
    if mtp is not None and mtp.depth > 0:
        from megacpp_mcore.features.mtp import MTPGPTModel

        model_cls, extra = MTPGPTModel, {"mtp": mtp, "fused_lm_loss": fused_lm_loss}
    elif fused_lm_loss:
        from megacpp_mcore.features.mtp import FusedLossGPTModel

        model_cls, extra = FusedLossGPTModel, {"fused_lm_loss": True}
    return model_cls(config=config, transformer_layer_spec=layer_spec, vocab_size=vocab_size,
                     max_sequence_length=max_sequence_length, pre_process=pre_process,
                     post_process=post_process, vp_stage=vp_stage, **extra, **gpt_kwargs)


def build_model(model: ModelConfig, config, *, backend: str = "auto", wrap_ddp: bool = True,
                trainable: Callable[[str], bool] | None = None, fused_lm_loss: bool = False) -> list:
    """GPTModel chunks (one per virtual stage) of ``model`` through :func:`gpt_model`, from the
    hybrid spec; DDP-wrapped by default. ``fused_lm_loss``: the LM loss through the fused linear
    cross-entropy (``FusedLossGPTModel``; off here, ``GPTModel`` itself, so that a library caller
    gets upstream's model unless it asks; ``train`` and the launcher turn it on by default).

    ``trainable(name)``: only the parameters it accepts (names inside the GPTModel) keep
    ``requires_grad``; the rest are frozen before the DDP wrap, which gives gradient buffers to
    trainable parameters only (and Megatron's optimizer then holds only those)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megacpp_mcore.features.mtp import MTPConfig
    from megacpp_mcore.spec.block import hybrid_block_spec

    spec = hybrid_block_spec(model.pattern, backend=backend, num_layers=model.num_layers,
                             **model.feature_configs)
    vp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp or 1):
        stage = vp_stage if vp else None
        gpt = gpt_model(
            config, spec, vocab_size=model.vocab_size, max_sequence_length=model.seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage, mtp=MTPConfig(depth=model.mtp_depth) if model.mtp_depth else None,
            fused_lm_loss=fused_lm_loss,
            share_embeddings_and_output_weights=model.tie_embeddings, position_embedding_type="rope",
        )
        gpt.to(device())
        for name, param in gpt.named_parameters() if trainable else ():
            param.requires_grad_(param.requires_grad and trainable(name))
        chunks.append(gpt)
    if not wrap_ddp:
        return chunks
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside Megatron's wrappers (DDP, ``Float16Module``: each holds what it wraps as
    ``.module``), e.g. the GPTModel of a :func:`build_model` chunk, whose parameter names are the
    checkpoint's keys."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def build_optimizer(chunks: list, *, lr: float = 1e-3, weight_decay: float = 0.0,
                    clip_grad: float = 1.0, min_lr: float | None = None):
    """Megatron's Adam (fp32 on CPU, bf16 mixed precision with fp32 master weights on GPU)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = chunks[0].config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=min_lr if min_lr is not None else lr * 0.1,
        weight_decay=weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        clip_grad=clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=False,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    # What Megatron's training loop wires into the config: DP/SP grad reduction and per-token
    # scaling after backward (finalize_model_grads), and the loss scale.
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    return optimizer


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's per-token loss convention: (sum of masked losses, token count, report)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.stack([loss.detach(), num_tokens.detach().float()])}


def gpt_forward_step(data_iterator: Iterator[dict], model):
    """``forward_step_func`` for Megatron's schedules: batch dict -> (per-token loss, loss fn)."""
    batch = next(data_iterator)
    dev = device()
    tokens = batch["tokens"].to(dev, non_blocking=True)
    labels = batch["labels"].to(dev, non_blocking=True)
    loss_mask = batch["loss_mask"].to(dev, non_blocking=True)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)
    output = model(tokens, position_ids.to(dev), None, labels=labels, loss_mask=loss_mask)
    return output, partial(lm_loss_func, loss_mask)


def chunk_iterators(micro_batches: Iterator[dict] | Sequence[dict], *, num_chunks: int,
                    num_microbatches: int) -> Iterator[dict] | list[Iterator[dict]]:
    """The ``data_iterator`` Megatron's schedule reads, made in this ONE place: an iterator over
    this step's ``num_microbatches`` micro-batches (batch dicts), or, for an interleaved pipeline
    (``num_chunks > 1`` model chunks), one such iterator per chunk, because every virtual stage
    reads every micro-batch. Callers pass micro-batches, never iterators of their own per chunk."""
    if isinstance(micro_batches, (list, tuple)):
        micro = list(micro_batches)
    else:
        micro = [next(micro_batches) for _ in range(num_microbatches)]
    wrong = next((type(b).__name__ for b in micro if not isinstance(b, dict)), None)
    if wrong is not None:
        raise TypeError(f"train_step takes micro-batches (dicts of tensors), got a {wrong}; "
                        "per-chunk iterators are made by runtime.chunk_iterators")
    if len(micro) != num_microbatches:
        raise ValueError(f"{len(micro)} micro-batches given for num_microbatches={num_microbatches}")
    return iter(micro) if num_chunks == 1 else [iter(micro) for _ in range(num_chunks)]


def train_step(
    chunks: list,
    optimizer,
    data_iterator: Iterator[dict] | Sequence[dict],
    *,
    num_microbatches: int,
    micro_batch_size: int,
    seq_length: int,
    forward_step: Callable = gpt_forward_step,
    forward_only: bool = False,
) -> dict[str, float]:
    """One global batch: forward-backward through Megatron's schedule, then an optimizer step.

    Returns the token-weighted LM loss over the whole global batch (all DP ranks), the grad norm
    and the token count; on non-last pipeline stages the loss arrives by broadcast from the last.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not forward_only:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
    # Auxiliary losses (MoE's, MoD's) take their backward scale from Megatron's schedule, which
    # sets it per micro-batch (patch aux-loss-scale-without-moe: also for models without MoE).
    forward_backward = get_forward_backward_func()
    reports = forward_backward(
        forward_step_func=forward_step,
        data_iterator=chunk_iterators(data_iterator, num_chunks=len(chunks),
                                      num_microbatches=num_microbatches),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    grad_norm = float("nan")
    if not forward_only:
        _, grad_norm, _ = optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    totals = torch.zeros(2, dtype=torch.float64, device=device())
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for report in reports:
            totals += report["lm loss"].to(totals)
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    torch.distributed.broadcast(totals, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return {
        "loss": float(totals[0] / totals[1].clamp(min=1)),
        "tokens": int(totals[1]),
        "grad_norm": grad_norm,
    }
