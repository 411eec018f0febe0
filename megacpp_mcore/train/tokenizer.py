"""Tokenizers of prepared data: bytes (the default) or a byte-level BPE trained on the training split.

``prepare-data --tokenizer byte|bpe:N`` picks one (:func:`parse_spec`). Both share what the loop
and the data writer need: ``encode_documents`` (raw file bytes -> ids ending in ``eod``),
``byte_lengths`` (the UTF-8 bytes each id stands for, 0 for special tokens: validation divides its
summed loss by the bytes of the evaluated labels, so bits per byte means the same for both) and
Megatron's tokenizer interface (``eod``, ``pad``, ``vocab_size``, ``unique_identifiers``) for
``GPTDataset``.

The BPE is the Hugging Face ``tokenizers`` library's byte-level BPE (GPT-2's byte-to-character
alphabet, so every byte sequence has ids and each id is a fixed byte string). It is saved as a
directory ``transformers.AutoTokenizer`` loads (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``), which is what Megatron's ``HuggingFaceTokenizer`` reads from
``pretrain_gpt.py --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from megatron.core.tokenizers import MegatronTokenizerBase

# Special tokens of the BPE, ids 0 and 1 (the trainer puts them first). Text that happens to
# contain these strings is encoded as ordinary bytes (``encode_special_tokens``).
BPE_EOD, BPE_PAD = "<|eod|>", "<|pad|>"
BPE_MIN_VOCAB = 256 + 2 + 1  # the byte alphabet, the two specials, at least one merge
BPE_MAX_VOCAB = 1 << 20
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_SPEC = re.compile(r"bpe:(\d+)")


def parse_spec(spec: str) -> int | None:
    """``None`` for ``byte``, ``N`` for ``bpe:N``; ``ValueError`` (one line) for anything else."""
    if spec == "byte":
        return None
    match = _SPEC.fullmatch(spec or "")
    if match and BPE_MIN_VOCAB <= int(match.group(1)) <= BPE_MAX_VOCAB:
        return int(match.group(1))
    raise ValueError(f"--tokenizer {spec!r} is not allowed; use byte or bpe:N with N in "
                     f"{BPE_MIN_VOCAB}..{BPE_MAX_VOCAB} (256 bytes + 2 special tokens + merges)")


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
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        """The bytes ``ids`` stand for (special tokens dropped)."""
        return bytes(int(i) for i in ids if 0 <= int(i) < self.NUM_BYTES)

    def encode_documents(self, docs: list[bytes]) -> list[np.ndarray]:
        """Each document's bytes followed by ``eod`` (``uint16``)."""
        out = []
        for raw in docs:
            doc = np.empty(len(raw) + 1, dtype=np.uint16)
            doc[:-1] = np.frombuffer(raw, dtype=np.uint8)
            doc[-1] = self.EOD
            out.append(doc)
        return out

    def byte_lengths(self) -> np.ndarray:
        """``[vocab_size]``: 1 for each byte, 0 for the special tokens."""
        return (np.arange(self.vocab_size) < self.NUM_BYTES).astype(np.int64)

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


@functools.cache
def byte_chars() -> tuple[str, ...]:
    """GPT-2's byte -> character table (``byte_chars()[b]``), the alphabet of byte-level BPE:
    printable Latin-1 bytes stand for themselves, the other 68 map to U+0100 onwards."""
    kept = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    shifted = iter(range(256, 512))
    return tuple(chr(b) if b in kept else chr(next(shifted)) for b in range(256))


def utf8_pieces(raw: bytes) -> Iterator[str | bytes]:
    """``raw`` as maximal valid UTF-8 runs (``str``) and the invalid bytes between them
    (``bytes``): a source file need not be UTF-8, and the BPE encodes text."""
    pos = 0
    while pos < len(raw):
        try:
            yield raw[pos:].decode("utf-8")
            return
        except UnicodeDecodeError as exc:
            if exc.start:
                yield raw[pos:pos + exc.start].decode("utf-8")
            yield raw[pos + exc.start:pos + exc.end]
            pos += exc.end


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE with ``vocab_size`` ids at most (fewer when the text runs out of pairs)
    trained on ``texts``; a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOD, BPE_PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def save_bpe(tok, directory: Path) -> None:
    """Writes the directory ``AutoTokenizer.from_pretrained`` (so Megatron's HuggingFaceTokenizer)
    loads: ``<|eod|>`` is its end-of-sequence token (Megatron's ``eod``), ``<|pad|>`` its padding."""
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    specials = {"eos_token": BPE_EOD, "pad_token": BPE_PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_prefix_space": False,
              # decode must give back the text: no space clean-up; documents are long
              "clean_up_tokenization_spaces": False, "model_max_length": 1 << 40}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class BPETokenizer(MegatronTokenizerBase):
    """The byte-level BPE saved by :func:`save_bpe` in ``directory``, through ``tokenizers``
    (no ``transformers`` needed to train or prepare)."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        super().__init__(str(directory), {"library": "megacpp-bpe"})
        self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self._tok.encode_special_tokens = True  # "<|eod|>" in a source file is text, not eod
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        self.sha256 = file_sha256(directory / "tokenizer.json")
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": self.vocab_size,
                                   "sha256": self.sha256}

    def tokenize(self, text: str | bytes) -> np.ndarray:
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return self.encode_documents([raw])[0][:-1].astype(np.int64)

    def encode_documents(self, docs: list[bytes]) -> list[np.ndarray]:
        """Each document's ids followed by ``eod``: valid UTF-8 runs through the BPE (in one batch),
        the bytes between them as their single-byte ids, so every file round-trips exactly."""
        single = [self._vocab[c] for c in byte_chars()]
        pieces = [list(utf8_pieces(raw)) for raw in docs]
        encoded = iter(self._tok.encode_batch([p for ps in pieces for p in ps if isinstance(p, str)],
                                              add_special_tokens=False))
        dtype = np.uint16 if self.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        out = []
        for ps in pieces:
            ids = [i for p in ps for i in (next(encoded).ids if isinstance(p, str) else (single[b] for b in p))]
            out.append(np.array([*ids, self.eod], dtype=dtype))
        return out

    def decode_bytes(self, ids) -> bytes:
        """The bytes ``ids`` stand for, exactly (special tokens drop out)."""
        table = {c: b for b, c in enumerate(byte_chars())}
        specials = {self.eod, self.pad}
        return bytes(table[c] for i in ids if int(i) not in specials
                     for c in self._tok.id_to_token(int(i)))

    def detokenize(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def byte_lengths(self) -> np.ndarray:
        """``[vocab_size]``: each token's byte count (one alphabet character is one byte), 0 for
        the special tokens."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in self._vocab.items():
            lengths[i] = len(token)
        lengths[[self.eod, self.pad]] = 0
        return lengths

    @property
    def vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {v: k for k, v in self._vocab.items()}

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def eod(self) -> int:
        return self._vocab[BPE_EOD]

    @property
    def pad(self) -> int:
        return self._vocab[BPE_PAD]

    @property
    def special_tokens_dict(self) -> dict[str, int]:
        return {"eod_token": self.eod, "pad_token": self.pad}

    def apply_chat_template(self, *_, **__):
        raise NotImplementedError("the BPE tokenizer of prepared C/C++ data has no chat template")


