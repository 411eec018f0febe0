"""The training loop: real C/C++ bytes through megatron-core's data pipeline, schedule and optimizer.

:func:`train` validates everything it can before it writes anything (model, sizes, data prefix,
checkpoint to load), then: starts the parallel world (:mod:`megacpp_mcore.train.runtime`), builds the
model from the pattern compiler, reads data through ``BlendedMegatronDatasetBuilder``/``GPTDataset``,
steps through Megatron's forward-backward schedule with Megatron's optimizer and LR scheduler, logs a
line per interval (step, loss, tokens/s, peak memory, ETA), validates in bits per byte, saves and
resumes distributed checkpoints (model, optimizer, scheduler, step, data position) and writes the
run receipt (:mod:`megacpp_mcore.train.receipt`).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch

from megacpp_mcore.train import data as data_mod
from megacpp_mcore.models.presets import ModelConfig
from megacpp_mcore.train.runtime import Parallelism

TRACKER = "latest_checkpointed_iteration.txt"
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What to run: steps, batch, schedule, data, checkpoints, topology. Defaults are the CPU
    smoke run (the README's main command)."""

    # Defaults: the CPU smoke run (docs/benchmarks.md). nam56r-tiny needs ~1.5 CPU-seconds a step,
    # so 300 steps fit the 10-minute budget of a 2-core machine; its final validation bits/byte is
    # 0.63x the first (step 50).
    steps: int = 300
    micro_batch_size: int = 8
    global_batch_size: int | None = None  # default: micro_batch_size * data-parallel size
    seq_length: int | None = None  # default: the model's
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int | None = None  # default: min(20, steps // 10)
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    log_interval: int = 25
    eval_interval: int = 50
    eval_iters: int = 4  # global batches per validation
    data: str | None = None  # prepared prefix; default: system headers, prepared into the cache
    source: str = data_mod.DEFAULT_SOURCE
    save: str | None = None
    save_interval: int | None = None  # default: only at the end (when ``save`` is set)
    load: str | None = None
    stop_after: int | None = None  # save (if ``save``) and stop after this step, as if interrupted
    seed: int = 1234
    backend: str = "auto"
    parallel: Parallelism = Parallelism()
    bf16: bool | None = None  # default: on CUDA
    receipt: str | None = None  # default: <cache>/runs/<model>-<utc>.json

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "log_interval", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("global_batch_size", "seq_length", "save_interval", "stop_after"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 (or unset), got {value!r}")
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", min(20, self.steps // 10))
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps must be in 0..steps-1 = 0..{self.steps - 1}, got {self.warmup_steps}")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 < lr and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")


def model_flops_per_token(model: ModelConfig, seq_length: int | None = None) -> dict[str, float]:
    """Training FLOPs per token (forward + backward): ``6 * N_active + attention``.

    ``N_active`` counts the matmul weights a token passes through (all layers, MoE: router + top-k
    routed experts + shared expert, the output head; not the embedding lookup or norms). The
    attention term is ``12 * s * (d_qk + d_v) / 2 * heads`` per attention layer (QK^T and AV,
    forward and backward, no causal discount), i.e. ``12 * s * h`` for standard attention.
    Mamba/M2RNN scans are not counted (their projections are, through ``N_active``).
    """
    from megacpp_mcore.models import plan

    s = seq_length or model.seq_length
    h = model.hidden_size
    active = h * model.vocab_size  # output head
    attention = 0.0
    for entry in model.layer_table():
        if entry.symbol == "E" and model.moe is not None:
            e = model.moe
            active += h * e.num_experts + e.topk * 3 * h * e.ffn_hidden_size
            active += 3 * h * (e.shared_expert_size or 0)
        else:
            active += plan.layer_params(model, entry) - h  # minus the input norm
        if entry.symbol == "A":
            if "mla" in entry.features and model.mla is not None:
                qk = model.mla.qk_head_dim + model.mla.qk_pos_emb_head_dim
                attention += 6 * s * model.num_attention_heads * (qk + model.mla.v_head_dim)
            else:
                attention += 12 * s * h
    dense = 6.0 * active
    return {"active_params": float(active), "dense": dense, "attention": attention,
            "total": dense + attention}


