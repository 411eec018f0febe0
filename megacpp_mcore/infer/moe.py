"""Megatron's MoE layer at decode and verification sizes, without a host synchronisation.

Megatron's dropless MoE groups the tokens by expert: its dispatcher and experts read the per-expert
token counts on the host (``tokens_per_expert.tolist()`` / ``.cpu()``) in every forward. A decode
step has a handful of tokens, so that wait for the device dominates the step (measured on an H200:
~2.6 ms of host time per MoE layer against ~0.1 ms of GPU work). :class:`SyncFreeMoE` computes the
same layer for up to :data:`MAX_TOKENS` tokens from

* the layer's own router module (its top-k, score function, expert bias, scaling and
  ``moe_router_dtype``: the probabilities are Megatron's, ``[n, E]`` and zero outside the top-k);
* the routed experts' weights, stacked once when the engine is built (SequentialMLP's per-expert
  MLPs, TE's grouped linear ``weight0..`` or single grouped ``weight``, the legacy GroupedMLP's
  ``weight1``/``weight2``), applied as Megatron's experts apply them: SwiGLU, the routing
  probability multiplied in after the activation (in the probabilities' dtype, then cast back),
  the second projection, the top-k outputs summed in the activation dtype; by the route that
  reads the fewest expert weights (:meth:`SyncFreeMoE.route`: every expert, each token's top-k
  gathered, or on CUDA the chosen experts only through :mod:`.moe_triton`'s kernel);
* the layer's own shared-expert module, added last.

For forwards of any length (a prefill, the FlexiDepth hard-skip forward) the ``grouped`` route sorts
the (token, expert) rows by expert on the device and runs each projection as one grouped GEMM with
device offsets: Megatron's dropless output without its host read (:func:`sync_free_moe_layers`
swaps it in for a model's eval forward).

Anything else (another expert class or activation, expert parallelism, token dropping, latent
projections, FP8) keeps Megatron's own layer: :func:`plan_moe` says why, and the engine logs it once.
Every fast path is checked against Megatron's layer on a probe batch when it is planned, and a
mismatch also keeps Megatron's layer.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from megacpp_mcore.spec import backends

_log = logging.getLogger(__name__)

# Up to this many tokens (rows x new positions) a forward runs here: decode steps (b tokens),
# speculative verification (b (K + 1)) and MTP drafting. Longer forwards (the prefill) run
# Megatron's layer: one host sync per layer is nothing there, and it computes no unrouted experts.
MAX_TOKENS = 128

# The expert routes of SyncFreeMoE, cheapest first on a tie (see SyncFreeMoE.route). A forward of
# any length may also take the "grouped" route (SyncFreeMoE.grouped, :func:`sync_free_moe_layers`).
ROUTES = ("dense", "gathered", "sparse")
# The routes a layer may take unless told otherwise: the sparse route's kernel is opt-in
# (SyncFreeMoE.routes, bench_generate.py --moe-routes) until an H200 run has timed it against the
# torch routes (scripts/bench_moe_decode.py; h200_regression.sh moe-decode).
DEFAULT_ROUTES = ("dense", "gathered")

# Up to this many tokens the sparse route's kernel runs (one tile of them: moe_triton.MAX_TOKENS,
# which imports Triton; this module does not).
KERNEL_MAX_TOKENS = 64

# Expert modules whose parameter layouts are read here (megatron-core 0.16 - 0.19), and ours:
# DeviceCountsTEGroupedMLP (layers/moe.py, what `E` builds on TE by default) has TEGroupedMLP's
# parameters. Names, not classes: a subclass may lay its weights out otherwise.
KNOWN_EXPERTS = ("SequentialMLP", "TEGroupedMLP", "InferenceGroupedMLP", "GroupedMLP",
                 "DeviceCountsTEGroupedMLP")

# Relative error (Frobenius norm) allowed between this path and Megatron's layer on the probe: a
# wrong layout (another expert, swapped GLU halves, a transposed weight) is off by O(1); rounding
# is far below: bf16 GEMMs blocked differently ~4e-3, fp32 against TE's grouped GEMM (which runs
# fp32 tensors in TF32 whatever torch's flag says) ~5e-4.
_PROBE_TOLERANCE = {torch.float32: 1e-2, torch.float64: 1e-2}
_PROBE_TOLERANCE_16BIT = 5e-2


def _plain(t) -> bool:
    """A dense tensor the stacking can read (not an FP8 / quantized tensor subclass)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _grouped_linear(linear, num_experts: int) -> torch.Tensor:
    """``[E, out, in]`` of a TE grouped linear: ``weight0 .. weight{E-1}`` or one grouped
    ``weight`` (``moe_single_grouped_weight``)."""
    params = dict(linear.named_parameters(recurse=False))
    if all(f"weight{e}" in params for e in range(num_experts)):
        weights = [params[f"weight{e}"] for e in range(num_experts)]
        if not all(_plain(w) and w.dim() == 2 for w in weights):
            raise ValueError("grouped expert weights are not plain 2-D tensors")
        return torch.stack(weights)
    weight = params.get("weight")
    if weight is not None and _plain(weight) and weight.dim() == 3 and weight.shape[0] == num_experts:
        return weight
    raise ValueError(f"{type(linear).__name__} has neither weight0..weight{num_experts - 1} nor "
                     f"a grouped [E, out, in] weight")


