"""The one place that detects optional packages and picks the backend.

Two backends build every symbol and feature:

* ``te``: Transformer Engine modules (fused norm+linear, ``TEDotProductAttention``, grouped GEMM);
* ``local``: Megatron-Core's torch-native modules, runnable on CPU; the parity reference.

Every backend difference a layer needs is a provider method (Megatron's ``BackendSpecProvider``
plus ``mla_core_attention``, ``mla_projections``, ``mla_problems``, ``moda_cuda_kernel`` and
``mamba_mixer``): layer code never branches on the backend name.

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

# TE fused attention (cuDNN / flash) limits on sm80+/sm90 for bf16: head dims multiple of 8, <= 256.
TE_HEAD_DIM_MULTIPLE = 8
TE_MAX_HEAD_DIM = 256


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
    # Why each optional kernel package that is installed did not import: (package, reason) pairs.
    import_errors: tuple[tuple[str, str], ...] = ()


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
    found, errors = {}, []
    for package in ("mamba_ssm", "triton", "causal_conv1d"):
        found[package], reason = _version(package)
        if reason and f"No module named '{package}'" not in reason:
            errors.append((package, reason))  # installed but broken: say why when it is required
    return Environment(
        cuda=torch.cuda.is_available(),
        te=te,
        apex=_version("apex")[0] is not None,
        te_error=te_error,
        import_errors=tuple(errors),
        **found,
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

    def moe_grouped_gemm(self, requested: bool) -> bool:
        """Local experts are a ``SequentialMLP`` whatever the config asks: upstream's local
        grouped-GEMM experts (``GroupedMLP``) need the separate ``grouped_gemm`` package, which a
        CUDA host rarely has (the model failed to build there with ``--backend local``)."""
        return False

    # --- MLA (megacpp_mcore.layers.mla) ---
    def mla_core_attention(self) -> type:
        """Local core attention taking MLA's ``k_channels``/``v_channels`` and ``thd`` batches."""
        from megacpp_mcore.layers.mla import LatentDotProductAttention

        return LatentDotProductAttention

    def mla_projections(self, latent_norm: bool) -> dict[str, type]:
        """MLA's down/up projections and latent norms (``MLASelfAttentionSubmodules`` fields).

        The down projections are ``ColumnParallelLinear`` exactly (upstream's allow-list compares
        classes), sharded over TP before MLA's gather; the latent norms are explicit modules.
        """
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear
        from megatron.core.transformer.identity_op import IdentityOp

        norm = self.layer_norm(for_qk=True) if latent_norm else IdentityOp
        up = self.column_parallel_linear()
        return dict(linear_q_down_proj=ColumnParallelLinear, linear_q_up_proj=up,
                    linear_kv_down_proj=ColumnParallelLinear, linear_kv_up_proj=up,
                    q_layernorm=norm, kv_layernorm=norm)

    @staticmethod
    def mla_problems(config) -> list[str]:
        """Why this backend cannot run ``config``'s MLA shape (empty when it can)."""
        tp, problems = config.tensor_model_parallel_size, []
        if (config.kv_lora_rank + config.qk_pos_emb_head_dim) % tp:
            problems.append(
                f"kv_lora_rank + qk_pos_emb_head_dim = "
                f"{config.kv_lora_rank + config.qk_pos_emb_head_dim} is not divisible by tp={tp}"
            )
        if config.q_lora_rank is not None and config.q_lora_rank % tp:
            problems.append(f"q_lora_rank={config.q_lora_rank} is not divisible by tp={tp}")
        if config.context_parallel_size > 1:
            problems.append("context parallelism needs TE attention")
        if config.apply_rope_fusion:
            problems.append("apply_rope_fusion needs TE/triton kernels")
        return problems

    # --- MoDA (megacpp_mcore.features.moda) ---
    @staticmethod
    def moda_cuda_kernel(requested: str, *, equal_dims: bool) -> str:
        """The sequence kernel a MoDA depth-reading layer runs on CUDA (``MoDAConfig.cuda_kernel``
        with ``"auto"`` resolved): torch's own FlashAttention-2 (aten) on the local backend."""
        return "flash" if requested == "auto" else requested

    # --- mixers (megacpp_mcore.layers.mixers) ---
    def mamba_mixer(self, config) -> tuple[type, type]:
        """The ``M`` mixer class and its submodules dataclass: the portable torch SSD mixer."""
        from megacpp_mcore.layers.mixers.mamba import MambaSubmodules, TorchMambaMixer

        return TorchMambaMixer, MambaSubmodules


