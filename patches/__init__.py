"""Runtime patches against named upstream versions.

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
  without it the status says ``not-applicable`` / ``n/a`` instead of asking for a re-base.

Nothing is applied on import: entry points (``python -m megacpp_mcore.upstream.launch_pretrain``,
``megacpp-mcore patches apply``) call :func:`patches.registry.apply_needed` explicitly.
"""

REGISTRY = (
    "megacpp_mcore.patches.spec_import_errors",
    "megacpp_mcore.patches.tp_attributes_without_init",
    "megacpp_mcore.patches.mla_have_te",
    "megacpp_mcore.patches.mla_down_proj_tp_marker",
    "megacpp_mcore.patches.te_attention_backend_per_layer",
)
