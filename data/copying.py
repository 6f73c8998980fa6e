"""Repeated random sequences mixed into training windows: the teacher of the copying circuit.

A small language model trained on natural text alone learns to use its context softly (a few
percent of perplexity) long before, if ever, it learns to *copy*: attend the earlier
occurrence of the current token and predict what followed it (an induction head, two layers
deep). On this corpus, a dense 2 x 128 model had not formed it after 33M tokens. A window that
is a random sequence repeated can only be predicted by copying, so a fraction of such windows
makes the circuit form within a few hundred steps, and the circuit then works on natural text
(experiments/README.md, "Language models that copy").

``data.copy_fraction`` of the training windows are replaced: a sequence of ``m`` tokens drawn
uniformly from the ``data.copy_alphabet`` most frequent tokens of the train split (an
alphabet of well-trained embeddings; drawn from the whole vocabulary the circuit formed much
later), ``m`` uniform in ``[4, seq_len // 2]``, repeated to fill the window. The first copy
cannot be predicted, so its targets are not scored (``IGNORE_INDEX``): the model is never
taught that these tokens are uniformly likely. Which windows are replaced and what they hold
is a function of (seed, epoch, window index) alone, so a resumed run sees the same windows.
Validation and evaluation windows are never replaced.
"""

from __future__ import annotations

import numpy as np
import torch

from data.batch import IGNORE_INDEX

MIN_PERIOD = 4
_STREAM = 0xC0B1  # separates these draws from every other use of the seed


def frequent_tokens(tokens: np.ndarray, vocab_size: int, count: int, exclude: int | None):
    """The ``count`` most frequent tokens of ``tokens``, most frequent first, without
    ``exclude`` (the end-of-document token); ties broken by token id."""
    freq = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.int64)
    if exclude is not None:
        freq[exclude] = -1
    order = np.lexsort((np.arange(vocab_size), -freq))
    return order[: min(count, int((freq > 0).sum()))]


class CopyMix:
    """Decides which training windows are replaced and builds them."""

    def __init__(self, fraction: float, alphabet: np.ndarray, seq_len: int, seed: int):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"data.copy_fraction must be in [0, 1], got {fraction!r}")
        if len(alphabet) < 2:
            raise ValueError(f"the copy alphabet needs at least 2 tokens, got {len(alphabet)}")
        self.fraction, self.alphabet, self.seq_len, self.seed = fraction, alphabet, seq_len, seed

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STREAM, epoch, int(index)])

    def window(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(input_ids, labels)`` of length ``seq_len`` if window ``index`` of ``epoch`` is
        replaced, else None."""
        rng = self.rng(epoch, index)
        if self.fraction == 0.0 or rng.random() >= self.fraction:
            return None
        L = self.seq_len
        period = int(rng.integers(MIN_PERIOD, max(MIN_PERIOD, L // 2) + 1))
        sequence = self.alphabet[rng.integers(0, len(self.alphabet), size=period)]
        chunk = torch.from_numpy(np.resize(sequence, L + 1).astype(np.int64))  # (L + 1,) tiled
        labels = chunk[1:].clone()
        labels[:period] = IGNORE_INDEX  # targets 1..period: the first copy and its wrap
        return chunk[:-1], labels