def _te_backend_class() -> type:
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    class TEBackend(TESpecProvider):
        """Transformer Engine modules; the production path on GPUs."""

        name = "te"

        def moe_grouped_gemm(self, requested: bool) -> bool:
            """TE's grouped-GEMM experts when the config asks for them."""
            return requested

        # --- MLA (megacpp_mcore.layers.mla) ---
        def mla_core_attention(self) -> type:
            """TE core attention that pads MLA's narrower V for ``thd`` batches."""
            from megacpp_mcore.layers.mla import te_core_attention_class

            return te_core_attention_class()

        def mla_projections(self, latent_norm: bool) -> dict[str, type]:
            """MLA's projections: ``TELinear`` down projections ('duplicated'; upstream's
            allow-list compares the exact class), latent norms fused into the up projections."""
            from megatron.core.transformer.identity_op import IdentityOp

            up = self.column_parallel_layer_norm_linear() if latent_norm else self.column_parallel_linear()
            return dict(linear_q_down_proj=self.linear(), linear_q_up_proj=up,
                        linear_kv_down_proj=self.linear(), linear_kv_up_proj=up,
                        q_layernorm=IdentityOp, kv_layernorm=IdentityOp)

        @staticmethod
        def mla_problems(config) -> list[str]:
            """Why TE cannot run ``config``'s MLA shape (empty when it can); reads no TE module."""
            problems = []
            tp = config.tensor_model_parallel_size
            if tp > 1 and not config.sequence_parallel:
                # Without SP the duplicated down projection gets a rope-key gradient from this
                # rank's heads only and its replicas drift apart across TP ranks (0.16-0.19).
                problems.append(f"tp={tp} needs sequence_parallel=True (duplicated down projection)")
            channels = {"k_channels": config.qk_head_dim + config.qk_pos_emb_head_dim,
                        "v_channels": config.v_head_dim}
            for name, value in channels.items():
                if value % TE_HEAD_DIM_MULTIPLE or value > TE_MAX_HEAD_DIM:
                    problems.append(
                        f"{name}={value} must be a multiple of {TE_HEAD_DIM_MULTIPLE} and at most "
                        f"{TE_MAX_HEAD_DIM} for TE fused attention"
                    )
            return problems

        # --- MoDA (megacpp_mcore.features.moda) ---
        @staticmethod
        def moda_cuda_kernel(requested: str, *, equal_dims: bool) -> str:
            """MoDA's CUDA sequence kernel with ``"auto"`` resolved: TE's fused attention (the
            cuDNN kernel of ``TEDotProductAttention``, with its softmax statistics) when the K/V
            head dims are equal, else FlashAttention-2 (aten), which pads MLA's narrower V."""
            if requested != "auto":
                return requested
            return "te" if equal_dims else "flash"

        # --- mixers (megacpp_mcore.layers.mixers) ---
        def mamba_mixer(self, config) -> tuple[type, type]:
            """Megatron-Core's ``MambaMixer`` (mamba_ssm kernels) adapted to the attention slot."""
            require("mamba_ssm", "the 'M' block on the te backend (Megatron-Core MambaMixer)")
            if config.use_mamba_mem_eff_path and not fused_conv_available():
                raise BackendUnavailable(
                    "the 'M' block's fused MambaMixer path (use_mamba_mem_eff_path=True) needs "
                    "causal_conv1d; install it (pip install causal-conv1d) or set "
                    "use_mamba_mem_eff_path=False"
                )
            from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules

            from megacpp_mcore.layers.mixers.mamba import fast_mixer_class

            return fast_mixer_class(), MambaMixerSubmodules

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
    return provider(resolve_backend_name(requested))


def provider(name: str):
    """The provider of backend ``name`` (``te`` or ``local``) without checking that this host can
    run it: its ``mla_problems`` answer for a launch elsewhere (no TE module is read)."""
    if name not in ("te", "local"):
        raise ValueError(f"unknown backend {name!r}; allowed: te, local")
    return _te_backend_class()() if name == "te" else LocalBackend()


def fused_conv_available() -> bool:
    """Whether MambaMixer's fused ("mem-eff") path can run: it needs causal_conv1d."""
    return detect().causal_conv1d is not None


def require(package: str, feature: str) -> str:
    """Returns the version of optional ``package`` (``mamba_ssm``, ``triton``) or raises with the fix."""
    env = detect()
    version = getattr(env, package)
    if not version:
        reason = dict(env.import_errors).get(package)
        if reason:
            raise BackendUnavailable(
                f"{feature} needs the optional package {package!r}, which is installed but does "
                f"not import here ({reason}); repair its install or use the portable path"
            )
        raise BackendUnavailable(
            f"{feature} needs the optional package {package!r}, which is not importable here; "
            f"install it (pip install {package.replace('_', '-')}) or use the portable path"
        )
    return version
