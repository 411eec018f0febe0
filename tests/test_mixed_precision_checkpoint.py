"""A bf16 model with fp32 parameters (Mamba-2 A_log/D, M2RNN's) saves and resumes its mixed-precision
optimizer state: Megatron's ``Float16OptimizerWithFloat16Params`` numbers only its 16-bit parameters
when it builds the sharded state (registry patch ``float16-optimizer-fp32-params``). The GPU path of
``megacpp-mcore train`` runs this optimizer; here, on CPU, the parameters report CUDA type names to
its constructor (it classifies them by ``param.type()``), and everything else is the real thing."""

from __future__ import annotations

import pytest
import torch

from megacpp_mcore.models.presets import get_preset
from megacpp_mcore.testing.parity import synthetic_batches

_TYPES = {torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float32: "torch.cuda.FloatTensor"}


def _build(model, seed: int):
    """Chunks (bf16 params, fp32 where the mixers keep them), the bf16 optimizer and a scheduler."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megacpp_mcore.patches import cpu_rng_tracker
    from megacpp_mcore.train import runtime

    cpu_rng_tracker.model_parallel_cpu_manual_seed(seed)
    config = runtime.transformer_config(model, runtime.Parallelism(), bf16=True)
    chunks = runtime.build_model(model, config, backend="local")
    for chunk in chunks:
        for param in chunk.parameters():  # the constructor's CUDA type check, nothing else
            name = _TYPES[param.dtype]
            param.type = lambda *args, _name=name, **kwargs: _name
    optimizer = runtime.build_optimizer(chunks, lr=1e-3)
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=1,
                                        lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.0,
                                        end_wd=0.0, wd_incr_steps=10, wd_incr_style="constant")
    return chunks, optimizer, scheduler


def _step(model, chunks, optimizer, step: int) -> float:
    from megacpp_mcore.train import runtime

    micro = synthetic_batches(seed=0, step=step, global_batch=2, seq_length=model.seq_length,
                              vocab=model.vocab_size, dp_rank=0, dp=1, micro_batch_size=2)
    return runtime.train_step(chunks, optimizer, micro, num_microbatches=1, micro_batch_size=2,
                              seq_length=model.seq_length)["loss"]


def _inner_states(optimizer) -> list[dict]:
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    return [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
            for opt in inner for g in opt.param_groups for p in g["params"]]


def test_bf16_model_with_fp32_params_saves_and_resumes(single_rank, tmp_path):
    from megacpp_mcore.patches import float16_optimizer_fp32_params as patch
    from megacpp_mcore.patches import registry
    from megacpp_mcore.train import checkpoint

    registry.apply_needed()  # what `megacpp-mcore train` does
    assert patch.applied() == (patch.check() == "needed")
    model = get_preset("nam56r-tiny").replace(pattern="AEMR", num_layers=4, seq_length=32, mtp_depth=1)
    chunks, optimizer, scheduler = _build(model, seed=1)
    dtypes = {p.dtype for c in chunks for p in c.parameters()}
    assert dtypes == {torch.bfloat16, torch.float32}  # the mix the defect needs
    assert type(optimizer).__name__ in ("ChainedOptimizer", "Float16OptimizerWithFloat16Params")
    _step(model, chunks, optimizer, 0)
    scheduler.step(1)
    path = checkpoint.save_checkpoint(str(tmp_path), chunks, optimizer, scheduler, step=1, consumed=2,
                                      model=model)

    fresh, fresh_optimizer, fresh_scheduler = _build(model, seed=2)  # other initial weights
    assert checkpoint.load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler, model=model) == (1, 2)
    for (name, a), (_, b) in zip(chunks[0].module.named_parameters(), fresh[0].module.named_parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    saved, loaded = _inner_states(optimizer), _inner_states(fresh_optimizer)
    assert len(saved) == len(loaded) and any(saved)
    for i, (a, b) in enumerate(zip(saved, loaded)):  # fp32 main copies and Adam moments, in order
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i
    # and training goes on identically from both
    assert _step(model, fresh, fresh_optimizer, 1) == pytest.approx(_step(model, chunks, optimizer, 1), abs=0)
