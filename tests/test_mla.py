"""MLA through the adapter seam: spec, plain-torch reference, packed sequences, TP parity, refusals,
patches. CPU (local backend) unless marked ``gpu``."""

from __future__ import annotations

import math

import pytest
import torch

from megacpp_mcore.layers import mla
from megacpp_mcore.models import accounting
from megacpp_mcore.train import runtime
from megacpp_mcore.spec.block import hybrid_block_spec
from megacpp_mcore.spec.pattern import FeaturePlacement, PatternError
from megacpp_mcore.models.presets import get_preset
from megacpp_mcore.testing.parity import model_from_spec
from scripts_module import load_script

MLA_DIMS = {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_head_dim": 16, "qk_pos_emb_head_dim": 8,
            "v_head_dim": 24}
TINY_MLA = {
    "pattern": "AE", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
    "ffn_hidden_size": 128, "vocab_size": 128, "seq_length": 32, "moe": None, "mla": MLA_DIMS,
}


def _model(**mla_changes):
    return model_from_spec(dict(TINY_MLA, mla=dict(MLA_DIMS, **mla_changes)))


def layer_backend():
    from megacpp_mcore.spec.backends import get_backend

    return get_backend("local")


def _config(model, **overrides):
    return runtime.transformer_config(model, runtime.Parallelism(), **overrides)


def _layer(model, config, index=0):
    """Global layer ``index`` of the hybrid stack, built alone (layer_number is 1-based)."""
    from megatron.core.transformer.spec_utils import build_module

    spec = hybrid_block_spec(model.pattern, backend="local", num_layers=model.num_layers,
                             **model.feature_configs).submodules.layer_spec(config, index)
    return build_module(spec, config=config, layer_number=index + 1)


# ----------------------------------------------------------------------------- plain-torch reference
def _rms(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, positions, base=10000.0):
    """RoPE on the last dim of ``x`` [s, b, n, d] (DeepSeek layout: interleaved pairs first
    de-interleaved into halves, then rotated as (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin))."""
    d = x.shape[-1]
    x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = positions[:, None].float() * inv_freq[None]  # [s, d/2]
    cos = torch.cat((angles.cos(), angles.cos()), -1)[:, None, None]
    sin = torch.cat((angles.sin(), angles.sin()), -1)[:, None, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat((-x2, x1), -1) * sin


class ReferenceMLA(torch.nn.Module):
    """DeepSeek-V2 MLA residual sub-layer written from the paper, in plain torch."""

    def __init__(self, *, hidden, heads, q_lora_rank, kv_lora_rank, qk_head_dim, qk_pos_emb_head_dim,
                 v_head_dim):
        super().__init__()
        self.heads, self.qk, self.pe, self.v = heads, qk_head_dim, qk_pos_emb_head_dim, v_head_dim
        self.kv_lora_rank = kv_lora_rank
        q_dim = heads * (qk_head_dim + qk_pos_emb_head_dim)
        self.norm = torch.nn.Parameter(1 + 0.1 * torch.randn(hidden))
        if q_lora_rank:
            self.q_down = torch.nn.Linear(hidden, q_lora_rank, bias=False)
            self.q_norm = torch.nn.Parameter(1 + 0.1 * torch.randn(q_lora_rank))
            self.q_up = torch.nn.Linear(q_lora_rank, q_dim, bias=False)
        else:
            self.q_proj = torch.nn.Linear(hidden, q_dim, bias=False)
        self.kv_down = torch.nn.Linear(hidden, kv_lora_rank + qk_pos_emb_head_dim, bias=False)
        self.kv_norm = torch.nn.Parameter(1 + 0.1 * torch.randn(kv_lora_rank))
        self.kv_up = torch.nn.Linear(kv_lora_rank, heads * (qk_head_dim + v_head_dim), bias=False)
        self.out = torch.nn.Linear(heads * v_head_dim, hidden, bias=False)

    def attention(self, x, positions, doc_ids=None):  # x [s, b, h] -> [s, b, h]
        s, b, _ = x.shape
        h = _rms(x, self.norm)
        if hasattr(self, "q_proj"):
            q = self.q_proj(h)
        else:
            q = self.q_up(_rms(self.q_down(h), self.q_norm))
        q = q.view(s, b, self.heads, self.qk + self.pe)
        latent, k_pe = self.kv_down(h).split([self.kv_lora_rank, self.pe], -1)
        kv = self.kv_up(_rms(latent, self.kv_norm)).view(s, b, self.heads, self.qk + self.v)
        k_nope, v = kv.split([self.qk, self.v], -1)
        q_nope, q_pe = q.split([self.qk, self.pe], -1)
        q = torch.cat((q_nope, _rope(q_pe, positions)), -1)
        k_pe = _rope(k_pe[:, :, None, :], positions).expand(-1, -1, self.heads, -1)
        k = torch.cat((k_nope, k_pe), -1)
        scores = torch.einsum("sbnd,tbnd->bnst", q, k) / math.sqrt(self.qk + self.pe)
        visible = torch.ones(s, s, dtype=torch.bool).tril()
        if doc_ids is not None:
            visible &= doc_ids[:, None] == doc_ids[None, :]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        ctx = torch.einsum("bnst,tbnd->sbnd", probs, v).reshape(s, b, self.heads * self.v)
        return x + self.out(ctx)

    def megatron_state_dict(self) -> dict[str, torch.Tensor]:
        """The same weights under Megatron's MLA TransformerLayer names (local backend)."""
        sd = {"input_layernorm.weight": self.norm,
              "self_attention.linear_kv_down_proj.weight": self.kv_down.weight,
              "self_attention.kv_layernorm.weight": self.kv_norm,
              "self_attention.linear_kv_up_proj.weight": self.kv_up.weight,
              "self_attention.linear_proj.weight": self.out.weight}
        if hasattr(self, "q_proj"):
            sd["self_attention.linear_q_proj.weight"] = self.q_proj.weight
        else:
            sd.update({"self_attention.linear_q_down_proj.weight": self.q_down.weight,
                       "self_attention.q_layernorm.weight": self.q_norm,
                       "self_attention.linear_q_up_proj.weight": self.q_up.weight})
        return {k: v.detach().clone() for k, v in sd.items()}


@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["q_lora", "no_q_lora"])
def test_matches_plain_torch_reference(single_rank, q_lora_rank):
    model = _model(q_lora_rank=q_lora_rank)
    config = _config(model)
    layer = _layer(model, config)
    torch.manual_seed(0)
    ref = ReferenceMLA(hidden=64, heads=4, **dict(MLA_DIMS, q_lora_rank=q_lora_rank))
    missing, unexpected = layer.load_state_dict(ref.megatron_state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("_extra_state")]
    x = torch.randn(12, 2, 64)
    out, _ = layer(x.clone().requires_grad_(), attention_mask=None)
    expected = ref.attention(x, torch.arange(12))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # gradients flow to the same weights
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(layer.self_attention.linear_kv_down_proj.weight.grad,
                               ref.kv_down.weight.grad, atol=1e-4, rtol=1e-4)


