"""MoD as shipped (issue 16): the presets' default MoD and their dense variants, the budget driven by
Megatron-LM's iteration, the aux-loss scale under Megatron's schedule and under our train step, and
the statistics in the tracker Megatron-LM's ``training_log`` reports."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from megacpp_mcore.features.mod import MoDConfig
from megacpp_mcore.models.presets import MoEConfig, custom_model, get_preset
from megacpp_mcore.spec.pattern import FeaturePlacement, PatternError
from scripts_module import load_script

# the A/E layers of AEMEAEMEAEMR from index 2 (depth 12) and 4 (depth 52) on
LITE_MOD_LAYERS = [3, 4, 5, 7, 8, 9]
_BASE = dict(pattern="AE", num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
             vocab_size=128, seq_length=32, mla=None, mtp_depth=0)


def _moe():
    return MoEConfig(num_experts=4, topk=2, ffn_hidden_size=64)


# ------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name, skip", [("nam56r", 4), ("nam56r-lite", 2), ("nam56r-tiny", 2)])
def test_presets_ship_gateskip_on_a_e_layers_past_the_first(name, skip):
    m, dense = get_preset(name), get_preset(f"{name}-dense")
    table = m.layer_table()
    carrying = [e.index for e in table if "mod" in e.features]
    assert carrying == [e.index for e in table if e.symbol in "AE" and e.index >= skip]
    assert not any("mod" in e.features for e in table if e.symbol in "MR")
    if name != "nam56r":
        assert carrying == LITE_MOD_LAYERS
    else:
        assert len(carrying) == 32 and carrying[:3] == [4, 5, 7]  # 35 A/E layers less 0, 1, 3
    mod = m.features["mod"]
    assert (mod.mode, mod.budget_start, mod.budget_end, mod.budget_steps) == ("gateskip", 1.0, 0.8, None)
    # the dense variant: the same model without MoD
    assert "mod" not in dense.features and not any("mod" in e.features for e in dense.layer_table())
    assert dense.replace(name=name, features=m.features) == m


def test_layer_specs_carry_the_presets_features():
    from layer_specs import nam56r, nam56r_lite

    assert nam56r.NAM56R.submodules.features == get_preset("nam56r").feature_configs
    assert nam56r.NAM56R_DENSE.submodules.features == get_preset("nam56r-dense").feature_configs
    assert nam56r_lite.NAM56R_LITE.submodules.features == get_preset("nam56r-lite").feature_configs
    assert nam56r_lite.NAM56R_LITE_DENSE.submodules.features == get_preset("nam56r-lite-dense").feature_configs
    table = nam56r_lite.NAM56R_LITE.submodules.table(12)  # as pretrain_gpt's --num-layers 12 builds it
    assert [e.index for e in table if "mod" in e.features] == LITE_MOD_LAYERS


def test_custom_models_keep_their_base_features():
    assert "mod" not in custom_model(pattern="AE", num_layers=4).features  # default base: dense
    deeper = custom_model(pattern="AEMEAEMEAEMR", num_layers=24, base="nam56r-tiny")
    assert [e.index for e in deeper.layer_table() if "mod" in e.features][:3] == [3, 4, 5]


def test_tiny_preset_builds_mod_exactly_on_its_layers(single_rank):
    from megacpp_mcore.features.mod import MoDLayer
    from megacpp_mcore.train import runtime

    model = get_preset("nam56r-tiny").replace(seq_length=32, mtp_depth=0)
    (chunk,) = runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                                   backend="local", wrap_ddp=False)
    assert [i for i, layer in enumerate(chunk.decoder.layers)
            if isinstance(layer, MoDLayer)] == LITE_MOD_LAYERS


@pytest.mark.parametrize("placement, message", [
    (FeaturePlacement(symbols="AEM"), "mod cannot attach to symbol class 'M' (mamba); mod is allowed "
                                      "on A, E; to place it on 'M' layers anyway pass allow_on='M'"),
    (FeaturePlacement(layers=(11,)), "mod cannot attach to layer 11 is 'R' (m2rnn)"),
])
def test_guard_still_refuses_mod_on_m_and_r(placement, message):
    tiny = get_preset("nam56r-tiny")
    with pytest.raises(PatternError) as err:
        tiny.replace(features={"mod": MoDConfig(placement=placement)})
    assert message in str(err.value)


@pytest.mark.parametrize("make, message", [
    (lambda: FeaturePlacement(symbols="AE", skip_first=-1),
     "FeaturePlacement.skip_first=-1 must be an int >= 0"),
    (lambda: FeaturePlacement(symbols="AE", skip_first=True),
     "FeaturePlacement.skip_first=True must be an int >= 0"),
    (lambda: MoDConfig(budget_steps=2.5), "MoDConfig.budget_steps=2.5 is not allowed; allowed: an int "
                                          ">= 0, or None (decay over the whole run)"),
    (lambda: MoDConfig(budget_steps=None).budget(3),
     "MoDConfig.budget_steps=None decays the budget over the whole run, but the training loop gave "
     "total_steps=None; allowed: the run's step count (an int >= 1)"),
    (lambda: get_preset("nam56r-tiny-dens"), "unknown preset 'nam56r-tiny-dens'; known presets: "),
])
def test_invalid_configs_name_the_value_and_what_is_allowed(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert message in str(err.value)


def test_budget_over_the_run_and_plan_line(capsys):
    mod = get_preset("nam56r-tiny").features["mod"]
    assert [mod.budget(s, 11) for s in (0, 5, 10, 20)] == pytest.approx([1.0, 0.9, 0.8, 0.8])
    from megacpp_mcore.cli import main

    assert main(["plan", "--preset", "nam56r-tiny"]) == 0
    out = capsys.readouterr().out
    assert ("  mod: 6 layers (3,4,5,7,8,9), +774 params; gateskip, budget 1.0 -> 0.8 over the run"
            in out.splitlines())  # 6 routers Linear(128, 1)


# ------------------------------------------------------------- the budget follows the iteration
@pytest.fixture
def megatron_args(monkeypatch):
    """A stand-in for Megatron-LM's ``megatron.training.global_vars`` (its contract: ``get_args()``
    asserts until the arguments are parsed; ``train`` sets ``args.curr_iteration`` before every
    step; ``train_iters`` is the run's length). The checkout itself imports triton, absent here;
    tests/test_launch_pretrain.py checks the contract against each tag's source."""
    state = types.SimpleNamespace(args=None)

    def get_args():
        assert state.args is not None, "args is not initialized."
        return state.args

    module = types.ModuleType("megatron.training.global_vars")
    module.get_args = get_args
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return state


