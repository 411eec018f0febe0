"""FlexiDepth fine-tune of a dense checkpoint through ``megacpp-mcore train``: the backbone loads
from the dense checkpoint and stays frozen bit for bit while routers and adapters train, the
optimizer holds exactly their parameters, the step and LR schedule start fresh, the fine-tune
resumes from its own checkpoint, the receipt records what was frozen and FlexiDepth's usage, the
usage heatmap matches it, and bad flags are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megacpp_mcore import cli
from megacpp_mcore.features.flexidepth import TRAINABLE_PATTERN, FlexiDepthConfig, is_branch_parameter
from megacpp_mcore.models.presets import get_preset
from megacpp_mcore.train import data, receipt
from megacpp_mcore.train import loop as training
from test_data import make_tree
from test_heatmap import _read_png

# Varied router scores from the start (bias 0, wide weights): skip rates well inside (0, 1).
FD_OPTIONS = "router_bias_init=0,router_init_std=0.5"
DENSE_ARGS = ["--preset", "ae-tiny", "--num-layers", "2", "--seq-length", "32"]


def _dense():
    return get_preset("ae-tiny").replace(name="custom(AE)", num_layers=2, seq_length=32)


def _flexidepth():
    return _dense().replace(name="custom(AE)+flexidepth",
                            features={"flexidepth": FlexiDepthConfig.from_options(FD_OPTIONS)})


def _cfg(prefix: str, **kw) -> training.TrainConfig:
    base = dict(steps=4, micro_batch_size=2, global_batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                log_interval=1, eval_interval=100, eval_iters=1, data=prefix, backend="local")
    return training.TrainConfig(**(base | kw))


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.chunks[0].module.named_parameters()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Dense 3 steps (saved); the fine-tune from it, 4 steps; the same fine-tune stopped after 2
    (saved) and resumed from its own checkpoint. Trainers are recorded to look inside."""
    tmp = tmp_path_factory.mktemp("finetune")
    seen: dict[str, dict] = {}

    class Recording(training.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            name = Path(self.cfg.receipt).stem
            seen[name] = {"init": _params(self), "scheduler_steps": self.scheduler.num_steps,
                          "optimizer": {id(p) for g in self.optimizer.param_groups for p in g["params"]},
                          "named": {n: id(p) for n, p in self.chunks[0].module.named_parameters()}}

        def run(self):
            super().run()
            seen[Path(self.cfg.receipt).stem]["end"] = _params(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEGACPP_CACHE", str(tmp / "cache"))
        mp.setattr(training, "Trainer", Recording)
        prefix = data.prepare(make_tree(tmp / "src", extra=60), tmp / "data" / "cpp", valid_percent=20).prefix
        dense, ft = tmp / "dense", tmp / "ft"
        recs = {"dense": training.train(_dense(), _cfg(prefix, steps=3, save=str(dense),
                                                       receipt=str(tmp / "dense.json")), log=lambda _: None)}
        lines: list[str] = []
        recs["full"] = training.train(_flexidepth(), _cfg(prefix, load=str(dense), freeze_backbone=True,
                                                          receipt=str(tmp / "full.json")), log=lines.append)
        recs["stopped"] = training.train(_flexidepth(), _cfg(prefix, load=str(dense), freeze_backbone=True,
                                                             save=str(ft), stop_after=2,
                                                             receipt=str(tmp / "stopped.json")), log=lambda _: None)
        recs["resumed"] = training.train(_flexidepth(), _cfg(prefix, load=str(ft), freeze_backbone=True,
                                                             receipt=str(tmp / "resumed.json")), log=lambda _: None)
    return {"recs": recs, "seen": seen, "lines": lines, "prefix": prefix, "dense": dense, "ft": ft, "tmp": tmp}


def test_backbone_loads_from_dense_and_stays_frozen_while_branches_train(runs):
    dense_end, full = runs["seen"]["dense"]["end"], runs["seen"]["full"]
    backbone = [n for n in full["init"] if not is_branch_parameter(n)]
    branches = [n for n in full["init"] if is_branch_parameter(n)]
    assert sorted(backbone) == sorted(dense_end)  # every dense weight has its place, nothing else
    assert {n.split(".flexidepth.")[1] for n in branches} == {"norm.weight", "router.weight", "router.bias",
                                                             "down.weight", "up.weight"}
    for n in backbone:
        assert torch.equal(full["init"][n], dense_end[n]), n  # loaded: the dense model's weights
        assert torch.equal(full["end"][n], dense_end[n]), n  # frozen through 4 optimizer steps
    for n in branches:
        assert not torch.equal(full["end"][n], full["init"][n]), n  # router, norm and adapter moved


def test_optimizer_holds_exactly_the_branch_parameters(runs):
    full = runs["seen"]["full"]
    assert full["optimizer"] == {pid for n, pid in full["named"].items() if is_branch_parameter(n)}
    assert len(full["optimizer"]) == 10  # 2 layers x (norm, router weight + bias, down, up)


def test_fine_tune_starts_fresh_and_resumes_as_itself(runs):
    recs, seen = runs["recs"], runs["seen"]
    steps = lambda rec: {x["step"]: x["loss"] for x in rec["training"]["losses"]}  # noqa: E731
    assert seen["full"]["scheduler_steps"] == 0 and seen["resumed"]["scheduler_steps"] == 2
    assert sorted(steps(recs["full"])) == [1, 2, 3, 4]  # not from the dense run's step 3
    assert recs["full"]["data"]["consumed_samples"] == 16
    for step in (1, 2):
        assert steps(recs["stopped"])[step] == pytest.approx(steps(recs["full"])[step], abs=1e-6)
    for step in (3, 4):  # the resumed fine-tune continues exactly (optimizer state, schedule, data)
        assert steps(recs["resumed"])[step] == pytest.approx(steps(recs["full"])[step], abs=1e-5)
    assert recs["full"]["checkpoints"]["load_mode"] == "backbone"
    assert recs["full"]["checkpoints"]["loaded_from"].endswith("dense/iter_0000003")
    assert recs["resumed"]["checkpoints"]["load_mode"] == "resume" and recs["dense"]["checkpoints"]["load_mode"] is None
    assert not recs["resumed"]["invalid"]
    # step 0's validation measured the dense weights (routers fresh), not an untrained model
    assert any(line.startswith("validation step 0:") and "(loaded backbone)" in line for line in runs["lines"])
    assert any("; loaded backbone " in line for line in runs["lines"])  # the end-of-run summary
    lr1 = next(line for line in runs["lines"] if line.startswith("step      1/4")).split("| lr ")[1].split()[0]
    assert float(lr1) == pytest.approx(3e-3)  # warmup 1 step: the fine-tune's own peak, not the dense end


def test_receipt_records_frozen_backbone_and_flexidepth_usage(runs):
    recs, init = runs["recs"], runs["seen"]["full"]["init"]
    for name in ("dense", "full", "stopped", "resumed"):
        rec = json.loads(Path(recs[name]["receipt_path"]).read_text())
        receipt.validate(rec)
    assert recs["dense"]["training"]["frozen_backbone"] is None and recs["dense"]["stats"]["flexidepth"] is None
    frozen = recs["full"]["training"]["frozen_backbone"]
    assert frozen == {
        "trainable_pattern": TRAINABLE_PATTERN, "trainable_layers": [0, 1],
        "trainable_params": sum(p.numel() for n, p in init.items() if is_branch_parameter(n)),
        "frozen_params": sum(p.numel() for n, p in init.items() if not is_branch_parameter(n))}
    usage, latest = recs["full"]["stats"]["flexidepth"], recs["full"]["stats"]["latest"]
    per_layer = {str(i): latest[f"decoder.layers.{i}.skip_rate"] for i in (0, 1)}
    assert usage["skip_rate_per_layer"] == per_layer and 0 < usage["overall_skip_rate"] < 1
    assert usage["overall_skip_rate"] == pytest.approx(sum(per_layer.values()) / 2)
    assert usage["mean_layers_used"] == pytest.approx(2 - sum(per_layer.values()))
    assert usage["usage_loss"] == latest["decoder.layers.1.loss_usage"] > 0  # one segment: its last layer
    history = recs["full"]["validation"]["history"]
    assert [h["step"] for h in history] == [0, 4] and all(0 <= h["skip_rate"] <= 1 for h in history)
    line = next(line for line in runs["lines"] if line.startswith("step      4/4"))
    assert f"flexidepth layers used {usage['mean_layers_used']:.2f}/2 skip {100 * usage['overall_skip_rate']:.1f}%" in line
    assert any(line.startswith("validation step 4:") and "skip rate" in line for line in runs["lines"])


def test_usage_heatmap_matches_the_receipt(runs):
    from megacpp_mcore.train.heatmap import colormap, usage_matrix

    rec = runs["recs"]["full"]
    maps = rec["stats"]["heatmaps"]
    assert set(maps) == {"skip_rate", "score_mean"} and maps["skip_rate"] == str(runs["tmp"] / "full.skip_rate.png")
    matrix, rows = usage_matrix(rec["stats"]["history"], "skip_rate")
    assert rows == ["decoder.layers.0", "decoder.layers.1"] and matrix.shape == (2, 4)
    rates = [rec["stats"]["flexidepth"]["skip_rate_per_layer"][str(i)] for i in (0, 1)]
    np.testing.assert_array_equal(matrix[:, -1], rates)  # the last logged step is the receipt's
    image = _read_png(Path(maps["skip_rate"]))
    left = image.shape[1] - 4 - 4 * 6  # right margin 4, four 6-pixel step columns
    for r in range(2):
        for c in range(4):
            assert tuple(image[4 + r * 14 + 7, left + c * 6 + 3]) == tuple(colormap(np.array(matrix[r, c])))


def test_generate_on_the_fine_tuned_checkpoint(runs, capsys):
    """The checkpoint records how FlexiDepth was configured (the signature only names it per
    layer): ``generate`` rebuilds the fine-tuned model with the same config and decodes with the
    router choosing per token (tests/test_infer.py checks those steps against the full forward)."""
    import json

    from megacpp_mcore.infer import checkpoint as ckpt

    found = ckpt.open_checkpoint(str(runs["ft"]))
    model = ckpt.resolve_model(found)
    assert model.name == "custom(AE)+flexidepth"
    assert model.features["flexidepth"] == FlexiDepthConfig.from_options(FD_OPTIONS)
    assert cli.main(["generate", "--load", str(runs["ft"]), "--prompt", "int x", "--max-new-tokens",
                     "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "custom(AE)+flexidepth" and len(report["rows"][0]["tokens"]) >= 1


def test_a_named_model_resolves_on_a_frozen_fine_tune(runs):
    """Naming the model (``generate --preset``, needed for checkpoints that do not record it)
    checks it against the checkpoint but not the optimizer's frozen-backbone layout, which
    inference never loads."""
    from megacpp_mcore.infer import checkpoint as ckpt

    found = ckpt.open_checkpoint(str(runs["ft"]))
    assert found.frozen_backbone
    assert ckpt.resolve_model(found, _flexidepth()).features["flexidepth"] == FlexiDepthConfig.from_options(FD_OPTIONS)


def test_capacity_evaluation_script(runs, monkeypatch):
    """``scripts/eval_flexidepth_capacity.py`` on the fine-tune: a margin that lifts every
    capacity to 1 reproduces the exact hard forward's bits/byte and skip rates bit for bit (each
    setting is really applied and then replaced), a zero margin never skips less."""
    from scripts_module import load_script

    monkeypatch.setenv("MEGACPP_CACHE", str(runs["tmp"] / "cache"))
    name, rows = load_script("eval_flexidepth_capacity").evaluate_capacities(
        str(runs["ft"]), symbols="AE", margins=(0.99, 0.0), eval_iters=1, data=runs["prefix"])
    exact, full, tight = rows
    assert name == "custom(AE)+flexidepth" and [r["setting"] for r in rows] == ["exact", "kept+0.99", "kept+0"]
    assert set(exact["skip_rate_per_layer"]) == {0, 1} and exact["capacity"] == {}
    assert 0 < exact["skip_rate"] < 1
    assert full["capacity"] == {0: 1.0, 1: 1.0}
    assert full["bpb"] == exact["bpb"] and full["skip_rate_per_layer"] == exact["skip_rate_per_layer"]
    assert tight["capacity"] == {i: pytest.approx(1 - r) for i, r in exact["skip_rate_per_layer"].items()}
    assert all(tight["skip_rate_per_layer"][i] >= r for i, r in exact["skip_rate_per_layer"].items())


def _cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr()


@pytest.mark.parametrize("case", ["freeze-without-flexidepth", "freeze-without-load", "unknown-option",
                                  "bad-adapter", "placement-on-mamba", "resume-unfrozen", "mod-and-flexidepth",
                                  "mod-options-on-dense", "mod-option-bad-value"])
def test_bad_flags_one_line_exit_2_nothing_written(case, runs, tmp_path, monkeypatch, capsys):
    cache, save, rec = tmp_path / "cache", tmp_path / "save", tmp_path / "r.json"
    monkeypatch.setenv("MEGACPP_CACHE", str(cache))
    dense, ft = str(runs["dense"]), str(runs["ft"])
    argv, expected = {
        "freeze-without-flexidepth": (["--load", dense, "--freeze-backbone"], "add --flexidepth"),
        "freeze-without-load": (["--flexidepth", "--freeze-backbone"], "--freeze-backbone needs --load"),
        "unknown-option": (["--flexidepth", "rank=4"],
                           "--flexidepth 'rank=4': FlexiDepth option 'rank=4' is not key=value with a known key"),
        "bad-adapter": (["--flexidepth", "adapter=lora"], "adapter='lora' is unknown; allowed: mlp, linear, none"),
        "placement-on-mamba": (["--pattern", "AM", "--flexidepth", "symbols=M"],
                               "flexidepth cannot attach to symbol class 'M'"),
        "resume-unfrozen": (["--load", ft, "--flexidepth", FD_OPTIONS],
                            "was saved by a run with --freeze-backbone; resume it with --freeze-backbone"),
        # nam56r-tiny ships MoD on its A/E layers from index 2 on: at depth 4, layer 3
        "mod-and-flexidepth": (["--preset", "nam56r-tiny", "--num-layers", "4", "--flexidepth"],
                               "layer 3 ('E') carries both MoD and FlexiDepth"),
        "mod-options-on-dense": (["--mod", "router_scale=width"], "carries no MoD (a dense variant?)"),
        "mod-option-bad-value": (["--preset", "nam56r-tiny", "--mod", "router_scale=wide"],
                                 "--mod 'router_scale=wide': MoD option router_scale='wide' is not a number or 'width'"),
    }[case]
    code, out = _cli(["train", *DENSE_ARGS, "--data", runs["prefix"], *argv, "--save", str(save),
                      "--receipt", str(rec)], capsys)
    err = out.err.strip().splitlines()
    assert code == 2, out
    assert len(err) == 1 and err[0].startswith("megacpp-mcore train: error: ") and expected in err[0], err
    assert out.out == "" and not cache.exists() and not save.exists() and not rec.exists()
