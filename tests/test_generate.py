"""``megacpp-mcore generate`` on checkpoints written by the training loop: text and JSON output,
speculative decoding equal to plain greedy, batches of prompts and prompt files, and bad input
refused with one line and exit status 2 before anything runs."""

from __future__ import annotations

import json
import types

import pytest
import torch

from megacpp_mcore import cli
from megacpp_mcore.models.presets import get_preset
from megacpp_mcore.train import data, loop as training
from test_data import make_tree
from scripts_module import load_script


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One training step each, saved: a 4-layer AEMR nam56r-tiny (MLA, MoE, MTP depth 1), a
    2-layer ae-tiny (no MTP), and through the CLI the AEMR model with ``--mtp-depth 2``."""
    tmp = tmp_path_factory.mktemp("generate")
    with pytest.MonkeyPatch.context() as mp:  # the module's own cache, restored afterwards
        mp.setenv("MEGACPP_CACHE", str(tmp / "cache"))
        prefix = data.prepare(make_tree(tmp / "src", extra=60), tmp / "data" / "cpp",
                              valid_percent=20).prefix
        models = {"mtp": get_preset("nam56r-tiny").replace(pattern="AEMR", num_layers=4,
                                                            seq_length=32),
                  "plain": get_preset("ae-tiny").replace(num_layers=2, seq_length=32)}
        for name, model in models.items():
            cfg = training.TrainConfig(steps=1, micro_batch_size=2, global_batch_size=2,
                                       warmup_steps=0, eval_interval=100, eval_iters=1,
                                       data=prefix, save=str(tmp / name),
                                       receipt=str(tmp / f"{name}.json"))
            training.train(model, cfg, log=lambda _: None)
        code = cli.main(["train", *_TINY_AEMR, "--data", str(prefix), "--mtp-depth", "2",
                         "--save", str(tmp / "mtp2"), "--receipt", str(tmp / "mtp2.json")])
        assert code == 0
    return tmp


# `megacpp-mcore train` flags of the AEMR model above (one step, no validation to speak of)
_TINY_AEMR = ["--preset", "nam56r-tiny", "--pattern", "AEMR", "--num-layers", "4", "--seq-length",
              "32", "--steps", "1", "--micro-batch-size", "2", "--global-batch-size", "2",
              "--warmup-steps", "0", "--eval-interval", "100", "--eval-iters", "1"]


def _generate(argv, capsys):
    code = cli.main(["generate", *argv])
    return code, capsys.readouterr()


def test_generate_json_batch_and_speculative_equals_plain(checkpoints, capsys):
    prompt_file = checkpoints / "prompt.cpp"
    prompt_file.write_text("#include <x>\n")  # the model was trained at 32 tokens
    base = ["--load", str(checkpoints / "mtp"), "--prompt", "int f(int x) {", "--prompt-file",
            str(prompt_file), "--max-new-tokens", "9", "--json"]
    outputs = {}
    for name, extra in (("plain", ["--speculative", "0"]), ("spec", ["--speculative", "1"]),
                        ("wide", ["--plain-width", "2", "--ssd-verify", "recurrent"])):
        code, out = _generate(base + extra, capsys)
        assert code == 0, out.err
        outputs[name] = json.loads(out.out)
    plain, spec = outputs["plain"], outputs["spec"]
    assert [r["tokens"] for r in spec["rows"]] == [r["tokens"] for r in plain["rows"]]
    assert [r["tokens"] for r in outputs["wide"]["rows"]] == [r["tokens"] for r in plain["rows"]]
    assert plain["model"] == "custom(AEMR)" and plain["step"] == 1
    assert plain["prompt_tokens"] == [1 + len("int f(int x) {"), 1 + len(prompt_file.read_bytes())]
    for row in plain["rows"]:
        assert row["stop"] in ("length", "stop_token")
        assert len(row["tokens"]) == 9 or row["stop"] == "stop_token"
        assert row["text"] == bytes(t for t in row["tokens"] if t < 256).decode("utf-8", "replace")
    assert len(spec["acceptance_per_position"]) == 1 and spec["speculative"] == 1
    assert spec["decode_tokens_per_s"] > 0 and "acceptance_per_position" not in plain


def test_train_mtp_depth_reaches_generate(checkpoints, tmp_path, capsys):
    """`train --mtp-depth 2` records the depth (receipt and checkpoint): `generate --speculative
    2` drafts two tokens and equals plain greedy, 3 is refused naming the trained depth; a depth
    outside 0..8 and a resume at another depth are refused with one line and exit 2."""
    mtp2 = str(checkpoints / "mtp2")
    assert json.loads((checkpoints / "mtp2.json").read_text())["model"]["mtp_depth"] == 2
    base = ["--load", mtp2, "--prompt", "int f(", "--max-new-tokens", "6", "--json"]
    runs = []
    for k in ("0", "2"):
        code, out = _generate(base + ["--speculative", k], capsys)
        assert code == 0, out.err
        runs.append(json.loads(out.out))
    assert [r["tokens"] for r in runs[1]["rows"]] == [r["tokens"] for r in runs[0]["rows"]]
    assert len(runs[1]["acceptance_per_position"]) == 2
    code, out = _generate(base + ["--speculative", "3"], capsys)
    assert code == 2 and "beyond the trained MTP depth 2" in out.err, out.err
    for argv, expected in ((["--mtp-depth", "9"], "--mtp-depth 9: ModelConfig"),
                           (["--load", mtp2], "resume it with --mtp-depth 2")):
        code = cli.main(["train", *_TINY_AEMR, "--data", str(checkpoints / "data" / "cpp"), *argv,
                         "--save", str(tmp_path / "run"), "--receipt", str(tmp_path / "r.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and expected in err[0], err
        assert not any(tmp_path.iterdir())  # nothing written


def test_generate_prints_the_continuation(checkpoints, capsysbinary):
    """Bytes out: the continuation's bytes as they are (a random-ish model writes non-UTF-8 too)."""
    argv = ["generate", "--load", str(checkpoints / "plain"), "--prompt", "x",
            "--max-new-tokens", "5", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3"]
    assert cli.main(argv) == 0
    out = capsysbinary.readouterr()
    assert out.out.endswith(b"\n") and len(out.out) <= 6 and b"tokens/s" in out.err
    assert cli.main(argv) == 0
    assert capsysbinary.readouterr().out == out.out  # the seed fixes the sample


def _foreign(path):
    """A committed distributed checkpoint that `train` did not write (no model signature)."""
    from megatron.core import dist_checkpointing

    from megacpp_mcore.train import runtime

    (path / "iter_0000001").mkdir(parents=True)
    runtime.initialize(runtime.Parallelism())
    try:
        dist_checkpointing.save({"step": 1}, str(path / "iter_0000001"))
    finally:
        runtime.shutdown()
    (path / "latest_checkpointed_iteration.txt").write_text("1\n")
    return path


@pytest.mark.parametrize("case", [
    "missing-dir", "half-written", "tracker-without-step", "foreign", "prompt-too-long",
    "k-beyond-depth", "no-mtp", "non-utf8-file", "no-prompt", "zero-tokens", "bad-temperature",
    "bad-top-p", "negative-k", "graphs-speculative-no-cuda", "graphs-sampling",
    "compile-speculative-no-graphs", "bad-plain-width", "plain-width-speculative", "bad-ssd-verify",
    pytest.param("graphs-no-cuda", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="refusal of a host without CUDA")),
])
def test_bad_input_one_line_exit_2(checkpoints, tmp_path, capsys, case):
    mtp, plain = str(checkpoints / "mtp"), str(checkpoints / "plain")
    foreign = _foreign(tmp_path / "foreign") if case == "foreign" else None
    half = tmp_path / "half"
    (half / "iter_0000005").mkdir(parents=True)  # a save interrupted before the tracker
    tracker = tmp_path / "tracker"
    tracker.mkdir()
    (tracker / "latest_checkpointed_iteration.txt").write_text("7\n")
    binary = tmp_path / "bad.cpp"
    binary.write_bytes(b"int x = 1;\n\xff\xfe\n")
    prompt = ["--prompt", "int"]
    argv, expected = {
        "missing-dir": (["--load", str(tmp_path / "none"), *prompt], "no such directory"),
        "half-written": (["--load", str(half), *prompt], "holds no checkpoint"),
        "tracker-without-step": (["--load", str(tracker), *prompt], "holds no checkpoint"),
        "foreign": (["--load", str(foreign), *prompt],
                    "written neither by `megacpp-mcore train`"),
        "prompt-too-long": (["--load", mtp, "--prompt", "x" * 40],  # trained at 32 tokens
                            "too long for the model's context of 32"),
        "k-beyond-depth": (["--load", mtp, *prompt, "--speculative", "2"],
                           "beyond the trained MTP depth 1"),
        "no-mtp": (["--load", plain, *prompt, "--speculative", "1"], "has no MTP block"),
        "non-utf8-file": (["--load", mtp, "--prompt-file", str(binary)], "is not UTF-8"),
        "no-prompt": (["--load", mtp], "no prompt"),
        "zero-tokens": (["--load", mtp, *prompt, "--max-new-tokens", "0"], "--max-new-tokens"),
        "bad-temperature": (["--load", mtp, *prompt, "--temperature", "-1"], "temperature"),
        "bad-top-p": (["--load", mtp, *prompt, "--top-p", "0"], "top_p"),
        "negative-k": (["--load", mtp, *prompt, "--speculative", "-1"], "--speculative"),
        "graphs-speculative-no-cuda": (["--load", mtp, *prompt, "--cuda-graphs", "--speculative", "1"],
                                       "--cuda-graphs needs a CUDA device"),
        "graphs-sampling": (["--load", mtp, *prompt, "--cuda-graphs", "--temperature", "0.5"],
                            "--cuda-graphs is built for greedy decoding (plain or speculative)"),
        "graphs-no-cuda": (["--load", mtp, *prompt, "--cuda-graphs"], "--cuda-graphs needs a CUDA device"),
        "compile-speculative-no-graphs": (["--load", mtp, *prompt, "--compile-speculative", "--speculative", "1"],
                                      "--compile-speculative compiles the graphed speculative step"),
        "bad-plain-width": (["--load", mtp, *prompt, "--plain-width", "0"], "--plain-width must be >= 1, got 0"),
        "plain-width-speculative": (["--load", mtp, *prompt, "--plain-width", "2", "--speculative", "1"],
                                    "allowed with --speculative 1: --plain-width 1"),
        "bad-ssd-verify": (["--load", mtp, *prompt, "--ssd-verify", "exact"],
                           "--ssd-verify 'exact'; allowed: quadratic, closed, recurrent"),
    }[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out = _generate(argv, capsys)
    assert code == 2
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megacpp-mcore generate: error:"), out.err
    assert expected in lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_bench_generate_cpu_smoke(checkpoints, tmp_path, capsys):
    """scripts/bench_generate.py on the MTP checkpoint: plain and K=1 through the same code,
    identical greedy output, the table printed last and the JSON written."""
    bench = load_script("bench_generate")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        (src / f"f{i}.h").write_text(f"#define F{i} {i}\nint f{i}(void);\n")
    out = tmp_path / "bench.json"
    assert bench.main(["--load", str(checkpoints / "mtp"), "--batch", "1,2", "--speculative",
                       "1,2", "--prompt-tokens", "12", "--new-tokens", "6", "--repeats", "1",
                       "--prompt-dir", str(src), "--bytes-by-part", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1].startswith("| 2 | 1 |")
    # the static step's bytes by part (batch 1): the parts add up to the row's MB/step, the MTP
    # block is read by drafting only, the trunk's weights by both
    parts = {int(k): v for k, v in json.loads(out.read_text())["bytes_by_part"].items()}
    assert sorted(parts) == [0, 1] and "| trunk routed experts |" in printed
    rows = {r["k"]: r for r in json.loads(out.read_text())["results"] if r["batch"] == 1}
    for k in (0, 1):
        assert sum(parts[k].values()) == pytest.approx(rows[k]["mb_per_step"], rel=1e-6)
    assert parts[0]["MTP block"] == 0 < parts[1]["MTP block"]
    trunk = "trunk attention, mixers, norms"  # each read once per step (a norm read again: a few KB)
    assert parts[1][trunk] == pytest.approx(parts[0][trunk], rel=0.01)
    assert "skipping K=[2]" in printed
    results = json.loads(out.read_text())["results"]
    assert [(r["batch"], r["k"]) for r in results] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(r["identical"] for r in results if r["k"])
    assert all(0 < r["distinct_8grams"] <= 1 for r in results if not r["k"] and r["distinct_8grams"])
    assert bench.distinct_ngrams([[1, 2] * 8], n=4) == pytest.approx(2 / 13)  # a loop of 2
    # the byte columns only where the dispatcher sees the work: not on a TE build
    te_linear = type("Linear", (torch.nn.Module,), {"__module__": "transformer_engine.pytorch.module.linear"})
    assert not bench.bytes_visible(types.SimpleNamespace(model=torch.nn.Sequential(te_linear())))
    assert bench.bytes_visible(types.SimpleNamespace(model=torch.nn.Sequential(torch.nn.Linear(2, 2))))
    assert bench.distinct_ngrams([list(range(12))], n=4) == 1.0
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 6 * r["batch"] for r in results)
    # host work: a speculative step (a K+1-position forward and a draft) calls more operators than
    # a plain one; the host-bound speed-up is its tokens per step, relative to a plain step's (one
    # per row: the batch), over that op ratio
    for plain, spec in zip(results[::2], results[1::2]):
        assert spec["ops_per_step"] > plain["ops_per_step"] > 100
        ratio = spec["ops_per_step"] / plain["ops_per_step"]
        assert plain["decode_tokens"] / plain["steps"] == plain["batch"]
        gain = spec["decode_tokens"] / spec["steps"] / plain["batch"]
        assert spec["host_bound_speedup"] == pytest.approx(gain / ratio)
        # memory traffic of the static step (what a CUDA graph replays): more for K + 1 positions
        # and a draft, the bytes-bound speed-up from it alike
        assert spec["mb_per_step"] > plain["mb_per_step"] > 0
        mb_ratio = spec["mb_per_step"] / plain["mb_per_step"]
        assert spec["bytes_bound_speedup"] == pytest.approx(gain / mb_ratio)
        # the sparse MoE kernel reads each chosen expert once: never more than a torch route
        for row in (plain, spec):
            assert 0 < row["mb_per_step_kernel"] < row["mb_per_step"]
        assert spec["gpu_ms_per_step"] is None and spec["device_bound_speedup"] is None  # CPU


@pytest.mark.skipif(__import__("shutil").which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_bench_generate_graphed_rows_through_the_static_step(checkpoints, tmp_path, monkeypatch, capsys):
    """bench_generate's CUDA-graph rows (``--cuda-graphs``, with ``--compile-speculative`` the
    compiled step's row too, with ``--matched-plain`` plain steps of K + 1 rows) on the CPU, with
    ``generate(cuda_graphs=True)`` replaced by the static step it captures: the rows, their labels
    and the warm-up accounting the GPU run will print."""
    import megacpp_mcore.infer as infer
    from megacpp_mcore.train import runtime

    bench = load_script("bench_generate")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.h").write_text("#define F 1\nint f(void);\n" * 2)
    real = infer.generate

    def static_generate(*args, cuda_graphs=False, static=False, **kwargs):
        return real(*args, static=static or cuda_graphs, **kwargs)

    monkeypatch.setattr(infer, "generate", static_generate)
    args = bench.parse_args(["--load", str(checkpoints / "mtp2"), "--batch", "1", "--speculative", "1",
                             "--prompt-tokens", "12", "--new-tokens", "6", "--repeats", "1",
                             "--prompt-dir", str(src), "--matched-plain", "--ssd-verify", "recurrent"])
    args.cuda_graphs = args.compile_speculative = True  # parse_args refuses both without CUDA
    try:
        engine, description = bench.build_engine(args)
        results, matched = bench.measure(engine, args)
    finally:
        runtime.shutdown()
    rows = [(r["k"], r.get("graphs", False), r.get("compiled", False)) for r in results]
    (same,) = matched  # K=1 against plain steps of 2 rows, graphed as the graphed K=1 row
    assert same["k"] == 1 and same["graphs"] and same["identical"] and same["identical_one_row"]
    assert same["spec_tokens_per_s"] == results[3]["tokens_per_s"] and same["decode_tokens"] > 0
    assert same["plain_tokens_per_s"] == results[1]["tokens_per_s"]
    assert rows == [(0, False, False), (0, True, False), (1, False, False), (1, True, False), (1, True, True)]
    graphed_plain, graphed, compiled = results[1], results[3], results[4]
    assert compiled["identical"] and graphed["identical"] and graphed_plain["identical"]
    assert compiled["warmup_steps"] == 1 and compiled["warmup_s"] > 0  # it compiled there
    assert graphed["warmup_steps"] == 0  # the static stand-in has no warm-up
    assert compiled["accepted"] == graphed["accepted"] and compiled["vs_graphed_plain"] > 0
    assert compiled["identical_to_graphed_plain"] and graphed["agreeing_prefix_graphed"] == 1.0
    bench.print_table(description, {}, results)
    bench.print_matched(matched)
    printed = capsys.readouterr().out
    assert "K=1, CUDA graphs, compiled:" in printed and "| 1 | 1 (CUDA graphs, compiled) |" in printed
    assert "plain of 2 rows, CUDA graphs:" in printed and "| 1 | 1 | yes |" in printed


def test_bpe_run_carries_its_tokenizer_and_generate_uses_it(tmp_path, monkeypatch, capsys):
    """A run on BPE data copies the tokenizer into its --save directory; `generate` encodes the
    prompt and decodes the output with it (with bytes, a BPE model's ids would come out as noise)."""
    from megacpp_mcore.train.tokenizer import BPETokenizer, for_checkpoint

    monkeypatch.setenv("MEGACPP_CACHE", str(tmp_path / "cache"))
    prefix = data.prepare(make_tree(tmp_path / "src", extra=60), tmp_path / "bpe" / "cpp",
                          valid_percent=20, tokenizer="bpe:300").prefix
    save = tmp_path / "run"
    cfg = training.TrainConfig(steps=1, micro_batch_size=2, global_batch_size=2, warmup_steps=0,
                               eval_interval=100, eval_iters=1, data=str(prefix), save=str(save),
                               receipt=str(tmp_path / "r.json"))
    training.train(get_preset("ae-tiny").replace(num_layers=2, seq_length=32), cfg, log=lambda _: None)
    tok = for_checkpoint(save)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 300

    code, out = _generate(["--load", str(save), "--prompt", "int main(", "--max-new-tokens", "5",
                           "--json"], capsys)
    assert code == 0, out.err
    row = json.loads(out.out)["rows"][0]
    assert all(0 <= t < tok.vocab_size for t in row["tokens"])  # ids of the BPE, not bytes
    assert row["text"] == tok.decode_bytes(row["tokens"]).decode("utf-8", errors="replace")


def test_profile_decode_step_cpu_attributes_ops(checkpoints, tmp_path, capsys):
    """scripts/profile_decode_step.py on a CPU: each aten op of a static step is charged to the
    package function running when it was called (the sweep over its labelled ranges), phases
    as the drafter and the trunk split them; K=1 adds the drafter's ops to the plain step's."""
    profile = load_script("profile_decode_step")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.h").write_text("#define F 1\nint f(void);\n" * 2)
    out = tmp_path / "profile.json"
    assert profile.main(["--load", str(checkpoints / "mtp"), "--speculative", "0,1", "--steps", "3",
                         "--prompt-dir", str(src), "--prompt-tokens", "12", "--out", str(out)]) == 0
    assert "aten ops" in capsys.readouterr().out
    results = {int(k): r for k, r in json.loads(out.read_text())["results"].items()}
    plain, spec = results[0]["parts"], results[1]["parts"]
    assert all(r["graphed_ms_per_step"] is None for r in results.values())  # no CUDA graphs here
    assert {name.split()[0] for name in plain} <= {"trunk", "step"}
    assert any(name.startswith("mtp ") for name in spec) and "mtp infer/mtp.py:draft" in spec
    assert "trunk infer/attention.py:mla_step" in plain  # the AEMR model's A layer
    assert "step ?" not in plain, "every op of a decode step runs inside a package function"
    assert results[1]["ops"] > results[0]["ops"] > 50
    if __import__("shutil").which("g++") is None:  # torch.compile on the CPU needs a C++ compiler
        return
    # the step's own work compiled: the drafter's and the bookkeeping's operators fewer, the trunk's
    # the same (the phases split by the two eager functions it labels then)
    assert profile.main(["--load", str(checkpoints / "mtp"), "--speculative", "1", "--steps", "3",
                         "--prompt-dir", str(src), "--prompt-tokens", "12", "--compile-speculative",
                         "--out", str(out)]) == 0
    compiled = json.loads(out.read_text())["results"]["1"]

    def phases(parts):
        return {ph: sum(p["kernels"] for name, p in parts.items() if name.startswith(ph + " "))
                for ph in ("mtp", "step", "trunk")}

    eager, fused = phases(spec), phases(compiled["parts"])
    assert fused["mtp"] < 0.8 * eager["mtp"] and fused["step"] < eager["step"]
    assert abs(fused["trunk"] - eager["trunk"]) <= 5  # eager either way
