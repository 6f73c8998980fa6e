"""Tiny random Hugging Face causal LMs saved in a folder (no download): a Llama-style and a
GPT-2-style one, each with a byte-level BPE trained here and wrapped as a fast tokenizer."""

from pathlib import Path

import pytest

from data.corpus import train_tokenizer

TEXT = "the quick brown fox jumps over the lazy dog; naïve café déjà vu. " * 4


def documents(directory: Path, n: int = 4, seed: int = 0) -> Path:
    """``n`` text files of a few hundred words each, for a text_dir corpus."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = TEXT.split()
    directory.mkdir(parents=True, exist_ok=True)
    for d in range(n):
        (directory / f"doc{d}.txt").write_text(" ".join(rng.choice(words, 120 + 40 * d)))
    return directory


def save_tiny(folder: Path, kind: str) -> Path:
    """A random ``llama`` or ``gpt2`` model and its tokenizer (EOS, no BOS) in ``folder``."""
    tf = pytest.importorskip("transformers")
    tok = train_tokenizer(iter([TEXT] * 20), 300)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    vocab = tok.get_vocab_size()
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, bos_token_id=None,
                             eos_token_id=fast.eos_token_id)  # fmt: skip
        model = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                            bos_token_id=None, eos_token_id=fast.eos_token_id)  # fmt: skip
        model = tf.GPT2LMHeadModel(cfg)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