def stacked_expert_weights(experts, num_experts: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed experts' weights as ``w1`` ``[E, h, F1]`` (``F1``: gate and up halves, as
    Megatron's SwiGLU chunks them) and ``w2`` ``[E, f, h]``, contiguous: copies, except for the
    legacy GroupedMLP whose parameters already have that layout (so the engine sees the weights as
    they were when it was built). ``ValueError`` (the reason) for a layout not read here."""
    kind = type(experts).__name__
    if kind not in KNOWN_EXPERTS:
        raise ValueError(f"expert module {kind} is not one of {', '.join(KNOWN_EXPERTS)}")
    if hasattr(experts, "local_experts"):  # SequentialMLP: one MLP per expert, weights [out, in]
        mlps = list(experts.local_experts)
        if len(mlps) != num_experts:
            raise ValueError(f"{len(mlps)} local experts, expected {num_experts}")
        fc1 = [m.linear_fc1.weight for m in mlps]
        fc2 = [m.linear_fc2.weight for m in mlps]
        if not all(_plain(w) and w.dim() == 2 for w in fc1 + fc2):
            raise ValueError("expert weights are not plain 2-D tensors")
        if any(getattr(m.linear_fc1, "bias", None) is not None or
               getattr(m.linear_fc2, "bias", None) is not None for m in mlps):
            raise ValueError("experts with biases")
        w1, w2 = torch.stack(fc1).transpose(1, 2), torch.stack(fc2).transpose(1, 2)
    elif hasattr(experts, "weight1") and hasattr(experts, "weight2"):  # legacy GroupedMLP
        # weight1 [h, E * F1] and weight2 [E * f, h] hold expert-major [h, F1] / [f, h] blocks
        # (GroupedMLP's forward views them as [E, h, F1] / [E, f, h])
        w1 = experts.weight1.view(num_experts, hidden, -1)
        w2 = experts.weight2.view(num_experts, -1, hidden)
    elif hasattr(experts, "linear_fc1") and hasattr(experts, "linear_fc2"):  # TE grouped GEMM
        if getattr(experts.linear_fc1, "use_bias", False) or getattr(experts.linear_fc2, "use_bias", False):
            raise ValueError("grouped experts with biases")
        w1 = _grouped_linear(experts.linear_fc1, num_experts).transpose(1, 2)
        w2 = _grouped_linear(experts.linear_fc2, num_experts).transpose(1, 2)
    else:
        raise ValueError(f"{kind} has no expert weights in a known layout")
    if w1.shape[1] != hidden or w2.shape[2] != hidden or w1.shape[2] != 2 * w2.shape[1]:
        raise ValueError(f"expert weight shapes {tuple(w1.shape)} / {tuple(w2.shape)} do not make "
                         f"a SwiGLU MLP of hidden size {hidden}")
    return w1.detach().contiguous(), w2.detach().contiguous()


def _unsupported_config(moe) -> str | None:
    """Why the layer's configuration has no sync-free path here (None: it has one)."""
    config = moe.config
    checks = (
        (moe.num_local_experts != config.num_moe_experts, "expert parallelism"),
        (bool(getattr(config, "moe_latent_size", None)), "MoE latent projections"),
        (config.moe_expert_capacity_factor is not None, "token dropping (capacity factor)"),
        (bool(getattr(config, "moe_apply_probs_on_input", False)), "moe_apply_probs_on_input"),
        (bool(getattr(config, "fp8", None) or getattr(config, "fp4", None)), "FP8/FP4"),
        (not (config.gated_linear_unit and config.activation_func is F.silu), "an activation other than SwiGLU"),
        (bool(getattr(config, "use_te_activation_func", False)), "TE activation modules"),
        (getattr(config, "activation_func_clamp_value", None) is not None, "clamped activations"),
        (bool(getattr(config, "glu_linear_offset", 0.0)), "a GLU linear offset"),
        (config.add_bias_linear, "expert biases"),
    )
    return next((why for bad, why in checks if bad), None)


class SyncFreeMoE:
    """One MoE layer's forward for small token counts without host syncs; see the module docstring.

    Call it like the layer: ``[s, b, h] -> (out [s, b, h], None)``. More than :data:`MAX_TOKENS`
    tokens run the layer itself."""

    def __init__(self, moe, w1: torch.Tensor, w2: torch.Tensor, topk: int | None = None):
        """``moe``: the layer (its router and shared expert); None with ``topk`` gives the expert
        routes alone (``dense`` / ``gathered`` / ``sparse`` on given probabilities: benchmarks)."""
        self.moe, self.w1, self.w2 = moe, w1, w2
        self.num_experts = w1.shape[0]
        self.topk = moe.config.moe_router_topk if topk is None else topk
        # the Triton kernel of the sparse route runs on CUDA tensors where Triton is installed
        self.kernel = w1.is_cuda and backends.detect().triton is not None
        self.routes = DEFAULT_ROUTES  # the routes route() may take (ROUTES: the kernel too)
        self.kernel_options: dict = {}  # expert_gemm's block sizes / split (benchmarks sweep them)
        self.grouped_ok = True  # torch's grouped GEMM runs here (plan_moe probes it)
        # the router's top-k in a few kernels where its settings are plain ones (plan_moe probes
        # it against the layer's router; else the router module itself runs)
        self.router = _TopKRouting.of(moe.router) if moe is not None else None

    def __call__(self, hidden: torch.Tensor):
        n = hidden.shape[0] * hidden.shape[1]
        if n > MAX_TOKENS:
            return self.moe(hidden)
        return self.run(hidden, self.route(n)), None

    def expert_reads(self, tokens: int) -> dict[str, int]:
        """Per route this layer can take for ``tokens`` tokens, the expert weights it reads, in
        units of one expert's weights (a decode-sized forward is bound by reading weights).
        ``dense`` reads all ``E`` experts once (and computes every expert for every token,
        unrouted ones weighted by 0); ``gathered`` copies the ``tokens * k`` chosen experts'
        weights (one read, one write) before its GEMMs read the copies, ~3 reads per chosen
        expert; ``sparse`` (the Triton kernel: CUDA, up to :data:`KERNEL_MAX_TOKENS`) reads each
        chosen expert once, at most ``min(E, tokens * k)``."""
        chosen = self.topk * tokens
        reads = {"dense": self.num_experts, "gathered": 3 * chosen}
        if self.kernel and tokens <= KERNEL_MAX_TOKENS:
            reads["sparse"] = min(self.num_experts, chosen)
        return reads

    def route(self, tokens: int) -> str:
        """The route of :data:`ROUTES` (among :attr:`routes`) that reads the fewest expert
        weights for ``tokens`` tokens (:meth:`expert_reads`); ties go to the earlier route.
        Without the kernel gathering wins while ``3 * tokens * k < E``: a plain decode step at
        batch 1, not a speculative verification of ``K + 1`` positions (on nam56r-lite, 8 experts
        top-2, the gathered route read 1.5x the dense one at 2 tokens)."""
        reads = self.expert_reads(tokens)
        allowed = [r for r in ROUTES if r in reads and r in self.routes] or ["dense"]
        return min(allowed, key=reads.get)  # the first of equal minima: ROUTES' order

    def run(self, hidden: torch.Tensor, route: str, padding_mask=None) -> torch.Tensor:
        """The layer's output ``[s, b, h]`` through ``route`` (one of :data:`ROUTES`, or
        ``grouped``): the layer's router, the routed experts, then its shared expert.
        ``padding_mask`` goes to the router as Megatron's layer passes it (it only shapes the
        training losses)."""
        s, b, h = hidden.shape
        if self.router is not None and padding_mask is None:
            probs = self.router(hidden)  # [n, E], zero outside each token's top-k
        else:
            extra = () if padding_mask is None else (padding_mask,)
            probs, _ = self.moe.router(hidden, *extra)
        out = getattr(self, route)(hidden.reshape(s * b, h), probs).view(s, b, h)
        if self.moe.shared_experts is not None:
            out = out + self.moe.shared_experts(hidden)
        return out

    @staticmethod
    def _swiglu(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """SwiGLU of ``y`` ``[..., 2f]`` times the routing probability ``weight`` (broadcast), as
        Megatron's experts apply it: product in the probabilities' dtype, cast back to ``y``'s."""
        gate, up = torch.chunk(y, 2, dim=-1)
        return (F.silu(gate) * up * weight).to(y.dtype)

    def dense(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Every expert on every token ``x`` ``[n, h]``, weighted by ``probs`` ``[n, E]``."""
        y = torch.matmul(x, self.w1)  # [E, n, 2f]
        act = self._swiglu(y, probs.t().unsqueeze(-1))  # [E, n, f]
        return torch.matmul(act, self.w2).sum(dim=0)  # [n, h]

    def sparse(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Every token ``x`` ``[n, h]`` through every expert some token chose, weighted by
        ``probs`` ``[n, E]`` (0 where a token did not choose the expert): :meth:`dense` reading
        only the chosen experts' weights (:func:`.moe_triton.expert_gemm`; ``n`` <= its
        ``MAX_TOKENS``). The routing stays on the device."""
        from megacpp_mcore.infer.moe_triton import expert_gemm

        used = (probs != 0).any(dim=0)  # [E]: an expert chosen by no token computes nothing
        options = self.kernel_options
        y = expert_gemm(x.unsqueeze(0), self.w1, used, **options)  # [E, n, 2f], 0 for unused experts
        act = self._swiglu(y, probs.t().unsqueeze(-1))  # [E, n, f]
        return expert_gemm(act, self.w2, used, **options).sum(dim=0)  # [n, h]

    def grouped(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Each token ``x`` ``[n, h]`` through its top-k experts, for any ``n``: the ``n * k``
        (token, expert) rows sorted by expert on the device and each projection run as one
        grouped GEMM over the experts' row ranges (``torch._grouped_mm`` with device offsets).
        What Megatron's dropless layer computes, without reading the per-expert counts on the
        host (its dispatcher and grouped experts do, once per layer and forward), so a forward
        of MoE layers queues without waiting for the device; the top-k outputs are summed in the
        activation dtype as :meth:`gathered` sums them."""
        n, h = x.shape
        k = self.topk
        weight, index = probs.topk(k, dim=-1)  # [n, k]
        expert = index.reshape(-1)  # [n k]: row r is token r // k's choice r % k
        order = torch.argsort(expert, stable=True)  # rows grouped by expert
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, expert, torch.ones_like(expert, dtype=torch.int32))
        ends = torch.cumsum(counts, dim=0, dtype=torch.int32)  # each expert's last row + 1
        rows = x.index_select(0, order // k)  # [n k, h]
        y = torch._grouped_mm(rows, self.w1, offs=ends)  # [n k, 2f]
        act = self._swiglu(y, weight.reshape(-1).index_select(0, order)[:, None])
        out = torch._grouped_mm(act, self.w2, offs=ends)  # [n k, h], grouped order
        unsorted = torch.empty_like(out).index_copy_(0, order, out)  # back to (token, choice)
        return unsorted.view(n, k, h).sum(dim=1)

    def gathered(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Each token ``x`` ``[n, h]`` through its top-k experts only. The top-k of ``probs`` are
        the router's choices (an expert whose probability underflowed to 0 contributes 0 under
        either choice)."""
        weight, index = probs.topk(self.topk, dim=-1)  # [n, k]
        y = torch.matmul(x[:, None, None, :], self.w1[index])  # [n, k, 1, 2f]
        act = self._swiglu(y, weight[..., None, None])  # [n, k, 1, f]
        return torch.matmul(act, self.w2[index]).sum(dim=1).squeeze(1)  # [n, h]


class _TopKRouting:
    """An MoE router's top-k probabilities ``[n, E]`` (zero outside each token's top k) in a
    handful of kernels, for a decode step: the router's own gating (its GEMM, in its router
    dtype), then the top-k and its softmax (or sigmoid) and the scatter, without the routing
    map, statistics and checks the router module computes around them for training. The routing
    Megatron's ``TopKRouter`` applies in eval for plain settings (:meth:`of` says which: no
    expert groups, no token dropping, no hooks on the module, softmax before or after the top-k,
    or sigmoid normalised over the top k with an optional expert bias, a top-k scaling factor);
    :func:`plan_moe` checks it against the module on a probe and keeps the module where they
    differ."""

    def __init__(self, router, score: str, pre_softmax: bool, scale, expert_bias):
        self.router, self.topk = router, router.topk
        self.score, self.pre_softmax, self.scale, self.expert_bias = score, pre_softmax, scale, expert_bias

    @classmethod
    def of(cls, router) -> "_TopKRouting | None":
        """The fast routing of ``router``, or None where its settings are not the plain ones."""
        config = getattr(router, "config", None)
        if (type(router).__name__ != "TopKRouter" or config is None or router._forward_hooks
                or router._forward_pre_hooks or not hasattr(router, "gating")):
            return None
        score = getattr(router, "score_function", None)
        plain = (score in ("softmax", "sigmoid") and not getattr(config, "moe_router_num_groups", None)
                 and getattr(router, "routing_type", "aux_loss") != "sinkhorn"
                 and config.moe_expert_capacity_factor is None
                 and not getattr(config, "moe_router_force_load_balancing", False)
                 and getattr(router, "router_replay", None) is None)
        if not plain:
            return None
        bias = getattr(router, "expert_bias", None) if getattr(
            config, "moe_router_enable_expert_bias", False) else None
        return cls(router, score, bool(config.moe_router_pre_softmax),
                   config.moe_router_topk_scaling_factor, bias)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.router.gating(hidden)
        logits = logits.reshape(-1, logits.shape[-1])  # [n, E] in the router dtype
        k = self.topk
        if self.score == "softmax":
            if self.pre_softmax:
                scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
                probs, index = scores.topk(k, dim=-1)
            else:
                top, index = logits.topk(k, dim=-1)
                probs = torch.softmax(top, dim=-1, dtype=torch.float32).type_as(logits)
        else:  # sigmoid, normalised over the top k
            scores = torch.sigmoid(logits.float()).type_as(logits)
            if self.expert_bias is None:
                probs, index = scores.topk(k, dim=-1)
            else:
                index = (scores + self.expert_bias).topk(k, dim=-1)[1]
                probs = scores.gather(1, index)
            if k > 1:
                probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scale:
            probs = probs * self.scale
        return torch.zeros_like(logits).scatter(1, index, probs)


def _probe(fast: SyncFreeMoE, want, got, tokens: int, tolerance: float) -> str | None:
    """Why ``got`` differs from Megatron's ``want`` (callables of the same ``tokens`` seeded random
    hidden states ``[tokens, 1, h]``) by more than ``tolerance`` (relative error, Frobenius norm)
    or fails, else None."""
    generator = torch.Generator().manual_seed(tokens)  # never touches the global RNG
    x = torch.randn(tokens, 1, fast.w1.shape[1], generator=generator).to(fast.w1.device, fast.w1.dtype)
    try:
        ref, out = want(x).double(), got(x).double()
    except Exception as exc:  # e.g. a router that returns something else than [n, E] probs
        return f"failed on a probe ({type(exc).__name__}: {exc})"
    error = float((out - ref).norm() / ref.norm().clamp(min=1e-30))
    if error <= tolerance:
        return None
    return f"differs from Megatron's layer on a probe (relative error {error:.2e} > {tolerance:.0e})"


@torch.no_grad()
def plan_moe(moe) -> tuple[SyncFreeMoE | None, str | None]:
    """The sync-free path of the MoE layer ``moe`` and None, or None and why it has none."""
    why = _unsupported_config(moe)
    if why is not None:
        return None, why
    try:
        w1, w2 = stacked_expert_weights(moe.experts, moe.config.num_moe_experts, moe.config.hidden_size)
    except ValueError as exc:
        return None, str(exc)
    fast = SyncFreeMoE(moe, w1, w2)
    tolerance = _PROBE_TOLERANCE.get(w1.dtype, _PROBE_TOLERANCE_16BIT)
    if fast.router is not None:  # the few-kernel routing against the router module's own
        why = _probe(fast, lambda x: moe.router(x)[0], fast.router, 24, tolerance)
        if why is not None:
            fast.router = None
            _log.warning("inference: the MoE router's module runs: its few-kernel routing %s", why)
    for route, tokens in (("gathered", 2), ("dense", 32), ("sparse", 3), ("grouped", 40)):
        if route == "sparse" and not fast.kernel:
            continue
        why = _probe(fast, lambda x: moe(x)[0], lambda x: fast.run(x, route), tokens, tolerance)
        if why is None:
            continue
        if route == "grouped":  # e.g. no grouped GEMM for this dtype on this device: long
            fast.grouped_ok = False  # forwards keep Megatron's layer
            _log.warning("inference: the grouped MoE expert path %s; Megatron's layer runs long "
                         "forwards", why)
            continue
        if route != "sparse":
            return None, f"the {route} expert path {why}"
        fast.kernel = False  # the torch routes stay
        _log.warning("inference: the sparse MoE expert kernel %s; the torch routes decode", why)
    return fast, None


class SyncFreeMoELayer(torch.nn.Module):
    """Stands in for a Megatron MoE layer (``TransformerLayer.mlp``) in an inference forward of
    any length: :meth:`SyncFreeMoE.run` through :meth:`~SyncFreeMoE.grouped` (no host read), the
    layer's own router (its hooks included) and shared expert. Installed by
    :func:`sync_free_moe_layers`; not for training (no aux losses, no backward through Megatron's
    dispatcher)."""

    def __init__(self, fast: SyncFreeMoE):
        super().__init__()
        self.fast = fast  # not a submodule: the layer it stands for keeps its parameters

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **_):
        return self.fast.run(hidden_states, "grouped", padding_mask), None


@contextlib.contextmanager
def sync_free_moe_layers(model):
    """While open, the MoE layers of ``model`` (``mlp`` of its layers) that have a sync-free
    path (:func:`plan_moe`, the grouped route included) run as :class:`SyncFreeMoELayer`: an
    eval forward of any length queues every layer without waiting for the device (e.g. the
    FlexiDepth hard-skip forward, ``scripts/bench_flexidepth.py``). Yields ``{layer name: None
    (swapped) or why not}``; the layers are restored on exit."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    swapped, report = [], {}
    try:
        for name, layer in model.named_modules():
            moe = getattr(layer, "mlp", None)
            if not isinstance(moe, MoELayer):
                continue
            if getattr(layer, "routes_kept", False):  # FlexiDepth hard_skip_moe="route"
                report[name] = ("FlexiDepth sends its skipped tokens to no expert here, and "
                                "Megatron's dispatcher drops their rows (the grouped route would "
                                "compute them)")
                continue
            fast, why = plan_moe(moe)
            if fast is not None and not fast.grouped_ok:
                fast, why = None, "the grouped expert path does not run here"
            report[name] = why
            if fast is not None:
                layer.mlp = SyncFreeMoELayer(fast)
                swapped.append((layer, moe))
        yield report
    finally:
        for layer, moe in swapped:
            layer.mlp = moe
