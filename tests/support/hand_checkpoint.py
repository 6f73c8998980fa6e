"""A checkpoint written by hand, without training: a random model in the layout eval.py reads
(``hyper_parameters.model``, ``run_config``, ``state_dict`` with ``model.`` keys), for tests
of what happens around scoring, where training a run first would only cost time."""

from pathlib import Path

import torch

from data.corpus import train_tokenizer
from models.transformer import ModelConfig, TransformerLM


def write_checkpoint(run_dir: Path, data: dict, texts: list[str] | None = None, seed: int = 0,
                     **model) -> Path:  # fmt: skip
    """``run_dir/checkpoints/last.ckpt`` of a random dilated model (weights drawn with
    ``seed``; ``model`` overrides its tiny config) whose run read ``data``; with ``texts``, a
    300-token byte-level BPE trained on them is saved beside it (``run_dir/tokenizer.json``,
    as train.py does) and sets the vocabulary."""
    vocab = 300
    if texts is not None:
        tok = train_tokenizer(iter(texts), 300)
        run_dir.mkdir(parents=True, exist_ok=True)
        tok.save(str(run_dir / "tokenizer.json"))
        vocab = tok.get_vocab_size()
    fields = dict(vocab_size=vocab, d_model=16, n_layer=1, n_head=2, d_ff=32,
                  segment_lengths=[8, 16], dilation_rates=[1, 2])  # fmt: skip
    cfg = ModelConfig(**{**fields, **model})
    torch.manual_seed(seed)
    state = {f"model.{k}": v for k, v in TransformerLM(cfg).state_dict().items()}
    ckpt = {"hyper_parameters": {"model": cfg.to_dict(), "run_config": {"data": data}},
            "state_dict": state}  # fmt: skip
    path = run_dir / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path
