"""Mixture-of-Depths (MoD): a per-token router decides how much a token pays for a layer.

:func:`mod_layer_spec` wraps the spec of an ``A``/``E`` layer (``M``/``R`` only when the placement
opts in) into :class:`MoDLayer`, a subclass of the wrapped ``TransformerLayer`` class built from
the very same submodules (upstream parameter names are kept; the router adds ``mod_router.*``).
The router is a replicated ``Linear(h, 1)`` read on the layer INPUT (pre-norm), in fp32.

Modes (``MoDConfig.mode``):

* ``gateskip`` (default): every token goes through the block; the gate ``g = sigmoid(router)``
  scales the block's residual contribution, ``y = x + g * f(x)``. A sparsity loss
  ``w_s * relu(mean(g) - budget)^2`` pushes the gate mass under a token budget that decays
  linearly over training (``budget_start -> budget_end`` over ``budget_steps``, or over the run;
  driven by the training iteration: see "Any loop" below). ``inference="hard"`` (eval only)
  keeps, per sequence, the ``ceil(budget * T)`` highest-gate tokens and lets the others pass
  through exactly: the budget training wrote is the budget inference reads.
* ``threshold``: tokens with ``g < threshold`` skip the block (``torch.where`` on a mask: static
  shapes, the block still runs on all tokens); processed tokens get ``x + g * f(x)``.
* ``topk`` (original MoD): per sequence, the ``ceil(capacity * T)`` tokens with the highest router
  logits are gathered (in sequence order, so the causal mask stays right), processed, weighted by
  ``g`` so the router learns, and scattered back; unselected tokens pass through exactly
  (:mod:`.topk`: route -> dispatch -> combine). An auxiliary BCE loss teaches
  ``sigmoid(router) > 0.5`` to predict the top-k choice, so ``inference="causal"`` (eval) can
  decide per token without looking at future tokens.

The gate is applied inside the wrapped layer's bias-dropout-add (the residual seam), so a gate of
exactly 1 reproduces the unwrapped layer bit for bit. Forward has static shapes (``topk``'s ``k``
follows from the sequence length) and no host synchronisation; statistics stay on device until
``megacpp_stats()`` is called after the step (:mod:`.stats`).

Parallelism. Router weights are replicated (``tensor_model_parallel=False``). Without sequence
parallelism every TP rank sees the full sequence and computes identical routes. With SP:
``gateskip``/``threshold`` route each token on the rank that owns it (a per-token decision needs
nothing else), so the router's gradient is partial per rank and its parameters are flagged
``sequence_parallel`` (``finalize_model_grads`` all-reduces them over TP); the gate mean of the
sparsity loss is all-reduced over TP (:func:`.gate.global_mean`). ``topk`` needs the whole
sequence to rank tokens: its :class:`.topk.TopkDispatcher` all-gathers the hidden states, routes
on the full sequence (identical on all TP ranks, router NOT flagged), splits the ``k`` selected
tokens over the TP ranks for the wrapped block (``k`` is rounded up to a multiple of the TP size)
and gathers them back.

Side contracts of the wrapped block. MoE auxiliary losses are attached inside the block and keep
flowing (the block output is always part of the graph). MoDA depth pushes happen inside the wrapped
attention: in ``gateskip``/``threshold`` the wrapped layer runs on every position, so a push covers
all positions (:attr:`MoDLayer.attention_sees_all_positions` is True). In ``topk`` the wrapped
attention only sees the ``k`` selected positions, so a depth push from inside it would cover those
only; :func:`mod_layer_spec` therefore refuses ``topk`` on a layer that also carries MoDA.
In ``topk`` an ``E`` layer's MoE router (and its load-balancing loss) sees the selected tokens only.

Losses. The sparsity loss and the top-k router's BCE ride on the gate's own backward
(:class:`.gate.SparsityGate`, :class:`.gate.FusedGateSkip`, :class:`.topk.TopkRouteIn`), so the
gate is the one control surface of LM loss, sparsity loss and router loss. Their scale is the one
Megatron's pipeline schedule sets for every auxiliary loss (:func:`.gate.aux_loss_scale`:
``MoEAuxLossAutoScaler``'s, ``1 / num_microbatches`` for a per-micro-batch mean LM loss), so they
are scaled right under any Megatron loop (ours or ``pretrain_gpt.py``'s; for models without MoE
the ``aux-loss-scale-without-moe`` patch makes the schedule set it).

Any loop. The budget follows the training iteration of whatever loop trains: ``megacpp-mcore
train`` calls ``megacpp_set_step(step, total_steps=)`` before every step; without such a call (stock
``pretrain_gpt.py``, with or without the package's launcher) every forward reads Megatron-LM's own
position (:func:`megacpp_mcore.spec.compat.training_iteration`: its ``curr_iteration`` and
``train_iters``) and moves the budget when it changes; while that loop runs, the statistics of
every training forward also go to Megatron's MoE metrics tracker (:class:`.stats.TrackerMetrics`),
which Megatron-LM's ``training_log`` prints and writes to tensorboard each iteration
(``docs/upstream.md`` says what each release shows without the launcher). Other loops read
``megacpp_stats()`` (``train/stats.py``), so their forwards pay nothing for the tracker.

Performance. A gateskip layer with one residual seam (every split ``A``/``E`` layer) reads its
router AT the seam, where the layer input is also the residual (:class:`.gate.FusedGateSkip`:
``y = x + sigmoid(x . w + b) * out``, the router's input gradient folded into the residual
gradient). Other gateskip cases (forced gate, hard-budget eval, dropout, two seams) and
``threshold`` read the router before the block and apply the gate with one ``addcmul`` in the
bias-dropout-add. A topk layer's attention and MLP run on the ``k`` gathered tokens only; its
attention (:class:`.rope.TokenRopeAttention`) applies their RoPE as a flat ``[k*b]`` sequence, so
TE's fused RoPE kernel runs on top-k layers too; MLA, which builds its own rotary table, is handed
the tokens' positions (:func:`.rope.gathered_rotary`; its fused RoPE is refused). On CUDA the fused gateskip seam and the top-k
routing are Triton kernels (:mod:`.kernels`; ``MoDConfig.kernels``, resolved when the layer is
built). A top-k layer's GPU work is small enough that its host time (Megatron's layer code plus the
routing, a few ms per layer) exceeds it: where no dense layer before it has built the host a lead
(block 0 routed, at the start of a step), the GPU waits (see ``docs/benchmarks.md``).
With Transformer Engine, attention layers of two shapes (topk and dense) alternate, and TE's
process-wide one-entry backend-selection cache then re-runs its CPU-side selection on every call;
``patches.te_attention_backend_per_layer`` gives each attention layer its own cache entry
(``scripts/bench_mod.py`` applies it and counts selections).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.random import get_data_parallel_rng_tracker_name
from megatron.core.transformer.identity_op import IdentityFuncOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megacpp_mcore.features.mod.config import MoDConfig
from megacpp_mcore.features.mod.gate import (
    FusedGateSkip,
    SparsityGate,
    budget_mask,
    global_mean,
    router_logits,
    triton_kernels,
)
from megacpp_mcore.features.mod.rope import (
    check_gather,
    check_gatherable,
    gathered_rotary,
    with_token_rope,
)
from megacpp_mcore.features.mod.stats import MoDStats, TrackerMetrics
from megacpp_mcore.features.mod.topk import TopkDispatcher
from megacpp_mcore.spec import compat
from megacpp_mcore.spec.context import LayerContext
from megacpp_mcore.spec.pattern import FeaturePlacement


@dataclasses.dataclass
class _Route:
    """What the gated bias-dropout-add of the current forward applies."""

    weight: torch.Tensor | None  # [s, b, 1] in the activation dtype: scales the block's contribution
    mask: torch.Tensor | None = None  # [s, b, 1] bool: False -> the token passes through exactly
    # Fused gateskip (weight None): the layer input, read by the router at the residual seam.
    router_input: torch.Tensor | None = None


class MoDLayer(TransformerLayer):
    """A ``TransformerLayer`` (or subclass) whose residual contributions are routed per token.

    Built by :func:`mod_layer_spec` from the wrapped spec's submodules plus ``mod=MoDConfig``
    and ``mod_layers`` (how many layers of the model carry MoD; None: unknown, the tracker gets
    unscaled values). Exposes ``megacpp_set_step(step, total_steps=None)`` (budget schedule) and
    ``megacpp_stats()`` (per-layer fraction processed, gate mean, loss terms, budget; averaged over
    the forwards since the last step change).
    """

    def __init__(self, config, submodules, layer_number: int = 1, *, mod: MoDConfig,
                 mod_layers: int | None = None, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        self.mod = mod
        if mod.mode == "topk" and config.fused_single_qkv_rope:
            raise ValueError(
                f"MoD topk on layer {self.layer_number}: gathered tokens carry per-token rotary "
                "embeddings [k, b, 1, d], which the fused single-QKV RoPE kernel does not take; "
                "set fused_single_qkv_rope=False (apply_rope_fusion is fine)"
            )
        graphs = compat.graphs_capturing_layers(config)
        if graphs is not None:
            raise ValueError(
                f"MoD on layer {self.layer_number}: CUDA graphs ({graphs}) would capture this "
                "layer, and a captured forward bypasses MoD's gate and freezes its token budget; "
                "with MoD allowed: cuda_graph_impl='none', or capture only "
                f"{sorted(compat.LAYER_FREE_GRAPH_MODULES)} (Megatron-LM: --cuda-graph-scope "
                "mamba, 0.19: --cuda-graph-modules mamba)"
            )
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.mod_router = torch.nn.Linear(config.hidden_size, 1, bias=True, device=device,
                                          dtype=config.params_dtype)
        self._init_router()
        self.router_scale = mod.router_multiplier(config.hidden_size)  # MoDConfig.router_scale
        for param in self.mod_router.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
            # Per-token routing on the local SP shard gives partial gradients per TP rank; topk
            # routes on the gathered sequence, identically on every rank (full gradients).
            param.sequence_parallel = bool(config.sequence_parallel and mod.mode != "topk")
        gated = 0
        for name in ("self_attn_bda", "mlp_bda"):
            bda = getattr(self, name)
            if not isinstance(bda, IdentityFuncOp):  # identity slots carry no contribution
                setattr(self, name, functools.partial(self._gated_bda, bda))
                gated += 1
        if not gated:
            raise ValueError(
                f"MoD on layer {self.layer_number}: the wrapped layer has no residual sub-layer "
                "(both bias-dropout-add slots are identity), so there is nothing to route"
            )
        self._gated_sites = gated
        # Triton kernels or torch ops, decided once here (used on CUDA tensors only)
        self._triton = triton_kernels(mod.kernels, config.hidden_size)
        # the TP group whose SP shards make up the sequence (gate means are reduced over it)
        self._seq_group = self.tp_group if config.sequence_parallel else None
        self._topk = TopkDispatcher(mod, self.tp_group, sequence_parallel=config.sequence_parallel,
                                    use_triton=self._triton) if mod.mode == "topk" else None
        self._route: _Route | None = None
        self._forced_gate: float | None = None
        self._budget = mod.budget_start if mod.budget_steps is None else mod.budget(0)
        self._stats = MoDStats(mod, self._budget)
        # where the budget's step comes from: "loop" once megacpp_set_step was called, else each
        # forward reads Megatron-LM's iteration (compat.training_iteration); last position seen
        self._loop_driven = False
        self._position: tuple[int, int] | None = None
        # whether this forward's statistics also go to Megatron's metrics tracker: while a
        # Megatron-LM training loop drives the layer (its training_log reports the tracker)
        self._to_tracker = False
        scale = compat.tracker_layer_count(config) / mod_layers if mod_layers else 1.0
        self._tracker = TrackerMetrics(mod, layer_number=self.layer_number,
                                       size=compat.tracker_size(config), scale=scale)

    def _init_router(self) -> None:
        weight, bias = self.mod_router.weight, self.mod_router.bias
        with torch.no_grad():
            bias.fill_(self.mod.router_bias_init)
            if not self.config.perform_initialization:
                return
            tracker = tensor_parallel.get_cuda_rng_tracker()
            if tracker.is_initialized():  # same stream on every TP rank: replicated weights agree
                with tracker.fork(get_data_parallel_rng_tracker_name()):
                    weight.normal_(0.0, self.mod.router_init_std)
            else:
                weight.normal_(0.0, self.mod.router_init_std)

    def router_weight(self) -> torch.Tensor:
        """The router's effective weight: ``mod_router.weight`` times :attr:`router_scale` (one
        ``[1, h]`` product in the graph, so the parameter's gradient carries the factor)."""
        weight = self.mod_router.weight
        return weight if self.router_scale == 1.0 else weight * self.router_scale

    # ----------------------------------------------------------------------------- public hooks
    @property
    def attention_sees_all_positions(self) -> bool:
        """True when, in training, the wrapped attention runs on every position (so MoDA depth
        pushes cover all positions): gateskip/threshold see the full ``[s, b, h]`` sequence; topk
        only the ``k`` selected tokens (unless capacity is 1). See :meth:`_run_inner`."""
        return not self.mod.gathers

    def force_gate(self, value: float | None) -> None:
        """Ablation/test hook: use a constant gate ``value`` instead of ``sigmoid(router)``
        (routing decisions still come from the router); ``None`` restores the learned gate."""
        self._forced_gate = None if value is None else float(value)

    def megacpp_set_step(self, step: int, total_steps: int | None = None) -> None:
        """Sets the budget for training ``step`` of a ``total_steps`` run (needed when
        ``budget_steps`` is None) and starts a new statistics window. From the first call on, the
        layer stops reading Megatron-LM's iteration: the calling loop drives it."""
        self._loop_driven = True
        self._set_budget(step, total_steps)

    def _set_budget(self, step: int, total_steps: int | None) -> None:
        self._budget = self.mod.budget(step, total_steps)
        self._stats.start_window(self._budget)

    def _follow_megatron(self) -> None:
        """Without a loop calling :meth:`megacpp_set_step`: the budget of Megatron-LM's current
        iteration (a new statistics window when it changes); nothing when no such loop runs."""
        position = compat.training_iteration()
        self._to_tracker = self.training and position is not None
        if position is not None and position != self._position:
            self._position = position
            self._set_budget(*position)

    def megacpp_stats(self) -> dict[str, float]:
        """Means since the last ``megacpp_set_step``: fraction processed, gate mean, losses."""
        return self._stats.means()

    @property
    def budget(self) -> float:
        return self._budget

    # ---------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self._loop_driven:
            self._to_tracker = False
        else:
            self._follow_megatron()
        if self.mod.mode == "topk" and not (not self.training and self.mod.inference == "causal"):
            return self._forward_topk(hidden_states, *args, **kwargs)
        if self._fused_gateskip():
            # the router runs at the residual seam (_gated_bda -> FusedGateSkip), where the gate
            # is needed: one fused op instead of router GEMV + gate ops + addcmul
            self._route = _Route(weight=None, router_input=hidden_states)
            try:
                output, context = super().forward(hidden_states, *args, **kwargs)
            finally:
                self._route = None
            self._record_fraction(1.0, hidden_states)
            return output, context
        logits, gate = self._gate(hidden_states)
        mask = None
        if self.mod.mode == "threshold":
            mask = gate.detach() >= self.mod.threshold
        elif self.mod.mode == "topk":  # eval, causal: the per-token predictor trained by the BCE
            mask = logits.detach() >= 0.0
        elif not self.training and self.mod.inference == "hard":
            mask = budget_mask(gate.detach(), self._budget, self._seq_group)
        output, context = self._run_inner(hidden_states, self._weight(gate), mask, *args, **kwargs)
        fraction = 1.0 if mask is None else global_mean(mask.float(), self._seq_group)[0]
        self._record_fraction(fraction, hidden_states)
        return output, context

    def _record_fraction(self, fraction, hidden_states: torch.Tensor) -> None:
        """The forward's fraction of tokens processed, in the layer's statistics and (training)
        Megatron's metrics tracker, with the budget it trained against."""
        self._stats.record("fraction_processed", fraction)
        if self._to_tracker:
            self._tracker.step(fraction, self._budget, hidden_states.device)

    def _fused_gateskip(self) -> bool:
        """gateskip with the learned gate, no hard budget mask, one residual seam and no dropout
        (every layer of a split ``A``/``E`` stack) takes :class:`.gate.FusedGateSkip`."""
        return (self.mod.mode == "gateskip" and self._forced_gate is None and self._gated_sites == 1
                and (self.training or self.mod.inference == "soft")
                and (self.config.hidden_dropout == 0.0 or not self.training))

    def _with_sparsity_loss(self) -> bool:
        return self.training and torch.is_grad_enabled() and self.mod.sparsity_loss_weight > 0

    def _gate(self, hidden_states: torch.Tensor):
        """Router logits ``[s, b, 1]`` (fp32) and the gate, its mean recorded; in training the
        sparsity loss rides on the gate's backward (:class:`.gate.SparsityGate`)."""
        logits = router_logits(hidden_states, self.router_weight(), self.mod_router.bias)  # [s, b, 1]
        if self._with_sparsity_loss():
            gate, gate_mean = SparsityGate.apply(logits, self.mod.sparsity_loss_weight,
                                                 self._budget, self._seq_group)
        else:
            gate = torch.sigmoid(logits)
            gate_mean = global_mean(gate, self._seq_group)[0]
        self._record_gate(gate_mean)
        return logits, gate

    def _record_gate(self, gate_mean: torch.Tensor) -> None:
        self._stats.record("gate_mean", gate_mean)
        if self._to_tracker:
            self._tracker.gate(gate_mean, self._budget)

    def _weight(self, gate: torch.Tensor) -> torch.Tensor:
        """The gate that scales the block's contribution (``force_gate`` overrides its value; the
        product with 0 keeps the gate in the graph so the losses riding on its backward flow)."""
        if self._forced_gate is not None:
            return gate * 0.0 + self._forced_gate
        return gate

    def _run_inner(self, hidden_states, weight, mask, *args, **kwargs):
        """The wrapped layer's forward with ``weight``/``mask`` applied at its residual seam.

        MoDA seam: this is the only place the wrapped layer (its attention, and any depth K/V push
        made from inside it) runs. gateskip/threshold pass every position here; topk passes the
        gathered ``k`` tokens, which is why topk is refused on MoDA layers.
        """
        if weight.dtype != hidden_states.dtype:
            weight = weight.to(hidden_states.dtype)
        self._route = _Route(weight=weight, mask=mask)
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            self._route = None

    def _gated_bda(self, bda_factory, training: bool, fused: bool):
        """Replaces ``self_attn_bda``/``mlp_bda``: ``residual + weight * (out + bias)``, masked."""
        bda = bda_factory(training, fused)

        def gated(x_with_bias, residual, prob):
            route = self._route
            if route is None:
                raise RuntimeError("MoDLayer bias-dropout-add called outside MoDLayer.forward")
            out, bias = x_with_bias
            if route.weight is None:  # fused gateskip (see forward)
                if (bias is None and residual is route.router_input and out.dtype == residual.dtype
                        and out.shape == residual.shape and (prob == 0.0 or not training)):
                    return self._fused_gate(residual, out)
                route.weight = self._weight(self._gate(route.router_input)[1]).to(residual.dtype)
            if bias is not None:
                out = out + bias
            if (prob == 0.0 or not training) and out.dtype == residual.dtype:  # no dropout:
                # one fused op (a custom backward skipping addcmul's scaled copies measured no
                # better on host-bound steps: the Python Function costs what the kernels save)
                mixed = torch.addcmul(residual, out, route.weight)
            else:
                mixed = bda((out * route.weight, None), residual, prob)  # [s, b, h]
            if route.mask is not None:
                mixed = torch.where(route.mask, mixed, residual)
            return mixed

        return gated

    def _fused_gate(self, residual: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        mixed, gate_mean = FusedGateSkip.apply(
            residual, out, self.router_weight(), self.mod_router.bias,
            self.mod.sparsity_loss_weight if self._with_sparsity_loss() else 0.0, self._budget,
            self._seq_group, self._triton and residual.is_cuda)
        self._record_gate(gate_mean)
        return mixed

    # ------------------------------------------------------------------------------ topk path
    def _forward_topk(self, hidden_states, *args, **kwargs):
        """Route -> dispatch -> the wrapped layer on the ``k`` chosen tokens -> combine
        (:class:`.topk.TopkDispatcher`; ``hidden_states``: ``[s/tp, b, h]`` under SP)."""
        check_gatherable(args, kwargs, "MoD topk", self.layer_number)
        aux_weight = self.mod.router_aux_loss_weight if self.training else 0.0
        route = self._topk.route(hidden_states, self.router_weight(), self.mod_router.bias, aux_weight)
        self._stats.record_topk(route.logits, route.idx.unsqueeze(-1))
        if self._to_tracker:
            self._tracker.topk(route.logits, route.idx.unsqueeze(-1))
        kwargs["rotary_pos_emb"] = gathered_rotary(self.self_attention, kwargs.pop("rotary_pos_emb", None),
                                                   route.idx, route.full.shape[0], "MoD topk")
        tokens, weight = self._topk.dispatch(route, self._weight(route.gate))
        processed, context = self._run_inner(tokens, weight, None, **kwargs)
        out = self._topk.combine(route, processed)
        self._record_fraction(route.idx.shape[0] / route.full.shape[0], hidden_states)
        return out, context


@functools.cache
def mod_layer_class(cls: type) -> type:
    """The MoD subclass of a ``TransformerLayer`` class (``MoDLayer`` for the plain one)."""
    if not (isinstance(cls, type) and issubclass(cls, TransformerLayer)):
        raise ValueError(
            f"MoD wraps TransformerLayer-based blocks (it routes at their bias-dropout-add "
            f"residual seam); {cls!r} is not one"
        )
    if issubclass(cls, MoDLayer):
        raise ValueError(f"{cls.__name__} is already MoD-wrapped")
    if cls is TransformerLayer:
        return MoDLayer
    return type(f"MoD{cls.__name__}", (MoDLayer, cls), {"__module__": __name__})


def mod_layer_spec(spec: ModuleSpec, ctx: LayerContext) -> ModuleSpec:
    """MoD's transform at the ``layer`` seam: wraps layer ``ctx.index``'s spec with the MoD config
    in ``ctx.feature_configs["mod"]`` (a :class:`MoDConfig`, or a bare ``FeaturePlacement`` for
    the defaults)."""
    config = ctx.feature("mod")
    if isinstance(config, FeaturePlacement):
        config = MoDConfig(placement=config)
    if not isinstance(config, MoDConfig):
        raise ValueError(
            f"layer {ctx.index} ({ctx.symbol!r}): feature 'mod' needs a MoDConfig or a "
            f"FeaturePlacement, got {config!r}"
        )
    if config.gathers and ctx.has("moda"):
        raise ValueError(
            f"layer {ctx.index} ({ctx.symbol!r}) carries both MoD topk and MoDA: the wrapped "
            "attention only sees the selected tokens, so its depth K/V push would miss the other "
            "positions; use MoD mode 'gateskip' or 'threshold' on MoDA layers"
        )
    if config.gathers:
        check_gather(ctx, "MoD topk")
    try:
        module = mod_layer_class(spec.module)
    except ValueError as exc:
        raise ValueError(f"layer {ctx.index} ({ctx.symbol!r}): {exc}") from None
    submodules = spec.submodules
    if config.mode == "topk" and dataclasses.is_dataclass(submodules):
        submodules = with_token_rope(submodules)
    # the model's MoD layer count (its logged statistics are averaged over them); unknown without
    # the builder's table
    mod_layers = sum("mod" in entry.features for entry in ctx.model_table) or None
    return ModuleSpec(module=module, params={**(spec.params or {}), "mod": config,
                                             "mod_layers": mod_layers},
                      submodules=submodules)
