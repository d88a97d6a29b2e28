"""Text -> tokens -> batches.

Tokenizers: `byte` (256 ids, never fails on any input), `char` (vocabulary = characters of the
corpus), `bpe` (byte-level BPE trained on the corpus with HF `tokenizers`). Tokens are cached as
`np.memmap` files in the run directory; the split is deterministic (the last `val_fraction` of the
tokens is validation); batches are random contiguous windows drawn from a `torch.Generator`.

Replacement policy for text tokenizers (`char`, `bpe`): the corpus is decoded as UTF-8 with
invalid sequences replaced by U+FFFD; a corpus containing NUL bytes, or where more than 1% of the
characters are replacements, is refused as binary. The `byte` tokenizer accepts anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """The data cannot be used; the message says why."""


TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}


def default_corpus() -> str:
    """The embedded corpus: the Python reference documentation topics shipped with every CPython
    (`pydoc_data.topics`, ~0.47 MB of English prose and code). No download needed."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_corpus_bytes(path: str) -> bytes:
    """Bytes of a text file, or of all text files (sorted, recursive) in a folder."""
    if not path:
        return default_corpus().encode("utf-8")
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path not found: {path}")
    if not p.is_dir() and not p.is_file():  # a FIFO or /dev/zero would block or never end
        raise DataError(f"data path {path} is not a regular file or folder")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise DataError(f"data folder {path} holds no text files (*.txt, *.md, *.rst)")
        chunks = [_read(f) for f in files]
        data = b"\n".join(chunks)
    else:
        data = _read(p)
    if not data.strip():
        raise DataError(f"data {path} is empty")
    return data


def _read(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {p}: {e.strerror or e}") from None


def decode_text(data: bytes, source: str = "data") -> str:
    """UTF-8 with U+FFFD replacement; refuse data that looks binary."""
    if b"\x00" in data:
        raise DataError(f"{source} looks binary (contains NUL bytes); use --tokenizer byte")
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if bad > 0.01 * max(len(text), 1):
        raise DataError(
            f"{source} looks binary ({bad} of {len(text)} characters are not UTF-8); "
            "use --tokenizer byte"
        )
    return text


# ----------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, defined for every input."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, str):
            text = text.encode("utf-8", errors="surrogateescape")
        return list(text)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "byte"}


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of the corpus' characters."""

    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        missing = sorted(set(text) - self.stoi.keys())
        if missing:
            shown = "".join(missing)[:20]
            raise DataError(f"text has characters outside the vocabulary: {shown!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": "".join(self.chars)}


