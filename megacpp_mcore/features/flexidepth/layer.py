"""FlexiDepth layers: a per-token router between the wrapped (pretrained) block and an adapter.

:func:`transform` (FlexiDepth's entry at the composer's ``layer`` seam) wraps the spec of an
``A``/``E`` layer (``M``/``R`` only when the placement opts in) into :class:`FlexiDepthLayer`, a
subclass of the wrapped ``TransformerLayer`` class built from the very same submodules: upstream
parameter names are kept (a dense checkpoint's weights load into the backbone as they are) and
FlexiDepth adds ``flexidepth.{norm,router,down,up}.*`` (:class:`.branch.SkipBranch`).

Forward, with ``x [s, b, h]`` the layer input (``[s/tp, b, h]`` under sequence parallelism),
``g [s, b, 1]`` the router score, ``B(x)`` the wrapped layer's output and ``P(x)`` the skip path
(:class:`.config.FlexiDepthConfig` has the formulas):

* training and ``inference="soft"``: ``y = g * B(x) + (1 - g) * P(x)`` -- both branches on every
  token, static shapes; a score of exactly 1 reproduces the wrapped layer bit for bit, exactly 0
  the skip path;
* ``inference="hard"`` (eval): ``y = B(x)`` where ``g >= threshold``, ``P(x)`` elsewhere. On layers
  whose symbol is in ``hard_skip_symbols`` the block really runs on the kept tokens only
  (:class:`.dispatch.SkipDispatcher`: route -> dispatch -> combine, SP inside the dispatcher), or,
  on an ``E`` layer with routed experts and ``hard_skip_moe="route"``, the block runs on every
  token while its MoE router sends the skipped tokens to no expert (:meth:`FlexiDepthLayer._route_kept`);
  elsewhere the block runs on every token and the rows are selected.

Choice of formulation: the paper routes each token to one of the two paths with a thresholded
router and weights the paths' outputs by ``G`` and ``1 - G`` so that the router learns from the LM
loss; here every token takes both paths in training (the soft mixture), which keeps static shapes
and gives the router a gradient on every token, and inference thresholds the same score.

Side contracts of the wrapped block: it runs on every position in training and in soft or
non-gathering hard inference, so MoE auxiliary losses keep flowing (its output stays in the graph
even where ``g = 0``) and a MoDA depth K/V push from its attention covers all positions. A
gathering hard layer's attention sees the kept tokens only, so :func:`transform` refuses MoDA on
such a layer. MoD on the same layer is refused (two routers over one residual contribution have no
defined composition).

Losses and statistics: the usage penalty rides on the score's backward (:mod:`.usage`), scaled by
Megatron's auxiliary-loss scale. ``megacpp_stats()`` gives per layer ``skip_rate`` (fraction of
tokens with ``g < threshold``: routed to the adapter), ``score_mean`` and, on a usage segment's last
layer, ``loss_usage``; :func:`.usage.usage_summary` derives mean layers used and the overall skip
rate. Parallelism: the branch's parameters are replicated (flagged ``sequence_parallel`` under SP);
statistics are all-reduced over the TP group under SP (one collective per layer and forward).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megacpp_mcore.features.flexidepth.branch import SkipBranch
from megacpp_mcore.features.flexidepth.config import FORCED_ROUTES, FlexiDepthConfig, check_capacity, mod_conflict
from megacpp_mcore.features.flexidepth.dispatch import SkipDispatcher
from megacpp_mcore.features.flexidepth.usage import (
    TrackerUsage,
    FlexiDepthStats,
    UsageGate,
    UsageLedger,
    UsageSlot,
    shard_means,
)
from megacpp_mcore.features.mod.rope import (
    check_gather,
    check_gatherable,
    gathered_rotary,
    with_token_rope,
)
from megacpp_mcore.spec import compat
from megacpp_mcore.spec.context import LayerContext
from megacpp_mcore.spec.pattern import FeaturePlacement

class FlexiDepthLayer(TransformerLayer):
    """A ``TransformerLayer`` (or subclass) with a per-token choice between its block and an
    adapter path (module docstring). Built by :func:`transform` with ``flexidepth=`` (the config),
    ``usage=`` (its :class:`.usage.UsageSlot`), ``gather_kept=`` (hard inference gathers) and
    ``route_kept=`` (hard inference masks the MoE routing of the skipped tokens).

    Hooks: ``megacpp_set_step(step)`` starts a statistics window; ``megacpp_stats()`` returns its
    means; ``force_route("full" | "skip" | None)`` overrides the router (tests, ablations).
    """

    def __init__(self, config, submodules, layer_number: int = 1, *, flexidepth: FlexiDepthConfig,
                 usage: UsageSlot | None = None, gather_kept: bool = False, route_kept: bool = False,
                 flexidepth_layers: int | None = None, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        self.fd = flexidepth
        graphs = compat.graphs_capturing_layers(config)
        if graphs is not None:
            raise ValueError(
                f"FlexiDepth on layer {self.layer_number}: CUDA graphs ({graphs}) would capture "
                "this layer, and a captured forward bypasses the router and the adapter (the block "
                "would train and run as if FlexiDepth were not there); with FlexiDepth allowed: "
                f"cuda_graph_impl='none', or capture only {sorted(compat.LAYER_FREE_GRAPH_MODULES)} "
                "(Megatron-LM: --cuda-graph-scope mamba, 0.19: --cuda-graph-modules mamba)")
        # Under a Megatron-LM loop (no megacpp_set_step calls) the statistics also go to Megatron's
        # MoE metrics tracker, which its training_log reports (see TrackerUsage).
        self._loop_driven = False
        self._tracker = TrackerUsage(config, layer_number=self.layer_number, layers=flexidepth_layers)
        if flexidepth.freeze_backbone:  # every parameter so far is the wrapped block's
            for param in self.parameters():
                param.requires_grad_(False)
        if flexidepth.usage_loss_weight > 0 and config.recompute_granularity == "full":
            raise ValueError(
                f"FlexiDepth on layer {self.layer_number}: the usage penalty sums the router scores "
                "of a micro-batch over layers in forward order, which full activation recomputation "
                "re-runs out of order; use recompute_granularity='selective' or usage_loss_weight=0")
        self.flexidepth = SkipBranch(config, flexidepth)
        # a layer built alone (not through a chunk) is a usage segment of its own
        self._usage = usage if usage is not None else UsageLedger(()).register(self.layer_number - 1)
        self._seq_group = self.tp_group if config.sequence_parallel else None
        self._shards = self._seq_group.size() if self._seq_group is not None else 1
        self._dispatcher = SkipDispatcher(self.tp_group, sequence_parallel=config.sequence_parallel,
                                          capacity=flexidepth.hard_skip_capacity) if gather_kept else None
        self._forced = flexidepth.forced_route
        self._stats = FlexiDepthStats()
        self._routing_keep: torch.Tensor | None = None  # set for one hard forward (route_kept)
        self.routes_kept = route_kept
        if route_kept:
            router = getattr(self.mlp, "router", None)
            if router is None:
                raise ValueError(f"FlexiDepth on layer {self.layer_number}: hard_skip_moe='route' needs "
                                 f"an MoE block with a router; {type(self.mlp).__name__} has none")
            router.register_forward_hook(self._route_kept)

    # ----------------------------------------------------------------------------- public hooks
    def force_route(self, route: str | None) -> None:
        """``"full"`` (score 1: the wrapped layer), ``"skip"`` (score 0: the adapter path) or
        ``None`` (the router)."""
        if route is not None and route not in FORCED_ROUTES:
            raise ValueError(f"force_route({route!r}): allowed: {', '.join(FORCED_ROUTES)}, None")
        self._forced = route

    def megacpp_set_step(self, step: int) -> None:
        """Starts a new statistics window (no schedule depends on the step); our loop drives it."""
        self._loop_driven = True
        self._stats.start_window()

    def megacpp_stats(self) -> dict[str, float]:
        """Means since the last ``megacpp_set_step``: ``skip_rate``, ``score_mean`` and, on a
        usage segment's last layer, ``loss_usage``."""
        return self._stats.means()

    def set_hard_skip_capacity(self, capacity: float | None) -> None:
        """This layer's ``hard_skip_capacity`` (config docstring), e.g. from its own trained rate
        (benchmarks); a gathering layer only."""
        check_capacity(capacity, f"layer {self.layer_number}: hard_skip_capacity")
        if self._dispatcher is None:
            raise ValueError(f"FlexiDepth on layer {self.layer_number}: hard_skip_capacity applies to "
                             "a layer whose hard skip gathers; this one does not")
        self._dispatcher.capacity = capacity

    @property
    def hard_skip_capacity(self) -> float | None:
        return None if self._dispatcher is None else self._dispatcher.capacity

    @property
    def gathers(self) -> bool:
        """Whether hard inference runs the block on the kept tokens only."""
        return self._dispatcher is not None

    # ---------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        x = hidden_states
        if self._dispatcher is not None and not self.training and self.fd.inference == "hard":
            out, context, score, keep = self._forward_gathered(x, args, kwargs)
            self._record(score, keep)
            return out, context
        score, keep, skip = self.route(x)
        if self.training or self.fd.inference == "soft":
            full, context = super().forward(x, *args, **kwargs)
            g = score.to(full.dtype)
            out = torch.addcmul(full * g, skip, 1.0 - g)  # g B(x) + (1 - g) P(x)
        else:  # hard, selecting rows: the block runs on every token (its experts on the kept ones
            # where routes_kept)
            with self.experts_for(keep):
                full, context = super().forward(x, *args, **kwargs)
            out = torch.where(keep, full, skip)
        self._record(score, keep)
        return out, context

    def route(self, x: torch.Tensor, *, bookkeeping: bool = True):
        """The router score ``[s, b, 1]`` (fp32), the keep mask (``g >= threshold``: takes the
        full block) and the skip path ``P(x)`` of ``x``. ``bookkeeping=False`` (a decoder's steps,
        :mod:`megacpp_mcore.infer`): the score alone, not added to the usage sum."""
        logits, inner = self.flexidepth.project(x)  # [s, b, 1] fp32
        score, keep = self._keep(logits, bookkeeping)
        return score, keep, self.flexidepth.skip_path(x, inner)

    def _keep(self, logits: torch.Tensor, bookkeeping: bool = True):
        score = self._score(logits, bookkeeping)
        return score, score.detach() >= self.fd.threshold  # [s, b, 1]: takes the full block

    def _score(self, logits: torch.Tensor, bookkeeping: bool = True) -> torch.Tensor:
        """The router score ``[s, b, 1]`` (fp32), added to the usage sum when the usage penalty
        has a weight; in training the penalty rides on its backward (:class:`.usage.UsageGate`)."""
        weighted = bookkeeping and self.fd.usage_loss_weight > 0
        if self._forced is not None:
            score = torch.full_like(logits, 1.0 if self._forced == "full" else 0.0)
        elif weighted and self.training and torch.is_grad_enabled():
            return UsageGate.apply(logits, self._usage, self.fd.usage_loss_weight, self._shards)
        else:
            score = torch.sigmoid(logits)
        if weighted:  # weight 0: the sum feeds nothing (_record reports 0)
            self._usage.add(score)
        return score

    @contextlib.contextmanager
    def experts_for(self, keep: torch.Tensor):
        """While open, a ``route_kept`` layer's MoE router sends the tokens ``keep`` (``[s, b, 1]``,
        the router's tokens) drops to no expert: the hard forward, and a decoder's steps around
        the layer's MoE call. A no-op on other layers."""
        self._routing_keep = keep if self.routes_kept else None
        try:
            yield
        finally:
            self._routing_keep = None

    def _route_kept(self, router, inputs, output):
        """Forward hook of the MoE router (``route_kept``): during a hard forward the skipped
        tokens get no expert (routing map cleared, probabilities zero), so the dispatcher counts
        and the experts compute the kept tokens only. The router's tokens are its input's ``[s, b]``
        flattened, the layout of ``keep``; otherwise (training, soft, decoding) it passes through."""
        keep = self._routing_keep
        if keep is None:
            return None
        probs, routing_map = output
        rows = keep.reshape(-1, 1)
        if rows.shape[0] != routing_map.shape[0]:
            raise RuntimeError(f"FlexiDepth on layer {self.layer_number}: the router saw {routing_map.shape[0]} "
                               f"tokens, the keep mask has {rows.shape[0]}")
        return probs * rows.to(probs.dtype), routing_map & rows

    def _record(self, score: torch.Tensor, keep: torch.Tensor) -> None:
        names, values = ("score_mean", "skip_rate"), [score, ~keep]
        if self._usage.last:  # the segment's sum is complete: the penalty's value
            names += ("loss_usage",)
            weight = self.fd.usage_loss_weight
            values.append(self._usage.segment.total.square() * weight if weight > 0 else score.new_zeros(()))
        means = shard_means(values, self._seq_group)
        self._stats.record(names, means)
        if self.training and not self._loop_driven and compat.training_iteration() is not None:
            self._tracker.record(names, means)

    def _forward_gathered(self, x, args, kwargs):
        """Route -> dispatch -> the wrapped layer on the kept tokens -> combine. The kept count
        the block's shape needs travels to the host while the device computes the adapter's update
        (:meth:`.dispatch.SkipDispatcher.start`), so the device is not left idle while the host
        queues the block after reading it. Returns (output, context, score, keep)."""
        check_gatherable(args, kwargs, "FlexiDepth hard skip", self.layer_number)
        logits, inner = self.flexidepth.project(x)
        score, keep = self._keep(logits)
        pending = self._dispatcher.start(x, keep)
        update = self.flexidepth.update(inner, x.dtype)  # queued behind the count's copy
        route = self._dispatcher.finish(pending)
        keep = route.keep  # with a capacity, the kept tokens that fit in it
        if route.idx.shape[0] == 0:  # every token skips: the block does not run
            return (x if update is None else x + update), None, score, keep
        kwargs["rotary_pos_emb"] = gathered_rotary(self.self_attention, kwargs.pop("rotary_pos_emb", None),
                                                   route.idx, route.full.shape[0], "FlexiDepth hard skip")
        processed, context = super().forward(self._dispatcher.dispatch(route), **kwargs)
        return self._dispatcher.combine(route, processed, x, update), context, score, keep


