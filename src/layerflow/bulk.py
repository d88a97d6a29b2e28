"""Bounded-memory encoding of large corpora (a 50 MB single line must not need gigabytes).

* `char`: code points are mapped to ids with `np.searchsorted` over the sorted vocabulary, in
  slices of `CHAR_STEP` characters: O(n log V) time, 4-16 bytes per character of working memory
  per slice instead of a Python list of n ints.
* `bpe` (byte-level, GPT-2 pre-tokenizer regex): the text is cut into pieces of about
  `CHUNK` characters at *safe boundaries* and encoded with `encode_batch` in small groups.
  A safe boundary is a position i with text[i] == " " and neither text[i-1] nor text[i+1]
  whitespace. Every alternative of the pre-tokenizer regex either contains no space or starts
  with one optional space (` ?\\p{L}+`, ...) or is a whitespace run; so no pre-token spans
  i-1..i, the scan restarts exactly at i, and BPE merges never cross pre-tokens: the ids of the
  pieces, concatenated, equal the ids of the whole text (tested). A piece with no safe boundary
  (e.g. 1 MB without a single space) is cut at the size limit; that only changes how the one
  pathological "word" spanning the cut is split, and decode(encode(x)) == x still holds.
  Training feeds the same pieces to the trainer, so word counts (and merges) are unchanged.
"""

from __future__ import annotations

import numpy as np

CHUNK = 1 << 18  # characters per BPE piece
GROUP = 8  # pieces per encode_batch call (bounds the HF Encoding objects alive at once)
CHAR_STEP = 1 << 20


def _boundary(text: str, target: int, lo: int) -> int:
    i = text.rfind(" ", lo + 1, target + 1)
    while i > lo:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
        i = text.rfind(" ", lo + 1, i)
    return target


def safe_chunks(text: str, size: int | None = None):
    """Pieces of `text` (concatenating to it) of at most `size` (default `CHUNK`) characters,
    cut at safe boundaries for the byte-level pre-tokenizer where one exists."""
    size = size or CHUNK
    start, n = 0, len(text)
    while n - start > size:
        end = _boundary(text, start + size, start)
        yield text[start:end]
        start = end
    if start < n or n == 0:
        yield text[start:]


def bpe_encode_array(tok, text: str, dtype) -> np.ndarray:
    """Ids of `text` under an HF byte-level BPE `tokenizers.Tokenizer`, as a numpy array."""
    chunks = list(safe_chunks(text))
    parts = []
    for i in range(0, len(chunks), GROUP):
        parts.extend(np.asarray(e.ids, dtype=dtype) for e in tok.encode_batch(chunks[i:i + GROUP]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def char_encode_array(chars, text: str, dtype, error=ValueError) -> np.ndarray:
    """Ids of `text` for the character vocabulary `chars`; raises `error` naming the first
    characters that are outside the vocabulary."""
    keys = np.fromiter((ord(c) for c in chars), dtype=np.int64, count=len(chars))
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    out = np.empty(len(text), dtype=dtype)
    for s in range(0, len(text), CHAR_STEP):
        piece = text[s:s + CHAR_STEP]
        cps = np.frombuffer(piece.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        if len(sorted_keys) == 0:
            pos, bad = np.zeros(len(cps), dtype=np.int64), np.ones(len(cps), dtype=bool)
        else:
            pos = np.searchsorted(sorted_keys, cps).clip(max=len(sorted_keys) - 1)
            bad = sorted_keys[pos] != cps
        if bad.any():
            missing = sorted({piece[j] for j in np.flatnonzero(bad)[:10_000].tolist()})
            raise error(f"text has characters outside the vocabulary: {''.join(missing)[:20]!r}")
        out[s:s + len(piece)] = order[pos]
    return out
