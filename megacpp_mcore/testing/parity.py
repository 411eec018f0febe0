"""Single rank versus TP/SP/PP/EP: same weights, same global batches, compare losses and grad norms.

Sharded layouts initialise differently (GLU halves, expert ranges, pipeline offsets), so "same
weights" is made by construction: the reference run saves its freshly initialised model with
Megatron's distributed checkpointing and the parallel run loads it, resharded by Megatron's own
``sharded_state_dict`` logic. Both then train on identical global batches (split over DP ranks).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Iterator

import torch

from megacpp_mcore.models.presets import MLAConfig, ModelConfig, MoEConfig, custom_model

# Tiny A/E models for parity checks (JSON-able, see model_from_spec).
TINY_DENSE = {
    "pattern": "AE", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
    "ffn_hidden_size": 128, "vocab_size": 128, "seq_length": 32, "moe": None, "mtp_depth": 0,
}
TINY_MOE = dict(TINY_DENSE, moe={"num_experts": 4, "topk": 2, "ffn_hidden_size": 64,
                                 "shared_expert_size": 64})


def model_from_spec(spec: dict[str, Any] | str) -> ModelConfig:
    """A ModelConfig from a JSON-able dict (``moe``/``mla`` as dicts) or a ``module:func`` factory."""
    if isinstance(spec, str):
        module, func = spec.split(":")
        return getattr(importlib.import_module(module), func)()
    spec = dict(spec)
    if isinstance(spec.get("moe"), dict):
        spec["moe"] = MoEConfig(**spec["moe"])
    if isinstance(spec.get("mla"), dict):
        spec["mla"] = MLAConfig(**spec["mla"])
    spec.setdefault("mla", None)
    if isinstance(spec.get("features", {}).get("moda"), dict):
        from megacpp_mcore.features.moda import MoDAConfig

        spec["features"] = dict(spec["features"], moda=MoDAConfig.from_dict(spec["features"]["moda"]))
    spec.setdefault("mtp_depth", 0)  # the base preset's MTP only when asked for
    return custom_model(**spec)


def synthetic_batches(*, seed: int, step: int, global_batch: int, seq_length: int, vocab: int,
                      dp_rank: int, dp: int, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of global step ``step``: learnable token sequences
    (arithmetic progressions mod a small alphabet), identical for every parallel layout."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    alphabet = min(vocab, 32)
    start = torch.randint(0, alphabet, (global_batch, 1), generator=g)
    stride = torch.randint(1, 4, (global_batch, 1), generator=g)
    seqs = (start + stride * torch.arange(seq_length + 1)) % alphabet  # [G, s+1]
    rows = seqs.chunk(dp)[dp_rank]
    loss_mask = torch.ones(rows.shape[0], seq_length)
    loss_mask[:, -3:] = 0  # exercise masking
    return [
        {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(), "loss_mask": m}
        for t, m in zip(rows.split(micro_batch_size), loss_mask.split(micro_batch_size))
    ]


def _sharded(chunks: list) -> dict:
    """One sharded dict per model chunk; storage keys carry global layer numbers, while each
    chunk's dict keys are local (so chunks must not be merged into one flat dict)."""
    return {f"model{i}": chunk.module.sharded_state_dict(prefix="") for i, chunk in enumerate(chunks)}


def save_model(chunks: list, directory: str) -> None:
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(_sharded(chunks), directory)


def load_model(chunks: list, directory: str) -> None:
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(_sharded(chunks), directory)
    for i, chunk in enumerate(chunks):
        missing, _ = chunk.module.load_state_dict(loaded[f"model{i}"], strict=False)
        real_missing = [k for k in missing if not k.endswith("_extra_state")]
        if real_missing:
            raise RuntimeError(f"checkpoint lacks {real_missing[:5]}")


