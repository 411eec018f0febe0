"""The BPE path: ``prepare-data --tokenizer bpe:N`` trains a byte-level BPE on the training split,
round-trips the validation split exactly, loads in Megatron's HuggingFaceTokenizer (both release
lines), trains through ``train`` with bits per byte over the same bytes as the byte run, reaches
the recipes, and refuses bad values before writing anything."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from megacpp_mcore import cli
from megacpp_mcore.models.presets import get_preset
from megacpp_mcore.train import data, loop as training, receipt, tokenizer
from megacpp_mcore.train.substrate import corpus_fingerprint, tokenizer_label

REPO = Path(__file__).resolve().parents[1]
BPE_VOCAB = 320
WORDS = ("size", "buffer", "count", "index", "node", "value", "list", "table", "state", "flags",
         "device", "queue", "offset", "length", "entry", "handle", "config", "result", "error")
TYPES = ("int", "unsigned long", "const char *", "struct node *", "size_t", "void *", "uint32_t")


def c_corpus(root: Path, files: int = 60, seed: int = 0) -> Path:
    """Small C-like headers (~100 KB): declarations, comments (some non-ASCII), one file that is
    not UTF-8 and one that spells the BPE's special tokens as text."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for f in range(files):
        name = f"{rng.choice(WORDS)}_{f:02d}"
        lines = [f"#ifndef {name.upper()}_H", f"#define {name.upper()}_H", ""]
        for _ in range(rng.randint(20, 50)):
            a, b = rng.choice(WORDS), rng.choice(WORDS)
            lines.append(rng.choice([
                f"{rng.choice(TYPES)} {a}_{b}({rng.choice(TYPES)} {a}, {rng.choice(TYPES)} {b});",
                f"#define {a.upper()}_{b.upper()} {rng.randint(0, 4096)}",
                f"/* the {a} of the {b}: café, naïve ∑ */",
                f"struct {a}_{b} {{ {rng.choice(TYPES)} {a}; {rng.choice(TYPES)} {b}; }};",
                f"static inline int {a}_is_{b}(const struct {a} *p) {{ return p->{b} != 0; }}",
            ]))
        lines.append(f"#endif /* {name.upper()}_H */")
        (root / f"{name}.h").write_text("\n".join(lines) + "\n")
    (root / "latin1.h").write_bytes(b"/* caf\xe9 \xff\xfe: not UTF-8 */\nint latin1_value;\n")
    (root / "specials.h").write_text(f'const char *s = "{tokenizer.BPE_EOD}{tokenizer.BPE_PAD}";\n')
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One corpus prepared both ways (bytes and bpe:320), validation 25 % of the files."""
    tmp = tmp_path_factory.mktemp("tok")
    src = c_corpus(tmp / "src")
    byte = data.prepare(src, tmp / "byte" / "cpp", valid_percent=25)
    bpe = data.prepare(src, tmp / "bpe" / "cpp", valid_percent=25, tokenizer=f"bpe:{BPE_VOCAB}")
    return {"tmp": tmp, "src": src, "byte": byte, "bpe": bpe}


def _split_files(src: Path, split: str) -> list[bytes]:
    return [p.read_bytes() for rel, p in data.walk_sources(src)
            if ("valid" if data.is_validation(rel, 25) else "train") == split]


def _docs(prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: the views die with ds's memory map


@pytest.mark.parametrize("spec,vocab", [("byte", None), ("bpe:259", 259), ("bpe:32768", 32768)])
def test_parse_spec(spec, vocab):
    assert tokenizer.parse_spec(spec) == vocab


def test_byte_level_alphabet_is_the_libraries():
    from tokenizers import pre_tokenizers

    chars = tokenizer.byte_chars()
    assert len(set(chars)) == 256 and set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    text = "".join(map(chr, range(1, 128))) + "é∑"
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert "".join(p for p, _ in pieces) == "".join(chars[b] for b in text.encode())
    assert list(tokenizer.utf8_pieces(b"ab\xffc\xc3\xa9")) == ["ab", b"\xff", "cé"]


def test_bpe_is_trained_on_the_training_split_and_saved_beside_the_data(corpus):
    bpe, byte = corpus["bpe"], corpus["byte"]
    tok_dir = Path(f"{bpe.prefix}.tokenizer")
    rec = bpe.manifest["tokenizer"]
    assert sorted(p.name for p in tok_dir.iterdir()) == sorted(tokenizer.FILES)
    assert rec["kind"] == "bpe" and rec["vocab_size"] == rec["requested_vocab_size"] == BPE_VOCAB
    assert rec["sha256"] == tokenizer.file_sha256(tok_dir / "tokenizer.json") and rec["path"] == "cpp.tokenizer"
    tok = data.open_tokenizer(bpe)
    assert (tok.vocab_size, tok.eod, tok.pad) == (BPE_VOCAB, rec["eod"], rec["pad"])
    merged = [t for t in tok.vocab if len(t) > 1 and t not in (tokenizer.BPE_EOD, tokenizer.BPE_PAD)]
    assert len(merged) == BPE_VOCAB - 258
    # the same files, documents and bytes per split as the byte run: one corpus, one fingerprint
    for split in ("train", "valid"):
        b, p = byte.manifest["splits"][split], bpe.manifest["splits"][split]
        assert (b["documents"], b["bytes"]) == (p["documents"], p["bytes"])
        assert b["tokens"] == b["bytes"] and p["tokens"] < p["bytes"] / 1.5  # merges shorten the text
    assert corpus_fingerprint(byte.manifest["splits"]) == corpus_fingerprint(bpe.manifest["splits"])
    # the merges come from the training split alone (all files would teach others)
    train_texts = [raw.decode("utf-8", errors="ignore") for raw in _split_files(corpus["src"], "train")]
    assert tokenizer.train_bpe(train_texts, BPE_VOCAB).get_vocab() == tok.vocab
    everything = train_texts + [r.decode("utf-8", errors="ignore") for r in _split_files(corpus["src"], "valid")]
    assert tokenizer.train_bpe(everything, BPE_VOCAB).get_vocab() != tok.vocab
    # deterministic: the same corpus gives the same tokenizer and the same ids
    again = data.prepare(corpus["src"], corpus["tmp"] / "again" / "cpp", valid_percent=25,
                         tokenizer=f"bpe:{BPE_VOCAB}")
    assert again.manifest["tokenizer"]["sha256"] == rec["sha256"]
    assert Path(f"{again.prefix}.valid.bin").read_bytes() == Path(f"{bpe.prefix}.valid.bin").read_bytes()


def test_validation_split_round_trips_exactly_and_byte_lengths_count_its_bytes(corpus):
    bpe = corpus["bpe"]
    tok = data.open_tokenizer(bpe)
    docs, files = _docs(bpe.valid_prefix), _split_files(corpus["src"], "valid")
    assert len(docs) == len(files) >= 5
    lengths = tok.byte_lengths()
    for ids, raw in zip(docs, files):
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1] and tok.pad not in ids
        assert tok.decode_bytes(ids) == raw  # exact, also for the file that is not UTF-8
        assert int(lengths[ids].sum()) == len(raw)  # the bits-per-byte denominator, per document
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert tok.detokenize(ids) == text and tok.tokenize(text).tolist() == ids[:-1].tolist()
    assert sum(int(lengths[d].sum()) for d in docs) == bpe.manifest["splits"]["valid"]["bytes"]
    # the special tokens' strings in a source file are text, never an end of document
    specials = tok.encode_documents([(corpus["src"] / "specials.h").read_bytes()])[0]
    assert list(specials).count(tok.eod) == 1


def _defaulting_args(**given) -> argparse.Namespace:
    """``pretrain_gpt.py``'s parsed args as the tokenizer builder reads them: given values, None
    (argparse's default) for every other flag either release line may look up."""
    class Args(argparse.Namespace):
        def __getattr__(self, name):
            return None

    return Args(**given)


def test_megatron_huggingface_tokenizer_loads_it(corpus):
    """Both ways ``pretrain_gpt.py --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``
    builds it: megatron-core's tokenizer builder (the default path; its module moved between
    0.16 and 0.19) -> ``megatron.core.tokenizers`` HuggingFaceTokenizer, and Megatron-LM's legacy
    ``_HuggingFaceTokenizer`` (``--legacy-tokenizer``, 0.16), which is ``AutoTokenizer`` with
    ``eod = eos_token_id``; megatron/training is not in the wheel, so that one is read through
    transformers directly."""
    import importlib

    import transformers

    bpe = corpus["bpe"]
    tok_dir, ours = f"{bpe.prefix}.tokenizer", data.open_tokenizer(bpe)
    text = next(r.decode() for r in _split_files(corpus["src"], "valid") if "é" in r.decode(errors="ignore"))
    ids = ours.tokenize(text).tolist()
    modules = [m for m in ("megatron.core.tokenizers.utils.build_tokenizer",  # 0.19
                           "megatron.core.tokenizers.text.utils.build_tokenizer")  # 0.16
               if importlib.util.find_spec(m.rsplit(".", 1)[0]) is not None]
    build = importlib.import_module(modules[0]).build_tokenizer
    mt = build(_defaulting_args(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tok_dir))
    assert type(mt._tokenizer).__name__ == "HuggingFaceTokenizer"
    assert (mt.vocab_size, mt.eod, mt.pad) == (BPE_VOCAB, ours.eod, ours.pad)
    assert list(mt.tokenize(text)) == ids and mt.detokenize(ids) == text

    auto = transformers.AutoTokenizer.from_pretrained(tok_dir)
    assert (len(auto), auto.eos_token_id, auto.pad_token_id) == (BPE_VOCAB, ours.eod, ours.pad)
    assert auto(text).input_ids == ids and auto.decode(ids) == text


def _train(prefix: str, tmp: Path, name: str) -> dict:
    model = get_preset("ae-tiny").replace(name="custom(AE)", num_layers=2, seq_length=32)
    cfg = training.TrainConfig(steps=8, micro_batch_size=2, global_batch_size=4, lr=3e-3, min_lr=3e-4,
                               warmup_steps=1, log_interval=4, eval_interval=8, eval_iters=2,
                               data=prefix, backend="local", receipt=str(tmp / f"{name}.json"))
    return training.train(model, cfg, log=lambda _: None)


def _evaluated_labels(prepared, rec) -> tuple[int, bytes]:
    """(labels counted, the bytes they decode to) of one validation, rebuilt as the loop builds it."""
    topo, steps = rec["topology"], rec["training"]["steps"]
    gbs, iters = topo["global_batch_size"], 2
    tok = data.open_tokenizer(prepared)
    _, valid_ds = training.build_datasets(prepared, seq_length=topo["seq_length"], train_samples=steps * gbs,
                                          valid_samples=iters * gbs, seed=rec["training"]["seed"])
    import torch

    lengths = torch.from_numpy(tok.byte_lengths())
    count, decoded = 0, b""
    for i in range(iters):
        for batch in training.micro_batches(valid_ds, first_sample=i * gbs, global_batch=gbs,
                                            micro_batch_size=topo["micro_batch_size"], dp_rank=0, dp=1,
                                            byte_lengths=lengths):
            kept = batch["labels"][batch["loss_mask"] > 0]
            count += kept.numel()
            decoded += tok.decode_bytes(kept.tolist())
    return count, decoded


def test_train_on_bpe_reports_bits_per_byte_over_the_same_bytes(corpus, monkeypatch):
    """A tiny run on each: the receipt names the tokenizer, the BPE model's vocabulary is the
    tokenizer's padded to 128, and validation divides by the UTF-8 bytes the evaluated labels
    decode to (for bytes: one per label). Untrained, the loss per label is ~ln(padded vocab), so
    bits/byte = log2(V) x labels / bytes: the check that the denominator is bytes, not tokens."""
    tmp = corpus["tmp"]
    monkeypatch.setenv("MEGACPP_CACHE", str(tmp / "cache"))
    recs = {kind: _train(corpus[kind].prefix, tmp, kind) for kind in ("byte", "bpe")}
    bpe_rec = corpus["bpe"].manifest["tokenizer"]
    assert recs["byte"]["tokenizer"] == {"kind": "byte", "vocab_size": 258, "sha256": None}
    assert recs["bpe"]["tokenizer"] == {"kind": "bpe", "vocab_size": BPE_VOCAB, "sha256": bpe_rec["sha256"]}
    assert tokenizer_label(recs["bpe"]) == f"bpe:{BPE_VOCAB}@{bpe_rec['sha256'][:8]}"
    assert tokenizer_label(recs["byte"]) == "bytes"
    assert recs["byte"]["model"]["vocab_size"] == 512 and recs["bpe"]["model"]["vocab_size"] == 384
    per_label = {}
    for kind, rec in recs.items():
        receipt.validate(rec)
        count, decoded = _evaluated_labels(corpus[kind], rec)
        untrained, final = rec["validation"]["history"][0], rec["validation"]["history"][-1]
        assert untrained["step"] == 0 and final["step"] == 8
        assert untrained["bytes"] == final["bytes"] == len(decoded)  # the bytes the labels decode to
        assert decoded.decode("utf-8", errors="replace")  # real validation text
        uniform = math.log2(rec["model"]["vocab_size"]) * count / len(decoded)
        assert untrained["bpb"] == pytest.approx(uniform, rel=0.03)
        assert final["bpb"] < untrained["bpb"]
        per_label[kind] = len(decoded) / count
    assert per_label["byte"] == 1.0 and per_label["bpe"] > 1.3  # BPE labels carry more bytes each
    # comparable: both runs measure bits per byte of the same kind of text on one scale
    assert 0.5 < recs["bpe"]["validation"]["final_bpb"] / recs["byte"]["validation"]["final_bpb"] < 2


@pytest.mark.parametrize("value", ["bpe", "bpe:", "bpe:abc", "bpe:258", "bpe:0", "bpe:-5", "BPE:300",
                                   "bpe:300:1", "bpe:2000000", "sentencepiece", "bytes", ""])
def test_bad_tokenizer_value_one_line_exit_2_nothing_written(value, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["prepare-data", "--source", str(REPO / "tests"), "--output", str(out / "cpp"),
                     "--tokenizer", value])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and captured.out == ""
    assert len(err) == 1 and f"--tokenizer {value!r} is not allowed" in err[0] and "bpe:N" in err[0]
    assert not out.exists()


def test_prepare_data_command_with_bpe_and_train_refuses_a_changed_tokenizer(corpus, tmp_path, capsys):
    """The CLI prints the tokenizer line; data whose tokenizer.json changed (or vanished) after
    preparation is refused by ``open_prepared`` and so by ``train`` (one line, exit 2)."""
    out = tmp_path / "d" / "cpp"
    assert cli.main(["prepare-data", "--source", str(corpus["src"]), "--output", str(out),
                     "--valid-percent", "25", "--tokenizer", "bpe:300"]) == 0
    printed = capsys.readouterr().out
    assert "cpp.tokenizer/" in printed and "byte-level BPE, 300 ids" in printed and "bytes/token" in printed
    tok_json = Path(f"{out}.tokenizer") / "tokenizer.json"
    tok_json.write_text(tok_json.read_text().replace('"<|pad|>"', '"<|PAD|>"'))
    with pytest.raises(data.DataError, match="has sha256"):
        data.open_prepared(out)
    code = cli.main(["train", "--preset", "ae-tiny", "--num-layers", "2", "--data", str(out),
                     "--receipt", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "has sha256" in err[0] and not (tmp_path / "r.json").exists()
    tok_json.unlink()
    with pytest.raises(data.DataError, match="missing or unreadable"):
        data.open_prepared(out)
    # preparing bytes at the same prefix removes the stale tokenizer (recipes look for one there)
    data.prepare(corpus["src"], out, valid_percent=25)
    assert not Path(f"{out}.tokenizer").exists()
    assert data.open_prepared(out).manifest["tokenizer"]["kind"] == "bytes"


def _dry_run(recipe: str, checkout: Path, data_prefix: str) -> list[str]:
    proc = subprocess.run(["bash", str(REPO / "recipes" / recipe), "--dry-run"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "MEGATRON_LM": str(checkout),
                                                      "DATA": data_prefix, "OUT": str(checkout / "out")})
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


@pytest.mark.parametrize("recipe", ["nam56r_lite_1xh200.sh", "nam56r_8xh200.sh"])
def test_recipes_pass_the_datas_tokenizer_to_pretrain_gpt(recipe, corpus, tmp_path):
    from megacpp_mcore.upstream import launch_pretrain as lp

    checkout = tmp_path / "Megatron-LM"
    for name in lp.CHECKOUT_FILES:
        path = checkout / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".py"):
            path.write_text("")
        else:
            path.mkdir()
    tokens = _dry_run(recipe, checkout, corpus["bpe"].train_prefix)
    assert tokens[tokens.index("--data-path") + 1] == corpus["bpe"].train_prefix
    assert tokens[tokens.index("--tokenizer-type") + 1] == "HuggingFaceTokenizer"
    assert tokens[tokens.index("--tokenizer-model") + 1] == f"{corpus['bpe'].prefix}.tokenizer"
    assert "--vocab-size" not in tokens  # Megatron pads the tokenizer's own size
    tokens = _dry_run(recipe, checkout, corpus["byte"].valid_prefix)  # byte data: no tokenizer beside it
    assert tokens[tokens.index("--tokenizer-type") + 1] == "NullTokenizer" and "--tokenizer-model" not in tokens


MIRROR = Path("/work/.mirror/NVIDIA+Megatron-LM/repo")


@pytest.mark.skipif(not MIRROR.exists(), reason="needs the Megatron-LM git mirror at " + str(MIRROR))
def test_tokenizer_flags_are_known_to_both_megatron_lm_lines():
    from megacpp_mcore.testing.megatron_lm import flag_known, parser_dests

    mirror = MIRROR
    for tag in ("core_v0.16.1", "core_v0.19.0"):
        dests = parser_dests(str(mirror), tag)
        assert flag_known("--tokenizer-type", dests) and flag_known("--tokenizer-model", dests), tag


def test_manifest_written_by_prepare_is_json_with_tokens(corpus):
    manifest = json.loads(Path(f"{corpus['bpe'].prefix}.json").read_text())
    assert manifest == corpus["bpe"].manifest
    valid = manifest["splits"]["valid"]
    assert sum(d.size - 1 for d in _docs(corpus["bpe"].valid_prefix)) == valid["tokens"]
