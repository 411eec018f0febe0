"""``megacpp-mcore compare`` on constructed receipts (no training run): best-with-step, every INVALID
reason, substrate refusal and labelling, the PNG and what it plots, directory resolution, bad input."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from megacpp_mcore import cli
from megacpp_mcore.train import compare, compare_plot, heatmap, substrate

SPLITS = {"train": {"documents": 102, "bytes": 3071}, "valid": {"documents": 22, "bytes": 710}}


def make_receipt(**changes) -> dict:
    """A receipt with the keys ``train`` writes (those compare reads), 4 evaluations whose best
    (2.1 at step 100) is not the last; ``changes`` replace top-level keys."""
    history = [{"step": s, "tokens": s * 8 * 64, "bpb": b}
               for s, b in ((0, 8.0), (50, 3.0), (100, 2.1), (150, 2.4))]
    rec = {
        "schema_version": 1, "status": "completed", "preset": "nam56r-tiny",
        "model": {"name": "nam56r-tiny", "pattern": "AEME", "num_layers": 4, "hidden_size": 128,
                  "seq_length": 64},
        "expanded_pattern": "AEME", "layer_table_hash": "0123456789abcdef",
        "topology": {"world_size": 1, "tp": 1, "pp": 1, "ep": 1, "dp": 1, "sp": False, "vp": None,
                     "micro_batch_size": 8, "global_batch_size": 8, "seq_length": 64},
        "versions": {"megacpp_mcore": "0.1.0", "megatron_core": "0.16.1"},
        "data": {"prefix": "/d/cpp", "source": "/usr/include", "splits": SPLITS,
                 "tokenizer": {"kind": "bytes", "vocab_size": 258}},
        "training": {"steps": 150, "completed_steps": 150, "lr": 3e-3,
                     "losses": [{"step": 50, "loss": 2.5, "grad_norm": 1.0},
                                {"step": 150, "loss": 1.7, "grad_norm": 0.5}],
                     "final_loss": 1.7},
        "throughput": {"tokens_per_s": 900.0},
        "time": {"total_s": 200.0, "goodput_s": 150.0},
        "validation": {"metric": "bits_per_byte", "history": history},
        "stats": {"latest": {}, "history": []},
        "invalid": [],
    }
    rec.update(copy.deepcopy(changes))
    return rec


def write(path, rec, *, allow_nan=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, allow_nan=allow_nan))
    return path


def run_cli(argv, capsys):
    code = cli.main(["compare", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def rows_of(tmp_path, *recs, allow=False):
    paths = [write(tmp_path / f"run{i}.json", r) for i, r in enumerate(recs)]
    return compare.compare(paths, allow_substrate_mismatch=allow)


def test_best_is_reported_with_its_step_when_not_last(tmp_path, capsys):
    path = write(tmp_path / "a.json", make_receipt())
    code, out, err = run_cli([str(path), "--png", str(tmp_path / "p.png")], capsys)
    assert code == 0 and not err
    row = next(line for line in out.splitlines() if line.startswith("| a |") and "bpb" not in line
               and "(step" in line)
    assert "2.1000 (step 100)" in row and "2.4000 (step 150)" in row and "| ok |" in row
    assert "900" in row and "75%" in row  # tokens/s, goodput share 150 / 200
    # the substrate table names what the numbers stand on
    fingerprint = substrate.corpus_fingerprint(SPLITS)
    assert f"| a | {fingerprint} | bytes | 4 | 128 | 64 | 8 | 150 | tp1 pp1 ep1 dp1 |" in out


def test_best_tie_takes_the_earliest_step_and_skips_non_finite(tmp_path):
    hist = [{"step": 10, "tokens": 1, "bpb": 2.0}, {"step": 20, "tokens": 2, "bpb": 2.0},
            {"step": 30, "tokens": 3, "bpb": 2.5}]
    (row,) = rows_of(tmp_path, make_receipt(validation={"history": hist}))
    assert (row.best_bpb, row.best_step, row.best_tokens) == (2.0, 10, 1)
    assert (row.final_bpb, row.final_step) == (2.5, 30)


BAD_HISTORY = [{"step": 0, "tokens": 0, "bpb": 8.0}, {"step": 50, "tokens": 1, "bpb": None},
               {"step": 100, "tokens": 2, "bpb": 3.0}]


@pytest.mark.parametrize("case, changes, rule, reason", [
    ("recorded-by-run", {"invalid": [{"rule": "placement_override", "step": None,
                                      "reason": "MoD on layer 0 (guard overridden by --force)"}]},
     "placement_override", "MoD on layer 0 (guard overridden by --force)"),
    ("recorded-spike", {"invalid": [{"rule": "loss_spike_near_save", "step": 120,
                                     "reason": "loss x3.1 within 2 steps of the save at step 120"}]},
     "loss_spike_near_save", "loss x3.1 within 2 steps of the save at step 120"),
    ("null-bpb", {"validation": {"history": BAD_HISTORY}},
     "nonfinite_validation", "NaN/inf at 1 of 3 evaluations (first at step 50)"),
    ("null-loss", {"training": {"steps": 150, "completed_steps": 150, "final_loss": 1.7,
                                "losses": [{"step": 25, "loss": None, "grad_norm": 1.0}]}},
     "nonfinite_steps", "NaN/inf at 1 of 1 logged steps (first at step 25)"),
    ("null-grad-norm", {"training": {"steps": 150, "completed_steps": 150, "final_loss": 1.7,
                                     "losses": [{"step": 25, "loss": 2.0, "grad_norm": 1.0},
                                                {"step": 75, "loss": 2.0, "grad_norm": None}]}},
     "nonfinite_steps", "NaN/inf at 1 of 2 logged steps (first at step 75)"),
    ("null-final-loss", {"training": {"steps": 150, "completed_steps": 150, "final_loss": None, "losses": []}},
     "nonfinite_steps", "final training loss is NaN/inf (step 150)"),
    ("no_validation", {"validation": {"history": []}},
     "no_validation", "the run recorded no validation evaluation"),
])
def test_each_invalid_reason_shows(case, changes, rule, reason, tmp_path, capsys):
    path = write(tmp_path / "bad.json", make_receipt(**changes))
    clean = write(tmp_path / "clean.json", make_receipt())
    code, out, err = run_cli([str(clean), str(path), "--png", str(tmp_path / "p.png")], capsys)
    assert code == 0 and not err
    results = out.split("Validation bits per byte")[1]
    bad_row = next(line for line in results.splitlines() if line.startswith("| bad |"))
    assert f"INVALID: {rule}: " in bad_row and reason in bad_row
    assert bad_row.count("| INVALID |") == 1 and "| INVALID | INVALID |" in bad_row  # no numbers
    clean_row = next(line for line in results.splitlines() if line.startswith("| clean |"))
    assert "INVALID" not in clean_row and clean_row.endswith("| ok |")
    code, out, _ = run_cli([str(clean), str(path), "--json", "--png", str(tmp_path / "p.png")], capsys)
    runs = json.loads(out)["runs"]
    assert runs[0]["valid"] and runs[0]["invalid"] == []
    assert not runs[1]["valid"] and [e["rule"] for e in runs[1]["invalid"]] == [rule]


def test_raw_nan_in_the_history_is_invalid_too(tmp_path):
    hist = [{"step": 10, "tokens": 1, "bpb": float("nan")}, {"step": 20, "tokens": 2, "bpb": float("inf")}]
    path = write(tmp_path / "nan.json", make_receipt(validation={"history": hist}), allow_nan=True)
    (row,) = compare.compare([path])
    assert [e["rule"] for e in row.invalid] == ["nonfinite_validation"] and row.best_bpb is None
    assert "NaN/inf at 2 of 2 evaluations (first at step 10)" in row.invalid[0]["reason"]


def test_a_rule_the_run_recorded_is_not_reported_twice(tmp_path):
    rec = make_receipt(validation={"history": BAD_HISTORY},
                       invalid=[{"rule": "nonfinite_validation", "reason": "run says so", "step": 50}])
    (row,) = rows_of(tmp_path, rec)
    assert row.invalid == [{"rule": "nonfinite_validation", "reason": "run says so", "step": 50}]


@pytest.mark.parametrize("changes, named", [
    ({"model": {"num_layers": 8, "hidden_size": 128, "seq_length": 64, "pattern": "AEME"}}, "depth 8 vs 4"),
    ({"data": {"splits": {"train": {"documents": 5, "bytes": 9}}, "tokenizer": None}}, "data "),
    ({"data": {"splits": SPLITS, "tokenizer": {"kind": "bpe", "vocab_size": 4096}}}, "tokenizer bpe:4096 vs bytes"),
    ({"training": {"steps": 300, "completed_steps": 300, "losses": [], "final_loss": 1.0}}, "steps 300 vs 150"),
    ({"topology": {"tp": 2, "pp": 1, "ep": 1, "dp": 1, "global_batch_size": 8, "seq_length": 64}},
     "topology tp2 pp1 ep1 dp1 vs tp1 pp1 ep1 dp1"),
])
def test_substrate_mismatch_is_refused_and_labelled_with_the_flag(changes, named, tmp_path, capsys):
    a = write(tmp_path / "a.json", make_receipt())
    b = write(tmp_path / "b.json", make_receipt(**changes))
    png = tmp_path / "p.png"
    code, out, err = run_cli([str(a), str(b), "--png", str(png)], capsys)
    assert code == 2 and not out and not png.exists()
    assert len(err.strip().splitlines()) == 1 and "b: " in err and named in err
    assert "--allow-substrate-mismatch" in err
    code, out, err = run_cli([str(a), str(b), "--png", str(png), "--allow-substrate-mismatch"], capsys)
    assert code == 0 and png.stat().st_size > 0
    b_rows = [line for line in out.splitlines() if line.startswith("| b |")]
    assert "≠ " in b_rows[0] and f"other substrate ({named}" in b_rows[1]
    assert "≠" not in next(line for line in out.splitlines() if line.startswith("| a |"))


def test_pattern_and_versions_differ_without_refusal(tmp_path):
    """An ablation changes the pattern (and may run on other versions): not a substrate change."""
    other = make_receipt(expanded_pattern="AMAM", layer_table_hash="fedcba9876543210",
                         versions={"megacpp_mcore": "0.2.0", "megatron_core": "0.19.2"})
    rows = rows_of(tmp_path, make_receipt(), other)
    assert rows[1].differs == [] and rows[1].identity["pattern"] == "AMAM"
    assert "| AMAM | fedcba9876543210 | 0.003 | - | 0.2.0 | 0.19.2 |" in compare.markdown(rows)  # no kernels


def test_kernel_paths_are_identity_not_substrate(tmp_path):
    """Runs built with other kernel paths (the same model, other kernels) share a table; the
    ``kernels`` cell says which ran, since tokens/s depends on them."""
    cpu = {"use_mamba_mem_eff_path": False, "bias_dropout_fusion": False, "apply_rope_fusion": False,
           "rope_type": "rope", "moe_token_dispatcher_type": "allgather", "moe_permute_fusion": False,
           "moe_router_fusion": False, "cross_entropy_loss_fusion": False, "cuda_graph_impl": "none",
           "fp8": None, "fp8_recipe": "delayed"}
    gpu = dict(cpu, use_mamba_mem_eff_path=True, bias_dropout_fusion=True, moe_permute_fusion=True,
               moe_token_dispatcher_type="alltoall", cuda_graph_impl="local", fp8="hybrid")
    base = make_receipt()
    a, b = (make_receipt(backends=dict(base.get("backends") or {}, kernel_paths=p)) for p in (cpu, gpu))
    assert substrate.kernel_label(a) == "unfused, allgather"
    assert substrate.kernel_label(b) == "fused: mamba residual permute, alltoall, graphs local, fp8 hybrid/delayed"
    assert substrate.kernel_label(base) is None  # written before receipts recorded them
    from megacpp_mcore.train import fast_paths
    assert {field for field, _ in substrate._FUSIONS} <= set(fast_paths.CONFIG_FIELDS)  # no drift
    rows = rows_of(tmp_path, a, b)
    assert rows[1].differs == [] and rows[1].identity["kernels"].startswith("fused: mamba")
    table = compare.markdown(rows)
    assert "| kernels |" in table and "| unfused, allgather |" in table


def test_fingerprint_ignores_paths_and_token_counts():
    with_tokens = {k: dict(v, tokens=7) for k, v in SPLITS.items()}
    assert substrate.corpus_fingerprint(with_tokens) == substrate.corpus_fingerprint(SPLITS)
    other = {"train": {"documents": 1, "bytes": 2}}
    assert substrate.corpus_fingerprint(other) != substrate.corpus_fingerprint(SPLITS)
    a = make_receipt()
    b = make_receipt(data=dict(a["data"], prefix="/elsewhere/cpp", source="/other/include"))
    assert substrate.substrate(a) == substrate.substrate(b)
    recorded = make_receipt(data=dict(a["data"], fingerprint="00000000000000ff"))
    assert substrate.substrate(recorded)["data"] == "00000000000000ff"  # the run's own wins


def test_older_receipts_get_tokens_from_step_and_batch(tmp_path):
    hist = [{"step": 50, "bpb": 3.0}, {"step": 100, "bpb": 2.0}]
    (row,) = rows_of(tmp_path, make_receipt(validation={"history": hist}))
    assert row.tokens == [50 * 8 * 64, 100 * 8 * 64] and row.best_tokens == 100 * 8 * 64


def _usage_history():
    return [{"step": s, "decoder.layers.0.mlp.fraction_processed": f0,
             "decoder.layers.2.mlp.fraction_processed": f2}
            for s, f0, f2 in ((25, 0.5, 1.0), (50, 0.25, 0.0), (75, 0.75, 0.5))]


def test_png_plots_what_the_table_says(tmp_path, capsys):
    a = write(tmp_path / "a.json", make_receipt(stats={"latest": {}, "history": _usage_history()}))
    hist_b = [{"step": s, "tokens": s * 512, "bpb": b} for s, b in ((0, 7.0), (50, 5.0), (100, 4.0), (150, 4.5))]
    b = write(tmp_path / "b.json", make_receipt(validation={"history": hist_b}))
    bad = write(tmp_path / "bad.json", make_receipt(invalid=[{"rule": "r", "reason": "x", "step": None}]))
    code, out, _ = run_cli([str(a), str(b), str(bad), "--json"], capsys)
    assert code == 0
    table = json.loads(out)
    png = tmp_path / "a.compare.png"  # default: beside the first receipt
    assert table["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = compare.compare([a, b, bad])
    figure = compare_plot.plot(rows)
    by_step, by_tokens = figure.panels
    assert [s.label for s in by_step.series] == ["a", "b"]  # the INVALID run draws no curve
    assert "bad (INVALID: r)" in [label for label, _ in figure.legend]
    image = compare_plot.render(figure)
    for series_step, series_tokens, run in zip(by_step.series, by_tokens.series, table["runs"]):
        assert list(series_step.x) == run["steps"] and list(series_step.y) == run["bpb"]
        assert list(series_tokens.x) == run["tokens"] and list(series_tokens.y) == run["bpb"]
        assert series_step.best == (run["best_step"], run["best_bpb"])
        assert series_tokens.best == (run["best_tokens"], run["best_bpb"])
        for panel, s in ((by_step, series_step), (by_tokens, series_tokens)):
            row, col = panel.pixel(*s.best)  # the best point is drawn in the run's colour
            assert tuple(image[row, col]) == s.color
    assert table["runs"][0]["best_step"] == 100 and table["runs"][1]["best_step"] == 100

    # the first run's usage heatmap: layers x logged steps, cells in the heatmap colour map
    (block,) = figure.heatmaps
    matrix, names = heatmap.usage_matrix(_usage_history(), "fraction_processed")
    assert block.rows == tuple(names) and np.array_equal(block.matrix, matrix)
    left = compare_plot.MARGIN + max(len(n) for n in names) * compare_plot.CHAR_W + compare_plot.MARGIN
    for r in range(2):
        for c in range(3):
            pixel = image[block.top + r * compare_plot.CELL_H + 3, left + c * block.cell_w + block.cell_w // 2]
            assert tuple(pixel) == tuple(heatmap.colormap(np.array(matrix[r, c])))


def test_directory_resolution(tmp_path, capsys):
    save = tmp_path / "save"
    write(save / "receipt.json", make_receipt())
    write(save / "other.json", make_receipt())  # receipt.json wins in a --save dir
    assert compare.resolve([str(save)]) == [save / "receipt.json"]
    runs = tmp_path / "runs"
    for name in ("m-20260102.json", "m-20260101.json"):
        write(runs / name, make_receipt())
    write(runs / "cpp.json", {"version": 1, "splits": SPLITS})  # a data manifest: not a run
    (runs / "m-20260101.fraction_processed.png").write_bytes(b"png")
    assert [p.name for p in compare.resolve([str(runs)])] == ["m-20260101.json", "m-20260102.json"]
    first = runs / "m-20260101.json"
    assert compare.resolve([str(first), str(runs)]) == [first, runs / "m-20260102.json"]  # once each
    code, out, _ = run_cli([str(runs), "--png", str(tmp_path / "p.png")], capsys)
    assert code == 0 and "| m-20260101 |" in out and "| m-20260102 |" in out


def test_colliding_stems_are_told_apart(tmp_path):
    # Run directories are named by the directory; two receipts of one stem by parent/stem.
    a = write(tmp_path / "x" / "receipt.json", make_receipt())
    b = write(tmp_path / "y" / "receipt.json", make_receipt())
    assert [r.label for r in compare.compare([a, b])] == ["x", "y"]
    c = write(tmp_path / "x" / "run.json", make_receipt())
    d = write(tmp_path / "y" / "run.json", make_receipt())
    assert [r.label for r in compare.compare([c, d])] == ["x/run", "y/run"]


def _bad_inputs(tmp_path):
    (tmp_path / "malformed.json").write_text('{"schema_version": 1, "model": ')
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "splits": SPLITS}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "nulls.json").write_text(json.dumps(make_receipt(topology=None, training=[])))
    (tmp_path / "future.json").write_text(json.dumps(make_receipt(schema_version=99)))
    (tmp_path / "badinvalid.json").write_text(json.dumps(make_receipt(invalid=["nan"])))
    (tmp_path / "badhistory.json").write_text(json.dumps(make_receipt(validation={"history": [{"bpb": 1}]})))
    (tmp_path / "empty").mkdir()
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / compare.CHECKPOINT_TRACKER).write_text("10")
    (tmp_path / "brokendir").mkdir()
    (tmp_path / "brokendir" / "r.json").write_text("{nope")


@pytest.mark.parametrize("argv, expected", [
    (["missing.json"], "'missing.json': no such file or directory"),
    (["malformed.json"], "'malformed.json': not valid JSON (Expecting value: line 1 column"),
    (["manifest.json"], "'manifest.json' is not a run receipt (no 'schema_version', 'model', 'topology'"),
    (["list.json"], "'list.json' is not a run receipt (a JSON list, not an object)"),
    (["nulls.json"], "'nulls.json' is not a run receipt ('topology', 'training' not a JSON object)"),
    (["future.json"], "'future.json': receipt schema_version 99; this megacpp-mcore reads 1..1"),
    (["badinvalid.json"], "'badinvalid.json': 'invalid' must be a list of {rule, reason, step} objects"),
    (["badhistory.json"], "'badhistory.json' is not a run receipt (validation.history is not a list"),
    (["empty"], "'empty': directory holds no run receipt"),
    (["ckpt"], "'ckpt': directory holds no run receipt (receipt.json or *.json receipts) (a checkpoint directory"),
    (["brokendir"], "not valid JSON"),
    (["good.json", "--png", "nodir/p.png"], "--png 'nodir/p.png': directory 'nodir' does not exist"),
    (["good.json", "--png", "empty"], "--png 'empty' is a directory"),
])
def test_bad_input_one_line_exit_2_nothing_written(argv, expected, tmp_path, capsys, monkeypatch):
    _bad_inputs(tmp_path)
    write(tmp_path / "good.json", make_receipt())
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megacpp-mcore compare: error: ") and expected in lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no PNG, nothing half-written


def test_default_png_falls_back_to_cwd_when_the_receipt_folder_is_read_only(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    rec = write(folder / "a.json", make_receipt())
    monkeypatch.setattr(compare.os, "access", lambda p, mode: str(p) != str(folder))
    assert compare.default_png(rec, cwd=tmp_path) == tmp_path / "a.compare.png"
    monkeypatch.undo()
    assert compare.default_png(rec) == folder / "a.compare.png"


def test_ticks_are_round_and_inside_the_range():
    ticks = compare_plot._ticks(0.13, 2.71)
    assert ticks == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5])
    assert compare_plot._tick_label(1_500_000, 500_000) == "1.5M" and compare_plot._tick_label(2.25, 0.05) == "2.25"
    assert all(math.isclose(t / 0.5, round(t / 0.5)) for t in ticks)
