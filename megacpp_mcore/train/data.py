"""C/C++ source bytes as a Megatron indexed dataset: byte-level tokenizer, source walker, writer.

A prepared dataset at ``PREFIX`` is three things, written atomically (temporary names in the same
directory, then renames, the manifest last):

* ``PREFIX.train.bin/.idx`` and ``PREFIX.valid.bin/.idx``: megatron-core ``IndexedDataset`` files
  (written with its ``IndexedDatasetBuilder``), one document per source file, each document the
  file's bytes followed by the end-of-document token;
* ``PREFIX.json``: the manifest (source, file and byte counts, split rule, tokenizer). It is the
  commit marker: :func:`open_prepared` refuses a prefix without it, so an interrupted preparation
  never leaves a half dataset that a later run would read.

The validation split holds out whole files, chosen by a hash of their relative path (stable across
machines and runs, independent of walk order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from megatron.core.tokenizers import MegatronTokenizerBase

SOURCE_SUFFIXES = (".h", ".hh", ".hpp", ".hxx", ".c", ".cc", ".cpp", ".cxx", ".inl", ".ipp")
DEFAULT_SOURCE = "/usr/include"
MANIFEST_VERSION = 1


class DataError(ValueError):
    """Bad data input (missing/empty source, unreadable prefix); one line, exit status 2 in the CLI."""


class ByteTokenizer(MegatronTokenizerBase):
    """Bytes are tokens 0..255; then the special tokens Megatron's GPT dataset needs.

    ``eod`` (256) ends every document; ``pad`` (257) pads partial sequences (GPTDataset masks its
    loss). ``vocab_size`` is 258; models may use a larger (padded) embedding.
    """

    NUM_BYTES = 256
    EOD = 256
    PAD = 257

    def __init__(self):
        super().__init__("bytes", {"library": "megacpp-bytes"})
        # GPTDataset hashes this into the names of its cached sample indices.
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": self.vocab_size,
                                   "eod": self.EOD, "pad": self.PAD}

    def tokenize(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def detokenize(self, ids) -> str:
        raw = bytes(int(i) for i in ids if 0 <= int(i) < self.NUM_BYTES)
        return raw.decode("utf-8", errors="replace")

    @property
    def vocab(self) -> dict[str, int]:
        table = {chr(i) if 32 <= i < 127 else f"<0x{i:02X}>": i for i in range(self.NUM_BYTES)}
        return table | {"<eod>": self.EOD, "<pad>": self.PAD}

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {v: k for k, v in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + 2

    @property
    def eod(self) -> int:
        return self.EOD

    @property
    def pad(self) -> int:
        return self.PAD

    @property
    def special_tokens_dict(self) -> dict[str, int]:
        return {"eod_token": self.EOD, "pad_token": self.PAD}

    def apply_chat_template(self, *_, **__):
        raise NotImplementedError("the byte tokenizer has no chat template")


def is_source_file(relpath: str) -> bool:
    """C/C++ by suffix, or an extension-less standard header (``c++/<ver>/vector``)."""
    name = os.path.basename(relpath)
    if name.lower().endswith(SOURCE_SUFFIXES):
        return True
    parts = Path(relpath).parts
    return "." not in name and "c++" in parts[:-1]


def walk_sources(source: str | os.PathLike) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every C/C++ file under ``source``, sorted, each real file once."""
    root = Path(source)
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if not is_source_file(rel):
                continue
            try:
                st = path.stat()
            except OSError:  # dangling symlink
                continue
            if not path.is_file() or (st.st_dev, st.st_ino) in seen or st.st_size == 0:
                continue
            seen.add((st.st_dev, st.st_ino))
            yield rel, path


def check_source(source: str | os.PathLike) -> None:
    """:class:`DataError` unless ``source`` is a directory holding at least one C/C++ file."""
    if not Path(source).is_dir():
        raise DataError(f"source directory {str(source)!r} does not exist or is not a directory")
    if next(walk_sources(source), None) is None:
        raise DataError(
            f"no C/C++ sources under {str(source)!r} (looked for {' '.join(SOURCE_SUFFIXES)} "
            "and extension-less headers under c++/)"
        )


def is_validation(relpath: str, valid_percent: float) -> bool:
    """Deterministic held-out choice: a hash of the relative path, in [0, 100)."""
    bucket = int.from_bytes(hashlib.sha1(relpath.encode()).digest()[:4], "big") % 10_000
    return bucket < valid_percent * 100


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreparedData:
    """A prepared dataset: Megatron prefixes per split and the manifest."""

    prefix: str
    manifest: dict

    @property
    def train_prefix(self) -> str:
        return f"{self.prefix}.train"

    @property
    def valid_prefix(self) -> str:
        return f"{self.prefix}.valid"


def _check_prefix(prefix: str) -> Path:
    if not prefix:
        raise DataError("empty output prefix")
    path = Path(prefix)
    if path.name in ("", ".", ".."):
        raise DataError(f"output prefix {prefix!r} must end in a file name stem, e.g. data/cpp")
    return path