def _mod_chunk(mod: MoDConfig, *, moe: bool = True, wrap_ddp: bool = False):
    from megacpp_mcore.train import runtime

    model = custom_model(**_BASE, moe=_moe() if moe else None, features={"mod": mod})
    return runtime.build_model(model, runtime.transformer_config(model, runtime.Parallelism()),
                               backend="local", wrap_ddp=wrap_ddp)


def _batches(n: int, *, masked: bool = False):
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 32) if masked else torch.ones(2, 32)
    return [{"tokens": tokens, "labels": tokens, "loss_mask": mask}] * n


def megatron_schedule(chunk, n: int, *, masked: bool = False) -> None:
    """``n`` micro-batches of :func:`_batches` through Megatron's own forward-backward schedule
    (what Megatron-LM's ``train_step`` runs), with the package's forward step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megacpp_mcore.train import runtime

    get_forward_backward_func()(forward_step_func=runtime.gpt_forward_step,
                                data_iterator=iter(_batches(n, masked=masked)), model=chunk,
                                num_microbatches=n, seq_length=32, micro_batch_size=2)


def _tracked_names() -> set[str]:
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        return set(get_moe_layer_wise_logging_tracker())
    return set(get_moe_metrics_tracker().metrics)


def test_budget_follows_megatrons_iteration(single_rank, megatron_args):
    from megacpp_mcore.spec import compat

    mod = MoDConfig(placement=FeaturePlacement(symbols="AE", skip_first=1), budget_steps=None)
    (chunk,) = _mod_chunk(mod)
    layers = [m for m in chunk.decoder.layers if hasattr(m, "megacpp_stats")]
    assert len(layers) == 3 and compat.training_iteration() is None  # arguments not parsed yet
    tokens = _batches(1)[0]["tokens"]
    positions = torch.arange(32).expand(2, 32)
    megatron_args.args = types.SimpleNamespace(train_iters=21)  # parsed, training not started
    assert compat.training_iteration() is None
    chunk(tokens, positions, None, labels=tokens)
    assert not {n for n in _tracked_names() if n.startswith("mod_")}  # no Megatron-LM loop: no tracker
    for iteration, budget in ((0, 1.0), (5, 0.95), (10, 0.9), (20, 0.8), (30, 0.8)):
        megatron_args.args.curr_iteration = iteration  # what Megatron-LM's train() sets
        for _ in range(2):  # two micro-batches of the iteration: one statistics window
            chunk(tokens, positions, None, labels=tokens).mean().backward()
        for layer in layers:
            assert layer.budget == pytest.approx(budget) == mod.budget(iteration, 21), iteration
            stats = layer.megacpp_stats()
            assert stats["budget"] == pytest.approx(budget)
    assert {"mod_budget", "mod_gate_mean", "mod_sparsity_loss"} <= _tracked_names()
    # a loop that calls megacpp_set_step drives the layer from then on
    layers[0].megacpp_set_step(0, total_steps=21)
    chunk(tokens, positions, None, labels=tokens)
    assert layers[0].budget == 1.0 and layers[1].budget == pytest.approx(0.8)


def test_stats_collector_gives_the_run_length(single_rank):
    from megacpp_mcore.train.stats import StatsCollector

    mod = MoDConfig(placement=FeaturePlacement(layers=(1,)), budget_steps=None)
    collector = StatsCollector(_mod_chunk(mod))
    collector.set_step(3, total_steps=7)
    (layer,) = [m for name, m in collector.step_hooks if name == "decoder.layers.1"]
    assert layer.budget == pytest.approx(0.9)
    with pytest.raises(ValueError, match="total_steps=None"):
        collector.set_step(3)


# --------------------------------------------- aux-loss gradient: Megatron's schedule vs train_step
class _RecordingOptimizer:
    """What ``runtime.train_step`` calls of an optimizer; ``step`` keeps the gradients it would use."""

    def __init__(self, params):
        self.params, self.grads = params, None

    def zero_grad(self):
        pass

    def step(self):
        self.grads = [p.main_grad.detach().clone() for p in self.params]
        return True, 0.0, None


@pytest.mark.parametrize("moe", [True, False])
def test_mod_aux_grad_megatron_schedule_equals_train_step(single_rank, moe):
    """The sparsity loss's router gradient (LM loss masked out) through Megatron's own
    ``get_forward_backward_func()`` with a ``pretrain_gpt.py``-contract forward step equals the one
    through ``runtime.train_step``, at 1 and 4 micro-batches, and both equal the hand-computed
    gradient of one micro-batch: the schedule scales MoD's loss by ``1 / num_microbatches`` as it
    scales MoE's (with MoE upstream sets the scale; without, the registry's patch does)."""
    from megacpp_mcore.patches import registry
    from megacpp_mcore.train import runtime

    registry.apply_needed(["aux-loss-scale-without-moe"])  # what every entry point does
    mod = MoDConfig(sparsity_loss_weight=0.5, budget_start=0.6, budget_end=0.6,
                    placement=FeaturePlacement(layers=(3,)))  # the last layer: its output only
    chunks = _mod_chunk(mod, moe=moe, wrap_ddp=True)
    router = chunks[0].module.decoder.layers[3].mod_router
    with torch.no_grad():
        router.weight.zero_()
        router.bias.fill_(1.0)  # every gate sigmoid(1)
    g = 1.0 / (1.0 + math.exp(-1.0))
    expected = (g - 0.6) * g * (1 - g)  # d/db of 0.5 * (mean(sigmoid(b)) - 0.6)^2
    for n in (1, 4):
        chunks[0].zero_grad_buffer()
        megatron_schedule(chunks[0], n, masked=True)
        megatron = router.bias.main_grad.item()
        recorder = _RecordingOptimizer([router.bias])
        runtime.train_step(chunks, recorder, _batches(n, masked=True), num_microbatches=n,
                           micro_batch_size=2, seq_length=32)
        assert recorder.grads[0].item() == pytest.approx(megatron, rel=1e-6), n
        assert megatron == pytest.approx(expected, rel=1e-5), n


# ----------------------------------------------- statistics in the tracker training_log reports
def report_as_training_log(*, num_layers: int, num_microbatches: int, writer=None) -> tuple[dict, str]:
    """Megatron's MoE metrics report as Megatron-LM's ``training_log`` calls it for a GPT model
    with the default ``aux_loss`` balancing (core_v0.16/0.17: ``moe_utils.track_moe_metrics``;
    core_v0.18+: ``get_moe_metrics_tracker().report``): ``(total_loss_dict, console string)``."""
    totals: dict = {}
    kwargs = dict(loss_scale=1 / num_microbatches, iteration=1, writer=writer, wandb_writer=None,
                  total_loss_dict=totals, per_layer_logging=False, force_initialize=True,
                  track_names=["load_balancing_loss"], num_layers=num_layers, moe_layer_freq=1,
                  mtp_num_layers=None)
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        track_moe_metrics(**kwargs)
        return totals, ""
    return totals, get_moe_metrics_tracker().report(**kwargs)


class _Writer:
    def __init__(self):
        self.scalars: dict[str, float] = {}

    def add_scalar(self, name, value, step):
        self.scalars[name] = float(value)


def shown_in_training_log(*, num_layers: int, num_microbatches: int) -> tuple[dict, dict, str]:
    """:func:`report_as_training_log` with a tensorboard writer: ``(shown, totals, console)``,
    ``shown`` being every figure by name (the interval totals and the scalars written)."""
    writer = _Writer()
    totals, console = report_as_training_log(num_layers=num_layers, num_microbatches=num_microbatches,
                                             writer=writer)
    return {**{k: float(v) for k, v in totals.items()}, **writer.scalars}, totals, console


def _run_and_collect(n: int, megatron_args):
    """A MoE model with threshold MoD on layers 1-3 (AE x 2, skip_first=1), ``n`` micro-batches
    of Megatron-LM's iteration 3 through Megatron's schedule; the per-layer means the layers
    themselves kept."""
    from megacpp_mcore.spec import compat

    compat.reset_moe_metrics()
    megatron_args.args = types.SimpleNamespace(curr_iteration=3, train_iters=10)
    mod = MoDConfig(mode="threshold", sparsity_loss_weight=0.5, budget_start=0.3, budget_end=0.3,
                    placement=FeaturePlacement(symbols="AE", skip_first=1))
    (chunk,) = _mod_chunk(mod)
    layers = [m for m in chunk.decoder.layers if hasattr(m, "megacpp_stats")]
    for i, layer in enumerate(layers):  # gates around 0.5: some tokens skip, sparsity loss > 0
        with torch.no_grad():
            layer.mod_router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(i))
            layer.mod_router.bias.zero_()
    megatron_schedule(chunk, n)
    per_layer = [layer.megacpp_stats() for layer in layers]
    return {key: sum(s[key] for s in per_layer) / len(per_layer) for key in per_layer[0]}


@pytest.mark.parametrize("patched", [False, True])
def test_stats_reach_the_tracker_training_log_reports(single_rank, restore_metrics_patch, patched,
                                                     megatron_args):
    """What Megatron's report prints and writes to tensorboard equals the mean over the MoD layers
    of the layers' own statistics. Without the registry's patch, core_v0.16/0.17 report every
    tracked entry already; core_v0.18+ report only the names training_log passes."""
    from megacpp_mcore.patches import layer_metrics_in_moe_report as patch

    if patched:
        patch.apply()
    expected = _run_and_collect(2, megatron_args)
    shown, totals, console = shown_in_training_log(num_layers=4, num_microbatches=2)
    new_tracker = patch._targets()[0] == "report"
    if new_tracker and not patched:
        assert not any(k.startswith("mod_") for k in shown)
        return
    assert shown["mod_budget"] == pytest.approx(0.3)
    assert shown["mod_gate_mean"] == pytest.approx(expected["gate_mean"], rel=1e-5)
    assert shown["mod_fraction_processed"] == pytest.approx(expected["fraction_processed"], rel=1e-5)
    assert shown["mod_sparsity_loss"] == pytest.approx(expected["loss_sparsity"], rel=1e-5)
    assert 0 < expected["fraction_processed"] < 1 and expected["loss_sparsity"] > 0
    if new_tracker:  # losses go to the interval averages, the rest to the console line
        assert "mod_sparsity_loss" in totals and "mod_gate_mean" not in totals
        assert f" mod_budget: {0.3:.2f} |" in console


@pytest.fixture
def restore_metrics_patch(monkeypatch):
    """Upstream's report (0.18+) or reduction (0.16/0.17) back after the test."""
    from megacpp_mcore.patches import layer_metrics_in_moe_report as patch
    from megacpp_mcore.patches._wrapping import upstream

    kind, target = patch._targets()
    attr = "report" if kind == "report" else "reduce_aux_losses_tracker_across_ranks"
    monkeypatch.setattr(target, attr, upstream(getattr(target, attr), patch.NAME))
    return monkeypatch


