"""Reliability (issue 8), point 5: hostile corpora.

Policy (data.py docstring): the byte tokenizer accepts any bytes; `char` and `bpe` decode UTF-8
with U+FFFD replacement and refuse NUL bytes or more than 1% replaced characters as binary; a
corpus of only ASCII whitespace is refused as empty. Anything else is a one-line DataError."""

import os
import threading
import time
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerflow import bulk
from layerflow.cli import main
from layerflow.config import DataConfig
from layerflow.data import BPETokenizer, DataError, decode_text, prepare_data

SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck))



def expected_refusal(data: bytes, kind: str) -> str | None:
    if not data.strip():
        return "empty"
    if kind == "byte":
        return None
    if b"\x00" in data:
        return "binary"
    text = data.decode("utf-8", errors="replace")
    return "binary" if text.count("\ufffd") > 0.01 * len(text) else None


ENDINGS = st.sampled_from(["\n", "\r\n", "\r", "", "\u2028"])
TEXT = st.lists(st.tuples(st.text(max_size=40), ENDINGS), max_size=30).map(
    lambda parts: "".join(a + b for a, b in parts).encode("utf-8"))
CORPORA = st.one_of(
    st.binary(max_size=3000),  # random bytes
    TEXT,  # any Unicode, mixed line endings
    st.tuples(TEXT, st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])).map(
        lambda t: t[0] + t[1]),  # invalid UTF-8 at the end (a cut multi-byte sequence, ...)
    st.tuples(TEXT, st.binary(max_size=8)).map(lambda t: t[0] + b"\x00" + t[1]),  # NUL bytes
    st.text(alphabet=" \t\r\n\x0b\x0c", max_size=40).map(str.encode),  # only whitespace
)


@settings(max_examples=60, **SETTINGS)
@given(data=CORPORA, kind=st.sampled_from(["byte", "char", "bpe"]))
def test_hostile_corpus_follows_the_policy(tmp_path, data, kind):
    d = tmp_path / uuid.uuid4().hex
    d.mkdir()
    (d / "c.txt").write_bytes(data)
    cfg = DataConfig(data=str(d / "c.txt"), tokenizer=kind, bpe_vocab_size=260)
    refusal = expected_refusal(data, kind)
    if refusal:
        with pytest.raises(DataError, match=refusal) as e:
            prepare_data(cfg, d / "run")
        assert len(str(e.value).splitlines()) == 1
        return
    tok, ids = prepare_data(cfg, d / "run")
    if kind == "byte":  # never fails, and is exact
        assert np.asarray(ids).astype(np.uint8).tobytes() == data
    else:  # the documented replacement policy, losslessly tokenized
        assert tok.decode(np.asarray(ids).tolist()) == decode_text(data)


