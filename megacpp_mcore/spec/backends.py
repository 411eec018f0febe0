"""The one place that detects optional packages and picks the backend.

Two backends build every symbol and feature:

* ``te``: Transformer Engine modules (fused norm+linear, ``TEDotProductAttention``, grouped GEMM);
* ``local``: Megatron-Core's torch-native modules, runnable on CPU; the parity reference.

``auto`` resolves to ``te`` when Transformer Engine imports on a CUDA host, else ``local``. Asking for
a backend that cannot run here raises :class:`BackendUnavailable` (an ``ImportError``) at build time,
saying what to install, instead of a ``NoneType`` error deep inside a forward pass.

Detection runs once per process (:func:`detect`); tests may replace the result with
:func:`override_detection`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
from typing import Iterator

from megatron.core.models.backends import LocalSpecProvider

from megacpp_mcore.layers.norms import LocalNorm

BACKENDS = ("auto", "te", "local")


class BackendUnavailable(ImportError):
    """The requested backend (or an optional kernel package) is not usable on this host."""


@dataclasses.dataclass(frozen=True)
class Environment:
    """What this process can use; filled once by :func:`detect`."""

    cuda: bool
    te: str | None  # Transformer Engine version when ``transformer_engine.pytorch`` imports
    apex: bool
    mamba_ssm: str | None
    triton: str | None
    causal_conv1d: str | None = None  # MambaMixer's fused training path needs it
    te_error: str | None = None  # why TE did not import, when it is installed but broken


def _version(module_name: str) -> tuple[str | None, str | None]:
    """Imports ``module_name``; returns (version, None) or (None, reason)."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a broken install raises more than ImportError (e.g. cuDNN errors)
        return None, f"{type(exc).__name__}: {exc}"
    root = importlib.import_module(module_name.split(".")[0])
    return str(getattr(root, "__version__", getattr(module, "__version__", "unknown"))), None


_override: Environment | None = None


@functools.cache
def _detect() -> Environment:
    import torch

    te, te_error = _version("transformer_engine.pytorch")
    if te_error and "No module named 'transformer_engine'" in te_error:
        te_error = None
    return Environment(
        cuda=torch.cuda.is_available(),
        te=te,
        apex=_version("apex")[0] is not None,
        mamba_ssm=_version("mamba_ssm")[0],
        triton=_version("triton")[0],
        causal_conv1d=_version("causal_conv1d")[0],
        te_error=te_error,
    )


def detect() -> Environment:
    """The detected environment (computed once per process)."""
    return _override if _override is not None else _detect()


@contextlib.contextmanager
def override_detection(**fields) -> Iterator[Environment]:
    """Test hook: pretend the environment differs in ``fields`` (e.g. ``te=None``)."""
    global _override
    previous = _override
    _override = dataclasses.replace(detect(), **fields)
    try:
        yield _override
    finally:
        _override = previous


class LocalBackend(LocalSpecProvider):
    """Megatron-Core's local (torch) modules; norms are :class:`LocalNorm` (SP-capable)."""

    name = "local"

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, **_later) -> type:
        # **_later: provider kwargs added after 0.16 (has_residual in 0.18), see megacpp_mcore.spec.compat
        return LocalNorm

    def linear(self) -> type:
        """A replicated (non-tensor-parallel) linear, as TE's ``TELinear`` is used upstream."""
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear

        return ColumnParallelLinear


def _te_backend_class() -> type:
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    class TEBackend(TESpecProvider):
        """Transformer Engine modules; the production path on GPUs."""

        name = "te"

    return TEBackend


def resolve_backend_name(requested: str) -> str:
    """Maps ``auto``/``te``/``local`` to the backend that will be built; raises if unusable."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; allowed: {', '.join(BACKENDS)}")
    env = detect()
    te_ok = env.te is not None and env.cuda
    if requested == "auto":
        return "te" if te_ok else "local"
    if requested == "te" and not te_ok:
        missing = []
        if env.te is None:
            missing.append(
                "Transformer Engine is not importable"
                + (f" ({env.te_error})" if env.te_error else "")
                + "; install it with `pip install 'megacpp-mcore[te]'` on a CUDA host"
            )
        if not env.cuda:
            missing.append("no CUDA device is visible (torch.cuda.is_available() is False)")
        raise BackendUnavailable(
            "backend 'te' is not usable here: " + "; ".join(missing) + ". Use backend='local' "
            "(torch modules, CPU-capable) or backend='auto'."
        )
    return requested


def get_backend(requested: str = "auto"):
    """The backend provider object for ``requested`` (``auto``, ``te`` or ``local``)."""
    name = resolve_backend_name(requested)
    return _te_backend_class()() if name == "te" else LocalBackend()


def require(package: str, feature: str) -> str:
    """Returns the version of optional ``package`` (``mamba_ssm``, ``triton``) or raises with the fix."""
    version = getattr(detect(), package)
    if not version:
        raise BackendUnavailable(
            f"{feature} needs the optional package {package!r}, which is not importable here; "
            f"install it (pip install {package.replace('_', '-')}) or use the portable path"
        )
    return version