def test_metrics_patch_protocol(restore_metrics_patch):
    from megacpp_mcore.patches import layer_metrics_in_moe_report as patch

    assert patch.check() == "needed" and patch.applied() is False
    assert len(patch.apply()) == 1 and patch.apply() == [] and patch.applied() is True
    assert patch.check() == "needed"  # the probe reads upstream behind the wrapper
    assert set(patch.METRIC_NAMES) >= {"mod_gate_mean", "mod_budget", "mod_sparsity_loss"}


def test_metrics_patch_joins_names_any_pipeline_rank_holds(restore_metrics_patch, monkeypatch):
    """With pipeline stages, a rank without MoD layers creates the entries another stage recorded
    (sizes agreed by one MAX all-reduce over the pipeline group), so every rank reduces the same
    names; names nobody holds are not added."""
    from megacpp_mcore.patches import layer_metrics_in_moe_report as patch

    other_rank = {"mod_budget": 12, "mod_gate_mean": 12}

    def all_reduce(tensor, op=None, group=None):  # the other stage's sizes arrive by MAX
        assert op == torch.distributed.ReduceOp.MAX
        for i, name in enumerate(patch.METRIC_NAMES):
            tensor[i] = max(int(tensor[i]), other_rank.get(name, 0))

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    made = {}
    names = patch._with_ours(["load_balancing_loss"], {"load_balancing_loss": 12},
                             lambda name, size: made.__setitem__(name, size),
                             types.SimpleNamespace(pp=object()))
    assert names == ["load_balancing_loss", "mod_gate_mean", "mod_budget"]
    assert made == {"mod_gate_mean": 12, "mod_budget": 12}


