"""Tokenizers, token caches, splits and batches."""

import numpy as np
import pytest
import torch

from layerflow.config import DataConfig
from layerflow.data import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    DataError,
    build_tokenizer,
    default_corpus,
    prepare_data,
    read_corpus_bytes,
    split_tokens,
    tokenizer_from_dict,
)


def test_default_corpus_is_embedded_prose():
    text = default_corpus()
    assert len(text) > 300_000 and "statement" in text


@pytest.mark.parametrize(
    "data", [b"", b"\x00\xff\xfe", "h\u00e9llo w\u00f6rld \U0001f600".encode()])
def test_byte_tokenizer_round_trip_any_bytes(data):
    tok = ByteTokenizer()
    ids = tok.encode(data)
    assert bytes(ids) == data and all(0 <= i < 256 for i in ids)


def test_char_and_bpe_round_trip():
    text = default_corpus()[:20000]
    for tok in (CharTokenizer.train(text), BPETokenizer.train(text, 300)):
        ids = tok.encode(text[:500])
        assert tok.decode(ids) == text[:500]
        again = tokenizer_from_dict(tok.to_dict())
        assert again.encode(text[:500]) == ids
    assert BPETokenizer.train(text, 300).vocab_size <= 300


def test_binary_data_refused_for_text_tokenizers():
    with pytest.raises(DataError, match="binary"):
        build_tokenizer("char", b"abc\x00def")
    with pytest.raises(DataError, match="binary"):
        build_tokenizer("bpe", bytes(range(128, 256)) * 10)


def test_folder_of_text_files(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.bin").write_bytes(b"\x00")
    assert read_corpus_bytes(str(tmp_path)) == b"first\nsecond"


def test_split_and_batches_deterministic(tmp_path):
    tok, ids = prepare_data(DataConfig(tokenizer="char"), tmp_path)
    assert isinstance(ids, np.memmap)
    data = split_tokens(ids, 0.1, 32)
    n_val = len(data.splits["val"])
    assert abs(n_val - 0.1 * len(ids)) <= 1
    x1, y1 = data.get_batch("train", 8, torch.Generator().manual_seed(3))
    x2, y2 = data.get_batch("train", 8, torch.Generator().manual_seed(3))
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    # a batch split across ranks is the same rows as the whole batch
    g = torch.Generator().manual_seed(3)
    r0 = data.get_batch("train", 8, g, rank=0, world_size=2)[0]
    g = torch.Generator().manual_seed(3)
    r1 = data.get_batch("train", 8, g, rank=1, world_size=2)[0]
    assert torch.equal(torch.stack([r0, r1], 1).reshape(8, 32), x1)
    # the cache is reused
    _, ids2 = prepare_data(DataConfig(tokenizer="char"), tmp_path, tok)
    assert np.array_equal(ids, ids2)


def test_corpus_shorter_than_a_block():
    with pytest.raises(DataError, match="corpus too short"):
        split_tokens(np.arange(100, dtype=np.uint16), 0.1, 16)
