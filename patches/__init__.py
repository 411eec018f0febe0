"""Runtime patches against named upstream versions: the package's one patch registry.

Each patch is a module of this package with the protocol:

* ``NAME: str``: short kebab-case name shown by ``megacpp-mcore patches status``;
* ``TARGETS: str``: the distribution and versions it was written for, e.g.
  ``"megatron-core >=0.16,<0.18"``;
* ``DESCRIPTION: str``: the upstream defect, in one sentence;
* ``check() -> str``: exactly one of ``"needed"`` (the defect is present), ``"fixed-upstream"``
  (upstream behaves correctly: retire the patch) or ``"target-missing"`` (what the patch changes
  no longer exists: re-base it). ``check`` probes upstream's own behaviour, also after ``apply``;
* ``apply() -> list[str]``: idempotent; returns what it changed (empty when nothing to do);
* optional ``REQUIRES: str``: an optional package the target lives in (e.g. ``transformer_engine``);
  without it the status says ``not-applicable`` / ``n/a`` instead of asking for a re-base;
* optional ``SCOPE: str``: the hosts it is applied on, ``"any"`` (default) or ``"cpu"`` (hosts
  without CUDA: the ``cpu_*`` shims that let megatron-core run with gloo; never on a GPU host);
* optional ``applied() -> bool | None``: whether the patch is in (``None``: cannot tell).

Nothing is applied on import: every entry point (``megacpp-mcore train`` through
``runtime.initialize``, ``python -m megacpp_mcore.launch_pretrain``, ``megacpp-mcore patches
apply``, the test harness) calls :func:`megacpp_mcore.patches.registry.apply_needed` explicitly.
"""

REGISTRY = (
    "megacpp_mcore.patches.spec_import_errors",
    "megacpp_mcore.patches.tp_attributes_without_init",
    "megacpp_mcore.patches.mla_have_te",
    "megacpp_mcore.patches.mla_down_proj_tp_marker",
    "megacpp_mcore.patches.te_attention_backend_per_layer",
    "megacpp_mcore.patches.aux_loss_scale_without_moe",
    "megacpp_mcore.patches.layer_metrics_in_moe_report",
    "megacpp_mcore.patches.float16_optimizer_fp32_params",
    "megacpp_mcore.patches.mamba_ssd_tuned_configs",
    "megacpp_mcore.patches.te_permute_tuned_configs",
    # SCOPE "cpu": hosts without CUDA only
    "megacpp_mcore.patches.cpu_device_redirect",
    "megacpp_mcore.patches.cpu_rng_tracker",
    "megacpp_mcore.patches.cpu_clip_grads",
    "megacpp_mcore.patches.cpu_block_norm",
    "megacpp_mcore.patches.cpu_moe_router_gemm",
    "megacpp_mcore.patches.cpu_tied_embedding_copy",
)