def test_spec_uses_seam_classes_and_channel_metadata(single_rank):
    model = _model()
    config = _config(model)
    meta = mla.channel_metadata(config)
    assert (meta.k_channels, meta.v_channels) == (16 + 8, 24)
    layer = _layer(model, config)
    attn = layer.self_attention
    assert isinstance(attn, mla.LatentSelfAttention)
    core = attn.core_attention
    assert isinstance(core, mla.LatentDotProductAttention)
    assert (core.k_channels, core.v_channels) == (24, 24)
    assert core.hidden_size_per_partition == 4 * 24  # heads * v_head_dim, not kv_channels
    assert attn.softmax_scale == pytest.approx(1 / math.sqrt(24))
    # upstream's down-projection allow-list compares exact classes (no subclasses/ModuleSpecs)
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    subs = mla.mla_self_attention_spec(config, layer_backend()).submodules
    assert subs.linear_q_down_proj is ColumnParallelLinear
    assert subs.linear_kv_down_proj is ColumnParallelLinear
    # E layers of an MLA model are untouched
    assert _layer(model, config, 1).self_attention.__class__.__name__ == "IdentityOp"


def test_plan_attention_params_match_instantiated(single_rank):
    for q_lora_rank in (32, None):
        model = _model(q_lora_rank=q_lora_rank)
        layer = _layer(model, _config(model))
        built = sum(p.numel() for p in layer.parameters())
        assert accounting.attention_params(model, mla=True) == built, q_lora_rank


def _packed_params(lengths):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))


