"""The one place for megatron-core names and signatures that differ across versions.

CI pins megatron-core 0.16.x; users upgrade. What changes after 0.16 and how the package absorbs it:

* Layer constructors gain keyword arguments (``TransformerLayer`` in 0.17: ``is_mtp_layer``,
  ``add_layer_offset``, ``pp_layer_offset``; 0.18: ``name``). Our adapters (``HybridLayer``, norms,
  mixers) accept ``**kwargs``; :func:`layer_kwargs` forwards to a module what its constructor
  takes, drops later-version kwargs it does not take while they carry their neutral meaning, and
  refuses the rest with a message naming them. :func:`global_layer_index` honours
  ``add_layer_offset``/``is_mtp_layer`` the way upstream layers do.
* Backend providers gain keyword arguments (``layer_norm(..., has_residual=)`` in 0.18): provider
  methods of :mod:`megacpp_mcore.spec.backends` accept them too.
* Config field names with upstream's spelling live here (:data:`HETEROGENEOUS_CHECKPOINT_FIELD`).
* The MoE aux-loss tracker became ``MoEMetricsTracker`` (0.18): :func:`reset_moe_metrics`,
  :func:`record_layer_metric` (what Megatron-LM's ``training_log`` reports; see
  :func:`tracker_layer_count` for the average it prints).
* Megatron-LM's training loop keeps its position in its global arguments (``args.curr_iteration``,
  ``args.train_iters``, core_v0.16 - core_v0.19): :func:`training_iteration`.
* Megatron-LM's ``pretrain`` takes a config container (core_v0.18) and then the model provider as a
  keyword (core_v0.19); ``--use-legacy-models`` is gone from core_v0.18: :func:`call_pretrain`,
  :func:`megatron_arg`.
* ``MambaMixer`` holds ``conv1d_weight``/``conv1d_bias`` parameters (0.19) where it had a
  ``conv1d`` module; dist-checkpoint keys stay ``conv1d.weight``/``conv1d.bias`` (split per part):
  :func:`mamba_state_dict_as_conv_module` for plain torch state dicts.
* MLA's Q/KV norms and up projections are resolved by ``QKNormConfigResolver`` (0.19) instead of
  built as the spec gives them: :func:`mla_norms_as_specified` is the spec's meaning, for
  ``MLASelfAttention._resolve_qk_norm_config`` (the 0.19 hook; earlier releases never call it).
* ``rope_utils.apply_rotary_pos_emb`` takes ``mla_rotary_interleaved`` (0.19) where it read
  ``config.multi_latent_attention``: :func:`rope_deinterleaves`.
* CUDA graph capture is chosen by ``cuda_graph_scope`` (0.16 - 0.18) or ``cuda_graph_modules``
  (0.19): :func:`cuda_graph_modules`.
* ``dist_checkpointing`` lost ``common_strategy`` (0.19): ``torch_dist`` keeps the common
  (non-tensor) state inside its files, where 0.16 - 0.18 look for ``common.pt``:
  :func:`write_legacy_common_file` keeps checkpoints loadable by every supported release.
* The MoE spec is a ``ModuleSpec`` (to 0.17) or a ``functools.partial`` of ``MoELayer`` (0.18
  on), its experts likewise: :func:`with_moe_modules` swaps the layer and experts classes in
  either. To 0.17, ``TransformerLayer`` hands ``pg_collection`` to a ``ModuleSpec`` MLP only when
  its class *is* upstream's ``MoELayer`` (else it warns "Unknown MLP type" and builds it on the
  default groups); 0.18 calls the partial with them: :func:`build_layer` binds them for ours.
* Nothing to absorb: ``MambaMixer(use_mem_eff_path=)`` (gone in 0.17, not used by the package:
  the config field stays).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from typing import Any, Callable, Mapping

from packaging.version import Version

# Upstream's spelling of the TransformerConfig flag for per-layer checkpoint keys (0.16 .. 0.19).
HETEROGENEOUS_CHECKPOINT_FIELD = "hetereogenous_dist_checkpoint"

_ANY = object()  # "any value is neutral": the kwarg only carries information the module re-derives

# Layer-constructor kwargs added after 0.16: name -> (first version, neutral value). A kwarg at its
# neutral value may be dropped for a module that does not take it without changing the model.
LATER_LAYER_KWARGS: dict[str, tuple[str, Any]] = {
    "is_mtp_layer": ("0.17", False),
    "add_layer_offset": ("0.17", True),
    "pp_layer_offset": ("0.17", _ANY),  # upstream layers re-derive the offset from the config
    "name": ("0.18", _ANY),  # module instance name, informational
}


@functools.cache
def mcore_version() -> Version:
    """The installed megatron-core version."""
    import megatron.core

    return Version(megatron.core.__version__)


def _accepts(target: Callable) -> tuple[set[str], bool]:
    """(keyword names ``target`` takes, whether it takes ``**kwargs``)."""
    if inspect.isclass(target):  # a spec-time dispatcher (e.g. HybridLayer) builds in __new__
        target = target.__new__ if target.__new__ is not object.__new__ else target.__init__
    params = inspect.signature(target).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def layer_kwargs(target: Callable, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of upstream's layer-construction ``kwargs`` to pass on to ``target``.

    ``target`` takes ``**kwargs`` or names the kwarg: forwarded. A later-version kwarg ``target``
    does not name, at its neutral value: dropped. Anything else: ``TypeError`` naming the kwarg,
    its value and the module (building would otherwise silently change the layer's meaning).
    """
    names, var_kw = _accepts(target)
    forwarded: dict[str, Any] = {}
    for key, value in kwargs.items():
        if var_kw or key in names:
            forwarded[key] = value
            continue
        since, neutral = LATER_LAYER_KWARGS.get(key, (None, None))
        if since is not None and (neutral is _ANY or value == neutral):
            continue
        what = f"added to megatron-core layers in {since}" if since else "unknown to megacpp_mcore"
        raise TypeError(
            f"{getattr(target, '__qualname__', target)} does not take {key}={value!r} ({what}); "
            f"it takes: {', '.join(sorted(names))}"
        )
    return forwarded