WORD = st.text(st.characters(blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cs")),
               min_size=1, max_size=8)


@settings(max_examples=40, **SETTINGS)
@given(words=st.lists(WORD, min_size=1, max_size=60), size=st.integers(9, 40))
def test_bpe_in_pieces_equals_bpe_whole(bpe, words, size, monkeypatch):
    """Cutting at safe boundaries never changes the ids (bulk.py)."""
    text = " ".join(words)
    monkeypatch.setattr(bulk, "CHUNK", size)
    pieces = list(bulk.safe_chunks(text))
    assert "".join(pieces) == text and all(len(p) <= size for p in pieces[:-1])
    got = bulk.bpe_encode_array(bpe.tok, text, np.uint32).tolist()
    assert got == bpe.tok.encode(text).ids


@settings(max_examples=40, **SETTINGS)
@given(text=st.text(max_size=300), size=st.integers(1, 50))
def test_safe_chunks_always_concatenate_back(text, size):
    assert "".join(bulk.safe_chunks(text, size)) == text


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train("the flow of tokens, through layer-time: één stap!\n" * 50, 300)


def test_bpe_training_in_pieces_learns_the_same_merges(monkeypatch):
    line = " ".join(f"w{i % 37}x{i % 11}" for i in range(3000))  # one 27 kB line
    whole = BPETokenizer.train(line, 300).tok.to_str()
    monkeypatch.setattr(bulk, "CHUNK", 500)
    assert BPETokenizer.train(line, 300).tok.to_str() == whole


def test_single_50mb_line(tmp_path):
    """Byte and char tokenizers take a 50 MB line in seconds with bounded memory."""
    line = (b"flow of tokens " * 3_400_000)[:50_000_000]
    (tmp_path / "c.txt").write_bytes(line)
    for kind in ("byte", "char"):
        t0 = time.perf_counter()
        tok, ids = prepare_data(DataConfig(data=str(tmp_path / "c.txt"), tokenizer=kind),
                                tmp_path / kind)
        assert len(ids) == 50_000_000 and time.perf_counter() - t0 < 60
        assert tok.decode(np.asarray(ids[:15]).tolist()) == "flow of tokens "


def test_single_2mb_line_bpe(tmp_path):
    line = " ".join(f"tok{i % 997}" for i in range(300_000))[:2_000_000]
    (tmp_path / "c.txt").write_text(line)
    tok, ids = prepare_data(DataConfig(data=str(tmp_path / "c.txt"), tokenizer="bpe",
                                       bpe_vocab_size=512), tmp_path / "run")
    assert tok.decode(np.asarray(ids).tolist()) == line


def test_files_changing_while_read(tmp_path):
    corpus, folder = tmp_path / "c.txt", tmp_path / "folder"
    folder.mkdir()
    versions = [b"hello world\n" * 2000, b"\x00\xff" * 3000, b"", "ünï\r\ncödé\r".encode() * 1500]
    stop, started = threading.Event(), threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            corpus.write_bytes(versions[i % 4])
            f = folder / f"{i % 3}.txt"
            f.write_bytes(versions[i % 4]) if i % 2 else f.unlink(missing_ok=True)
            i += 1
            if i == 8:
                started.set()
            time.sleep(0)

    t = threading.Thread(target=writer)
    t.start()
    started.wait(10)
    seen = set()
    try:
        for i in range(25):
            for path in (corpus, folder):
                for kind in ("byte", "char"):
                    cfg = DataConfig(data=str(path), tokenizer=kind)
                    try:
                        prepare_data(cfg, tmp_path / f"run{i}{kind}")
                        seen.add("ok")
                    except DataError as e:  # a clear error, never a traceback
                        assert len(str(e).splitlines()) == 1
                        seen.add(str(e).split(" ")[0])
                    time.sleep(0.002)
    finally:
        stop.set()
        t.join()
    assert "ok" in seen
    corpus.write_bytes(versions[3])  # the token cache follows the file's final content
    tok, ids = prepare_data(DataConfig(data=str(corpus), tokenizer="char"), tmp_path / "run0char")
    assert tok.decode(np.asarray(ids).tolist()) == versions[3].decode()


def test_non_regular_files_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        with pytest.raises(DataError, match="not a regular file"):
            prepare_data(DataConfig(data=path, tokenizer="byte"), tmp_path / "run")


TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
        "--batch-size", "2", "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
        "--sample-tokens", "3", "--no-progress", "--bpe-vocab-size", "260"]


@pytest.mark.parametrize("content,kind,code,needle", [
    (bytes(range(256)) * 8, "byte", 0, ""),
    (bytes(range(256)) * 8, "char", 2, "binary"),
    (b"ab\x00cd" * 300, "bpe", 2, "binary"),
    (b" \t\r\n" * 100, "byte", 2, "empty"),
    ("línea uno\r\nline two\rthree\n".encode() * 40, "bpe", 0, ""),
    ("línea uno\r\nline two\rthree\n".encode() * 40, "char", 0, ""),
], ids=["random-byte", "random-char", "nul-bpe", "whitespace-byte", "crlf-bpe", "crlf-char"])
def test_cli_on_hostile_corpora(tmp_path, capsys, content, kind, code, needle):
    (tmp_path / "c.txt").write_bytes(content)
    got = main(["train", "--data", str(tmp_path / "c.txt"), "--out", str(tmp_path / "run"),
                "--tokenizer", kind, *TINY])
    err = capsys.readouterr().err
    assert got == code and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == (1 if code else 0), err
