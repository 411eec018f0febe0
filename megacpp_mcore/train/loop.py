"""The training loop: real C/C++ bytes through megatron-core's data pipeline, schedule and optimizer.

:func:`train` validates everything it can before it writes anything (:func:`check` returns the
:class:`CheckedRun`: model, sizes, data prefix, checkpoint to load), then: starts the parallel world
(:mod:`megacpp_mcore.train.runtime`), builds the model from the pattern compiler, reads data through
``BlendedMegatronDatasetBuilder``/``GPTDataset``, steps through Megatron's forward-backward schedule
with Megatron's optimizer and LR scheduler, logs a line per interval (step, loss, tokens/s, peak
memory, ETA), validates in bits per byte, saves and resumes checkpoints
(:mod:`megacpp_mcore.train.checkpoint`, atomically), refuses NaN/inf updates and records the
INVALID rules that fire (:mod:`megacpp_mcore.train.guards`) and hands the run's facts to
:mod:`megacpp_mcore.train.receipt`, which assembles and writes the run receipt.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch

from megacpp_mcore.models.presets import ModelConfig
from megacpp_mcore.train import data as data_mod
from megacpp_mcore.train import dynamic_depth, faults, invalid, storage
from megacpp_mcore.train.guards import RunGuards
from megacpp_mcore.train import tokenizer as tokenizer_mod
from megacpp_mcore.train.checkpoint import (
    find_checkpoint,
    load_backbone,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from megacpp_mcore.train.fast_paths import CONFIG_FIELDS, FastPaths
from megacpp_mcore.train.runtime import Parallelism, fast_path_kwargs
from megacpp_mcore.train.timing import Timers, fmt_eta, peak_memory_bytes, process_start

LN2 = math.log(2.0)
# Steps timed before the run says how long it will take (the mean of all but the first, which
# pays one-off costs).
ESTIMATE_AFTER_STEPS = 5


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What to run: steps, batch, schedule, data, checkpoints, topology. Defaults are the CPU
    smoke run (the README's main command)."""

    # Defaults: the CPU smoke run, the README's main job (docs/benchmarks.md). nam56r-tiny with its
    # shipped MoD needs ~1.45 CPU-seconds a step, so 250 steps with their validations fit the
    # 5-minute budget of an idle 2-core machine.
    steps: int = 250
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
    freeze_backbone: bool = False  # train FlexiDepth's routers and adapters only (train.dynamic_depth)
    stop_after: int | None = None  # save (if ``save``) and stop after this step, as if interrupted
    seed: int = 1234
    backend: str = "auto"
    parallel: Parallelism = Parallelism()
    bf16: bool | None = None  # default: on CUDA
    fused_lm_loss: bool = True  # the LM loss through the fused linear cross-entropy (FusedLossGPTModel)
    fast: FastPaths = FastPaths()  # kernel-path switches (default: this host's defaults)
    receipt: str | None = None  # default: <cache>/runs/<model>-<utc>.json
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient: "stop" the run, or "skip" the update
    fault: str | None = None  # test-only fault injection (megacpp_mcore.train.faults), hidden in the CLI

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
        if self.on_nonfinite not in invalid.NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite={self.on_nonfinite!r} is unknown; allowed: "
                             f"{', '.join(invalid.NONFINITE_POLICIES)}")
        faults.FaultPlan.parse(self.fault)


# ----------------------------------------------------------------------------------- validation --

def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckedRun:
    """What :func:`check` derived from the inputs of ``train``, before anything starts: the model
    (at the run's sequence length), data-parallel size, global batch, micro-batches per step and
    the checkpoint to load. (Not the layer plan of :mod:`megacpp_mcore.models.plan`.)"""

    model: ModelConfig
    seq_length: int
    dp: int
    global_batch: int
    num_microbatches: int
    load: tuple[Path, int] | None
    load_mode: str | None = None  # "resume", or "backbone" (a fine-tune's start; train.dynamic_depth)


