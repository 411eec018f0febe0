"""Megatron-LM's ``training_log`` reports only the MoE tracker entries it names.

MoD (and any feature of the package) records its per-layer statistics in Megatron's MoE metrics
tracker (``megacpp_mcore.spec.compat.record_layer_metric``), the one ``training_log`` reports each
iteration when the model has experts. ``training_log`` passes ``track_names`` (the MoE losses it
knows) and upstream restricts work to them:

* megatron-core 0.18+: ``MoEMetricsTracker.report(track_names=...)`` synchronises, prints and writes
  to tensorboard only the named entries, so the package's entries never appear (they are cleared);
* 0.16/0.17: ``track_moe_metrics`` prints every entry, but
  ``moe_utils.reduce_aux_losses_tracker_across_ranks`` sums only the named ones over the pipeline
  stages, so with pipeline parallelism the logging rank prints its own stage's layers only.

The patch wraps that function (0.16/0.17) or method (0.18+): when called with ``track_names``, it
adds the package's metric names (:data:`METRIC_NAMES`) that any rank of the pipeline group holds
(one MAX all-reduce of their sizes over that group; entries missing on a rank are created there
with zeros, so every rank joins the same collectives), then calls upstream. Upstream then reduces,
prints and logs them as its own. Calls without ``track_names`` (upstream already takes every
entry) go through unchanged.
"""

from __future__ import annotations

import importlib
import inspect
import types
from typing import Callable

import torch

from megacpp_mcore.features.flexidepth.usage import TRACKER_NAMES as FLEXIDEPTH_TRACKER_NAMES
from megacpp_mcore.features.mod.stats import TRACKER_NAMES
from megacpp_mcore.features.mtp.block import TRACKER_NAMES as MTP_TRACKER_NAMES
from megacpp_mcore.patches._wrapping import is_patched, upstream, wrap

NAME = "layer-metrics-in-moe-report"
TARGETS = "megatron-core >=0.16,<0.20"
DESCRIPTION = (
    "training_log's MoE tracker report takes only the MoE names it passes (0.18+: others are never "
    "printed; 0.16/0.17: never reduced over pipeline stages), so MoD's, FlexiDepth's and MTP's statistics are missing"
)

_MOE = "megatron.core.transformer.moe"


# The tracker names the package's features record (MoD's, FlexiDepth's, the shared MTP block's).
METRIC_NAMES = (tuple(TRACKER_NAMES.values()) + tuple(FLEXIDEPTH_TRACKER_NAMES.values())
                + tuple(MTP_TRACKER_NAMES.values()))


def _targets():
    """``("report", MoEMetricsTracker)`` (0.18+), ``("reduce", moe_utils)`` (0.16/0.17) or None."""
    try:
        logging_mod = importlib.import_module(f"{_MOE}.moe_logging")
    except ImportError:
        logging_mod = None
    tracker_cls = getattr(logging_mod, "MoEMetricsTracker", None)
    if tracker_cls is not None:
        return ("report", tracker_cls) if callable(getattr(tracker_cls, "report", None)) else None
    try:
        moe_utils = importlib.import_module(f"{_MOE}.moe_utils")
    except ImportError:
        return None
    if not callable(getattr(moe_utils, "reduce_aux_losses_tracker_across_ranks", None)):
        return None
    return "reduce", moe_utils


def _pp_group(pg_collection):
    if pg_collection is not None:
        return pg_collection.pp
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group()


def _agreed_sizes(local: dict[str, int], pg_collection) -> dict[str, int]:
    """``name -> size`` of the package's entries held by any rank of the pipeline group."""
    sizes = [local.get(name, 0) for name in METRIC_NAMES]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        group = _pp_group(pg_collection)
        if torch.distributed.get_world_size(group) > 1:
            device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
            agreed = torch.tensor(sizes, dtype=torch.int64, device=device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX, group=group)
            sizes = agreed.tolist()
    return {name: size for name, size in zip(METRIC_NAMES, sizes) if size}


def _device(values) -> torch.device | str:
    for v in values:
        return v.device
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def _with_ours(track_names, entries: dict, make: Callable[[str, int], None], pg_collection) -> list:
    """``track_names`` plus the package's names held anywhere in the pipeline group (created
    locally with ``make(name, size)`` where missing)."""
    names = [track_names] if isinstance(track_names, str) else list(track_names)
    sizes = {name: entries[name] for name in METRIC_NAMES if name in entries}
    for name, size in _agreed_sizes(sizes, pg_collection).items():
        if name not in entries:
            make(name, size)
        if name not in names:
            names.append(name)
    return names


