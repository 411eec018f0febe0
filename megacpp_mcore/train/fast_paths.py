"""The hot-path switches of the one model builder (:func:`megacpp_mcore.train.runtime.transformer_config`).

Each switch is a ``TransformerConfig`` setting (or a small group of them) that changes which kernels
run, never what is computed, so that a benchmark can measure it on and off in one call
(``scripts/bench_stage.py`` sets the same switches through Megatron-LM's flags). ``FastPaths()``
reproduces the builder's defaults:

=====================  ==========================================  ================================
switch                 default                                     TransformerConfig fields
=====================  ==========================================  ================================
``mamba_fused``        on when causal_conv1d is installed          ``use_mamba_mem_eff_path``
``fused_residual``     on with CUDA                                ``bias_dropout_fusion``
``rope_fusion``        on with CUDA and TE's fused RoPE (non-MLA)  ``apply_rope_fusion``
``mla_rope_fusion``    off                                         ``apply_rope_fusion``,
                                                                   ``rope_type="yarn"`` at factor 1
``moe_dispatcher``     ``alltoall`` with CUDA, else ``allgather``  ``moe_token_dispatcher_type``
``moe_permute_fusion`` on with CUDA and TE's fused permutation     ``moe_permute_fusion``
``moe_router_fusion``  off                                         ``moe_router_fusion``
``cross_entropy_fusion`` off                                       ``cross_entropy_loss_fusion``
``cuda_graphs``        ``none``                                    ``cuda_graph_impl``
``fp8``                None (bf16)                                 ``fp8``, ``fp8_recipe``
=====================  ==========================================  ================================

TE's fused MoE permutation is on by default where it is installed: x1.051 (H200) and x1.038 (H100)
at the full-width 12-layer NAM56R stage (``docs/benchmarks.md``); the recipes pass
``--moe-permute-fusion`` for the same reason.

MLA's fused RoPE kernels (megatron-core's ``fused_mla_yarn_rope_apply``) exist only on MLA's YaRN
path; YaRN at scaling factor 1 (``mscale`` 1, ``mscale_all_dim`` 0) computes exactly the rotary
embedding of ``rope_type="rope"``, so the switch moves MLA onto that path without changing the
model. Megatron-LM's ``pretrain_gpt.py`` already builds MLA that way (``--rope-type`` unset gives
YaRN, ``--rotary-scaling-factor`` defaults to 1, rope fusion is on unless ``--no-rope-fusion``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

DISPATCHERS = ("alltoall", "allgather", "flex")
CUDA_GRAPH_IMPLS = ("none", "local", "transformer_engine")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")
#: the named (not on/off) switches and their values
CHOICES = {"moe_dispatcher": DISPATCHERS, "cuda_graphs": CUDA_GRAPH_IMPLS, "fp8": FP8_FORMATS,
           "fp8_recipe": FP8_RECIPES}
#: the TransformerConfig fields the switches set (a receipt records their values as built)
CONFIG_FIELDS = ("use_mamba_mem_eff_path", "bias_dropout_fusion", "apply_rope_fusion", "rope_type",
                 "moe_token_dispatcher_type", "moe_permute_fusion", "moe_router_fusion",
                 "cross_entropy_loss_fusion", "cuda_graph_impl", "fp8", "fp8_recipe")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FastPaths:
    """Kernel-path switches; ``None`` means the builder's default for this host (table above)."""

    mamba_fused: bool | None = None
    fused_residual: bool | None = None
    rope_fusion: bool | None = None
    mla_rope_fusion: bool = False
    moe_dispatcher: str | None = None
    moe_permute_fusion: bool | None = None
    moe_router_fusion: bool = False
    cross_entropy_fusion: bool = False
    cuda_graphs: str = "none"
    fp8: str | None = None
    fp8_recipe: str = "delayed"

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"FastPaths.{name}={value!r}; allowed: {', '.join(allowed)}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type.startswith("bool") and value is not None and not isinstance(value, bool):
                raise ValueError(f"FastPaths.{field.name} must be True, False or None, got {value!r}")

    @classmethod
    def from_options(cls, items: list[str]) -> "FastPaths":
        """``NAME=VALUE`` items (``megacpp-mcore train --fast``): on/off for the on/off switches
        (``auto``: this host's default where the switch has one), a name for the others (``fp8``:
        ``off`` is bf16). Raises ``ValueError`` naming the bad item and what is allowed."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for item in items:
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in fields:
                raise ValueError(f"{item!r}: expected NAME=VALUE with NAME one of "
                                 f"{', '.join(fields)}")
            if name in kwargs:
                raise ValueError(f"{item!r}: {name} given twice")
            auto = fields[name].default is None  # the switch has a host default
            if fields[name].type.startswith("bool"):
                table = {"on": True, "off": False, **({"auto": None} if auto else {})}
            else:  # fp8's None is bf16: "off", not "auto"
                none = {"off": None} if name == "fp8" else {"auto": None} if auto else {}
                table = {**none, **{v: v for v in CHOICES[name]}}
            if value not in table:
                raise ValueError(f"{item!r}: {name} takes {', '.join(table)}")
            kwargs[name] = table[value]
        return cls(**kwargs)

    def needs_cuda(self) -> list[str]:
        """The switches set here that only exist on a CUDA host (kernels of TE, Triton, CUDA graphs)."""
        wanted = {"mamba_fused": self.mamba_fused, "fused_residual": self.fused_residual,
                  "rope_fusion": self.rope_fusion, "mla_rope_fusion": self.mla_rope_fusion,
                  # Megatron's alltoall dispatcher makes a CUDA stream; flex needs DeepEP
                  "moe_dispatcher": self.moe_dispatcher in ("alltoall", "flex"),
                  "moe_permute_fusion": self.moe_permute_fusion,
                  "moe_router_fusion": self.moe_router_fusion,
                  "cuda_graphs": self.cuda_graphs != "none", "fp8": self.fp8 is not None}
        return [name for name, on in wanted.items() if on]

    def config_kwargs(self, model: Any, *, cuda: bool, fused_rope: bool, fused_conv: bool,
                      fused_permute: bool = False) -> dict[str, Any]:
        """TransformerConfig fields for ``model`` (a presets.ModelConfig) on this host.

        ``fused_rope`` / ``fused_conv`` / ``fused_permute``: whether TE's fused RoPE, causal_conv1d
        and TE's fused MoE permutation are available (the caller detects them). Raises
        ``ValueError`` naming the switch when it asks for a kernel this host does not have.
        """
        if not cuda and self.needs_cuda():
            raise ValueError(f"FastPaths needs a CUDA device for {', '.join(self.needs_cuda())}; "
                             "leave those unset or off on CPU")
        if self.mamba_fused and not fused_conv:
            raise ValueError("FastPaths.mamba_fused=True needs causal_conv1d (pip install "
                             "causal-conv1d); leave it None to use the fused path where it is installed")
        if self.rope_fusion and model.mla is None and not fused_rope:
            raise ValueError("FastPaths.rope_fusion=True needs Transformer Engine's fused RoPE")
        if self.moe_permute_fusion and not fused_permute:
            raise ValueError("FastPaths.moe_permute_fusion=True needs Transformer Engine's fused MoE "
                             "permutation (TE >= 2.1); leave it None to use it where it is installed")
        if self.mla_rope_fusion and model.mla is None:
            raise ValueError("FastPaths.mla_rope_fusion=True needs a model with MLA (model.mla is None)")
        out: dict[str, Any] = {
            "bias_dropout_fusion": cuda if self.fused_residual is None else self.fused_residual,
            "cross_entropy_loss_fusion": self.cross_entropy_fusion,
            "cuda_graph_impl": self.cuda_graphs,
        }
        if model.mla is None:
            out["apply_rope_fusion"] = fused_rope if self.rope_fusion is None else self.rope_fusion
        else:
            out["apply_rope_fusion"] = self.mla_rope_fusion
            if self.mla_rope_fusion:  # YaRN at factor 1 == RoPE; MLA's fused kernels live there
                out.update(rope_type="yarn", rotary_scaling_factor=1.0, mscale=1.0,
                           mscale_all_dim=0.0, original_max_position_embeddings=model.seq_length)
        if "M" in model.pattern:
            out["use_mamba_mem_eff_path"] = fused_conv if self.mamba_fused is None else self.mamba_fused
        if model.moe is not None:
            out.update(moe_token_dispatcher_type=self.moe_dispatcher or ("alltoall" if cuda else "allgather"),
                       moe_permute_fusion=(fused_permute if self.moe_permute_fusion is None
                                           else self.moe_permute_fusion),
                       moe_router_fusion=self.moe_router_fusion)
        if self.fp8 is not None:
            out.update(fp8=self.fp8, fp8_recipe=self.fp8_recipe)
        return out