def global_layer_index(
    config,
    layer_number: int,
    *,
    vp_stage: int | None,
    pp_rank: int,
    is_mtp_layer: bool = False,
    add_layer_offset: bool = True,
    **_later: Any,
) -> int:
    """0-based index in the whole model of the layer built as ``layer_number`` (1-based).

    Like upstream's ``TransformerLayer``: ``layer_number`` is local to the pipeline stage and gets
    the stage offset added, unless the caller says it is global already (``add_layer_offset=False``
    or ``is_mtp_layer=True``, megatron-core >= 0.17).
    """
    if is_mtp_layer or not add_layer_offset:
        return layer_number - 1
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(config, vp_stage, pp_rank) + layer_number - 1


def reset_moe_metrics() -> None:
    """Drops Megatron's process-global MoE aux-loss tracker: it is sized by the first model's depth,
    so a model of another depth in the same process needs a fresh one.

    0.18+: ``moe_logging.destroy_moe_metrics_tracker()`` (``get_moe_layer_wise_logging_tracker()``
    there returns a fresh dict built from the tracker, so clearing it would change nothing).
    0.16/0.17: the tracker is the module-global dict that getter returns: cleared in place.
    """
    try:
        from megatron.core.transformer.moe import moe_logging
    except ImportError:  # before 0.18
        moe_logging = None
    destroy = getattr(moe_logging, "destroy_moe_metrics_tracker", None)
    if destroy is not None:
        destroy()
        return
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()