def _report_wrapper(original: Callable) -> Callable:
    params = inspect.signature(original)

    def report(self, *args, **kwargs):
        bound = params.bind(self, *args, **kwargs)
        track_names, pg = bound.arguments.get("track_names"), bound.arguments.get("pg_collection")
        if track_names is not None:
            entries = {n: e.values.numel() for n, e in self.metrics.items()}
            device = _device(e.values for e in self.metrics.values())
            bound.arguments["track_names"] = _with_ours(
                track_names, entries,
                lambda name, size: self.ensure_initialized(name, size, device=device), pg)
        return original(*bound.args, **bound.kwargs)

    return wrap(original, report, NAME)


def _reduce_wrapper(original: Callable, moe_utils) -> Callable:
    def reduce(track_names=None, pg_collection=None):
        if track_names is not None:
            tracker = moe_utils.get_moe_layer_wise_logging_tracker()
            device = _device(e["values"] for e in tracker.values())

            def make(name: str, size: int) -> None:
                tracker[name] = {"values": torch.zeros(size, device=device), "reduce_group": None,
                                 "avg_group": None, "reduce_group_has_dp": False}

            entries = {n: e["values"].numel() for n, e in tracker.items()}
            track_names = _with_ours(track_names, entries, make, pg_collection)
        return original(track_names, pg_collection=pg_collection)

    return wrap(original, reduce, NAME)


_PROBE = "megacpp_patch_probe"


def _probe_report(tracker_cls) -> str:
    """0.18+: report a fresh tracker holding one unnamed entry; ``needed`` when it is left out."""
    tracker = tracker_cls()
    tracker.record(_PROBE, torch.ones(()), layer_number=1, num_layers=1)
    # collectives only for named entries: none here (stand-in groups, never used)
    groups = types.SimpleNamespace(pp=object(), dp_cp_gtp_remat=object(), dp=object())
    out = upstream(tracker_cls.report, NAME)(tracker, loss_scale=1.0, iteration=0, track_names=[],
                                             num_layers=1, pg_collection=groups)
    return "fixed-upstream" if _PROBE in out else "needed"


def _probe_reduce(moe_utils) -> str:
    """0.16/0.17: reduce with no names while one unnamed entry exists; ``needed`` when upstream
    leaves it alone (touching it would all-reduce over a stand-in group and raise)."""
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    saved = tracker.pop(_PROBE, None)
    tracker[_PROBE] = {"values": torch.ones(1), "reduce_group": None, "avg_group": None,
                       "reduce_group_has_dp": False}
    groups = types.SimpleNamespace(pp=object(), dp=object())
    try:
        upstream(moe_utils.reduce_aux_losses_tracker_across_ranks, NAME)([], pg_collection=groups)
    except Exception:  # it tried to reduce the unnamed entry
        return "fixed-upstream"
    finally:
        tracker.pop(_PROBE, None)
        if saved is not None:
            tracker[_PROBE] = saved
    return "needed"


def check() -> str:
    """``needed`` while upstream's report (0.18+) or pipeline reduction (0.16/0.17) skips entries
    outside ``track_names``; ``fixed-upstream`` once it takes them; ``target-missing`` when the
    function or its parameters moved."""
    targets = _targets()
    if targets is None:
        return "target-missing"
    kind, target = targets
    fn = upstream(target.report if kind == "report" else target.reduce_aux_losses_tracker_across_ranks,
                  NAME)
    if not {"track_names", "pg_collection"} <= set(inspect.signature(fn).parameters):
        return "target-missing"
    try:
        return _probe_report(target) if kind == "report" else _probe_reduce(target)
    except (TypeError, AttributeError):  # the tracker's contract changed: re-base
        return "target-missing"


def applied() -> bool:
    targets = _targets()
    if targets is None:
        return False
    kind, target = targets
    fn = target.report if kind == "report" else target.reduce_aux_losses_tracker_across_ranks
    return is_patched(fn, NAME)


def apply() -> list[str]:
    """Wraps the report method (0.18+) or the reduction function (0.16/0.17), once; returns what
    it wrapped."""
    targets = _targets()
    if targets is None or applied():
        return []
    kind, target = targets
    if kind == "report":
        target.report = _report_wrapper(target.report)
        return [f"{target.__module__}.MoEMetricsTracker.report"]
    target.reduce_aux_losses_tracker_across_ranks = _reduce_wrapper(
        target.reduce_aux_losses_tracker_across_ranks, target)
    return [f"{target.__name__}.reduce_aux_losses_tracker_across_ranks"]