@pytest.mark.parametrize("v_head_dim", [None, 16], ids=["v-equal-qk", "v-narrower"])
def test_packed_documents_match_separate_runs(single_rank, v_head_dim):
    """thd-packed batch through the whole GPT model = each document run on its own; also with a V
    head dim below the Q/K one (megatron-core 0.18+ pads V of a packed batch itself)."""
    model = _model() if v_head_dim is None else _model(v_head_dim=v_head_dim)
    (gpt,) = runtime.build_model(model, _config(model), backend="local", wrap_ddp=False)
    gpt.eval()
    lengths = [5, 9, 18]
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 128, (1, n + 1), generator=g) for n in lengths]
    tokens = torch.cat([d[:, :-1] for d in docs], 1)  # [1, t]
    labels = torch.cat([d[:, 1:] for d in docs], 1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    params = _packed_params(lengths)
    rotary_shapes = []
    gpt.decoder.layers[0].self_attention.rotary_pos_emb.register_forward_hook(
        lambda module, args, out: rotary_shapes.append(tuple(out.shape)))
    with torch.no_grad():
        packed = gpt(tokens, positions, None, labels=labels, packed_seq_params=params)  # [1, t]
    assert rotary_shapes == [mla.packed_rotary_shape(gpt.config, params)] == [(18, 1, 1, 8)]
    with torch.no_grad():
        separate = torch.cat([gpt(d[:, :-1], torch.arange(d.shape[1] - 1)[None], None,
                                  labels=d[:, 1:]) for d in docs], 1)
        unmasked = gpt(tokens, positions, None, labels=labels)  # documents see each other
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
    assert (unmasked[0, 5:] - separate[0, 5:]).abs().max() > 1e-3  # the check can fail


def test_packed_causal_mask():
    mask = mla.packed_causal_mask(_packed_params([2, 3]), 5, 5, "cpu")[0, 0]
    visible = (~mask).int().tolist()
    assert visible == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                       [0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="cu_seqlens end at q=5"):
        mla.packed_causal_mask(_packed_params([2, 3]), 6, 6, "cpu")


def test_mla_trains_on_local_backend(single_rank):
    from megacpp_mcore.testing.parity import synthetic_batches

    model = _model()
    chunks = runtime.build_model(model, _config(model), backend="local")
    optimizer = runtime.build_optimizer(chunks, lr=3e-3)
    losses = []
    for step in range(12):
        micro = synthetic_batches(seed=1, step=step % 2, global_batch=4, seq_length=32, vocab=128,
                                  dp_rank=0, dp=1, micro_batch_size=2)
        result = runtime.train_step(chunks, optimizer, iter(micro), num_microbatches=len(micro),
                                    micro_batch_size=2, seq_length=32)
        losses.append(result["loss"])
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses


# ------------------------------------------------------------------------------------- refusals
def test_te_head_dims_refused_at_build_time_naming_backend_and_dims():
    from megacpp_mcore.spec import backends

    te, local = backends.provider("te"), backends.provider("local")  # no TE needed to answer
    model = _model(qk_head_dim=250, qk_pos_emb_head_dim=14)
    config = _config(model)
    with pytest.raises(mla.MLAUnsupported, match=r"backend 'te'.*k_channels=264 \(qk_head_dim=250"):
        mla.mla_self_attention_spec(config, te)  # refused before any TE class is touched
    mla.check_support(config, local)  # the local backend runs any head dims
    tp2 = _config(_model(), tensor_model_parallel_size=2)
    with pytest.raises(mla.MLAUnsupported, match=r"backend 'te'.*tp=2 needs sequence_parallel=True"):
        mla.check_support(tp2, te)
    mla.check_support(tp2, local)


def test_local_tp_split_refused_at_build_time():
    model = _model(kv_lora_rank=31, qk_pos_emb_head_dim=8)
    config = _config(model, tensor_model_parallel_size=2)
    spec = hybrid_block_spec("AE", backend="local", num_layers=4, mla=model.mla)
    with pytest.raises(mla.MLAUnsupported,
                       match=r"backend 'local'.*kv_lora_rank \+ qk_pos_emb_head_dim = 39 is not divisible by tp=2"):
        spec.submodules.layer_spec(config, 0)


def test_mixed_mla_and_standard_attention_refused():
    model = _model()
    config = _config(model)
    partial = hybrid_block_spec("AE", backend="local", num_layers=4,
                                mla=FeaturePlacement(layers=(0,)))
    with pytest.raises(mla.MLAUnsupported, match=r"layer 2 \('A'\) has standard attention in an MLA"):
        partial.submodules.layer_spec(config, 2)
    plain_config = runtime.transformer_config(model.replace(mla=None), runtime.Parallelism())
    with pytest.raises(mla.MLAUnsupported, match=r"layer 0 \('A'\) carries 'mla'.*without MLA dims"):
        partial.submodules.layer_spec(plain_config, 0)


def test_spec_and_config_dims_must_agree():
    model = _model()
    config = _config(_model(kv_lora_rank=48))
    spec = hybrid_block_spec("AE", backend="local", num_layers=4, mla=model.mla)
    with pytest.raises(mla.MLAUnsupported, match="kv_lora_rank: spec 32 vs config 48"):
        spec.submodules.layer_spec(config, 0)


def test_mla_on_non_attention_layer_refused():
    with pytest.raises(PatternError, match="mla"):
        hybrid_block_spec("AE", backend="local", num_layers=4, mla=FeaturePlacement(layers=(1,)))


def test_nam56r_preset_uses_mla_on_every_attention_layer():
    preset = get_preset("nam56r")
    assert preset.mla is not None
    table = preset.layer_table()
    assert all(("mla" in e.features) == (e.symbol == "A") for e in table)
    config = _config(get_preset("nam56r-tiny"))
    assert mla.is_mla_config(config) and config.qk_layernorm and config.rope_type == "rope"


# -------------------------------------------------------------------------------------- patches
def test_have_te_patch(single_rank):
    import importlib

    import megacpp_mcore.patches as patches
    from megacpp_mcore.patches import mla_have_te

    assert "megacpp_mcore.patches.mla_have_te" in patches.REGISTRY
    assert "megacpp_mcore.patches.mla_down_proj_tp_marker" in patches.REGISTRY
    assert mla_have_te.NAME and mla_have_te.TARGETS and mla_have_te.DESCRIPTION
    module = importlib.import_module("megatron.core.transformer.multi_latent_attention")
    from megacpp_mcore.spec import backends

    if backends.detect().te:
        pytest.skip("TE is installed: the defect only shows without TE")
    if _mcore_before((0, 17)):  # megatron-core 0.16: the defect is there and the patch applied
        assert mla_have_te.check() == "needed"
        assert module.HAVE_TE is False and module.TELinear is None  # runtime.initialize applied it
    else:  # fixed upstream from 0.17: retire, never applied
        assert mla_have_te.check() == "fixed-upstream"
    assert mla_have_te.apply() == []  # idempotent


def test_down_proj_tp_marker_patch_logic():
    from megacpp_mcore.patches import mla_down_proj_tp_marker as patch

    class FakeTELinear(torch.nn.Module):  # TE marks every weight tensor-parallel, like TE does
        def __init__(self, input_size, output_size, *, parallel_mode, config=None, is_expert=False):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(output_size, input_size))
            self.weight.tensor_model_parallel = True

    assert patch.patch_class(FakeTELinear)
    assert patch.patch_class(FakeTELinear) == []  # idempotent
    assert FakeTELinear(4, 4, parallel_mode="duplicated").weight.tensor_model_parallel is False
    assert FakeTELinear(4, 4, parallel_mode="column").weight.tensor_model_parallel is True
    assert FakeTELinear(4, 4, parallel_mode="duplicated", is_expert=True).weight.tensor_model_parallel
    from megacpp_mcore.spec import backends

    if not backends.detect().te:  # the check reads upstream's source: 0.16 lacks the marker
        expected = "needed" if _mcore_before((0, 17)) else "fixed-upstream"
        assert patch.check() == expected and patch.apply() == []  # nothing to patch without TE