@functools.cache
def flexidepth_layer_class(cls: type) -> type:
    """The FlexiDepth subclass of a ``TransformerLayer`` class (``FlexiDepthLayer`` for the plain
    one)."""
    if not (isinstance(cls, type) and issubclass(cls, TransformerLayer)):
        raise ValueError(f"FlexiDepth wraps TransformerLayer-based blocks; {cls!r} is not one")
    if issubclass(cls, FlexiDepthLayer):
        raise ValueError(f"{cls.__name__} is already FlexiDepth-wrapped")
    if cls is TransformerLayer:
        return FlexiDepthLayer
    return type(f"FlexiDepth{cls.__name__}", (FlexiDepthLayer, cls), {"__module__": __name__})


def transform(spec: ModuleSpec, ctx: LayerContext) -> ModuleSpec:
    """FlexiDepth's transform at the ``layer`` seam: wraps layer ``ctx.index``'s spec with the
    config in ``ctx.feature_configs["flexidepth"]`` (a :class:`FlexiDepthConfig`, or a bare
    ``FeaturePlacement`` for the defaults) and registers the layer in its chunk's usage ledger."""
    config = ctx.feature("flexidepth")
    where = f"layer {ctx.index} ({ctx.symbol!r})"
    if isinstance(config, FeaturePlacement):
        config = FlexiDepthConfig(placement=config)
    if not isinstance(config, FlexiDepthConfig):
        raise ValueError(f"{where}: feature 'flexidepth' needs a FlexiDepthConfig or a FeaturePlacement, "
                         f"got {config!r}")
    if ctx.has("mod"):
        raise ValueError(mod_conflict(where))
    hard = config.inference == "hard" and ctx.symbol in config.hard_skip_symbols
    route = hard and config.hard_skip_moe == "route" and ctx.symbol == "E" and bool(ctx.config.num_moe_experts)
    gather = hard and not route
    if gather and ctx.has("moda"):
        raise ValueError(
            f"{where} carries MoDA and FlexiDepth hard skip with {ctx.symbol!r} in hard_skip_symbols: "
            "the attention would see the kept tokens only, so its depth K/V push would miss the "
            f"others; drop {ctx.symbol!r} from hard_skip_symbols (the block then runs on every token)")
    if gather:
        check_gather(ctx, "FlexiDepth hard skip")
    try:
        module = flexidepth_layer_class(spec.module)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    submodules = spec.submodules
    if gather and dataclasses.is_dataclass(submodules):  # per-token RoPE of the gathered tokens
        submodules = with_token_rope(submodules)
    if ctx.chunk is not None:
        ledger = ctx.chunk.shared(("flexidepth", "usage"), lambda: UsageLedger(config.usage_boundaries))
    else:
        ledger = UsageLedger(config.usage_boundaries)
    layers = sum("flexidepth" in entry.features for entry in ctx.model_table) or None
    return ModuleSpec(module=module, submodules=submodules, params={
        **(spec.params or {}), "flexidepth": config, "usage": ledger.register(ctx.index),
        "gather_kept": gather, "route_kept": route, "flexidepth_layers": layers})
