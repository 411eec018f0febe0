"""Megatron-LM's ``gpt_builders.gpt_builder`` builds our shared-block MTP model.

Stock ``pretrain_gpt.py`` (core_v0.16.1) builds MTP only from ``--mtp-num-layers`` (one upstream layer
per depth, ignoring ``--spec``) and crashes with ``UnboundLocalError`` when ``--spec`` and
``--mtp-num-layers`` are combined. After :func:`apply`, the ``GPTModel`` class that ``gpt_builder``
instantiates is :class:`megacpp_mcore.mtp.MTPGPTModel` configured from the environment when the
model is built:

* ``MEGACPP_MTP_DEPTH``       K >= 1 enables shared-block MTP (unset or 0: plain GPTModel);
* ``MEGACPP_MTP_DECAY``       step-weight decay (default 0.5);
* ``MEGACPP_MTP_LOSS_SCALE``  total MTP loss factor (default 0.3).

Use it through ``scripts/pretrain_gpt_mtp.py`` (applies this patch, then runs ``pretrain_gpt.py``);
do not pass ``--mtp-num-layers`` at the same time. The target is the Megatron-LM checkout's top-level
``gpt_builders`` module, importable when the checkout is on ``sys.path``.
"""

from __future__ import annotations

import importlib
import os

NAME = "megatron-lm-shared-mtp"
TARGETS = "Megatron-LM core_v0.16.x (gpt_builders.py), megatron-core >=0.16,<0.17"
DESCRIPTION = "pretrain_gpt.py builds shared-block MTP (MTPGPTModel) with --spec; MTP from env"
TARGET_MODULE = "gpt_builders"
_MARK = "_megacpp_shared_mtp"


def _target():
    try:
        module = importlib.import_module(TARGET_MODULE)
    except Exception:  # not on sys.path, or its megatron.training imports fail
        return None
    if not callable(getattr(module, "gpt_builder", None)) or not isinstance(getattr(module, "GPTModel", None), type):
        return None
    return module


def mtp_config_from_env(environ=os.environ):
    """The :class:`MTPConfig` the environment asks for, or None (``MEGACPP_MTP_DEPTH`` unset/0)."""
    from megacpp_mcore.mtp import MTPConfig

    raw = environ.get("MEGACPP_MTP_DEPTH", "0")
    try:
        depth = int(raw)
        decay = float(environ.get("MEGACPP_MTP_DECAY", "0.5"))
        scale = float(environ.get("MEGACPP_MTP_LOSS_SCALE", "0.3"))
    except ValueError as exc:
        raise ValueError(f"MEGACPP_MTP_* environment: {exc}") from None
    if depth == 0:
        return None
    return MTPConfig(depth=depth, decay=decay, loss_scale=scale)


def _model_class(base: type) -> type:
    from megacpp_mcore.mtp import MTPGPTModel

    class SharedMTPGPTModel(MTPGPTModel):
        """``gpt_builder``'s GPTModel: MTP from ``MEGACPP_MTP_*`` (refuses upstream MTP too)."""

        def __init__(self, *args, **kwargs):
            mtp = mtp_config_from_env()
            if mtp is not None and kwargs.get("mtp_block_spec") is not None:
                raise ValueError(
                    "MEGACPP_MTP_DEPTH is set and --mtp-num-layers built upstream MTP as well; "
                    "use one of them"
                )
            super().__init__(*args, mtp=mtp, **kwargs)

    SharedMTPGPTModel._megacpp_original = base
    setattr(SharedMTPGPTModel, _MARK, True)
    return SharedMTPGPTModel


def check() -> str:
    """``needed`` when the builder module is importable (0.16 has no shared MTP), else
    ``target-missing``."""
    module = _target()
    if module is None:
        return "target-missing"
    return "needed"


def apply() -> list[str]:
    """Points ``gpt_builders.GPTModel`` at the shared-MTP subclass (idempotent)."""
    module = _target()
    if module is None:
        raise RuntimeError(
            f"{NAME}: target {TARGET_MODULE}.gpt_builder not importable; put the Megatron-LM "
            "checkout (core_v0.16.1) on sys.path"
        )
    if getattr(module.GPTModel, _MARK, False):
        return []
    module.GPTModel = _model_class(module.GPTModel)
    return [f"{TARGET_MODULE}.GPTModel -> megacpp_mcore.mtp.MTPGPTModel (MEGACPP_MTP_DEPTH)"]
