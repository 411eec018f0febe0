"""C/C++ sources as a Megatron indexed dataset: source walker, writer, the prepared data's tokenizer.

A prepared dataset at ``PREFIX`` is written atomically (temporary names in the same directory, then
renames, the manifest last):

* ``PREFIX.train.bin/.idx`` and ``PREFIX.valid.bin/.idx``: megatron-core ``IndexedDataset`` files
  (written with its ``IndexedDatasetBuilder``), one document per source file, each document the
  file's tokens followed by the end-of-document token; tokens are bytes by default, or the ids of a
  byte-level BPE trained on the training split (:mod:`megacpp_mcore.train.tokenizer`);
* ``PREFIX.tokenizer/`` for a BPE only: the tokenizer, loadable by ``transformers.AutoTokenizer``
  and so by Megatron's ``HuggingFaceTokenizer``;
* ``PREFIX.json``: the manifest (source; documents, bytes and tokens per split; split rule;
  tokenizer with its hash). It is the commit marker: :func:`open_prepared` refuses a prefix without
  it, so an interrupted preparation never leaves a half dataset that a later run would read.

The validation split holds out whole files, chosen by a hash of their relative path (stable across
machines and runs, independent of walk order, the same for every tokenizer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from megacpp_mcore.train import tokenizer as tokenizer_mod
from megacpp_mcore.train.tokenizer import ByteTokenizer  # public here too: data.ByteTokenizer

SOURCE_SUFFIXES = (".h", ".hh", ".hpp", ".hxx", ".c", ".cc", ".cpp", ".cxx", ".inl", ".ipp")
DEFAULT_SOURCE = "/usr/include"
MANIFEST_VERSION = 1


class DataError(ValueError):
    """Bad data input (missing/empty source, unreadable prefix); one line, exit status 2 in the CLI."""


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


def _documents(files: list[tuple[str, Path]], valid_percent: float,
               max_bytes: int | None) -> Iterator[tuple[str, bytes]]:
    """(split, bytes) of each readable file in walk order, up to ``max_bytes`` source bytes."""
    total = 0
    for rel, path in files:
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        yield ("valid" if is_validation(rel, valid_percent) else "train"), raw
        total += len(raw)
        if max_bytes is not None and total >= max_bytes:
            return


def _train_texts(docs: Iterator[tuple[str, bytes]]) -> Iterator[str]:
    """The training split's text (valid UTF-8 runs) for the BPE trainer."""
    for split, raw in docs:
        if split == "train":
            yield from (p for p in tokenizer_mod.utf8_pieces(raw) if isinstance(p, str))


def _batched(docs: Iterator[tuple[str, bytes]], size: int = 256) -> Iterator[list[tuple[str, bytes]]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare(source: str | os.PathLike = DEFAULT_SOURCE, output: str | os.PathLike = "", *,
            valid_percent: float = 2.0, max_bytes: int | None = None,
            tokenizer: str = "byte") -> PreparedData:
    """Walks ``source`` and writes the dataset at prefix ``output`` (see the module docstring).

    ``max_bytes`` stops after that many source bytes (files in walk order). ``tokenizer``: ``byte``
    or ``bpe:N`` (a byte-level BPE of at most N ids trained on the training split). Raises
    :class:`DataError` before writing anything on bad input (missing source or no C/C++ files,
    unknown tokenizer, out-of-range numbers).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    try:
        bpe_vocab = tokenizer_mod.parse_spec(tokenizer)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if not 0 < valid_percent < 50:
        raise DataError(f"valid_percent must be in (0, 50), got {valid_percent}")
    if max_bytes is not None and max_bytes < 1:
        raise DataError(f"max_bytes must be >= 1, got {max_bytes}")
    src = Path(source)
    check_source(src)
    out = _check_prefix(str(output))
    files = list(walk_sources(src))
    tok_dir = Path(f"{out}.tokenizer")
    missing_parents = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    published = False
    try:
        if bpe_vocab is None:
            tok, tok_record = ByteTokenizer(), {"kind": "bytes", "vocab_size": ByteTokenizer().vocab_size,
                                                "eod": ByteTokenizer.EOD, "pad": ByteTokenizer.PAD}
        else:  # the BPE learns from the training split only (a first pass over the files)
            tokenizer_mod.save_bpe(tokenizer_mod.train_bpe(
                _train_texts(_documents(files, valid_percent, max_bytes)), bpe_vocab), tmpdir / "tokenizer")
            tok = tokenizer_mod.BPETokenizer(tmpdir / "tokenizer")
            tok_record = {"kind": "bpe", "vocab_size": tok.vocab_size, "requested_vocab_size": bpe_vocab,
                          "sha256": tok.sha256, "path": tok_dir.name, "eod": tok.eod, "pad": tok.pad}
        dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        builders = {split: IndexedDatasetBuilder(str(tmpdir / f"{split}.bin"), dtype=dtype)
                    for split in ("train", "valid")}
        # tokens: the documents' text tokens (end-of-document tokens not counted); bytes / tokens
        # is the split's bytes per token
        counts = {split: {"documents": 0, "bytes": 0, "tokens": 0} for split in builders}
        for batch in _batched(_documents(files, valid_percent, max_bytes)):
            for (split, raw), doc in zip(batch, tok.encode_documents([raw for _, raw in batch])):
                builders[split].add_document(doc, [doc.size])
                counts[split]["documents"] += 1
                counts[split]["bytes"] += len(raw)
                counts[split]["tokens"] += doc.size - 1
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
            "tokenizer": tok_record,
            "valid_percent": valid_percent,
            "max_bytes": max_bytes,
            "splits": counts,
        }
        Path(tmpdir, "manifest.json").write_text(json.dumps(manifest, indent=1))
        # Publish: tokenizer and data files first, the manifest (the commit marker) last. A byte
        # dataset leaves no tokenizer directory of an earlier BPE preparation beside it (recipes
        # take one there for the data's tokenizer).
        Path(f"{out}.json").unlink(missing_ok=True)
        if tok_dir.is_dir():
            shutil.rmtree(tok_dir)
        if bpe_vocab is not None:
            os.replace(tmpdir / "tokenizer", tok_dir)
        for split in builders:
            for ext in ("bin", "idx"):
                os.replace(tmpdir / f"{split}.{ext}", f"{out}.{split}.{ext}")
        os.replace(tmpdir / "manifest.json", f"{out}.json")
        published = True
    finally:
        shutil.rmtree(tmpdir)
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
    tok_dir = tokenizer_mod.directory_of(prefix, manifest)
    if tok_dir is not None:  # the ids mean nothing without the very tokenizer that wrote them
        tok_json = tok_dir / "tokenizer.json"
        try:
            digest = tokenizer_mod.file_sha256(tok_json)
        except OSError:
            raise DataError(f"data prefix {prefix!r}: its tokenizer {tok_json} is missing or unreadable") from None
        if digest != manifest["tokenizer"]["sha256"]:
            raise DataError(f"data prefix {prefix!r}: {tok_json} has sha256 {digest[:12]}..., not the "
                            f"{manifest['tokenizer']['sha256'][:12]}... the data was written with")
    return PreparedData(prefix=prefix, manifest=manifest)


def open_tokenizer(prepared: PreparedData) -> tokenizer_mod.ByteTokenizer | tokenizer_mod.BPETokenizer:
    """The tokenizer ``prepared`` was written with (its ``eod``/``pad``, byte lengths, vocab)."""
    return tokenizer_mod.for_manifest(prepared.prefix, prepared.manifest)


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
