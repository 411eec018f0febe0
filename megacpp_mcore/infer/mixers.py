"""Recurrent state of the ``M`` (Mamba-2) and ``R`` (M2RNN) mixers, advanced over new positions.

Each step reads the trained mixer's own parameters (``in_proj``, the depthwise conv, ``dt_bias``,
``A_log``, ``D``, the gated norm, ``out_proj``; M2RNN's recurrent weight and forget bias), so the
portable torch mixers and Megatron's ``MambaMixer`` (te backend, whose conv is a ``conv1d`` module
before megatron-core 0.19 and ``conv1d_weight``/``conv1d_bias`` parameters from 0.19:
:data:`megacpp_mcore.spec.compat.MAMBA_CONV_PARAMETERS`) are served by the same code.

State per row: the last ``d_conv - 1`` conv inputs and the recurrent state (Mamba ``[b, h, p, n]``,
M2RNN ``[b, h, K, V]``, fp32). A forward with ``keep=True`` keeps the state after EVERY new
position, so :meth:`RecurrentState.commit` can keep the first ``n`` positions only (speculative
decoding's rollback): the kept state is the one the recurrence reached at that position, i.e. the
state of a run that never saw the rejected positions. Mamba's are kept unmaterialised
(:class:`PendingSSDStates`: the step's inputs, from which the commit computes the one state it
keeps; the outputs come from the scan's quadratic form), so a verification step reads the old
state once and writes one new state, not one per position. Padded slots (left padding) feed zeros
to the conv and leave the recurrent state untouched, as if the row started later.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megacpp_mcore.infer.context import StepContext
from megacpp_mcore.layers.mixers.mamba import ssd_scan_torch
from megacpp_mcore.spec import backends, compat

# Up to this many new positions a forward that keeps no per-position state runs the Mamba scan in
# closed form (every position's state is materialised, [b, s, h, p, n]); longer forwards (prefill)
# use the chunked SSD scan, verifications (keep=True) the way VERIFY_STATES names.
CLOSED_FORM_MAX = 16

# How a Mamba verification (keep=True) keeps its per-position states for the commit:
# * "quadratic": outputs by the scan's quadratic form, states left unmaterialised
#   (PendingSSDStates), the one kept computed at the commit: fewer bytes (one state read, one
#   written), more kernels (~12 more per layer and step);
# * "closed": the closed form, every position's state materialised and the commit selecting one:
#   fewer kernels, s states written. A step replayed as a CUDA graph at small batch is bound by
#   its kernel count more than by its bytes (docs/benchmarks.md), so the choice is measured;
# * "recurrent": one position at a time, everything between the projections with a plain step's
#   own operations on a plain step's shapes and layouts (the conv over one window, the closed form
#   of one position from the previous state, the element-wise work and the gated norm on that
#   position's rows), every state materialised: the kept state and the outputs are bit for bit
#   those of plain steps over the same tokens, whatever the device's kernels do with other shapes
#   (a CPU's vectorised element-wise kernels round a vector's tail unlike its body); the most
#   kernels (s times a step's). The piece of the recurrence an exact speculative mode needs.
# The engine's ``ssd_verify`` picks one for its sessions.
VERIFY_STATES = ("quadratic", "closed", "recurrent")


class DeviceCount:
    """A commit's kept-position count ``n`` as a 0-d device tensor (``1 <= n <= s`` of an
    ``s``-position forward) with what every recurrent layer's commit derives from it, computed
    once per commit (:meth:`megacpp_mcore.infer.engine.Session.commit`) instead of once per
    layer: the last kept index ``[1]`` and an additive bias ``[s]`` (0 on kept positions, -inf
    after them)."""

    def __init__(self, n: torch.Tensor, s: int):
        self.n, self.s = n, s
        self.last = (n - 1).view(1)
        self._bias: torch.Tensor | None = None

    @property
    def bias(self) -> torch.Tensor:
        if self._bias is None:
            kept = torch.arange(self.s, device=self.n.device) < self.n
            self._bias = torch.where(kept, 0.0, float("-inf"))
        return self._bias


def conv_parameters(mixer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The depthwise conv's weight ``[C, 1, w]`` and bias of a mixer, under either spelling."""
    params = dict(mixer.named_parameters())
    weight, bias = (params.get(dotted, params.get(flat))
                    for flat, dotted in compat.MAMBA_CONV_PARAMETERS.items())  # weight, bias
    if weight is None:
        raise ValueError(f"inference: {type(mixer).__name__} has no depthwise conv parameters")
    return weight, bias