def record_layer_metric(name: str, value, *, layer_number: int, num_layers: int) -> None:
    """Adds ``value`` (a 0-d tensor) to layer ``layer_number``'s (1-based) slot of metric ``name``
    in Megatron's MoE metrics tracker, the one Megatron-LM's ``training_log`` reports each
    iteration (scaled by ``1 / num_microbatches``, summed over the layers and divided by
    :func:`tracker_layer_count`) and then clears.

    0.18+: ``moe_logging.get_moe_metrics_tracker().record`` (averaged over data-parallel ranks at
    report time). 0.16/0.17: ``moe_utils.save_to_aux_losses_tracker`` (the module-global dict).
    An entry of another size (left by a model of another depth in this process) is replaced by a
    zero one of ``num_layers`` first.
    """
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # before 0.18
        get_moe_metrics_tracker = None
    if get_moe_metrics_tracker is not None:
        tracker = get_moe_metrics_tracker()
        entry = tracker.metrics.get(name)
        if entry is not None and entry.values.numel() != num_layers:
            del tracker.metrics[name]
        tracker.record(name, value, layer_number=layer_number, num_layers=num_layers)
        return
    from megatron.core.transformer.moe.moe_utils import (
        get_moe_layer_wise_logging_tracker,
        save_to_aux_losses_tracker,
    )

    entry = get_moe_layer_wise_logging_tracker().get(name)
    if entry is not None and entry["values"].numel() != num_layers:
        del get_moe_layer_wise_logging_tracker()[name]
    save_to_aux_losses_tracker(name, value, layer_number, num_layers)


def tracker_layer_count(config) -> int:
    """The layer count Megatron-LM's ``training_log`` divides a tracked metric's sum over layers
    by (core_v0.16 - core_v0.19, GPT models): the layers ``moe_layer_freq`` marks as MoE (an int
    ``f``: every ``f``-th from 0; a list: its ones) plus ``mtp_num_layers``. A feature that wants
    its log line to read as the mean over the ``n`` layers carrying it records ``value *
    tracker_layer_count(config) / n`` per layer."""
    freq = getattr(config, "moe_layer_freq", 1)
    if isinstance(freq, int):
        count = sum(1 for i in range(config.num_layers) if i % freq == 0)
    else:
        count = sum(freq)
    return count + (getattr(config, "mtp_num_layers", None) or 0)


def tracker_size(config) -> int:
    """Slots per metric in Megatron's MoE metrics tracker: ``num_layers + mtp_num_layers``, as
    Megatron's own routers and ``training_log``'s pre-initialisation size them."""
    return config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)


def training_iteration() -> tuple[int, int] | None:
    """``(iteration, train_iters)`` of the Megatron-LM training loop running in this process (its
    global arguments: ``curr_iteration``, the 0-based iteration being trained, which its ``train``
    sets before every step, and ``train_iters``, the run's length, which it derives from
    ``--train-samples`` when needed), or ``None`` when no such loop runs (Megatron-LM's
    ``megatron.training`` not imported, its arguments not parsed, or training not started).

    Reads only modules already imported (``sys.modules``): no import, no environment read, so a
    forward may ask. Core_v0.16 - core_v0.19 keep both in the same fields."""
    import sys

    global_vars = sys.modules.get("megatron.training.global_vars")
    try:
        args = global_vars.get_args() if global_vars is not None else None
    except AssertionError:  # arguments not parsed yet
        return None
    iteration = getattr(args, "curr_iteration", None)
    total = getattr(args, "train_iters", None)
    if not isinstance(iteration, int) or not isinstance(total, int):
        return None
    return iteration, total


# Megatron-LM arguments removed in a later release: dest -> (first release without it, the value
# that means "not asked for"). Readers go through :func:`megatron_arg`.
REMOVED_MEGATRON_ARGS: dict[str, tuple[str, Any]] = {"use_legacy_models": ("0.18", False)}


