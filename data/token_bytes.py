"""How many UTF-8 bytes of text each token covers: the denominator of bits per byte.

Bits per byte divides a sum of NLL by the bytes of the text the scored tokens cover, so that
models with different tokenizers (each run trains its own BPE; a Hugging Face model brings its
own) are measured on one scale. Two ways to count:

- :func:`byte_table` for a byte-level BPE (this repository's tokenizers, GPT-2's): every
  character of a token's string stands for exactly one byte (the ByteLevel alphabet), so a
  token's byte count is the length of its string, fixed per token id. A token that holds only
  part of a multi-byte character counts the bytes it holds, so the counts of a document's
  tokens always add up to its UTF-8 length, however a character is split.
- :func:`offset_bytes` for any fast tokenizer: from the character offsets of each token. The
  bytes up to the furthest character end seen so far, minus those before: byte-level tokens
  of one character all point at it, so the first covers its bytes and the rest 0; a piece the
  tokenizer adds (a sentencepiece "▁" at the start) covers 0 bytes.
  The sum over a document is the bytes of the text up to its last token's end.

Special tokens (the end of document) cover no text: 0 bytes.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, pre_tokenizers


def byte_table(tokenizer: Tokenizer) -> np.ndarray:
    """(V,) int64 bytes of each token id of a byte-level BPE; special tokens 0. Raises
    ValueError naming a token that is not written in the ByteLevel alphabet."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    table = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if token in special:
            continue
        if not set(token) <= alphabet:
            raise ValueError(
                f"token {token!r} (id {i}) is not byte-level BPE: its bytes cannot be read from "
                "its string; count them from offsets (data.token_bytes.offset_bytes)"
            )
        table[i] = len(token)
    return table


def offset_bytes(text: str, offsets: list[tuple[int, int]]) -> np.ndarray:
    """(N,) int64 bytes each of N tokens covers, from their (start, end) character offsets
    into ``text`` (a fast tokenizer's ``offset_mapping``)."""
    # prefix[c]: UTF-8 bytes of text[:c]
    prefix = np.concatenate([[0], np.cumsum([len(ch.encode()) for ch in text])]).astype(np.int64)
    ends = np.maximum.accumulate(np.asarray([e for _, e in offsets] or [0], dtype=np.int64))
    covered = prefix[ends]  # bytes up to the furthest end so far
    return np.diff(covered, prepend=0)[: len(offsets)]
