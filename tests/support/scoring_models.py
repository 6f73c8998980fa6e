"""Small models and splits for the scoring tests, built in memory (no training, no files)."""

import numpy as np
import torch

from data.config import DataConfig
from data.corpus import Split
from models.transformer import ModelConfig, TransformerLM
from pipeline import scoring as sc


def random_model(vocab: int = 64, seed: int = 0, attention: str = "dense") -> sc.Model:
    """A random 2-layer model over ``vocab`` tokens; every token covers one byte."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_layer=2, d_ff=64, attention=attention)
    net = TransformerLM(cfg).eval()
    table = np.ones(vocab, dtype=np.int64)
    return sc.Model("random", net, 0, DataConfig(), "random", prefix=0, byte_table=table)


def random_split(lengths=(70, 41, 100), vocab: int = 64, seed: int = 0) -> Split:
    """Documents of the given token lengths, each followed by token 0 (the EOD)."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, vocab, n) for n in lengths]
    tokens = np.concatenate([np.append(d, 0) for d in docs]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum([n + 1 for n in lengths])[:-1]]).astype(np.int64)
    return Split(tokens, starts, np.asarray(lengths, dtype=np.int64),
                 [f"d{i}" for i in range(len(lengths))])  # fmt: skip