def setup_run(*, model, parallel, seed, backend, checkpoint, checkpoint_mode, lr, overrides=None):
    """(parallelism, model config, DP size, DDP chunks, optimizer) for one rank of a parity run;
    the initial weights are saved (reference) or loaded (parallel run) before the optimizer."""
    from megacpp_mcore.train import runtime

    par = runtime.Parallelism(**(parallel or {}))
    model_cfg = model_from_spec(model)
    dp = runtime.initialize(par, seed=seed)
    config = runtime.transformer_config(model_cfg, par, **(overrides or {}))
    chunks = runtime.build_model(model_cfg, config, backend=backend)
    if checkpoint_mode == "save":
        save_model(chunks, checkpoint)
    elif checkpoint_mode == "load":
        load_model(chunks, checkpoint)
    return par, model_cfg, dp, chunks, runtime.build_optimizer(chunks, lr=lr)


def train_run(
    *,
    model: dict[str, Any] | str,
    parallel: dict[str, Any] | None = None,
    steps: int = 3,
    seed: int = 1234,
    global_batch: int = 4,
    micro_batch_size: int = 1,
    lr: float = 1e-3,
    backend: str = "local",
    checkpoint: str | None = None,
    checkpoint_mode: str = "none",  # "save" (reference) | "load" (parallel run) | "none"
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Builds ``model`` under ``parallel``, optionally saves/loads its initial weights, trains
    ``steps`` global batches and returns per-step loss and grad norm (identical on all ranks)."""
    from megatron.core import parallel_state

    from megacpp_mcore.train import runtime

    par, model_cfg, dp, chunks, optimizer = setup_run(
        model=model, parallel=parallel, seed=seed, backend=backend, checkpoint=checkpoint,
        checkpoint_mode=checkpoint_mode, lr=lr, overrides=overrides)
    dp_rank = parallel_state.get_data_parallel_rank()
    if (global_batch // dp) % micro_batch_size or global_batch % dp:
        raise ValueError(f"global_batch {global_batch} does not split into dp={dp} x mbs={micro_batch_size}")
    losses, grad_norms = [], []
    for step in range(steps):
        micro = synthetic_batches(seed=seed, step=step, global_batch=global_batch,
                                  seq_length=model_cfg.seq_length, vocab=model_cfg.vocab_size,
                                  dp_rank=dp_rank, dp=dp, micro_batch_size=micro_batch_size)
        it: Iterator = iter(micro)
        result = runtime.train_step(chunks, optimizer, it, num_microbatches=len(micro),
                                    micro_batch_size=micro_batch_size,
                                    seq_length=model_cfg.seq_length)
        losses.append(result["loss"])
        grad_norms.append(result["grad_norm"])
    params = sum(p.numel() for c in chunks for p in c.module.parameters())
    out = {
        "losses": losses,
        "grad_norms": grad_norms,
        "rank": torch.distributed.get_rank(),
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "local_params": params,
        "parallel": dataclasses.asdict(par),
    }
    runtime.shutdown()
    return out


def compare_parallel(model: dict[str, Any] | str, parallel: dict[str, Any], *, steps: int = 3,
                     nproc: int = 2, **run_kwargs) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Runs ``model`` on 1 rank (saving its initial weights) and on ``nproc`` ranks under
    ``parallel`` (loading them); returns (reference result, per-rank results)."""
    import tempfile

    from megacpp_mcore.testing.dist import run_distributed

    target = "megacpp_mcore.testing.parity:train_run"
    with tempfile.TemporaryDirectory(prefix="megacpp-parity-") as ckpt:
        (ref,) = run_distributed(target, nproc=1, kwargs=dict(
            model=model, steps=steps, checkpoint=ckpt, checkpoint_mode="save", **run_kwargs))
        runs = run_distributed(target, nproc=nproc, kwargs=dict(
            model=model, parallel=parallel, steps=steps, checkpoint=ckpt,
            checkpoint_mode="load", **run_kwargs))
    return ref, runs