class RecurrentState:
    """Conv window and recurrent state of one mixer for a batch; see the module docstring."""

    def __init__(self, mixer, conv: torch.Tensor, state: torch.Tensor):
        self.conv_parameters = conv_parameters(mixer)  # read once, not per step
        self.conv = conv  # [b, C, w - 1]: the last conv inputs
        self.state = state  # fp32
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # per position, or last
        self._per_position = False
        # commit copies into the same buffers (their addresses stay fixed for a CUDA graph)
        # instead of taking the staged tensors
        self.in_place = False
        self.verify = "quadratic"  # Mamba's verification states (VERIFY_STATES)

    def stage(self, convs: torch.Tensor, states: torch.Tensor, per_position: bool) -> None:
        """States after the new positions: ``[s, ...]`` per position, or the last one only."""
        self._pending, self._per_position = (convs, states), per_position

    @staticmethod
    def _after(states, n: int | DeviceCount) -> torch.Tensor:
        """The staged per-position state after ``n`` positions (int >= 1 or a device count)."""
        if isinstance(states, PendingSSDStates):
            return states.after(n)
        return states.index_select(0, n.last)[0] if isinstance(n, DeviceCount) else states[n - 1]

    def commit(self, n: int | torch.Tensor | DeviceCount, s: int) -> None:
        """Keeps the first ``n`` of the ``s`` staged positions (all ``s`` without per-position
        states). ``n`` may be on the device (a 0-d tensor >= 1, or its :class:`DeviceCount`;
        per-position states, in place): the host need not know it."""
        if self._pending is None:
            raise RuntimeError("inference: commit without a forward")
        convs, states = self._pending
        self._pending = None
        if isinstance(n, torch.Tensor):
            n = DeviceCount(n, s)
        if isinstance(n, DeviceCount):
            if not (self._per_position and self.in_place):
                raise RuntimeError("inference: a device-side commit needs per-position states "
                                   "(forward(..., keep=True)) of a static session")
            self._take(convs.index_select(0, n.last)[0], self._after(states, n))
            return
        if not self._per_position:
            if n != s:
                raise RuntimeError(f"inference: commit({n}) of a {s}-position forward that kept no "
                                   "per-position state (forward(..., keep=True) allows rollback)")
            self._take(convs, states)
        elif n:
            self._take(convs[n - 1], self._after(states, n))

    def _take(self, conv: torch.Tensor, state: torch.Tensor) -> None:
        if self.in_place:
            self.conv.copy_(conv)
            self.state.copy_(state)
        else:
            self.conv, self.state = conv, state

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"conv": self.conv.clone(), "state": self.state.clone()}


def _conv(inputs: torch.Tensor, state: RecurrentState, valid: torch.Tensor, keep: bool,
          conv: torch.Tensor | None = None):
    """Causal depthwise conv of ``inputs`` ``[b, C, s]`` continuing the state's window (or
    ``conv``, a window ``[b, C, w - 1]`` in its place); returns SiLU(conv) ``[b, C, s]`` and the
    windows after each (or the last) position."""
    weight, bias = state.conv_parameters
    inputs = torch.where(valid[:, None, :], inputs, torch.zeros_like(inputs))  # padded: zeros
    window = torch.cat([(state.conv if conv is None else conv).to(inputs.dtype), inputs], dim=-1)
    s = inputs.shape[-1]  # window: [b, C, w - 1 + s]
    out = F.silu(F.conv1d(window, weight, bias, groups=weight.shape[0]))  # [b, C, s]
    if keep:
        width = weight.shape[-1]
        windows = torch.stack([window[..., j + 1:j + width] for j in range(s)])  # [s, b, C, w-1]
    else:
        windows = window[..., s:]
    return out, windows


def new_mamba_state(mixer, batch: int, dtype, device) -> RecurrentState:
    weight, _ = conv_parameters(mixer)
    conv = torch.zeros(batch, weight.shape[0], weight.shape[-1] - 1, dtype=dtype, device=device)
    state = torch.zeros(batch, mixer.nheads_local_tp, mixer.headdim, mixer.d_state,
                        dtype=torch.float32, device=device)
    return RecurrentState(mixer, conv, state)