# ------------------------------------- Megatron-LM's own training_log code against the installed wheel
MIRROR = "/work/.mirror/NVIDIA+Megatron-LM/repo"


def _training_py() -> str:
    """``megatron/training/training.py`` of the Megatron-LM release line installed here: from the
    checkout at ``$MEGATRON_LM`` (it must be of that line), else from the git mirror's tag."""
    import os
    from pathlib import Path

    from megacpp_mcore.spec import compat
    from megacpp_mcore.upstream import launch_pretrain as lp

    line = ".".join(str(compat.mcore_version()).split(".")[:2])
    root = os.environ.get("MEGATRON_LM")
    if root:
        found = lp.checkout_release(root) or "?"
        if not found.startswith(line + "."):
            pytest.skip(f"MEGATRON_LM={root} is megatron-core {found}; this interpreter has {line}.x")
        return Path(root, "megatron/training/training.py").read_text()
    if line not in lp.CHECKOUT_TAGS or not Path(MIRROR).exists():
        pytest.skip("needs MEGATRON_LM (a Megatron-LM checkout of the installed release line) or the "
                    f"Megatron-LM git mirror at {MIRROR}")
    from megacpp_mcore.testing.megatron_lm import GitTree

    return GitTree(MIRROR, lp.CHECKOUT_TAGS[line]).read("megatron/training/training.py")