# ----------------------------------------------------------------------------------- validation --

def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def find_checkpoint(directory: str) -> tuple[Path, int]:
    """The latest checkpoint in ``directory`` and its step; ``ValueError`` when there is none."""
    root = Path(directory)
    tracker = root / TRACKER
    if not root.is_dir():
        raise ValueError(f"--load {directory!r}: no such directory")
    try:
        step = int(tracker.read_text().strip())
    except (OSError, ValueError):
        raise ValueError(f"--load {directory!r} holds no checkpoint ({TRACKER} is missing or unreadable)") from None
    path = root / f"iter_{step:07d}"
    if not (path / "metadata.json").is_file():
        raise ValueError(f"--load {directory!r}: {TRACKER} names step {step} but {path} is not a checkpoint")
    return path, step


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Plan:
    """Everything :func:`check` derived from the inputs."""

    model: ModelConfig
    seq_length: int
    dp: int
    global_batch: int
    num_microbatches: int
    load: tuple[Path, int] | None


def check(model: ModelConfig, cfg: TrainConfig) -> _Plan:
    """All input validation, before anything is written or any process group starts."""
    from megacpp_mcore.spec.backends import resolve_backend_name

    resolve_backend_name(cfg.backend)
    seq = cfg.seq_length or model.seq_length
    if seq != model.seq_length:
        model = model.replace(seq_length=seq)
    vocab = data_mod.ByteTokenizer().vocab_size
    if model.vocab_size < vocab:
        raise ValueError(f"model vocab_size={model.vocab_size} is smaller than the byte tokenizer's {vocab}")
    model.layer_table(pp=cfg.parallel.pp if "|" in model.pattern else None)  # pattern + placements
    par = cfg.parallel
    dp = par.data_parallel(_world_size())
    par.check_model(model)
    gbs = cfg.global_batch_size or cfg.micro_batch_size * dp
    if gbs % (cfg.micro_batch_size * dp):
        raise ValueError(f"global batch {gbs} is not divisible by micro batch {cfg.micro_batch_size} "
                         f"x data-parallel size {dp}")
    if cfg.data is not None:
        data_mod.open_prepared(cfg.data)
    else:
        try:
            data_mod.open_prepared(data_mod.default_prefix(cfg.source))
        except data_mod.DataError:  # not cached yet: it will be prepared from the source
            data_mod.check_source(cfg.source)
    load = find_checkpoint(cfg.load) if cfg.load else None
    if load:
        check_checkpoint_matches(load[0], model)
    if load and load[1] > cfg.steps:
        raise ValueError(f"--load {cfg.load!r} is at step {load[1]}, beyond --steps {cfg.steps}")
    return _Plan(model=model, seq_length=seq, dp=dp, global_batch=gbs,
                 num_microbatches=gbs // (cfg.micro_batch_size * dp), load=load)


# ------------------------------------------------------------------------------------------ data --

def build_datasets(prepared: data_mod.PreparedData, *, seq_length: int, train_samples: int,
                   valid_samples: int, seed: int):
    """Train and validation ``GPTDataset``s through megatron-core's ``BlendedMegatronDatasetBuilder``."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[([prepared.train_prefix], None), ([prepared.valid_prefix], None), None],
        tokenizer=data_mod.ByteTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(data_mod.cache_dir() / "indices"),
    )
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, None], lambda: True, config).build()
    return train_ds, valid_ds


def micro_batches(dataset, *, first_sample: int, global_batch: int, micro_batch_size: int,
                  dp_rank: int, dp: int, bytes_only_loss: bool = False) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch starting at sample ``first_sample``.

    ``bytes_only_loss`` masks positions whose label is a special token (validation in bits per
    byte counts byte predictions only).
    """
    per_rank = global_batch // dp
    start = first_sample + dp_rank * per_rank
    out = []
    for m in range(per_rank // micro_batch_size):
        samples = [dataset[start + m * micro_batch_size + i] for i in range(micro_batch_size)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        if bytes_only_loss:
            batch["loss_mask"] = batch["loss_mask"] * (batch["labels"] < data_mod.ByteTokenizer.NUM_BYTES)
        out.append(batch)
    return out


# ------------------------------------------------------------------------------------ checkpoint --

def model_signature(model: ModelConfig) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into ``model`` (topology may differ)."""
    keys = ("pattern", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
            "ffn_hidden_size", "vocab_size")
    table = [[e.index, e.symbol, sorted(e.features)] for e in model.layer_table()]
    return {k: getattr(model, k) for k in keys} | {"moe": repr(model.moe), "layers": table}


def check_checkpoint_matches(path: Path, model: ModelConfig) -> None:
    """``ValueError`` naming the differences when the checkpoint at ``path`` holds another model."""
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_common_state_dict(str(path)).get("model_signature")
    if saved is None:
        raise ValueError(f"--load: {path} was not written by `megacpp-mcore train` (no model signature)")
    wanted = model_signature(model)
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs model {wanted[k]!r}"
            for k in wanted if k != "layers" and saved.get(k) != wanted[k]]
    if not diff and saved.get("layers") != wanted["layers"]:
        diff.append("layer table (symbols/features per layer) differs")
    if diff:
        raise ValueError(f"--load: {path} holds a different model: " + "; ".join(diff))


def _sharded_state(chunks, optimizer, scheduler, *, step: int, consumed: int, is_loading: bool,
                   model: ModelConfig) -> dict:
    model_sd: dict = {}
    for chunk in chunks:
        model_sd.update(chunk.module.sharded_state_dict(prefix=""))
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "consumed_samples": consumed,
        "model_signature": model_signature(model),
    }


def save_checkpoint(directory: str, chunks, optimizer, scheduler, *, step: int, consumed: int,
                    model: ModelConfig) -> Path:
    """``directory/iter_<step>`` through dist_checkpointing; the tracker file is written last
    (atomically), so an interrupted save is never picked up by ``--load``."""
    from megatron.core import dist_checkpointing

    path = Path(directory, f"iter_{step:07d}")
    rank = torch.distributed.get_rank()
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state = _sharded_state(chunks, optimizer, scheduler, step=step, consumed=consumed, is_loading=False,
                           model=model)
    dist_checkpointing.save(state, str(path))
    torch.distributed.barrier()
    if rank == 0:
        tmp = Path(directory, f".{TRACKER}.tmp")
        tmp.write_text(f"{step}\n")
        os.replace(tmp, Path(directory, TRACKER))
    torch.distributed.barrier()
    return path


def load_checkpoint(path: Path, chunks, optimizer, scheduler, *, model: ModelConfig) -> tuple[int, int]:
    """Restores model, optimizer and scheduler state; returns (step, consumed samples)."""
    from megatron.core import dist_checkpointing

    state = _sharded_state(chunks, optimizer, scheduler, step=0, consumed=0, is_loading=True, model=model)
    loaded = dist_checkpointing.load(state, str(path))
    for chunk in chunks:
        own = chunk.module.state_dict(keep_vars=True)
        missing, _ = chunk.module.load_state_dict(
            {k: v for k, v in loaded["model"].items() if k in own}, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks {missing[:5]}")
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    return int(loaded["step"]), int(loaded["consumed_samples"])


# ------------------------------------------------------------------------------------- the loop --

def peak_memory_bytes() -> dict[str, Any]:
    """Peak device memory on CUDA (allocated by torch), else the process's peak RSS."""
    if torch.cuda.is_available():
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    return {"kind": "cpu_max_rss", "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _fmt_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class _Timers:
    """Wall seconds per category (goodput = step compute; the rest is badput)."""

    def __init__(self):
        self.seconds = {"startup": 0.0, "step_compute": 0.0, "data_wait": 0.0,
                        "evaluation": 0.0, "checkpoint": 0.0}

    def add(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[name] += now - since
        return now


class Trainer:
    """One training run: set up from a checked plan, :meth:`run` the loop, :meth:`receipt`."""

    def __init__(self, plan: _Plan, cfg: TrainConfig, *, log: Callable[[str], None], t_start: float):
        from megatron.core import parallel_state
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megacpp_mcore.train import runtime
        from megacpp_mcore.train.stats import StatsCollector

        self.plan, self.cfg, self.model, self.t_start = plan, cfg, plan.model, t_start
        self.timers = _Timers()
        runtime.initialize(cfg.parallel, seed=cfg.seed)
        self.rank = torch.distributed.get_rank()
        self.say = log if self.rank == 0 else (lambda _msg: None)
        self.prepared = self._data()
        self.gbs, self.seq = plan.global_batch, plan.seq_length
        self.train_ds, self.valid_ds = build_datasets(
            self.prepared, seq_length=self.seq, train_samples=cfg.steps * self.gbs,
            valid_samples=cfg.eval_iters * self.gbs, seed=cfg.seed)
        self.config = runtime.transformer_config(self.model, cfg.parallel, bf16=cfg.bf16)
        self.chunks = runtime.build_model(self.model, self.config, backend=cfg.backend)
        self.optimizer = runtime.build_optimizer(self.chunks, lr=cfg.lr, min_lr=cfg.min_lr,
                                                 weight_decay=cfg.weight_decay, clip_grad=cfg.clip_grad)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
            lr_warmup_steps=cfg.warmup_steps, lr_decay_steps=cfg.steps, lr_decay_style="cosine",
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=cfg.steps,
            wd_incr_style="constant")
        self.collector = StatsCollector(self.chunks)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.step, self.consumed, self.loaded_from = 0, 0, None
        self.validation: list[dict[str, float]] = []
        self.losses: list[dict[str, float]] = []
        self.stats_history: list[dict[str, Any]] = []
        self.saved: list[str] = []
        self.compute_s, self.compute_steps, self.last_loss = 0.0, 0, float("nan")
        t = time.perf_counter()
        if plan.load:
            self.step, self.consumed = load_checkpoint(plan.load[0], self.chunks, self.optimizer,
                                                       self.scheduler, model=self.model)
            self.loaded_from = str(plan.load[0])
            self.say(f"resumed from {self.loaded_from}: step {self.step}, {self.consumed} samples consumed")
            t = self.timers.add("checkpoint", t)
        self.timers.seconds["startup"] = t - t_start - self.timers.seconds["checkpoint"]

    def _data(self) -> data_mod.PreparedData:
        """The prepared dataset; the default one is prepared once (by rank 0) into the cache."""
        if self.cfg.data is not None:
            return data_mod.open_prepared(self.cfg.data)
        if self.rank == 0:
            data_mod.ensure_default(self.cfg.source, log=self.say)
        torch.distributed.barrier()
        return data_mod.ensure_default(self.cfg.source, log=self.say)

    def _micro(self, dataset, first_sample: int, *, bytes_only_loss: bool = False) -> list[dict]:
        return micro_batches(dataset, first_sample=first_sample, global_batch=self.gbs,
                             micro_batch_size=self.cfg.micro_batch_size, dp_rank=self.dp_rank,
                             dp=self.plan.dp, bytes_only_loss=bytes_only_loss)

    def _schedule(self, micro: list[dict], *, forward_only: bool = False) -> dict[str, float]:
        from megacpp_mcore.train import runtime

        # One iterator per model chunk: interleaved pipeline stages each read every micro-batch.
        its = [iter(micro) for _ in self.chunks] if len(self.chunks) > 1 else iter(micro)
        return runtime.train_step(self.chunks, self.optimizer, its, num_microbatches=len(micro),
                                  micro_batch_size=self.cfg.micro_batch_size, seq_length=self.seq,
                                  forward_only=forward_only)

    def evaluate(self) -> float:
        """Validation bits per byte: mean nats over byte labels (specials excluded) / ln 2."""
        t0 = time.perf_counter()
        total_loss, total_tokens = 0.0, 0
        for i in range(self.cfg.eval_iters):
            out = self._schedule(self._micro(self.valid_ds, i * self.gbs, bytes_only_loss=True),
                                 forward_only=True)
            total_loss += out["loss"] * out["tokens"]
            total_tokens += out["tokens"]
        self.timers.add("evaluation", t0)
        bpb = total_loss / max(total_tokens, 1) / LN2
        self.validation.append({"step": self.step, "bpb": bpb})
        self.say(f"validation step {self.step}: {bpb:.4f} bits/byte" + (" (untrained)" if self.step == 0 else ""))
        return bpb

    def train_one_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        micro = self._micro(self.train_ds, self.consumed)
        t1 = self.timers.add("data_wait", t0)
        self.collector.set_step(self.step)
        out = self._schedule(micro)
        self.scheduler.step(increment=1)
        self.collector.collect()
        self.compute_s += time.perf_counter() - t1
        self.timers.add("step_compute", t1)
        self.compute_steps += 1
        self.step += 1
        self.consumed += self.gbs
        self.last_loss = out["loss"]
        if not math.isfinite(self.last_loss):
            raise RuntimeError(f"loss became {self.last_loss} at step {self.step}; lower --lr (now {self.cfg.lr})")
        return out

    def log_line(self, out: dict[str, float], window_s: float, window_steps: int) -> None:
        from megacpp_mcore.train.stats import format_stats

        stats = self.collector.gather()
        mem = peak_memory_bytes()
        self.losses.append({"step": self.step, "loss": self.last_loss, "grad_norm": out["grad_norm"]})
        if stats:
            self.stats_history.append({"step": self.step, **stats})
        per_step = window_s / window_steps
        lr = self.scheduler.get_lr(self.optimizer.param_groups[0])
        self.say(f"step {self.step:>6}/{self.cfg.steps} | loss {self.last_loss:.4f} | lr {lr:.2e} "
                 f"| grad norm {out['grad_norm']:.3f} | {self.gbs * self.seq / per_step:,.0f} tokens/s "
                 f"| peak mem {_fmt_bytes(mem['bytes'])} | ETA {_fmt_eta(per_step * (self.cfg.steps - self.step))}"
                 + (f" | {format_stats(stats)}" if stats else ""))

    def run(self) -> None:
        cfg = self.cfg
        self.say(f"training {self.model.name} ({self.model.num_layers} layers "
                 f"'{''.join(e.symbol for e in self.model.layer_table())}') for {cfg.steps} steps: "
                 f"global batch {self.gbs} x {self.seq} tokens, tp={cfg.parallel.tp} pp={cfg.parallel.pp} "
                 f"ep={cfg.parallel.ep} dp={self.plan.dp}, backend {self.backend_name}, data {self.prepared.prefix}")
        if self.step == 0:
            self.evaluate()
        stop = min(cfg.steps, cfg.stop_after or cfg.steps)
        window_s, window_steps = 0.0, 0  # compute seconds and steps since the last log line
        while self.step < stop:
            before = self.compute_s
            out = self.train_one_step()
            window_s, window_steps = window_s + self.compute_s - before, window_steps + 1
            if self.step % cfg.log_interval == 0 or self.step == stop:
                self.log_line(out, window_s, window_steps)
                window_s, window_steps = 0.0, 0
            if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                self.evaluate()
            if cfg.save and ((cfg.save_interval and self.step % cfg.save_interval == 0) or self.step == stop):
                t0 = time.perf_counter()
                self.saved.append(str(save_checkpoint(cfg.save, self.chunks, self.optimizer, self.scheduler,
                                                      step=self.step, consumed=self.consumed,
                                                      model=self.model)))
                self.timers.add("checkpoint", t0)
                self.say(f"saved checkpoint {self.saved[-1]}")

    @property
    def backend_name(self) -> str:
        from megacpp_mcore.spec.backends import resolve_backend_name

        return resolve_backend_name(self.cfg.backend)

    def receipt(self, *, started_at: datetime.datetime, preset: str | None) -> dict[str, Any]:
        """The run receipt (all ranks take part: observed backends and peak memory are gathered)."""
        from megacpp_mcore.train import receipt as receipt_mod
        from megacpp_mcore.train import runtime
        from megacpp_mcore.models.plan import build_plan

        cfg, model, world = self.cfg, self.model, torch.distributed.get_world_size()
        mem = peak_memory_bytes()
        peak = torch.tensor([mem["bytes"]], dtype=torch.float64, device=runtime.device())
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        observed_all: list = [None] * world
        torch.distributed.all_gather_object(observed_all, receipt_mod.observe_backends(self.chunks))
        final_stats = self.collector.gather()
        flops = model_flops_per_token(model, self.seq)
        tokens_per_s = self.compute_steps * self.gbs * self.seq / self.compute_s if self.compute_steps else 0.0
        plan = build_plan(model, pp=cfg.parallel.pp, tp=cfg.parallel.tp, ep=cfg.parallel.ep,
                          micro_batch=cfg.micro_batch_size, backend=cfg.backend)
        trained = [v for v in self.validation if v["step"] > 0]  # "first" = first after training began
        untrained = [v for v in self.validation if v["step"] == 0]
        best = min(self.validation, key=lambda v: v["bpb"]) if self.validation else None
        return {
            "schema_version": receipt_mod.SCHEMA_VERSION,
            "status": "completed" if self.step >= cfg.steps else "stopped",
            "command": receipt_mod.command_line(),
            "started_at": started_at.isoformat(),
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "preset": preset,
            "model": {k: getattr(model, k) for k in ("name", "pattern", "num_layers", "hidden_size",
                                                     "num_attention_heads", "ffn_hidden_size",
                                                     "vocab_size", "seq_length", "mtp_depth")},
            "expanded_pattern": plan["expanded_pattern"],
            "layer_table_hash": plan["layer_table_hash"],
            "layer_counts": plan["counts"],
            "parameters": plan["parameters"]["total"],
            "features": receipt_mod.feature_states(model),
            "topology": {"world_size": world, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp,
                         "ep": cfg.parallel.ep, "dp": self.plan.dp, "sp": cfg.parallel.sp,
                         "vp": cfg.parallel.vp, "micro_batch_size": cfg.micro_batch_size,
                         "global_batch_size": self.gbs, "num_microbatches": self.plan.num_microbatches,
                         "seq_length": self.seq},
            "backends": {"requested": cfg.backend, "resolved": self.backend_name,
                         "observed": _merge_observed(observed_all)},
            "precision": "bf16" if self.config.bf16 else "fp32",
            "versions": receipt_mod.package_versions(),
            "data": {"prefix": self.prepared.prefix, "source": self.prepared.manifest.get("source"),
                     "splits": self.prepared.manifest.get("splits"), "consumed_samples": self.consumed,
                     "tokenizer": self.prepared.manifest.get("tokenizer")},
            "training": {"steps": cfg.steps, "completed_steps": self.step, "seed": cfg.seed,
                         "lr": cfg.lr, "min_lr": cfg.min_lr, "warmup_steps": cfg.warmup_steps,
                         "lr_schedule": "cosine", "losses": self.losses,
                         "final_loss": _finite(self.last_loss)},
            "throughput": {"tokens_per_s": tokens_per_s,
                           "model_flops_per_token": flops["total"],
                           "active_params": flops["active_params"],
                           "model_tflops_per_s": tokens_per_s * flops["total"] / 1e12,
                           "model_tflops_per_s_per_device": tokens_per_s * flops["total"] / 1e12 / world},
            "peak_memory": {"kind": mem["kind"], "bytes": int(peak.item())},
            "time": {"total_s": time.perf_counter() - self.t_start,
                     "cpu_s": time.process_time(),  # this rank's process, all threads
                     "goodput_s": self.timers.seconds["step_compute"],
                     "badput_s": {k: v for k, v in self.timers.seconds.items() if k != "step_compute"}},
            "validation": {"metric": "bits_per_byte", "history": self.validation,
                           "untrained_bpb": untrained[0]["bpb"] if untrained else None,
                           "first_bpb": trained[0]["bpb"] if trained else None,
                           "final_bpb": self.validation[-1]["bpb"] if self.validation else None,
                           "best_bpb": best["bpb"] if best else None,
                           "best_step": best["step"] if best else None},
            "stats": {"latest": final_stats, "history": self.stats_history},
            "checkpoints": {"saved": self.saved, "loaded_from": self.loaded_from},
        }


def _print(line: str) -> None:
    print(line, flush=True)  # progress must show up promptly also when piped to a file


def train(model: ModelConfig, cfg: TrainConfig, *, log: Callable[[str], None] = _print,
          preset: str | None = None) -> dict[str, Any]:
    """Runs training; returns the receipt (also written to ``cfg.receipt``, default
    ``<cache>/runs/<model>-<utc>.json``, on rank 0)."""
    from megacpp_mcore.train import receipt as receipt_mod
    from megacpp_mcore.train import runtime

    # Start-up counts from process creation (interpreter and megatron imports included).
    t_start = time.perf_counter() - max(time.time() - _process_start(), 0.0)
    started_at = datetime.datetime.now(datetime.timezone.utc)
    plan = check(model, cfg)  # raises ValueError before anything is written
    trainer = Trainer(plan, cfg, log=log, t_start=t_start)
    trainer.run()
    receipt = trainer.receipt(started_at=started_at, preset=preset)
    if trainer.rank == 0:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", plan.model.name).strip("-")
        path = cfg.receipt or data_mod.cache_dir() / "runs" / f"{name}-{started_at:%Y%m%d-%H%M%S}.json"
        receipt["receipt_path"] = str(path)
        receipt_mod.write(path, receipt)
        _summary(receipt, trainer.say)
    runtime.shutdown()
    return receipt


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _merge_observed(parts: list[dict]) -> dict:
    """Observed backends of all ranks: layers by global index, class counts summed per rank."""
    layers = {}
    summary: dict[str, dict[str, int]] = {}
    te_attention = None
    kinds = set()
    for part in parts:
        for layer in part["layers"]:
            layers.setdefault(layer["index"], layer)
        for role, counts in part["summary"].items():
            for cls, n in counts.items():
                summary.setdefault(role, {})
                summary[role][cls] = summary[role].get(cls, 0) + n
        te_attention = te_attention or part["te_attention"]
        if part["attention"] != "none":
            kinds.add(part["attention"])
    attention = "none" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"
    return {"attention": attention, "summary": dict(sorted(summary.items())),
            "layers": [layers[i] for i in sorted(layers)], "te_attention": te_attention,
            "counted_over_ranks": len(parts)}


def _summary(receipt: dict, say: Callable[[str], None]) -> None:
    v, t, th = receipt["validation"], receipt["time"], receipt["throughput"]
    say("-" * 72)
    say(f"{receipt['status']}: {receipt['training']['completed_steps']}/{receipt['training']['steps']} steps "
        f"in {t['total_s']:.1f} s, {t['cpu_s']:.0f} CPU-s (compute {t['goodput_s']:.1f} s; "
        + ", ".join(f"{k} {s:.1f} s" for k, s in t["badput_s"].items()) + ")")
    if v["first_bpb"] is not None:
        first_step = next(h["step"] for h in v["history"] if h["step"] > 0)
        say(f"validation bits/byte: first (step {first_step}) {v['first_bpb']:.4f} -> final "
            f"{v['final_bpb']:.4f} (x{v['final_bpb'] / v['first_bpb']:.3f}); best {v['best_bpb']:.4f} "
            f"at step {v['best_step']}"
            + (f"; untrained {v['untrained_bpb']:.4f}" if v["untrained_bpb"] is not None else ""))
    say(f"throughput {th['tokens_per_s']:,.0f} tokens/s, {th['model_tflops_per_s']:.3f} model TFLOP/s "
        f"({th['model_flops_per_token'] / 1e6:.2f} MFLOP/token); peak memory "
        f"{_fmt_bytes(receipt['peak_memory']['bytes'])} ({receipt['peak_memory']['kind']})")
    obs = receipt["backends"]["observed"]
    say(f"backend requested {receipt['backends']['requested']}, observed attention {obs['attention']}"
        + (f" ({obs['te_attention']['kernel']})" if obs.get("te_attention") else ""))
    say(f"receipt: {receipt['receipt_path']}")