def _decays(dt, A):
    """The cumulated log decays ``cum`` ``[b, s, h]`` of ``s`` positions and the decay from
    position ``i`` to ``j`` ``[b, h, j, i]`` (``exp(cum_j - cum_i)`` for ``i <= j``, else 0)."""
    cum = torch.cumsum(dt * A, dim=1)
    s = cum.shape[1]
    later = torch.ones(s, s, dtype=torch.bool, device=cum.device).tril()  # [j, i]: i <= j
    seg = cum.transpose(1, 2)[..., :, None] - cum.transpose(1, 2)[..., None, :]  # [b, h, j, i]
    return cum, torch.exp(seg.masked_fill(~later, float("-inf")))


def _ssd_closed_form(x, dt, A, B, C, s0):
    """Mamba-2 from state ``s0`` ``[b, h, p, n]`` over ``s`` positions, every state materialised.
    x ``[b, s, h, p]``, dt ``[b, s, h]``, B/C ``[b, s, h, n]`` -> (y ``[b, s, h, p]``, states
    ``[b, s, h, p, n]``)."""
    cum, decay = _decays(dt, A)
    xdt = x * dt[..., None]
    states = torch.einsum("bhji,bihp,bihn->bjhpn", decay, xdt, B)
    states = states + torch.exp(cum)[..., None, None] * s0[:, None]
    return torch.einsum("bjhpn,bjhn->bjhp", states, C), states


class PendingSSDStates:
    """Mamba-2's states after each of ``s`` new positions, not materialised: the state ``s0``
    ``[b, h, p, n]`` the step started from, the cumulated log decays ``cum`` ``[b, s, h]``, the
    inputs ``xdt`` ``[b, s, h, p]`` and ``B`` ``[b, s, h, n]``. :meth:`after` computes the one a
    commit keeps (``s0`` must still hold the step's start state then: commits come before the
    next forward)."""

    def __init__(self, s0, cum, xdt, B):
        self.s0, self.cum, self.xdt, self.B = s0, cum, xdt, B

    def after(self, n: int | torch.Tensor | DeviceCount) -> torch.Tensor:
        """The state after the first ``n`` positions (``n`` >= 1: an int, or on the device, read
        by index there)."""
        if isinstance(n, torch.Tensor):
            n = DeviceCount(n, self.cum.shape[1])
        if isinstance(n, DeviceCount):
            end = self.cum.index_select(1, n.last)  # [b, 1, h]
            weight = torch.exp(end - self.cum + n.bias[None, :, None])  # 0 past the kept ones
            xdt, B = self.xdt, self.B
        else:
            end = self.cum[:, n - 1:n]
            weight, xdt, B = torch.exp(end - self.cum[:, :n]), self.xdt[:, :n], self.B[:, :n]
        return torch.exp(end[:, 0])[..., None, None] * self.s0 + torch.einsum("bih,bihp,bihn->bhpn", weight, xdt, B)


def _ssd_verify(x, dt, A, B, C, s0):
    """Mamba-2 from state ``s0`` over ``s`` positions without materialising a state: the outputs
    by the scan's quadratic form (``y_j = sum_{i<=j} exp(cum_j - cum_i) (C_j . B_i) x_i dt_i +
    exp(cum_j) C_j . s0``) and the states as :class:`PendingSSDStates`. Shapes as
    :func:`_ssd_closed_form`."""
    cum, decay = _decays(dt, A)
    mix = decay * torch.einsum("bjhn,bihn->bhji", C, B)
    xdt = x * dt[..., None]
    y = torch.einsum("bhji,bihp->bjhp", mix, xdt)
    y = y + torch.einsum("bjhn,bhpn->bjhp", C, s0) * torch.exp(cum)[..., None]
    return y, PendingSSDStates(s0, cum, xdt, B)


def _ssd_chunked(x, dt, A, B, C, s0, chunk: int):
    """Long forwards: the layer's chunked scan from zero plus ``s0``'s decayed contribution;
    returns y and the final state only."""
    y = ssd_scan_torch(x, dt, A, B, C, chunk)  # B/C per head: one group per head
    cum = torch.cumsum(dt * A, dim=1)  # [b, s, h]
    y = y + torch.einsum("bshn,bhpn,bsh->bshp", C, s0, torch.exp(cum))
    to_end = torch.exp(cum[:, -1:] - cum)  # [b, s, h]
    final = torch.exp(cum[:, -1])[..., None, None] * s0 + torch.einsum(
        "bsh,bshp,bshn->bhpn", to_end, x * dt[..., None], B)
    return y, final