def megatron_arg(args, dest: str) -> Any:
    """``args.<dest>`` from Megatron-LM's parser; for an argument a later release removed and
    this checkout's parser does not define, its "not asked for" value."""
    if dest in REMOVED_MEGATRON_ARGS and not hasattr(args, dest):
        return REMOVED_MEGATRON_ARGS[dest][1]
    return getattr(args, dest)


def pretrain_takes_config(pretrain: Callable) -> bool:
    """Whether Megatron-LM's ``pretrain`` takes a config container first (core_v0.18+), so the
    caller parses the arguments; before, ``pretrain`` parses them itself."""
    return "cfg_container" in inspect.signature(inspect.unwrap(pretrain)).parameters


def call_pretrain(
    pretrain: Callable,
    *,
    dataset_provider: Callable,
    model_provider: Callable,
    model_type: Any,
    forward_step: Callable,
    extra_args_provider: Callable | None,
    args_defaults: Mapping[str, Any],
    signature_of: Callable | None = None,
    parse_args: Callable | None = None,
    config_container: Callable | None = None,
    **kwargs: Any,
) -> Any:
    """Megatron-LM's ``pretrain`` with our ``model_provider``, in the form its signature takes.

    * core_v0.16/0.17: ``pretrain(dataset_provider, model_provider, model_type, forward_step,
      extra_args_provider=, args_defaults=, ...)``; it parses the arguments itself.
    * core_v0.18: ``pretrain(cfg_container, dataset_provider, model_provider, model_type,
      forward_step, ...)``; core_v0.19 moves ``model_provider`` behind ``forward_step`` as a keyword.
      The caller parses (``parse_and_validate_args``) and builds the container without a model
      config (``pretrain_cfg_container_from_args(args)``), so Megatron builds the model through
      ``model_provider``, as ``pretrain_gpt.py`` did before core_v0.19.

    Everything is passed by keyword, which binds the same way under the three signatures.
    ``signature_of``: the function whose signature decides (default ``pretrain``; pass the
    unwrapped one when ``pretrain`` is a restart wrapper). ``parse_args``/``config_container``
    default to Megatron-LM's (imported only when the signature takes a container). ``kwargs``
    (``store``, ``get_embedding_ranks``, ...) are passed through.
    """
    call = dict(train_valid_test_dataset_provider=dataset_provider, model_provider=model_provider,
                model_type=model_type, forward_step_func=forward_step, **kwargs)
    if not pretrain_takes_config(signature_of or pretrain):
        return pretrain(extra_args_provider=extra_args_provider, args_defaults=dict(args_defaults),
                        **call)
    if parse_args is None:
        from megatron.training.arguments import parse_and_validate_args as parse_args
    if config_container is None:
        from megatron.training.argument_utils import (
            pretrain_cfg_container_from_args as config_container,
        )
    args = parse_args(extra_args_provider=extra_args_provider, args_defaults=dict(args_defaults))
    return pretrain(config_container(args), **call)


# MambaMixer's conv parameters (0.19) -> their names as a ``conv1d`` module (before 0.19, ours).
MAMBA_CONV_PARAMETERS = {"conv1d_weight": "conv1d.weight", "conv1d_bias": "conv1d.bias"}


