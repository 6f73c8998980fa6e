"""Text the tests write: a corpus of small Python-like documents, offline and seeded."""

from pathlib import Path

import numpy as np

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def write_corpus(root: Path, n_docs: int = 60, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        n_words = int(rng.integers(20, 400))
        text = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))
        (root / f"doc{d:03d}.txt").write_text(f"def f{d}():\n    return '{text}'\n")
    return root