def mamba_step(mixer, hidden, state: RecurrentState, ctx: StepContext, keep: bool):
    """Mamba-2 mixer over the new positions: ``[s, b, h] -> (out, bias)``; stages the state.
    Verified ``"recurrent"``ly, everything between the two projections runs one position at a
    time on the rows of that position alone (:func:`_mamba_inner` of ``s = 1``, from the state the
    position before left): a plain step's operations on a plain step's shapes and layouts, so even
    a CPU's vectorised element-wise kernels, which round the elements of a vector's tail unlike the
    rest, give each position what a plain step gives it."""
    zxBCdt, _ = mixer.in_proj(hidden)  # [s, b, in_proj_dim]
    if not (keep and state.verify == "recurrent"):
        y, windows, states = _mamba_inner(mixer, zxBCdt, state, ctx.valid, keep)
    else:
        conv, s0, ys, windows, states = state.conv, state.state, [], [], []
        for j in range(zxBCdt.shape[0]):
            y, conv, s0 = _mamba_inner(mixer, zxBCdt[j:j + 1], state, ctx.valid[:, j:j + 1], False,
                                       conv=conv, s0=s0)
            ys.append(y)
            windows.append(conv)
            states.append(s0)
        y, windows, states = torch.cat(ys), torch.stack(windows), torch.stack(states)
    state.stage(windows, states, per_position=keep)
    return mixer.out_proj(y)


def _mamba_inner(mixer, zxBCdt, state: RecurrentState, valid, keep: bool, conv=None, s0=None):
    """Mamba-2 between its projections over ``s`` positions, ``[s, b, in_proj_dim] -> (y [s, b,
    d_inner], windows, states)``: per position (``[s, ...]``) with ``keep``, else the last; from
    the state's conv window and SSM state, or ``conv`` / ``s0`` in their place."""
    di, nh, n = mixer.d_inner_local_tp, mixer.nheads_local_tp, mixer.d_state
    gn = mixer.ngroups_local_tp * n
    s0 = state.state if s0 is None else s0
    z, xBC, dt = torch.split(zxBCdt.transpose(0, 1), [di, di + 2 * gn, nh], dim=-1)  # [b, s, .]
    xBC, windows = _conv(xBC.transpose(1, 2), state, valid, keep, conv=conv)
    x, B, C = torch.split(xBC.transpose(1, 2).float(), [di, gn, gn], dim=-1)
    x = x.unflatten(-1, (nh, mixer.headdim))  # [b, s, h, p]
    dt = F.softplus(dt.float() + mixer.dt_bias.float())
    dt = torch.where(valid[..., None], dt, torch.zeros_like(dt))  # padded: no decay, no input
    A = -torch.exp(mixer.A_log.float())
    heads_per_group = nh // mixer.ngroups_local_tp
    B = B.unflatten(-1, (-1, n)).repeat_interleave(heads_per_group, dim=2)  # [b, s, h, n]
    C = C.unflatten(-1, (-1, n)).repeat_interleave(heads_per_group, dim=2)
    s = x.shape[1]
    if keep and state.verify == "quadratic":  # the state a later commit keeps, computed then
        y, states = _ssd_verify(x, dt, A, B, C, s0)
    elif keep:  # "closed": every position's state materialised, [s, b, h, p, n]
        y, states = _ssd_closed_form(x, dt, A, B, C, s0)
        states = states.transpose(0, 1)
    elif s <= CLOSED_FORM_MAX:
        y, states = _ssd_closed_form(x, dt, A, B, C, s0)
        states = states[:, -1]  # the last
    else:
        y, states = _ssd_chunked(x, dt, A, B, C, s0, getattr(mixer, "chunk_size", 64))
    y = (y + x * mixer.D.float()[:, None]).flatten(-2)  # [b, s, d_inner]
    y = mixer.norm(y, z.float()).to(zxBCdt.dtype).transpose(0, 1).contiguous()  # [s, b, d_inner]
    return y, windows, states