def mamba_state_dict_as_conv_module(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A torch state dict with 0.19 ``MambaMixer`` conv parameter names (``...conv1d_weight``)
    renamed to the ``conv1d`` module spelling (``...conv1d.weight``) that ``TorchMambaMixer`` and
    earlier ``MambaMixer`` use and that dist checkpoints keep on every version."""
    out = {}
    for key, value in state_dict.items():
        head, _, last = key.rpartition(".")
        renamed = MAMBA_CONV_PARAMETERS.get(last)
        out[f"{head}.{renamed}" if head and renamed else renamed or key] = value
    return out


def write_legacy_common_file(checkpoint_dir: str) -> bool:
    """After ``dist_checkpointing.save``: writes ``common.pt`` (the common state as 0.16 - 0.18
    save and load it) when this release did not, i.e. when it stored the common state inside the
    ``torch_dist`` files (0.19). Older releases then load the checkpoint; 0.19 itself reads
    ``common.pt`` first when present (same content). Returns whether the file was written here.
    Rank 0 writes; the caller synchronises the ranks."""
    import os

    import torch
    from megatron.core import dist_checkpointing

    path = os.path.join(checkpoint_dir, "common.pt")  # COMMON_STATE_FNAME in every release
    if os.path.exists(path) or torch.distributed.get_rank() != 0:
        return False
    torch.save(dist_checkpointing.load_common_state_dict(str(checkpoint_dir)), path)
    return True


# MLASelfAttention's hook (0.19) that returns the modules below; absent before 0.19.
MLA_NORM_HOOK = "_resolve_qk_norm_config"


def mla_norms_as_specified(config, submodules) -> dict[str, Any]:
    """MLA's Q/KV up projections and latent norms as the spec gives them (what 0.16 - 0.18 build).

    0.19's ``QKNormConfigResolver`` reinterprets ``qk_layernorm`` with ``q_lora_rank=None``: it
    rejects a spec's Q norm on the local backend, and on TE swaps the plain Q projection for a
    fused norm+linear one, i.e. normalises the hidden states before Q although the spec has no such
    norm. Without a Q latent (``q_lora_rank=None``) there is no Q norm, as 0.16 - 0.18 build it; the
    KV latent norm and every projection are the spec's. Keys: those the 0.19 hook returns.
    """
    from megatron.core.transformer.identity_op import IdentityOp

    has_q_latent = config.q_lora_rank is not None
    return dict(
        linear_q_proj=submodules.linear_q_proj,
        linear_q_up_proj=submodules.linear_q_up_proj,
        linear_kv_up_proj=submodules.linear_kv_up_proj,
        q_layernorm=(submodules.q_layernorm or IdentityOp) if has_q_latent else IdentityOp,
        kv_layernorm=submodules.kv_layernorm or IdentityOp,
    )


@functools.cache
def _rope_takes_mla_flag() -> bool:
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    return "mla_rotary_interleaved" in inspect.signature(apply_rotary_pos_emb).parameters


def rope_deinterleaves(config, mla: bool) -> bool:
    """Whether Megatron's unfused RoPE first regroups the rotated dims as (even, odd) halves
    (DeepSeek's interleaved pairs) for a layer: 0.19 does it where the caller passes
    ``mla_rotary_interleaved=True`` (``MLASelfAttention`` does, plain attention does not);
    0.16 - 0.18 take no argument and do it for every layer of a ``multi_latent_attention``
    config. Used by the inference cache path (:mod:`megacpp_mcore.infer.context`), which applies
    the rotation itself at per-row positions."""
    if _rope_takes_mla_flag():
        return mla
    return bool(getattr(config, "multi_latent_attention", False))


def cuda_graph_modules_field(config) -> str:
    """The config field naming what CUDA graphs capture: ``cuda_graph_modules`` (0.19) or
    ``cuda_graph_scope`` (0.16 - 0.18)."""
    return "cuda_graph_modules" if hasattr(config, "cuda_graph_modules") else "cuda_graph_scope"


def cuda_graph_modules(config) -> tuple[str, ...] | None:
    """What Megatron's CUDA graphs capture for ``config``: None without CUDA graphs
    (``cuda_graph_impl`` ``"none"``), ``()`` for whole layers (no scope set), else the scope's
    names (``"attn"``, ``"mamba"``, ``"moe_router"``, ...; ``"full_iteration"`` for local graphs
    of the whole step). The setting is ``cuda_graph_scope`` to 0.18 and ``cuda_graph_modules``
    from 0.19."""
    if getattr(config, "cuda_graph_impl", "none") in (None, "none"):
        return None
    raw = getattr(config, cuda_graph_modules_field(config), None) or ()
    if isinstance(raw, str):
        raw = [part for part in raw.split(",") if part]
    elif not isinstance(raw, (list, tuple)):
        raw = [raw]
    return tuple(getattr(item, "name", str(item)) for item in raw)


# Megatron CUDA-graph modules that capture no TransformerLayer (Mamba layers are modules of their
# own): the only graphs a model whose A/E layers wrap their forward (MoD, FlexiDepth) may take.
LAYER_FREE_GRAPH_MODULES = frozenset({"mamba"})


def graphs_capturing_layers(config) -> str | None:
    """How ``config``'s CUDA graphs would capture attention or MoE ``TransformerLayer`` s (a
    captured layer runs without its Python ``forward``: a wrapper's routing is bypassed and its
    Python state frozen), or None where they capture none (no graphs, or Mamba-only ones)."""
    captured = cuda_graph_modules(config)
    if captured is None or (captured and set(captured) <= LAYER_FREE_GRAPH_MODULES):
        return None
    return f"cuda_graph_impl={config.cuda_graph_impl!r}, modules {list(captured) or 'whole layers'}"


def with_moe_modules(spec, layer: type, experts: Mapping[type, type]):
    """Megatron's MoE spec ``spec`` with ``layer`` as the MoE layer and each experts class in
    ``experts`` replaced by its value (same submodules and parameters). The spec is a
    ``ModuleSpec`` to 0.17 and a ``functools.partial`` of the layer from 0.18, with the experts a
    ``ModuleSpec`` or a ``partial`` likewise."""

    def swapped(builder):
        if isinstance(builder, functools.partial):
            new = experts.get(builder.func)
            return functools.partial(new, *builder.args, **builder.keywords) if new else builder
        new = experts.get(getattr(builder, "module", None))
        return dataclasses.replace(builder, module=new) if new else builder

    if isinstance(spec, functools.partial):
        submodules = spec.keywords["submodules"]
        submodules = dataclasses.replace(submodules, experts=swapped(submodules.experts))
        return functools.partial(layer, *spec.args, **{**spec.keywords, "submodules": submodules})
    submodules = dataclasses.replace(spec.submodules, experts=swapped(spec.submodules.experts))
    return dataclasses.replace(spec, module=layer, submodules=submodules)


def _moe_subclass_spec(mlp) -> bool:
    """Whether ``mlp`` is a ``ModuleSpec`` of a subclass of upstream's ``MoELayer`` (ours, to 0.17),
    which that release's ``TransformerLayer`` builds without the layer's process groups."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    module = getattr(mlp, "module", None)
    return (isinstance(mlp, ModuleSpec) and isinstance(module, type) and issubclass(module, MoELayer)
            and module is not MoELayer)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _quiet(logger_name: str, prefix: str):
    """Drops ``logger_name``'s records starting with ``prefix`` inside the block only."""
    logger, drop = logging.getLogger(logger_name), _DropMessage(prefix)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def build_layer(spec, **kwargs):
    """``build_module(spec, **kwargs)`` for a ``TransformerLayer`` spec. Where its MLP is a
    ``ModuleSpec`` of a ``MoELayer`` subclass (to 0.17), the layer's ``pg_collection`` is bound into
    that spec's params, so the MoE is built on the model's groups as upstream's own class is, and
    upstream's "Unknown MLP type ... default kwargs" warning (no longer true) is not printed. Other
    specs (every 0.18+ MoE, a partial that ``TransformerLayer`` calls with the groups) build as is."""
    from megatron.core.transformer.spec_utils import build_module

    mlp = getattr(getattr(spec, "submodules", None), "mlp", None)
    if not _moe_subclass_spec(mlp):
        return build_module(spec, **kwargs)
    if kwargs.get("pg_collection") is not None:
        mlp = dataclasses.replace(mlp, params={**mlp.params, "pg_collection": kwargs["pg_collection"]})
        spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=mlp))
    with _quiet("megatron.core.transformer.transformer_layer", "Unknown MLP type"):
        return build_module(spec, **kwargs)