class BPETokenizer:
    """Byte-level BPE trained on the corpus with HF `tokenizers`; saved with the run."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        from .bulk import safe_chunks  # a 50 MB line becomes pieces with the same word counts

        lines = [c for line in text.splitlines(keepends=True) for c in safe_chunks(line)]
        tok.train_from_iterator((lines[i:i + 1000] for i in range(0, len(lines), 1000)),
                                trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def to_dict(self) -> dict:
        return {"type": "bpe", "tokenizer": self.tok.to_str()}


class HFTokenizer(BPETokenizer):
    """A Hugging Face fast tokenizer (`tokenizer.json`) carried over from an imported model."""

    kind = "hf"

    def to_dict(self) -> dict:
        return {"type": "hf", "tokenizer": self.tok.to_str()}


class IdTokenizer:
    """Token ids written as decimal numbers ("464 3290 318"): the tokenizer of an imported model
    whose source had none."""

    kind = "ids"

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(w) for w in text.split()]
        except ValueError:
            raise DataError("this run has no tokenizer: write the prompt as token ids, e.g. "
                            "'464 3290 318'") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(f"token id {bad[0]} outside the vocabulary 0..{self.vocab_size - 1}")
        return ids

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def to_dict(self) -> dict:
        return {"type": "ids", "vocab_size": self.vocab_size}


TOKENIZERS = {"byte", "char", "bpe", "hf", "ids"}  # hf, ids: only from an imported model


def tokenizer_from_dict(d: dict):
    """The tokenizer saved as `d`; anything malformed (a hostile checkpoint) is a DataError."""
    try:
        tok = _tokenizer_from_dict(d)
    except DataError:
        raise
    except Exception as e:  # KeyError, TypeError, the tokenizers library's own errors
        raise DataError(f"saved tokenizer is malformed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if not isinstance(getattr(tok, "vocab_size", None), int) or tok.vocab_size <= 0:
        raise DataError("saved tokenizer is malformed: empty vocabulary")
    return tok


def _tokenizer_from_dict(d: dict):
    if not isinstance(d, dict):
        raise DataError(f"saved tokenizer is malformed: expected a mapping, got {type(d).__name__}")
    kind = d.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(list(d["chars"]))
    if kind == "bpe":
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_str(d["tokenizer"]))
    if kind == "hf":
        from tokenizers import Tokenizer

        return HFTokenizer(Tokenizer.from_str(d["tokenizer"]))
    if kind == "ids":
        return IdTokenizer(d["vocab_size"])
    raise DataError(f"unknown tokenizer type {kind!r}")


def build_tokenizer(kind: str, data: bytes, bpe_vocab_size: int = 1024, source: str = "data"):
    if kind == "byte":
        return ByteTokenizer()
    text = decode_text(data, source)
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(text, bpe_vocab_size)
    if kind in ("hf", "ids"):
        raise DataError(f"tokenizer {kind!r} comes with an imported model (layerflow import-hf) "
                        "and cannot be built from a corpus; choose byte, char or bpe")
    raise DataError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(sorted(TOKENIZERS))}")


def encode_corpus(tokenizer, data: bytes, source: str = "data") -> np.ndarray:
    if tokenizer.kind == "byte":
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
    text = decode_text(data, source)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    if tokenizer.kind == "char":  # bounded memory for huge corpora (bulk.py)
        from .bulk import char_encode_array

        return char_encode_array(tokenizer.chars, text, dtype, DataError)
    if tokenizer.kind == "bpe":
        from .bulk import bpe_encode_array

        return bpe_encode_array(tokenizer.tok, text, dtype)
    return np.asarray(tokenizer.encode(text), dtype=dtype)


# ----------------------------------------------------------------------------- token files


class TokenData:
    """Train/val token streams (memmaps) and a deterministic batch sampler."""

    def __init__(self, train: np.ndarray, val: np.ndarray, block_size: int):
        self.splits = {"train": train, "val": val}
        self.block_size = block_size
        for name, arr in self.splits.items():
            if len(arr) < block_size + 1:
                raise DataError(
                    f"corpus too short: the {name} split has {len(arr)} tokens but one block "
                    f"needs block_size+1 = {block_size + 1}; "
                    "use more text or a smaller --block-size"
                )

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator,
                  rank: int = 0, world_size: int = 1):
        """`batch_size` random windows (x, y = x shifted by one). The global batch is drawn
        identically on every rank and rank r takes rows r::world_size, so a run's data does not
        depend on how many processes share it."""
        arr = self.splits[split]
        ix = torch.randint(len(arr) - self.block_size, (batch_size,), generator=generator)
        ix = ix[rank::world_size].tolist()
        x = np.stack([arr[i:i + self.block_size] for i in ix]).astype(np.int64)
        y = np.stack([arr[i + 1:i + 1 + self.block_size] for i in ix]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_data(cfg, run_dir: str | os.PathLike, tokenizer=None):
    """Read the corpus named by `cfg` (a DataConfig), build or reuse the tokenizer, cache token
    files in `run_dir/data/`, and return (tokenizer, ids) where ids is the full uint array."""
    raw = read_corpus_bytes(cfg.data)
    source = cfg.data or "embedded corpus"
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg.tokenizer, raw, cfg.bpe_vocab_size, source)
    key = hashlib.sha256(raw + json.dumps(tokenizer.to_dict(), sort_keys=True).encode()).hexdigest()
    cache = Path(run_dir) / "data"
    meta_path, bin_path = cache / "tokens.json", cache / "tokens.bin"
    try:
        meta = json.loads(meta_path.read_text())
        if meta["key"] == key:
            ids = np.memmap(bin_path, dtype=meta["dtype"], mode="r", shape=(meta["n"],))
            return tokenizer, ids
    except (OSError, ValueError, KeyError):
        pass
    ids = encode_corpus(tokenizer, raw, source)
    cache.mkdir(parents=True, exist_ok=True)
    _write_atomic(bin_path, ids.tobytes())
    _write_atomic(meta_path, json.dumps({"key": key, "dtype": ids.dtype.name, "n": len(ids)})
                  .encode())
    return tokenizer, np.memmap(bin_path, dtype=ids.dtype, mode="r", shape=(len(ids),))


def split_tokens(ids: np.ndarray, val_fraction: float, block_size: int) -> TokenData:
    n_val = int(round(len(ids) * val_fraction))
    return TokenData(ids[: len(ids) - n_val], ids[len(ids) - n_val:], block_size)
