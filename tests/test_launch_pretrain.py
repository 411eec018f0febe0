"""megacpp_mcore.upstream.launch_pretrain on CPU: argument handling, refusals, and the model builder that
``pretrain_gpt.py``'s ``pretrain`` calls (Megatron-LM's training package needs triton and CUDA, so the
full path runs in the gpu test of tests/test_recipes.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megacpp_mcore.upstream import launch_pretrain as lp

MIRROR = Path("/work/.mirror/NVIDIA+Megatron-LM/repo")


@pytest.fixture
def checkout(tmp_path):
    """A directory with the files the launcher requires of a Megatron-LM checkout (empty stand-ins:
    the argv checks never import them)."""
    for name in lp.CHECKOUT_FILES:
        path = tmp_path / name
        if name.endswith(".py"):
            path.write_text("")
        else:
            path.mkdir(parents=True)
    return tmp_path


@pytest.fixture
def restore_spec_import(monkeypatch):
    from megatron.core.transformer import spec_utils

    monkeypatch.setattr(spec_utils, "import_module", spec_utils.import_module)


def _args(**overrides) -> argparse.Namespace:
    """What Megatron's parser yields for the fields the builder reads (defaults of core_v0.16.1),
    and our flags' defaults from our own argument group."""
    values = vars(lp.add_megacpp_arguments(argparse.ArgumentParser()).parse_args([])) | dict(
        spec=["layer_specs.nam56r_lite", "NAM56R_LITE_AE"], transformer_impl="local",
        padded_vocab_size=128, max_position_embeddings=32, fp16_lm_cross_entropy=False,
        untie_embeddings_and_output_weights=True, position_embedding_type="rope",
        rotary_percent=1.0, rotary_base=10000, use_rope_scaling=False, mtp_num_layers=None,
        use_legacy_models=False, yaml_cfg=None, multi_latent_attention=False, q_lora_rank=None,
        kv_lora_rank=32, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
        qk_layernorm=False, rope_type=None, rotary_scaling_factor=1.0,
    )
    assert set(lp.MEGATRON_ARGS_READ) <= set(values)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_split_argv_and_refusals(checkout):
    root, rest = lp.split_argv(["--megatron-lm", str(checkout), "--spec", "m", "A", "--bf16"])
    assert root == checkout.resolve() and rest == ["--spec", "m", "A", "--bf16"]
    cases = {
        ("--spec", "m", "A"): "--megatron-lm PATH",
        ("--megatron-lm", "/nonexistent/mlm", "--spec", "m", "A"): "missing pretrain_gpt.py",
        ("--megatron-lm", str(checkout), "--bf16"): "--spec MODULE ATTR is required",
        ("--megatron-lm", str(checkout), "--spec", "m", "A", "--mtp-num-layers", "2"):
            "--megacpp-mtp-depth",
        ("--megatron-lm", str(checkout), "--spec", "m", "A", "--yaml-cfg=x.yaml"): "--yaml-cfg",
    }
    for argv, message in cases.items():
        with pytest.raises(lp.LaunchError, match=message):
            lp.split_argv(list(argv))


def test_help_without_a_checkout(capsys):
    assert lp.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--megatron-lm PATH" in out and "--megacpp-mtp-depth" in out