def prepare(source: str | os.PathLike = DEFAULT_SOURCE, output: str | os.PathLike = "", *,
            valid_percent: float = 2.0, max_bytes: int | None = None) -> PreparedData:
    """Walks ``source`` and writes the dataset at prefix ``output`` (see the module docstring).

    ``max_bytes`` stops after that many source bytes (files in walk order). Raises
    :class:`DataError` before writing anything when ``source`` is missing or has no C/C++ files.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if not 0 < valid_percent < 50:
        raise DataError(f"valid_percent must be in (0, 50), got {valid_percent}")
    if max_bytes is not None and max_bytes < 1:
        raise DataError(f"max_bytes must be >= 1, got {max_bytes}")
    src = Path(source)
    check_source(src)
    out = _check_prefix(str(output))
    files = list(walk_sources(src))
    missing_parents = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    published = False
    try:
        builders = {split: IndexedDatasetBuilder(str(tmpdir / f"{split}.bin"), dtype=np.uint16)
                    for split in ("train", "valid")}
        counts = {split: {"documents": 0, "bytes": 0} for split in builders}
        total = 0
        for rel, path in files:
            try:
                raw = path.read_bytes()
            except OSError:
                continue
            split = "valid" if is_validation(rel, valid_percent) else "train"
            doc = np.empty(len(raw) + 1, dtype=np.uint16)
            doc[:-1] = np.frombuffer(raw, dtype=np.uint8)
            doc[-1] = ByteTokenizer.EOD
            builders[split].add_document(doc, [doc.size])
            counts[split]["documents"] += 1
            counts[split]["bytes"] += len(raw)
            total += len(raw)
            if max_bytes is not None and total >= max_bytes:
                break
        for split, builder in builders.items():
            builder.finalize(str(tmpdir / f"{split}.idx"))
        empty = [s for s, c in counts.items() if c["documents"] == 0]
        if empty:
            raise DataError(
                f"split(s) {empty} got no files from {str(src)!r} "
                f"({sum(c['documents'] for c in counts.values())} files); use more sources "
                f"or another --valid-percent"
            )
        manifest = {
            "version": MANIFEST_VERSION,
            "source": str(src.resolve()),
            "tokenizer": {"kind": "bytes", "vocab_size": ByteTokenizer().vocab_size,
                          "eod": ByteTokenizer.EOD, "pad": ByteTokenizer.PAD},
            "valid_percent": valid_percent,
            "max_bytes": max_bytes,
            "splits": counts,
        }
        Path(tmpdir, "manifest.json").write_text(json.dumps(manifest, indent=1))
        # Publish: data files first, the manifest (the commit marker) last.
        Path(f"{out}.json").unlink(missing_ok=True)
        for split in builders:
            for ext in ("bin", "idx"):
                os.replace(tmpdir / f"{split}.{ext}", f"{out}.{split}.{ext}")
        os.replace(tmpdir / "manifest.json", f"{out}.json")
        published = True
    finally:
        for leftover in tmpdir.iterdir():
            leftover.unlink()
        tmpdir.rmdir()
        if not published:  # leave no directories behind that this call created
            for parent in missing_parents:
                if parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
    return PreparedData(prefix=str(out), manifest=manifest)


def open_prepared(prefix: str | os.PathLike) -> PreparedData:
    """A dataset written by :func:`prepare`; :class:`DataError` naming what is missing otherwise."""
    prefix = str(prefix)
    manifest_path = Path(f"{prefix}.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"data prefix {prefix!r} is not a prepared dataset ({manifest_path} is missing); "
            "run `megacpp-mcore prepare-data --output PREFIX` first"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"data prefix {prefix!r}: cannot read {manifest_path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"data prefix {prefix!r}: {manifest_path} is not a version-{MANIFEST_VERSION} manifest")
    for split in ("train", "valid"):
        for ext in ("bin", "idx"):
            path = Path(f"{prefix}.{split}.{ext}")
            if not os.access(path, os.R_OK):
                raise DataError(f"data prefix {prefix!r}: {path} is missing or unreadable")
    return PreparedData(prefix=prefix, manifest=manifest)


def cache_dir() -> Path:
    """``$MEGACPP_CACHE`` or ``~/.cache/megacpp_mcore``."""
    return Path(os.environ.get("MEGACPP_CACHE") or Path.home() / ".cache" / "megacpp_mcore")


def default_prefix(source: str = DEFAULT_SOURCE, max_bytes: int | None = None) -> Path:
    """Where the default data for ``source`` lives in the cache."""
    tag = hashlib.sha1(f"{Path(source).resolve()}|{max_bytes}".encode()).hexdigest()[:10]
    return cache_dir() / "data" / f"{Path(source).name or 'root'}-{tag}" / "cpp"


def ensure_default(source: str = DEFAULT_SOURCE, max_bytes: int | None = None,
                   log=print) -> PreparedData:
    """The cached dataset for ``source``, prepared on first use."""
    prefix = default_prefix(source, max_bytes)
    try:
        return open_prepared(prefix)
    except DataError:
        pass
    log(f"preparing data from {source} into {prefix} (first use) ...")
    return prepare(source, prefix, max_bytes=max_bytes)
