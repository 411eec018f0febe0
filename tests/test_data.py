"""Byte tokenizer, source walker, indexed-dataset writer (atomic) and the prepare-data command."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megacpp_mcore import cli
from megacpp_mcore.train import data

FILES = {
    "a/vector.hpp": b"#pragma once\ntemplate <class T> struct vec { T* p; };\n",
    "a/impl.cc": b"int main() { return 0; }\n",
    "c++/12/vector": b"// libstdc++ style extension-less header\n#include <bits/stl_vector.h>\n",
    "c++/12/bits/x.tcc": b"not a suffix we read\n",
    "notes/README": b"not source\n",
    "b/empty.h": b"",
    "b/z.inl": b"inline int z() { return 1; }\n",
}


def make_tree(root: Path, files=FILES, extra: int = 40) -> Path:
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    for i in range(extra):  # enough files for both splits
        (root / "gen").mkdir(exist_ok=True)
        (root / "gen" / f"f{i:03d}.h").write_bytes(f"#define F{i} {i * 7}\nint f{i}(int);\n".encode())
    return root


def test_byte_tokenizer_roundtrip_and_specials():
    tok = data.ByteTokenizer()
    ids = tok.tokenize("int x; // é")
    assert ids.tolist() == list("int x; // é".encode())
    assert tok.detokenize(list(ids) + [tok.eod, tok.pad]) == "int x; // é"
    assert (tok.vocab_size, tok.eod, tok.pad) == (258, 256, 257)
    assert tok.vocab["<eod>"] == 256 and tok.inv_vocab[65] == "A"
    lengths = tok.byte_lengths()  # the bits-per-byte denominator: one byte per byte id, specials none
    assert lengths.shape == (258,) and lengths[:256].tolist() == [1] * 256 and lengths[256:].tolist() == [0, 0]


@pytest.mark.parametrize("rel,ok", [
    ("x/a.h", True), ("x/a.HPP", True), ("a.cxx", True), ("a.ipp", True), ("a.inl", True),
    ("c++/12/vector", True), ("c++/v1/map", True), ("linux/README", False), ("c++/12/x.tcc", False),
    ("a.py", False), ("Makefile", False),
])
def test_source_selection(rel, ok):
    assert data.is_source_file(rel) is ok


def test_walk_is_sorted_and_skips_empty_and_non_source(tmp_path):
    root = make_tree(tmp_path / "src", extra=0)
    os.symlink(root / "a/impl.cc", root / "a/link.cc")  # the same file twice: read once
    rels = [rel for rel, _ in data.walk_sources(root)]
    assert rels == ["a/impl.cc", "a/vector.hpp", "b/z.inl", "c++/12/vector"]


def test_prepare_writes_megatron_dataset_deterministically(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    root = make_tree(tmp_path / "src")
    first = data.prepare(root, tmp_path / "out1" / "cpp", valid_percent=20)
    second = data.prepare(root, tmp_path / "out2" / "cpp", valid_percent=20)
    for split in ("train", "valid"):
        for ext in ("bin", "idx"):
            assert Path(f"{first.prefix}.{split}.{ext}").read_bytes() == Path(f"{second.prefix}.{split}.{ext}").read_bytes()
    assert not [p for p in (tmp_path / "out1").iterdir() if p.name.startswith(".")]  # no temp left

    expected = {"train": [], "valid": []}
    for rel, path in data.walk_sources(root):
        expected["valid" if data.is_validation(rel, 20) else "train"].append(path.read_bytes())
    assert expected["valid"] and expected["train"]
    for split, prefix in (("train", first.train_prefix), ("valid", first.valid_prefix)):
        ds = IndexedDataset(prefix)
        docs = [ds[i] for i in range(len(ds))]
        assert len(docs) == len(expected[split]) == first.manifest["splits"][split]["documents"]
        for doc, raw in zip(docs, expected[split]):
            assert doc.dtype == np.uint16 and doc[-1] == data.ByteTokenizer.EOD
            assert bytes(doc[:-1].astype(np.uint8)) == raw
    assert data.open_prepared(first.prefix).manifest == first.manifest
    for split, counts in first.manifest["splits"].items():  # one token per byte, end-of-document apart
        assert counts["tokens"] == counts["bytes"] == sum(map(len, expected[split]))
    assert first.manifest["tokenizer"]["kind"] == "bytes" and not Path(f"{first.prefix}.tokenizer").exists()


def test_interrupted_prepare_leaves_nothing_readable(tmp_path, monkeypatch):
    from megatron.core.datasets import indexed_dataset

    root = make_tree(tmp_path / "src")
    prefix = tmp_path / "out" / "cpp"
    data.prepare(root, prefix, valid_percent=20)  # a complete older dataset at the same prefix

    real_replace = os.replace
    calls = []

    def crash_midway(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # train.bin, train.idx published, then "power loss"
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(data.os, "replace", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(root, prefix, valid_percent=30)
    monkeypatch.setattr(data.os, "replace", real_replace)
    with pytest.raises(data.DataError, match="not a prepared dataset"):
        data.open_prepared(prefix)  # the manifest (commit marker) is gone, half a dataset is not read
    assert not [p for p in prefix.parent.iterdir() if p.name.startswith(".")]

    def failing_finalize(self, idx_path):
        raise OSError("disk full")

    monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "finalize", failing_finalize)
    with pytest.raises(OSError, match="disk full"):
        data.prepare(root, tmp_path / "fresh" / "deeper" / "cpp")
    assert not (tmp_path / "fresh").exists()  # not even the directories it created


def test_gpt_dataset_reads_prepared_data_and_masks_specials_for_bpb(tmp_path, monkeypatch):
    from megacpp_mcore.train import loop as training

    monkeypatch.setenv("MEGACPP_CACHE", str(tmp_path / "cache"))
    prepared = data.prepare(make_tree(tmp_path / "src"), tmp_path / "out" / "cpp", valid_percent=20)
    train_ds, valid_ds = training.build_datasets(prepared, seq_length=16, train_samples=12,
                                                 valid_samples=4, seed=3)
    assert len(train_ds) >= 12 and len(valid_ds) >= 4
    sample = train_ds[0]
    assert sample["tokens"].shape == sample["labels"].shape == (16,)
    lengths = torch.from_numpy(data.open_tokenizer(prepared).byte_lengths())
    (batch,) = training.micro_batches(valid_ds, first_sample=0, global_batch=4, micro_batch_size=4,
                                      dp_rank=0, dp=1, byte_lengths=lengths)
    special = batch["labels"] >= 256
    assert special.any(), "short documents: some labels are end-of-document tokens"
    assert (batch["loss_mask"][special] == 0).all() and (batch["loss_mask"][~special] == 1).all()
    # the DP split takes disjoint consecutive samples of the global batch
    halves = [training.micro_batches(train_ds, first_sample=4, global_batch=4, micro_batch_size=1,
                                     dp_rank=r, dp=2) for r in (0, 1)]
    assert torch_equal(halves[0][1]["tokens"][0], train_ds[5]["tokens"])
    assert torch_equal(halves[1][0]["tokens"][0], train_ds[6]["tokens"])


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_prepare_data_command(tmp_path, capsys):
    root = make_tree(tmp_path / "src")
    assert cli.main(["prepare-data", "--source", str(root), "--output", str(tmp_path / "o" / "cpp"),
                     "--valid-percent", "20"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert data.open_prepared(tmp_path / "o" / "cpp").manifest["splits"]["valid"]["documents"] > 0


@pytest.mark.parametrize("case", ["missing", "empty", "no-sources"])
def test_prepare_data_bad_source_exits_2_and_writes_nothing(tmp_path, capsys, case):
    source = tmp_path / "src"
    if case != "missing":
        source.mkdir()
    if case == "no-sources":
        (source / "README").write_text("no C++ here")
    out = tmp_path / "out"
    assert cli.main(["prepare-data", "--source", str(source), "--output", str(out / "cpp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and str(source) in err[0]
    assert not out.exists()