def new_m2rnn_state(mixer, batch: int, dtype, device) -> RecurrentState:
    d = mixer.dims
    weight, _ = conv_parameters(mixer)
    conv = torch.zeros(batch, weight.shape[0], weight.shape[-1] - 1, dtype=dtype, device=device)
    state = torch.zeros(batch, mixer.nheads_local, d.k_dim, d.v_dim, dtype=torch.float32,
                        device=device)
    return RecurrentState(mixer, conv, state)


def m2rnn_step(mixer, hidden, state: RecurrentState, ctx: StepContext, keep: bool):
    """M2RNN mixer over the new positions: ``[s, b, h] -> (out, bias)``; stages the state.
    The recurrence of :func:`~megacpp_mcore.layers.mixers.m2rnn.m2rnn_scan_torch`, from the
    session's state, one position at a time: in one Triton kernel on CUDA
    (:mod:`.m2rnn_triton`), else :func:`m2rnn_recurrence`."""
    d, nh = mixer.dims, mixer.nheads_local
    proj, _ = mixer.in_proj(hidden)  # [s, b, nh * (2K + V + 1)]
    s, b = proj.shape[:2]
    proj = proj.reshape(s, b, nh, d.head_proj_dim)
    gate = proj[..., -1]  # [s, b, nh]
    qkv = proj[..., :-1].reshape(s, b, nh * d.qkv_dim).permute(1, 2, 0)  # [b, C, s]
    qkv, windows = _conv(qkv, state, ctx.valid, keep)
    if _step_kernel(qkv, d.k_dim, d.v_dim, s):
        from megacpp_mcore.infer import m2rnn_triton

        y, states = m2rnn_triton.m2rnn_step(qkv, gate, mixer.forget_bias, mixer.recurrent_weight,
                                            state.state, ctx.valid, keep, hidden.dtype)
        state.stage(windows, states, per_position=keep)
        return mixer.out_proj(y)
    qkv = qkv.permute(0, 2, 1).reshape(b, s, nh, d.qkv_dim).float()
    q, k, v = torch.split(qkv, [d.k_dim, d.k_dim, d.v_dim], dim=-1)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    f = torch.sigmoid(gate.float().transpose(0, 1) + mixer.forget_bias)  # [b, s, nh]
    y, states = m2rnn_recurrence(q, k, v, f, mixer.recurrent_weight, state.state, ctx.valid, keep)
    state.stage(windows, states, per_position=keep)
    y = y.to(hidden.dtype)  # [b, s, nh, V]
    return mixer.out_proj(y.transpose(0, 1).reshape(s, b, nh * d.v_dim))


# The M2RNN step's Triton kernel where it runs (False: the torch recurrence everywhere).
M2RNN_STEP_KERNEL = True


def _step_kernel(x: torch.Tensor, k_dim: int, v_dim: int, s: int) -> bool:
    """Whether the M2RNN step runs as the Triton kernel: allowed (:data:`M2RNN_STEP_KERNEL`),
    CUDA tensors, Triton installed, head sizes and a number of positions it takes."""
    if not (M2RNN_STEP_KERNEL and x.is_cuda) or backends.detect().triton is None:
        return False
    from megacpp_mcore.infer import m2rnn_triton

    return m2rnn_triton.supported(k_dim, v_dim, s)


def m2rnn_recurrence(q, k, v, f, weight, h0, valid, keep: bool):
    """The M2RNN recurrence in torch from state ``h0`` ``[b, heads, K, V]`` over ``s`` positions:
    q, k ``[b, s, heads, K]`` (normalised), v ``[b, s, heads, V]``, f ``[b, s, heads]``, valid
    ``[b, s]`` (a padded slot leaves the state as it is). Returns y ``[b, s, heads, V]`` (fp32)
    and the states ``[s, b, heads, K, V]`` after every position (``keep``) or the last."""
    h, ys, states = h0, [], []
    for t in range(q.shape[1]):
        f_t = f[:, t, :, None, None]  # [b, h, 1, 1]
        update = torch.tanh(h @ weight + k[:, t, :, :, None] * v[:, t, :, None, :])
        h = torch.where(valid[:, t, None, None, None], f_t * h + (1 - f_t) * update, h)
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], h))
        if keep:
            states.append(h)
    return torch.stack(ys, dim=1), torch.stack(states) if keep else h
