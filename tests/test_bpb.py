"""Bits per byte (data/token_bytes.py, pipeline/scoring.measure): byte counts that add up to
the text however a tokenizer splits it, a byte-level model's bpb is its NLL in bits, and two
tokenizations of one text by one distribution give one bpb."""

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from data.corpus import Split, train_tokenizer
from data.token_bytes import byte_table, offset_bytes
from pipeline import scoring as sc
from tests.support.scoring_models import random_model, random_split

TEXTS = [
    "naïve café — déjà vu 🙂 日本語のテキスト",
    "plain ascii text, twice: plain ascii text",
] * 3


@pytest.fixture(scope="module")
def tokenizers():
    """A byte-level tokenizer (257 ids: bytes and EOD) and a BPE with merges over the same."""
    return train_tokenizer(iter(TEXTS), 257), train_tokenizer(iter(TEXTS * 5), 400)


def test_byte_counts_add_up_to_the_utf8_length(tokenizers):
    for tok in tokenizers:
        table = byte_table(tok)
        assert table[tok.token_to_id("<|endoftext|>")] == 0
        for text in TEXTS:
            enc = tok.encode(text)
            assert table[enc.ids].sum() == len(text.encode())
            # offsets agree: a token ending inside a character covers 0 bytes
            assert offset_bytes(text, enc.offsets).sum() == len(text.encode())


def test_a_token_splitting_a_character_counts_its_own_bytes(tokenizers):
    byte_tok, _ = tokenizers
    enc = byte_tok.encode("🙂")  # 4 bytes, 4 byte tokens
    assert list(byte_table(byte_tok)[enc.ids]) == [1, 1, 1, 1]
    assert list(offset_bytes("🙂", enc.offsets)) == [4, 0, 0, 0]  # all point at the character


def test_a_tokenizer_not_byte_level_is_refused():
    tok = Tokenizer(models.WordLevel({"hello world": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="'hello world' .* is not byte-level BPE"):
        byte_table(tok)


def test_a_byte_level_model_bpb_is_its_nll_in_bits():
    model, split = random_model(), random_split()  # every token one byte
    m = sc.measure(model, split, [0, 1, 2], 16, 64, torch.device("cpu"), window="rolling")
    at = sc.AtLength(16, math.exp(m.nll / m.tokens), m.tokens, m.windows, nll=m.nll,
                     bytes=m.bytes)  # fmt: skip
    assert at.bpb == pytest.approx(m.nll / m.tokens / math.log(2), rel=1e-12)


def unigram_nll(probs: np.ndarray, table_bytes):
    """Per-target NLL of a model that draws every byte from ``probs`` (no context), seen
    through a tokenizer: a token's NLL is the sum over its bytes."""

    def nll(model, windows):
        targets = windows[:, 1:].numpy()
        return torch.from_numpy(np.vectorize(lambda t: table_bytes[t])(targets))

    return nll


def split_of_texts(tok, texts) -> Split:
    eod = tok.token_to_id("<|endoftext|>")
    ids = [tok.encode(t).ids for t in texts]
    flat = np.concatenate([np.append(i, eod) for i in ids]).astype(np.int64)
    lengths = np.asarray([len(i) for i in ids])
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    return Split(flat, starts, lengths, [f"t{i}" for i in range(len(texts))])


def test_two_tokenizations_of_one_distribution_agree(tokenizers, monkeypatch):
    """Rolling windows score every byte of every document under both tokenizers, so the NLL
    sums and byte counts are the same and so is bpb, while token perplexities differ."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(256))
    found = {}
    for tok in tokenizers:
        vocab = tok.get_vocab_size()
        # NLL of each token id under the byte distribution (bytes from the ByteLevel alphabet)
        alphabet = {c: b for b, c in enumerate(_byte_chars())}
        token_nll = np.zeros(vocab)
        for token, i in tok.get_vocab().items():
            if token != "<|endoftext|>":
                token_nll[i] = -np.log(probs[[alphabet[c] for c in token]]).sum()
        monkeypatch.setattr(sc, "model_nll", unigram_nll(probs, token_nll))
        model = random_model(vocab)
        model.byte_table = byte_table(tok)
        model.prefix = tok.token_to_id("<|endoftext|>")
        split = split_of_texts(tok, TEXTS)
        m = sc.measure(model, split, range(len(TEXTS)), 8, 64, torch.device("cpu"),
                       window="rolling")  # fmt: skip
        found[vocab] = (m.nll / m.bytes / math.log(2), m.bytes, m.tokens)
    (bpb_a, bytes_a, tokens_a), (bpb_b, bytes_b, tokens_b) = found.values()
    assert bytes_a == bytes_b == sum(len(t.encode()) for t in TEXTS)
    assert tokens_b < tokens_a
    assert bpb_a == pytest.approx(bpb_b, rel=1e-12)


def _byte_chars() -> list[str]:
    """The ByteLevel alphabet in byte order (GPT-2's bytes_to_unicode)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]