def test_main_reports_one_line_and_exit_2(checkout, capsys):
    assert lp.main(["--megatron-lm", str(checkout), "--spec", "m", "A", "--mtp-num-layers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("launch_pretrain: error: --mtp-num-layers")


def test_backend_follows_transformer_impl():
    assert lp.layer_spec_from_args(_args()).submodules.backend == "local"
    te = lp.layer_spec_from_args(_args(transformer_impl="transformer_engine"))
    assert te.submodules.backend == "te"
    local_spec = _args(spec=["layer_specs.nam56r_lite", "NAM56R_LITE_LOCAL"],
                       transformer_impl="transformer_engine", multi_latent_attention=True,
                       **_lite_mla())
    assert lp.layer_spec_from_args(local_spec).submodules.backend == "local"  # explicit wins
    with pytest.raises(lp.LaunchError, match="inference_optimized has no megacpp_mcore backend"):
        lp.layer_spec_from_args(_args(transformer_impl="inference_optimized"))


def _lite_mla() -> dict:
    from megacpp_mcore.models.presets import get_preset

    mla = get_preset("nam56r-lite").mla
    return {f: getattr(mla, f) for f in lp.MLA_FIELDS} | lp.mla_settings(mla)


def test_mla_flags_must_match_the_spec():
    lite = ["layer_specs.nam56r_lite", "NAM56R_LITE"]
    with pytest.raises(lp.LaunchError, match="add --multi-latent-attention"):
        lp.layer_spec_from_args(_args(spec=lite))
    wrong = dict(_lite_mla(), kv_lora_rank=512)
    with pytest.raises(lp.LaunchError, match=r"--kv-lora-rank 512 \(spec: 256\)"):
        lp.layer_spec_from_args(_args(spec=lite, multi_latent_attention=True, **wrong))
    # Megatron-LM's default builds MLA without the latent norms: not the package's MLA
    with pytest.raises(lp.LaunchError, match=r"--qk-layernorm False \(the package's MLA: True; pass "
                                             r"--qk-layernorm\)"):
        lp.layer_spec_from_args(_args(spec=lite, multi_latent_attention=True,
                                      **dict(_lite_mla(), qk_layernorm=False)))
    with pytest.raises(lp.LaunchError, match=r"--rotary-scaling-factor 40.0 \(YaRN"):
        lp.layer_spec_from_args(_args(spec=lite, multi_latent_attention=True, rotary_scaling_factor=40.0,
                                      **_lite_mla()))
    # YaRN at factor 1 (Megatron-LM's MLA default, what its fused MLA RoPE takes) is plain RoPE
    lp.layer_spec_from_args(_args(spec=lite, multi_latent_attention=True, rope_type="yarn", **_lite_mla()))
    ok = lp.layer_spec_from_args(_args(spec=lite, multi_latent_attention=True, **_lite_mla()))
    assert set(ok.submodules.features) == {"mla", "mod"}  # the shipped MoD rides along
    with pytest.raises(lp.LaunchError, match="has no MLA feature"):
        lp.layer_spec_from_args(_args(multi_latent_attention=True))


def test_bad_spec_names_the_cause_once_patched(restore_spec_import):
    lp._apply_patches()
    with pytest.raises(ImportError, match="has no attribute 'NAM56R_LIET'; it defines: NAM56R_LITE"):
        lp.layer_spec_from_args(_args(spec=["layer_specs.nam56r_lite", "NAM56R_LIET"]))
    with pytest.raises(ImportError, match="cannot import module 'layer_specs.nam65r'"):
        lp.layer_spec_from_args(_args(spec=["layer_specs.nam65r", "NAM56R"]))


def _config(num_layers=4):
    from megacpp_mcore.train import runtime
    from megacpp_mcore.models.presets import custom_model

    model = custom_model(pattern="AE", num_layers=num_layers, seq_length=32, vocab_size=128, mla=None)
    return runtime.transformer_config(model, runtime.Parallelism())


def test_builder_builds_gpt_model_from_spec(single_rank, capsys):
    from megatron.core.models.gpt import GPTModel

    from megacpp_mcore.features.mtp import FusedLossGPTModel

    plain = lp.gpt_builder(_args(megacpp_fused_lm_loss="off"), pre_process=True, post_process=True,
                           config=_config())
    assert type(plain) is GPTModel  # --megacpp-fused-lm-loss off: GPTModel's own loss
    assert "fused LM loss off" in capsys.readouterr().out
    gpt = lp.gpt_builder(_args(), pre_process=True, post_process=True, config=_config())
    assert type(gpt) is FusedLossGPTModel and gpt.fused_lm_loss and len(gpt.decoder.layers) == 4  # the default
    assert ("model FusedLossGPTModel from --spec layer_specs.nam56r_lite NAM56R_LITE_AE: pattern 'AE', "
            "backend local (--transformer-impl local), features [], no MTP, fused LM loss on"
            ) in capsys.readouterr().out
    assert gpt.decoder.layers[0].self_attention.linear_qkv.__class__.__name__ == "ColumnParallelLinear"
    from megacpp_mcore.layers import moe

    assert moe.DEVICE_COUNTS is True  # the default
    try:  # --megacpp-moe-device-counts reaches the MoE layers built after it
        lp.gpt_builder(_args(megacpp_moe_device_counts="off"), pre_process=True, post_process=True,
                       config=_config())
        assert moe.DEVICE_COUNTS is False
        assert "fused LM loss on, MoE device counts off" in capsys.readouterr().out
        lp.gpt_builder(_args(megacpp_moe_device_counts="on"), pre_process=True, post_process=True,
                       config=_config())
        assert moe.DEVICE_COUNTS is True
        assert "fused LM loss on, MoE device counts on" in capsys.readouterr().out
    finally:
        moe.DEVICE_COUNTS = True
    tokens = torch.randint(0, 128, (2, 32))
    loss = gpt(tokens, torch.arange(32).expand(2, -1), None, labels=tokens)
    assert loss.shape == (2, 32) and torch.isfinite(loss).all()


def test_builder_is_the_packages_one_gpt_model_builder(single_rank, monkeypatch):
    """``gpt_builder`` builds through ``runtime.gpt_model``, the builder ``train`` uses."""
    from megacpp_mcore.train import runtime

    calls = []
    real = runtime.gpt_model
    monkeypatch.setattr(runtime, "gpt_model", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    lp.gpt_builder(_args(), pre_process=True, post_process=False, vp_stage=None, config=_config())
    assert len(calls) == 1 and calls[0]["post_process"] is False and calls[0]["mtp"] is None
    assert calls[0]["share_embeddings_and_output_weights"] is False  # --untie-embeddings-...


def test_fused_lm_loss_is_the_default_but_not_for_arguments_saved_before_the_flag():
    assert lp.fused_lm_loss_from_args(_args()) is True
    saved = _args()
    del saved.megacpp_fused_lm_loss  # a checkpoint's arguments from before the flag: GPTModel's loss
    assert lp.fused_lm_loss_from_args(saved) is False


def test_builder_refuses_upstream_mtp_from_checkpoint_args():
    with pytest.raises(lp.LaunchError, match="--mtp-num-layers=2 is not supported"):
        lp.gpt_builder(_args(mtp_num_layers=2), pre_process=True, post_process=True, config=None)
    with pytest.raises(lp.LaunchError, match="--use-legacy-models=True is not supported"):
        lp.gpt_builder(_args(use_legacy_models=True), pre_process=True, post_process=True, config=None)


def test_builder_without_use_legacy_models_as_from_core_v018(single_rank):
    """core_v0.18+ parsers define no ``use_legacy_models``: the builder does not need it."""
    args = _args()
    del args.use_legacy_models
    gpt = lp.gpt_builder(args, pre_process=True, post_process=True, config=_config())
    assert len(gpt.decoder.layers) == 4


def test_builder_adds_our_mtp_on_the_last_stage(single_rank):
    from megacpp_mcore.features.mtp import MTPGPTModel

    args = _args(megacpp_mtp_depth=2, megacpp_mtp_decay=0.25)
    last = lp.gpt_builder(args, pre_process=True, post_process=True, config=_config())
    assert isinstance(last, MTPGPTModel) and last.mtp_block is not None
    assert (last.mtp_config.depth, last.mtp_config.decay, last.mtp_config.recompute) == (2, 0.25, False)
    # --megacpp-mtp-recompute on: the shared block recomputed in backward (the memory of EP 1)
    args.megacpp_mtp_recompute = "on"
    assert lp.gpt_builder(args, pre_process=True, post_process=True, config=_config()).mtp_config.recompute
    first = lp.gpt_builder(args, pre_process=True, post_process=False, config=_config())
    mtp_params = [n for n, _ in first.named_parameters() if "mtp" in n]
    assert mtp_params == [], "MTP belongs to the last pipeline stage only"


# Megatron-LM tags the launcher supports: one per megatron-core release line (lp.CHECKOUT_TAGS).
TAGS = ("core_v0.16.1", "core_v0.17.1", "core_v0.18.2", "core_v0.19.0")
needs_mirror = pytest.mark.skipif(not MIRROR.exists(),
                                  reason="needs the Megatron-LM git mirror at " + str(MIRROR))


def _release(tag: str) -> tuple[int, int]:
    return tuple(int(x) for x in tag.removeprefix("core_v").split(".")[:2])


@needs_mirror
@pytest.mark.parametrize("tag", TAGS)
def test_builder_reads_only_flags_megatron_defines(tag):
    from megacpp_mcore.spec import compat
    from megacpp_mcore.testing.megatron_lm import flag_known, parser_dests

    dests = parser_dests(str(MIRROR), tag)
    assert {"spec", "num_layers", "untie_embeddings_and_output_weights"} <= dests  # parser sanity
    assert flag_known("--disable-bias-linear", dests) and flag_known("--no-load-optim", dests)
    assert not flag_known("--no-such-megatron-flag", dests) and not flag_known("--num-layer", dests)
    removed = {d for d, (since, _) in compat.REMOVED_MEGATRON_ARGS.items()
               if _release(tag) >= tuple(int(x) for x in since.split("."))}
    assert sorted(set(lp.MEGATRON_ARGS_READ) - dests) == sorted(removed)
    assert tag < "core_v0.18" or removed == {"use_legacy_models"}  # gone from core_v0.18
    ours = {a.dest for a in lp.add_megacpp_arguments(argparse.ArgumentParser())._actions}
    assert not (ours - {"help"}) & dests, "our flags must not shadow Megatron's"
    flags = [f for f in lp.preset_args("nam56r") if f.startswith("--") and not f.startswith("--megacpp")]
    assert [f for f in flags if not flag_known(f, dests)] == []


def test_cli_entry_runs_as_module(checkout):
    proc = subprocess.run([sys.executable, "-m", "megacpp_mcore.upstream.launch_pretrain", "--megatron-lm",
                           str(checkout), "--bf16"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--spec MODULE ATTR is required" in proc.stderr


def _defined_names(source: str) -> set[str]:
    """Top-level names a module defines or imports."""
    import ast

    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Try):
            names |= _defined_names(ast.unparse(ast.Module(body=node.body, type_ignores=[])))
    return names


@needs_mirror
@pytest.mark.parametrize("tag", TAGS)
def test_run_uses_what_each_checkout_defines(tag):
    """What ``launch_pretrain.run`` and ``compat.call_pretrain`` take from the checkout exists
    there, at every supported tag (a re-base alarm)."""
    import inspect

    from megacpp_mcore.spec import compat
    from megacpp_mcore.testing.megatron_lm import GitTree

    tree = GitTree(MIRROR, tag)
    pretrain_gpt = _defined_names(tree.read("pretrain_gpt.py"))
    assert {"train_valid_test_datasets_provider", "forward_step", "get_embedding_ranks", "pretrain",
            "set_startup_timestamps", "has_nvidia_modelopt", "add_modelopt_args"} <= pretrain_gpt
    assert "model_provider" in _defined_names(tree.read("model_provider.py"))
    assert "maybe_wrap_for_inprocess_restart" in _defined_names(
        tree.read("megatron/training/inprocess_restart.py"))
    # gpt_builder's config fallback, importable from megatron.training.arguments at every tag
    assert "core_transformer_config_from_args" in _defined_names(tree.read("megatron/training/arguments.py"))
    compat_source = inspect.getsource(compat.call_pretrain)
    if _release(tag) >= (0, 18):  # the caller parses and builds the config container
        assert "parse_and_validate_args" in _defined_names(tree.read("megatron/training/arguments.py"))
        utils = tree.read("megatron/training/argument_utils.py")
        assert "def pretrain_cfg_container_from_args(args: Namespace, model_cfg=None)" in utils
        assert "megatron.training.arguments import parse_and_validate_args" in compat_source
    # our builder has gpt_builder's signature, as model_provider calls it
    builder = tree.read("gpt_builders.py")
    assert "def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None)" in builder
    assert list(inspect.signature(lp.gpt_builder).parameters) == [
        "args", "pre_process", "post_process", "vp_stage", "config", "pg_collection"]


def _pretrain_stub(tag: str):
    """A function with exactly the parameters of ``megatron.training.training.pretrain`` at ``tag``
    (annotations dropped), returning what it was called with."""
    import ast

    from megacpp_mcore.testing.megatron_lm import GitTree

    module = ast.parse(GitTree(MIRROR, tag).read("megatron/training/training.py"))
    fn = next(n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "pretrain")
    for arg in (*fn.args.args, *fn.args.kwonlyargs):
        arg.annotation = None
    stub = ast.FunctionDef(name="pretrain", args=fn.args, body=[ast.parse("return dict(locals())").body[0]],
                           decorator_list=[], returns=None, type_params=[])
    namespace: dict = {}
    exec(compile(ast.fix_missing_locations(ast.Module(body=[stub], type_ignores=[])), tag, "exec"),
         namespace)
    return namespace["pretrain"]


@needs_mirror
@pytest.mark.parametrize("tag", TAGS)
def test_call_pretrain_binds_our_builder_under_each_signature(tag):
    """``compat.call_pretrain`` against the real ``pretrain`` signature of each tag: our model
    provider, the dataset provider and forward step land in their parameters; from core_v0.18 the
    arguments are parsed first (with our extra-args provider and the defaults) into the container."""
    from megacpp_mcore.spec import compat

    pretrain, parsed = _pretrain_stub(tag), []
    provider, dataset, step, extra = object(), object(), object(), object()

    def parse_args(**kwargs):
        parsed.append(kwargs)
        return "ARGS"

    got = compat.call_pretrain(
        pretrain, dataset_provider=dataset, model_provider=provider, model_type="encoder_or_decoder",
        forward_step=step, extra_args_provider=extra, args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        parse_args=parse_args, config_container=lambda args: ("CONTAINER", args),
        store="STORE", get_embedding_ranks="RANKS")
    assert (got["train_valid_test_dataset_provider"], got["model_provider"], got["model_type"],
            got["forward_step_func"]) == (dataset, provider, "encoder_or_decoder", step)
    assert (got["store"], got["get_embedding_ranks"]) == ("STORE", "RANKS")
    if _release(tag) >= (0, 18):
        assert compat.pretrain_takes_config(pretrain) and got["cfg_container"] == ("CONTAINER", "ARGS")
        assert parsed == [{"extra_args_provider": extra,
                           "args_defaults": {"tokenizer_type": "GPT2BPETokenizer"}}]
    else:
        assert not compat.pretrain_takes_config(pretrain) and parsed == []
        assert got["extra_args_provider"] is extra
        assert got["args_defaults"] == {"tokenizer_type": "GPT2BPETokenizer"}
    positional = list(_pretrain_stub(tag).__code__.co_varnames[:4])
    expected = {(0, 16): ["train_valid_test_dataset_provider", "model_provider", "model_type", "forward_step_func"],
                (0, 17): ["train_valid_test_dataset_provider", "model_provider", "model_type", "forward_step_func"],
                (0, 18): ["cfg_container", "train_valid_test_dataset_provider", "model_provider", "model_type"],
                (0, 19): ["cfg_container", "train_valid_test_dataset_provider", "model_type", "forward_step_func"]}
    assert positional == expected[_release(tag)]  # the three signatures call_pretrain absorbs


def test_call_pretrain_decides_on_the_unwrapped_signature():
    """The in-process-restart wrapper hides ``pretrain``'s signature: ``signature_of`` decides."""
    from megacpp_mcore.spec import compat

    def pretrain(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func,
                 model_provider=None, store=None):
        return cfg_container, model_provider

    def wrapper(*args, **kwargs):
        return pretrain(*args, **kwargs)

    got = compat.call_pretrain(wrapper, signature_of=pretrain, dataset_provider=1, model_provider="MP",
                               model_type=2, forward_step=3, extra_args_provider=None, args_defaults={},
                               parse_args=lambda **kw: "ARGS", config_container=lambda a: [a])
    assert got == (["ARGS"], "MP")


def test_checkout_release_and_description(checkout):
    assert lp.checkout_release(checkout) is None
    assert "version unknown" in lp.describe_checkout(checkout)
    info = checkout / "megatron" / "core" / "package_info.py"
    info.parent.mkdir(parents=True, exist_ok=True)
    for (major, minor, patch), says in {(0, 19, 1): "tag line core_v0.19.0, pairs with megatron-core 0.19.x",
                                        (0, 16, 1): "tag line core_v0.16.1, pairs with megatron-core 0.16.x",
                                        (0, 15, 0): "not a supported release line"}.items():
        info.write_text(f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = ''\n")
        assert lp.checkout_release(checkout) == f"{major}.{minor}.{patch}"
        assert says in lp.describe_checkout(checkout)


@needs_mirror
@pytest.mark.parametrize("tag", ["core_v0.16.1", "core_v0.19.0"])
def test_checkout_release_reads_the_tags_package_info(tag, tmp_path):
    from megacpp_mcore.testing.megatron_lm import GitTree

    info = tmp_path / "megatron" / "core" / "package_info.py"
    info.parent.mkdir(parents=True)
    info.write_text(GitTree(MIRROR, tag).read("megatron/core/package_info.py"))
    # core_v0.19.0's package_info already says 0.19.1 (the tag is the 0.19 line's checkout)
    assert lp.checkout_release(tmp_path) == {"core_v0.16.1": "0.16.1", "core_v0.19.0": "0.19.1"}[tag]