def _moe_logging_block(source: str):
    """training_log's statements that report the MoE tracker: its ``if args.num_experts is not
    None:`` block whose body calls ``track_moe_metrics`` or ``...report``, with the
    ``moe_log_string = ""`` before it where there is one (core_v0.18+)."""
    import ast

    fn = next(n for n in ast.walk(ast.parse(source))
              if isinstance(n, ast.FunctionDef) and n.name == "training_log")
    for i, node in enumerate(fn.body):
        calls = {getattr(c.func, "attr", getattr(c.func, "id", None))
                 for c in ast.walk(node) if isinstance(c, ast.Call)} if isinstance(node, ast.If) else set()
        if "num_experts" in ast.unparse(node.test) if isinstance(node, ast.If) else False:
            if calls & {"track_moe_metrics", "report"}:
                before = fn.body[i - 1:i] if "moe_log_string" in ast.unparse(fn.body[i - 1]) else []
                return ast.Module(body=[*before, node], type_ignores=[])
    raise AssertionError("training_log no longer reports the MoE tracker under args.num_experts")


def test_megatron_lm_training_log_prints_mod_stats(single_rank, restore_metrics_patch, megatron_args):
    """Megatron-LM's own ``training_log`` MoE-logging code (read from the checkout of the installed
    release line) run against this wheel's tracker after a MoD model's iteration: the MoD
    statistics reach its totals, its tensorboard writer and (core_v0.18+) its console string, with
    the registry's patch applied (as the launcher applies it)."""
    from megacpp_mcore.patches import layer_metrics_in_moe_report as patch
    from megatron.core.transformer.moe import moe_utils

    block = compile(_moe_logging_block(_training_py()), "training_log", "exec")
    patch.apply()
    expected = _run_and_collect(2, megatron_args)
    writer = _Writer()
    args = types.SimpleNamespace(
        num_experts=4, moe_router_load_balancing_type="aux_loss", moe_z_loss_coeff=None,
        is_hybrid_model=False, num_layers=4, moe_per_layer_logging=False, moe_layer_freq=1,
        mtp_num_layers=None)
    scope = dict(args=args, get_num_microbatches=lambda: 2, writer=writer, wandb_writer=None,
                 total_loss_dict={}, iteration=1, pg_collection=None, is_hybrid_model=lambda a: False,
                 track_moe_metrics=getattr(moe_utils, "track_moe_metrics", None))
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
        scope["get_moe_metrics_tracker"] = get_moe_metrics_tracker
    except ImportError:  # before 0.18
        pass
    exec(block, scope)
    shown = {**{k: float(v) for k, v in scope["total_loss_dict"].items()}, **writer.scalars}
    assert shown["mod_budget"] == pytest.approx(0.3)
    assert shown["mod_gate_mean"] == pytest.approx(expected["gate_mean"], rel=1e-5)
    assert shown["mod_sparsity_loss"] == pytest.approx(expected["loss_sparsity"], rel=1e-5)
    if "moe_log_string" in scope:  # core_v0.18+: the non-loss metrics go to the console string
        assert f" mod_gate_mean: {expected['gate_mean']:.2f} |" in scope["moe_log_string"]


