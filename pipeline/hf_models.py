"""Hugging Face causal LMs as baselines in eval.py: ``checkpoints=[..., hf:PATH]``.

PATH is a local ``transformers`` folder (``save_pretrained``) or, with hub access, a hub name.
The model reads the same documents as the checkpoints beside it (``data`` if given, else the
first checkpoint's corpus and split), tokenized with its own tokenizer; bits per byte counts
the bytes each token covers from the tokenizer's character offsets (data/token_bytes.py), so
its numbers sit on the same scale as every other model's. ``transformers`` is the optional
extra ``hf`` (``pip install -e '.[hf]'``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from data.config import DataConfig
from data.corpus import SPLITS, Split, split_of
from data.sources import documents
from data.token_bytes import offset_bytes
from settings.loading import ConfigError

PREFIX = "hf:"
INSTALL = "pip install -e '.[hf]' (or: pip install transformers)"


def is_hf(path: str) -> bool:
    return str(path).startswith(PREFIX)


def transformers_module():
    """``transformers``, or a ConfigError saying how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise ConfigError(f"hf: models need the transformers library, not installed: {INSTALL}")\
            from err  # fmt: skip
    return transformers


@dataclass
class TextSplit(Split):
    """A split tokenized in memory, with the bytes each token covers (``document`` reads
    ``bytes`` instead of a byte table: offsets depend on the text, not only the token)."""

    bytes: np.ndarray = None  # (T,) int64, 0 for the separator after each document


def load_hf(spec: str, data: DataConfig, device):
    """A :class:`pipeline.scoring.Model` of the Hugging Face causal LM ``hf:PATH``."""
    from pipeline.scoring import Model

    tf = transformers_module()
    path = spec[len(PREFIX) :]
    try:
        tok = tf.AutoTokenizer.from_pretrained(path)
        net = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{spec!r} is not a Hugging Face causal LM folder: {err}") from err
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"{spec!r}: its tokenizer is not a fast one (no character offsets)")
    net.to(device).eval()
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    name = PREFIX + path.rstrip("/").split("/")[-1]
    reach = getattr(net.config, "max_position_embeddings", 0) or 0
    label = f"{name} [hf {net.config.model_type}, {reach} positions]"
    model = Model(name, net, reach, data, label, own_corpus=False, hf=True, prefix=start)
    model.tokenizer = tok
    return model


def hf_split(model, split_name: str) -> TextSplit:
    """The documents of ``split_name`` of ``model.data``'s corpus, tokenized by the model's
    tokenizer (no special tokens), each followed by a separator (EOS) as in a token cache."""
    cfg = model.data
    rows, _ = documents(cfg)
    names, ids, nbytes = [], [], []
    tok = model.tokenizer
    sep = tok.eos_token_id if tok.eos_token_id is not None else 0
    for row in rows:
        if split_name != "all" and split_of(row["name"], cfg.val_fraction,
                                            cfg.test_fraction) != split_name:  # fmt: skip
            continue
        enc = tok(row["text"], add_special_tokens=False, return_offsets_mapping=True)
        names.append(row["name"])
        ids.append(np.asarray([*enc["input_ids"], sep], dtype=np.int64))
        nbytes.append(np.append(offset_bytes(row["text"], enc["offset_mapping"]), 0))
    if split_name not in (*SPLITS, "all"):
        raise ConfigError(f"split={split_name!r} is not one of {[*SPLITS, 'all']}")
    lengths = np.asarray([len(i) - 1 for i in ids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    flat_bytes = np.concatenate(nbytes) if nbytes else np.zeros(0, dtype=np.int64)
    return TextSplit(flat, starts[: len(ids)], lengths, names, flat_bytes)


@torch.no_grad()
def hf_nll(net, windows: torch.Tensor) -> torch.Tensor:
    """(W, S) token windows -> (W, S-1) per-target NLL in float64 (log-softmax of the
    logits in float64: the model's own float32 loss differs by rounding only)."""
    logits = net(input_ids=windows[:, :-1]).logits.double()  # (W, S-1, V)
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, windows[:, 1:, None]).squeeze(-1)