def directory_of(prefix: str | Path, manifest: dict) -> Path | None:
    """Where a prepared dataset's BPE lives (``None`` for bytes): beside the data, named in the
    manifest relative to the prefix's directory."""
    tok = manifest.get("tokenizer") or {}
    return Path(prefix).parent / tok["path"] if tok.get("kind") == "bpe" else None


def for_manifest(prefix: str | Path, manifest: dict) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a prepared dataset was written with."""
    directory = directory_of(prefix, manifest)
    return ByteTokenizer() if directory is None else BPETokenizer(directory)


def record(manifest_tokenizer: dict | None) -> dict[str, Any]:
    """The receipt's ``tokenizer``: ``{"kind": "byte"|"bpe", "vocab_size", "sha256"}`` (``compare``
    treats it as substrate); data prepared before BPE existed names the byte tokenizer."""
    tok = manifest_tokenizer or {}
    if tok.get("kind") == "bpe":
        return {"kind": "bpe", "vocab_size": int(tok["vocab_size"]), "sha256": tok["sha256"]}
    return {"kind": "byte", "vocab_size": int(tok.get("vocab_size", ByteTokenizer().vocab_size)), "sha256": None}


CHECKPOINT_TOKENIZER = "tokenizer"  # a BPE run's tokenizer, copied into its --save directory


def store_with_checkpoint(prefix: str | Path, manifest: dict, save_dir: str | Path) -> Path | None:
    """Copies a BPE dataset's tokenizer into ``save_dir/tokenizer`` (once; atomically), so the
    checkpoint carries what its ids mean (``generate --load`` reads it). Bytes: nothing to copy."""
    source = directory_of(prefix, manifest)
    if source is None:
        return None
    target = Path(save_dir) / CHECKPOINT_TOKENIZER
    if (target / "tokenizer.json").is_file() and \
            file_sha256(target / "tokenizer.json") == manifest["tokenizer"]["sha256"]:
        return target
    partial = Path(save_dir) / f".{CHECKPOINT_TOKENIZER}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def for_checkpoint(save_dir: str | Path) -> ByteTokenizer | BPETokenizer:
    """The tokenizer of a ``train --save`` directory: its copied BPE, else bytes."""
    directory = Path(save_dir) / CHECKPOINT_TOKENIZER
    return BPETokenizer(directory) if (directory / "tokenizer.json").is_file() else ByteTokenizer()


def fit_model_vocab(model, manifest_tokenizer: dict | None, *, tp: int = 1):
    """``model`` with the embedding the data's tokenizer needs. Bytes: the preset's (padded)
    vocabulary, which must hold the 258 ids. BPE: the tokenizer's size padded to a multiple of
    128 x TP, as ``pretrain_gpt.py`` pads it (``--make-vocab-size-divisible-by`` 128), so both
    entry points build the same model."""
    rec = record(manifest_tokenizer)
    if rec["kind"] == "byte":
        if model.vocab_size < rec["vocab_size"]:
            raise ValueError(f"model vocab_size={model.vocab_size} is smaller than the byte "
                             f"tokenizer's {rec['vocab_size']}")
        return model
    multiple = 128 * tp
    return model.replace(vocab_size=-(-rec["vocab_size"] // multiple) * multiple)


def label_bytes(micro: list[dict], byte_lengths) -> int:
    """UTF-8 bytes the loss-counted labels of ``micro`` (batch dicts, ``labels``/``loss_mask``
    ``[b, s]``) stand for, read from ``byte_lengths`` (``[vocab]``): nothing is decoded."""
    return int(sum(int((byte_lengths[b["labels"]] * (b["loss_mask"] > 0)).sum()) for b in micro))


def data_parallel_sum(count: int) -> int:
    """``count`` summed over the data-parallel group (each DP rank evaluates its share)."""
    import torch
    from megatron.core import parallel_state

    from megacpp_mcore.train.runtime import device

    total = torch.tensor([count], dtype=torch.int64, device=device())
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return int(total.item())