def _mcore_before(version: tuple[int, int]) -> bool:
    import megatron.core

    return tuple(int(p) for p in megatron.core.__version__.split(".")[:2]) < version


# ----------------------------------------------------------------------------------- TP parity
@pytest.mark.distributed
def test_tp2_sp_pp2_matches_single_rank():
    """One 4-rank launch covers TP=2+SP and PP=2 (MLA layers on both stages, global offsets)."""
    from megacpp_mcore.testing.parity import compare_parallel

    # Step 1 catches a wrong rope-key gradient under TP (2.5e-5 relative grad-norm drift without
    # mla._SumRopeKeyGrad); with it the runs agree to ~1e-7.
    ref, runs = compare_parallel(TINY_MLA, {"tp": 2, "sp": True, "pp": 2}, steps=2, nproc=4)
    assert sorted(run["pp_rank"] for run in runs) == [0, 0, 1, 1]
    for run in runs:
        assert run["losses"] == pytest.approx(ref["losses"], rel=2e-6, abs=1e-7)
        assert run["grad_norms"] == pytest.approx(ref["grad_norms"], rel=2e-6, abs=1e-7)
    assert ref["losses"][-1] < ref["losses"][0]


# -------------------------------------------------------------------------------------- GPU / TE
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with Transformer Engine")
def test_te_packed_documents_match_separate_runs(single_rank):
    model = model_from_spec(dict(TINY_MLA, hidden_size=256, mla=dict(
        q_lora_rank=64, kv_lora_rank=64, qk_head_dim=64, qk_pos_emb_head_dim=32, v_head_dim=64)))
    config = _config(model)
    (gpt,) = runtime.build_model(model, config, backend="te", wrap_ddp=False)
    gpt.eval()
    core = gpt.decoder.layers[0].self_attention.core_attention
    assert type(core).__name__ == "LatentTEDotProductAttention"
    lengths = [40, 72, 16]
    docs = [torch.randint(0, 128, (1, n + 1), device="cuda") for n in lengths]
    tokens = torch.cat([d[:, :-1] for d in docs], 1)
    labels = torch.cat([d[:, 1:] for d in docs], 1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    params = _packed_params(lengths)
    for name in ("cu_seqlens_q", "cu_seqlens_kv"):
        setattr(params, name, getattr(params, name).cuda())
    with torch.no_grad():
        packed = gpt(tokens, positions, None, labels=labels, packed_seq_params=params)
        separate = torch.cat([gpt(d[:, :-1], torch.arange(d.shape[1] - 1, device="cuda")[None],
                                  None, labels=d[:, 1:]) for d in docs], 1)
    # bf16: per-document mean losses agree to bf16 precision
    for a, b in zip(packed.float().split(lengths, 1), separate.float().split(lengths, 1)):
        assert a.mean().item() == pytest.approx(b.mean().item(), abs=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with Transformer Engine")
def test_te_down_projection_not_marked_tensor_parallel(single_rank):
    model = _model(qk_head_dim=32, v_head_dim=32)
    (gpt,) = runtime.build_model(model, _config(model), backend="te", wrap_ddp=False)
    attn = gpt.decoder.layers[0].self_attention
    for proj in (attn.linear_q_down_proj, attn.linear_kv_down_proj):
        assert type(proj).__name__ == "TELinear"
        assert all(p.tensor_model_parallel is False for p in proj.parameters())
    assert attn.linear_kv_up_proj.weight.tensor_model_parallel is True


# ------------------------------------------------------------------------ ours vs upstream spec
def _bench():
    return load_script("bench_mla")


def test_bench_smoke_same_loss_as_upstream_spec(tmp_path):
    """CPU: our A+E stack and upstream's MLA layer spec, same weights -> same step-0 loss."""
    result = _bench().main(["--smoke", "--out", str(tmp_path / "bench.json")])
    assert result["step0_loss"]["abs_diff"] < 1e-6
    assert result["shapes"]["layers"] == 2 and (tmp_path / "bench.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with Transformer Engine")
def test_te_same_loss_as_upstream_te_mla_spec():
    result = _bench().main(["--layers", "2", "--hidden", "512", "--heads", "4", "--ffn", "1024",
                            "--seq", "512", "--vocab", "4096", "--iters", "3", "--warmup", "1"])
    assert result["backend"] == "te"
    assert "LatentTEDotProductAttention" in result["attention_modules"]["ours"]
    assert result["loss_match"], result["step0_loss"]


@pytest.mark.parametrize("rope_type", ["rope", "yarn"])
def test_gathered_tokens_rotate_at_their_own_positions(single_rank, rope_type):
    """``rotary_pos_emb=TokenPositions(index, length)`` (MoD top-k, FlexiDepth hard skip hand MLA
    tokens gathered from a longer sequence): each token is rotated at its own position, per
    sequence; the plain-torch reference with those positions gives the same output (YaRN at factor
    1, Megatron-LM's MLA default, is plain RoPE)."""
    from megacpp_mcore.layers.mla import TokenPositions

    model = _model()
    layer = _layer(model, _config(model, rope_type=rope_type, rotary_scaling_factor=1.0))
    torch.manual_seed(0)
    ref = ReferenceMLA(hidden=64, heads=4, **MLA_DIMS)
    layer.load_state_dict(ref.megatron_state_dict(), strict=False)
    index = torch.tensor([[0, 1], [3, 2], [4, 7], [9, 8], [15, 13]])  # [k, b]: kept positions, in order
    x = torch.randn(5, 2, 64)
    out, _ = layer(x, attention_mask=None, rotary_pos_emb=TokenPositions(index, length=16))
    for b in range(2):
        expected = ref.attention(x[:, b:b + 1], index[:, b])
        torch.testing.assert_close(out[:, b:b + 1], expected, atol=1e-5, rtol=1e-5)
    assert "rotary_pos_emb" not in layer.self_attention.__dict__  # the module is back
    plain, _ = layer(x, attention_mask=None)  # positions 0..4: what the gather used to give
    assert not torch.allclose(plain, out, atol=1e-3)