def check(model: ModelConfig, cfg: TrainConfig) -> CheckedRun:
    """All input validation, before anything is written or any process group starts."""
    from megacpp_mcore.spec.backends import resolve_backend_name

    resolve_backend_name(cfg.backend)
    seq = cfg.seq_length or model.seq_length
    if seq != model.seq_length:
        model = model.replace(seq_length=seq)
    # the embedding the data's tokenizer needs (a BPE's size, padded; bytes: the preset's)
    data_tokenizer = data_mod.open_prepared(cfg.data).manifest.get("tokenizer") if cfg.data is not None else None
    model = tokenizer_mod.fit_model_vocab(model, data_tokenizer, tp=cfg.parallel.tp)
    model.layer_table(pp=cfg.parallel.pp if "|" in model.pattern else None)  # pattern + placements
    par = cfg.parallel
    dp = par.data_parallel(_world_size())
    par.check_model(model)
    gbs = cfg.global_batch_size or cfg.micro_batch_size * dp
    if gbs % (cfg.micro_batch_size * dp):
        raise ValueError(f"global batch {gbs} is not divisible by micro batch {cfg.micro_batch_size} "
                         f"x data-parallel size {dp}")
    if cfg.data is None:  # (--data was opened above, for its tokenizer)
        try:
            data_mod.open_prepared(data_mod.default_prefix(cfg.source))
        except data_mod.DataError:  # not cached yet: it will be prepared from the source
            data_mod.check_source(cfg.source)
    load = find_checkpoint(cfg.load) if cfg.load else None
    load_mode = dynamic_depth.check(model, cfg, load)
    if load_mode == "resume":
        invalid.check_resume_optimizer(load[0], read_metadata(load[0]), cfg)
    if load_mode == "resume" and load[1] > cfg.steps:
        raise ValueError(f"--load {cfg.load!r} is at step {load[1]}, beyond --steps {cfg.steps}")
    fast_path_kwargs(model, cfg.fast)  # a switch this host cannot run, before anything starts
    storage.preflight(save=cfg.save, receipt=cfg.receipt, cache=data_mod.cache_dir(), model=model,
                      bf16=torch.cuda.is_available() if cfg.bf16 is None else cfg.bf16)
    return CheckedRun(model=model, seq_length=seq, dp=dp, global_batch=gbs,
                      num_microbatches=gbs // (cfg.micro_batch_size * dp), load=load,
                      load_mode=load_mode)


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
        tokenizer=data_mod.open_tokenizer(prepared),
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
                  dp_rank: int, dp: int, byte_lengths: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch starting at sample ``first_sample``.

    ``byte_lengths`` (``[vocab]``, the tokenizer's bytes per id, 0 for special tokens) masks the
    positions whose label is a special token: validation in bits per byte counts the predictions
    of text only.
    """
    per_rank = global_batch // dp
    start = first_sample + dp_rank * per_rank
    out = []
    for m in range(per_rank // micro_batch_size):
        samples = [dataset[start + m * micro_batch_size + i] for i in range(micro_batch_size)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        if byte_lengths is not None:
            batch["loss_mask"] = batch["loss_mask"] * (byte_lengths[batch["labels"]] > 0)
        out.append(batch)
    return out


# ------------------------------------------------------------------------------------- the loop --

class Trainer:
    """One training run: set up from a :class:`CheckedRun`, :meth:`run` the loop, :meth:`facts`
    for the receipt."""

    def __init__(self, checked: CheckedRun, cfg: TrainConfig, *, log: Callable[[str], None], t_start: float):
        from megatron.core import parallel_state
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megacpp_mcore.train import runtime
        from megacpp_mcore.train.stats import StatsCollector

        self.checked, self.cfg, self.model, self.t_start = checked, cfg, checked.model, t_start
        self.timers = Timers()
        runtime.initialize(cfg.parallel, seed=cfg.seed)
        self.rank = torch.distributed.get_rank()
        self.say = log if self.rank == 0 else (lambda _msg: None)
        self.prepared = self._data()
        # [vocab] UTF-8 bytes per id (0: special): the bits-per-byte denominator, for any tokenizer
        self.byte_lengths = torch.from_numpy(data_mod.open_tokenizer(self.prepared).byte_lengths())
        self.gbs, self.seq = checked.global_batch, checked.seq_length
        self.train_ds, self.valid_ds = build_datasets(
            self.prepared, seq_length=self.seq, train_samples=cfg.steps * self.gbs,
            valid_samples=cfg.eval_iters * self.gbs, seed=cfg.seed)
        self.config = runtime.transformer_config(self.model, cfg.parallel, bf16=cfg.bf16, fast=cfg.fast)
        self.chunks = runtime.build_model(self.model, self.config, backend=cfg.backend,
                                          trainable=dynamic_depth.trainable(cfg),
                                          fused_lm_loss=cfg.fused_lm_loss)
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
        self.eval_s: float | None = None  # seconds of the last validation (for the run's estimate)
        # this run's first step: its compute seconds and its end, from process start (receipt)
        self.first_step_compute_s: float | None = None
        self.first_step_end_s: float | None = None
        # INVALID ledger, NaN/inf step guard, test faults (train.guards)
        self.guards = RunGuards(cfg, model=self.model, chunks=self.chunks, optimizer=self.optimizer,
                                device=runtime.device(), rank=self.rank, signature=invalid.run_signature(
                                    cfg, global_batch=self.gbs, seq_length=self.seq, manifest=self.prepared.manifest))
        t = time.perf_counter()
        if checked.load_mode == "backbone":  # a fine-tune: fresh optimizer, schedule, step and data
            fresh = load_backbone(checked.load[0], self.chunks, model=self.model)
            self.loaded_from = str(checked.load[0])
            self.say(f"backbone from {self.loaded_from} (step {checked.load[1]} of its run), {len(fresh)} "
                     "new FlexiDepth tensors; step, LR schedule, optimizer and data start at 0")
            t = self.timers.add("checkpoint", t)
        elif checked.load:
            path = checked.load[0]
            self.step, self.consumed = load_checkpoint(path, self.chunks, self.optimizer,
                                                       self.scheduler, model=self.model)
            self.loaded_from = str(path)
            self.guards.resumed(path, self.step, self.consumed)
            self.say(f"resumed from {self.loaded_from}: step {self.step}, {self.consumed} samples consumed")
            t = self.timers.add("checkpoint", t)
        for line in self.guards.announce():
            self.say(line)
        self.timers.seconds["startup"] = t - t_start - self.timers.seconds["checkpoint"]

    def _data(self) -> data_mod.PreparedData:
        """The prepared dataset; the default one is prepared once (by rank 0) into the cache."""
        if self.cfg.data is not None:
            return data_mod.open_prepared(self.cfg.data)
        if self.rank == 0:
            data_mod.ensure_default(self.cfg.source, log=self.say)
        torch.distributed.barrier()
        return data_mod.ensure_default(self.cfg.source, log=self.say)

    def _micro(self, dataset, first_sample: int, *, text_only_loss: bool = False) -> list[dict]:
        return micro_batches(dataset, first_sample=first_sample, global_batch=self.gbs,
                             micro_batch_size=self.cfg.micro_batch_size, dp_rank=self.dp_rank,
                             dp=self.checked.dp, byte_lengths=self.byte_lengths if text_only_loss else None)

    def _schedule(self, micro: list[dict], *, forward_only: bool = False) -> dict[str, float]:
        from megacpp_mcore.train import runtime

        # The micro-batches themselves: runtime.chunk_iterators makes the schedule's iterator(s).
        return runtime.train_step(self.chunks, self.guards.step_guard, micro, num_microbatches=len(micro),
                                  micro_batch_size=self.cfg.micro_batch_size, seq_length=self.seq,
                                  forward_only=forward_only)

    def evaluate(self) -> float:
        """Validation bits per byte: summed nats over the text labels (specials excluded) / ln 2 /
        the UTF-8 bytes those labels stand for (for bytes: one per label; for a BPE: its tokens'
        byte lengths), so byte-level and BPE runs report the same quantity."""
        t0 = time.perf_counter()
        total_loss, total_bytes = 0.0, 0
        with dynamic_depth.validating(self.chunks, self.collector, self.model, self.step) as usage:
            for i in range(self.cfg.eval_iters):
                micro = self._micro(self.valid_ds, i * self.gbs, text_only_loss=True)
                out = self._schedule(micro, forward_only=True)
                total_loss += out["loss"] * out["tokens"]
                total_bytes += tokenizer_mod.label_bytes(micro, self.byte_lengths)
                self.guards.kill_at("eval", self.step)
        total_bytes = tokenizer_mod.data_parallel_sum(total_bytes)  # the loss covers all DP ranks too
        self.eval_s = time.perf_counter() - t0
        self.timers.add("evaluation", t0)
        bpb = total_loss / max(total_bytes, 1) / LN2
        # tokens: training tokens consumed so far (`compare` plots bits/byte against them too);
        # bytes: the validation bytes in the denominator
        self.validation.append({"step": self.step, "tokens": self.consumed * self.seq, "bpb": bpb,
                                "bytes": total_bytes, **usage})
        step0 = "loaded backbone" if self.checked.load_mode == "backbone" else "untrained"
        self.say(f"validation step {self.step}: {bpb:.4f} bits/byte" + (f" ({step0})" if self.step == 0 else "")
                 + "".join(f", {k.replace('_', ' ')} {v:.3f}" for k, v in usage.items()))
        return bpb

    def train_one_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        micro = self._micro(self.train_ds, self.consumed)
        t1 = self.timers.add("data_wait", t0)
        self.collector.set_step(self.step, total_steps=self.cfg.steps)
        self.guards.before_step(self.step + 1)
        out = self._schedule(micro)
        if not self.guards.skipped:  # a skipped update leaves the LR schedule alone (as Megatron-LM)
            self.scheduler.step(increment=1)
        self.collector.collect()
        self.compute_s += time.perf_counter() - t1
        end = self.timers.add("step_compute", t1)
        if self.first_step_compute_s is None:
            self.first_step_compute_s, self.first_step_end_s = end - t1, end - self.t_start
        self.compute_steps += 1
        self.step += 1
        self.consumed += self.gbs
        self.last_loss = out["loss"]
        for line in self.guards.after_step(self.step, self.last_loss):
            self.say(line)
        return out

    def log_line(self, out: dict[str, float], window_s: float, window_steps: int) -> None:
        from megacpp_mcore.train.receipt import format_bytes
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
                 f"| peak mem {format_bytes(mem['bytes'])} | ETA {fmt_eta(per_step * (self.cfg.steps - self.step))}"
                 + (f" | {format_stats(stats)}" if stats else "") + dynamic_depth.usage_text(stats, self.model))

    def run(self) -> None:
        cfg = self.cfg
        self.say(f"training {self.model.name} ({self.model.num_layers} layers "
                 f"'{''.join(e.symbol for e in self.model.layer_table())}') for {cfg.steps} steps: "
                 f"global batch {self.gbs} x {self.seq} tokens, tp={cfg.parallel.tp} pp={cfg.parallel.pp} "
                 f"ep={cfg.parallel.ep} dp={self.checked.dp}, backend {self.backend_name}, data {self.prepared.prefix}")
        if self.step == 0:
            self.evaluate()
        stop = min(cfg.steps, cfg.stop_after or cfg.steps)
        window_s, window_steps = 0.0, 0  # compute seconds and steps since the last log line
        after_first = 0.0  # compute seconds once the first step of this process is done
        while self.step < stop:
            before = self.compute_s
            out = self.train_one_step()
            window_s, window_steps = window_s + self.compute_s - before, window_steps + 1
            if self.compute_steps == 1:
                after_first = self.compute_s  # the first step pays one-off costs: leave it out
            elif self.compute_steps == ESTIMATE_AFTER_STEPS and stop - self.step > 0:
                self.say(self.estimate_line((self.compute_s - after_first) / (ESTIMATE_AFTER_STEPS - 1), stop))
            if self.step % cfg.log_interval == 0 or self.step == stop or self.guards.halted:
                self.log_line(out, window_s, window_steps)
                window_s, window_steps = 0.0, 0
            if self.guards.halted:
                break
            if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                self.evaluate()
            if cfg.save and ((cfg.save_interval and self.step % cfg.save_interval == 0) or self.step == stop):
                self.save()

    def estimate_line(self, step_s: float, stop: int) -> str:
        """How long the rest of the run will take on this machine: ``step_s`` (the mean compute time
        of the timed steps) for each step left, plus the measured step-0 validation (or a forward-only third of a step
        per validation batch) for each validation left."""
        # called after step ``self.step`` trained and before its own validation, if it has one
        evals_left = sum(1 for s in range(self.step, stop + 1)
                         if s % self.cfg.eval_interval == 0 or s == self.cfg.steps)
        eval_s = self.eval_s if self.eval_s is not None else step_s / 3 * self.cfg.eval_iters
        left = step_s * (stop - self.step) + eval_s * evals_left
        return (f"estimate: about {fmt_eta(left)} more on this machine ({stop - self.step} steps at "
                f"{step_s:.2f} s, {evals_left} validations at {eval_s:.1f} s)")

    def save(self) -> None:
        """Checkpoint of this step; its marker records the run's settings, the spike baseline and
        flags (a loss spike just before it)."""
        t0 = time.perf_counter()
        meta, hook = self.guards.saving(self.step)
        for flag in meta["flags"]:
            self.say(f"step {self.step}: {flag['reason']}")
        self.saved.append(str(save_checkpoint(self.cfg.save, self.chunks, self.optimizer, self.scheduler,
                                              step=self.step, consumed=self.consumed, model=self.model,
                                              metadata=meta, hook=hook)))
        if self.rank == 0:  # a BPE's ids mean nothing without it: the run directory carries it
            tokenizer_mod.store_with_checkpoint(self.prepared.prefix, self.prepared.manifest, self.cfg.save)
        self.timers.add("checkpoint", t0)
        self.say(f"saved checkpoint {self.saved[-1]}")

    @property
    def backend_name(self) -> str:
        from megacpp_mcore.spec.backends import resolve_backend_name

        return resolve_backend_name(self.cfg.backend)

    def facts(self, *, started_at: datetime.datetime, preset: str | None):
        """What this run was given and measured, for the receipt (all ranks take part: observed
        backends are gathered, peak memory is the maximum over ranks)."""
        from megacpp_mcore.train import receipt as receipt_mod
        from megacpp_mcore.train import runtime

        world = torch.distributed.get_world_size()
        mem = peak_memory_bytes()
        peak = torch.tensor([mem["bytes"]], dtype=torch.float64, device=runtime.device())
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        observed: list = [None] * world
        torch.distributed.all_gather_object(observed, receipt_mod.observe_backends(self.chunks))
        return receipt_mod.RunFacts(
            config=self.cfg, checked=self.checked, preset=preset, started_at=started_at,
            world_size=world, backend=self.backend_name, observed=observed, bf16=self.config.bf16,
            kernel_paths={name: getattr(self.config, name, None) for name in CONFIG_FIELDS},
            data_prefix=self.prepared.prefix, data_manifest=self.prepared.manifest,
            consumed_samples=self.consumed, completed_steps=self.step, losses=self.losses,
            last_loss=self.last_loss, validation=self.validation, stats=self.collector.gather(),
            stats_history=self.stats_history, compute_s=self.compute_s,
            compute_steps=self.compute_steps, peak_memory={"kind": mem["kind"], "bytes": int(peak.item())},
            seconds=dict(self.timers.seconds), total_s=time.perf_counter() - self.t_start,
            cpu_s=time.process_time(), saved=self.saved, loaded_from=self.loaded_from,
            load_mode=self.checked.load_mode, trainable=dynamic_depth.frozen_report(self.cfg),
            first_step_end_s=self.first_step_end_s, first_step_compute_s=self.first_step_compute_s,
            invalid=self.guards.report(), nonfinite_steps=self.guards.nonfinite_steps)


def file_name(model_name: str) -> str:
    """``model_name`` as a file-name part (``nam56r-tiny+flexidepth`` -> ``nam56r-tiny-flexidepth``):
    default receipt paths and run directories under ``<cache>/runs``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-")


def _print(line: str) -> None:
    print(line, flush=True)  # progress must show up promptly also when piped to a file


def train(model: ModelConfig, cfg: TrainConfig, *, log: Callable[[str], None] = _print,
          preset: str | None = None) -> dict[str, Any]:
    """Runs training; returns the receipt (also written to ``cfg.receipt``, default
    ``<cache>/runs/<model>-<utc>.json``, on rank 0)."""
    from megacpp_mcore.train import heatmap
    from megacpp_mcore.train import receipt as receipt_mod
    from megacpp_mcore.train import runtime

    # Start-up counts from process creation (interpreter and megatron imports included).
    t_start = time.perf_counter() - max(time.time() - process_start(), 0.0)
    started_at = datetime.datetime.now(datetime.timezone.utc)
    checked = check(model, cfg)  # raises ValueError before anything is written
    try:
        trainer = Trainer(checked, cfg, log=log, t_start=t_start)
        trainer.run()
    except BaseException:  # e.g. CheckpointError: leave no process group behind (in-process callers)
        runtime.shutdown()
        raise
    receipt = receipt_mod.assemble(trainer.facts(started_at=started_at, preset=preset))
    if trainer.rank == 0:
        name = file_name(checked.model.name)
        path = cfg.receipt or data_mod.cache_dir() / "runs" / f"{name}-{started_at:%Y%m%d-%H%M%S}.json"
        receipt["receipt_path"] = str(path)
        receipt["stats"]["heatmaps"] = heatmap.write_usage_heatmaps(
            trainer.stats_history, Path(path).with_suffix(""))
        receipt_mod.write(path, receipt)
        for line in receipt_mod.summary_lines(receipt):
            trainer.say(line)
    runtime.shutdown()
    return receipt