def test_megatron_lm_train_sets_the_iteration_mod_reads():
    """The contract behind :func:`compat.training_iteration`, in the installed line's training.py:
    ``train`` sets ``args.curr_iteration`` to the iteration before each ``train_step`` call, and
    ``update_train_iters`` fills ``args.train_iters`` for sample-based runs."""
    import ast

    module = ast.parse(_training_py())
    functions = {n.name: n for n in module.body if isinstance(n, ast.FunctionDef)}
    train = ast.unparse(functions["train"])
    step = train.index("train_step(forward_step_func")
    assert "args.curr_iteration = iteration" in train[:step]
    assert "args.train_iters =" in ast.unparse(functions["update_train_iters"])


# ------------------------------------------------------------ the H200 script's commands and parsing
def _bench_script():
    return load_script("bench_mod_pretrain")


def test_bench_mod_pretrain_commands_and_log_parsing(tmp_path):
    """``scripts/bench_mod_pretrain.py`` (the H200 acceptance run): the lite recipe with the MoD and
    dense specs through the launcher, and the MoD spec through the checkout's pretrain_gpt.py;
    iteration lines of both releases' formats parse into the MoD statistics."""
    import os

    from megacpp_mcore.upstream import launch_pretrain as lp

    for name in lp.CHECKOUT_FILES:  # a stand-in checkout: the recipe only checks the files
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("") if name.endswith(".py") else (tmp_path / name).mkdir()
    bench = _bench_script()
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DATA": "", "MEGATRON_LM": str(tmp_path)}
    runs = bench.commands(str(tmp_path), 30, 10, env)
    assert list(runs) == ["dense", "mod", "mod-stock"]
    spec = {k: v[v.index("--spec") + 2] for k, v in runs.items()}
    assert spec == {"dense": "NAM56R_LITE_DENSE", "mod": "NAM56R_LITE", "mod-stock": "NAM56R_LITE"}
    assert all("--save" not in v and "--mock-data" in v for v in runs.values())
    assert runs["mod"][runs["mod"].index("--train-iters") + 1] == "30"
    stock = runs["mod-stock"]
    assert str(tmp_path / "pretrain_gpt.py") in stock and "megacpp_mcore.launch_pretrain" not in stock
    assert "--megacpp-mtp-depth" not in stock and stock[stock.index("--train-iters") + 1] == "10"
    # a short stock run keeps Megatron's warm-up below its decay iterations (5 -> 4 at 5 iterations)
    short = bench.commands(str(tmp_path), 30, 5, env)["mod-stock"]
    assert short[short.index("--lr-warmup-iters") + 1] == "4"
    assert runs["mod"][runs["mod"].index("--lr-warmup-iters") + 1] == "5"
    log = "\n".join([
        " [2026] iteration        1/      30 | consumed samples: 16 | elapsed time per iteration (ms): "
        "912.5 | lm loss: 1.0E+01 | mod_gate_mean: 8.807971E-01 | mod_budget: 1.000000E+00 |",
        " [2026] iteration       30/      30 | consumed samples: 480 | elapsed time per iteration (ms): "
        "901.0 | lm loss: 9.1E+00 | mod_sparsity_loss: 1.2E-04 | mod_gate_mean: 0.83 | "
        "mod_fraction_processed: 1.00 | mod_budget: 0.80 | loss scale: 1.0 |",
    ])
    rows = bench.parse_iterations(log)
    assert rows == [
        {"iteration": 1, "ms": 912.5, "mod_gate_mean": 0.8807971, "mod_budget": 1.0},
        {"iteration": 30, "ms": 901.0, "mod_sparsity_loss": 1.2e-4, "mod_gate_mean": 0.83,
         "mod_fraction_processed": 1.0, "mod_budget": 0.8}]
