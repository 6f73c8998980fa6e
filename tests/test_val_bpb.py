"""val/bpb in the training logs (lightning_modules/lm.py): the validation NLL in bits over the
UTF-8 bytes of the text its scored targets cover, with the bytes counted here independently
(the targets decoded back to text); the byte table is not part of the checkpoint."""

import math

import pytest
import torch

from lightning_modules.lm import CausalLM
from pipeline.training import train


def test_val_bpb_is_the_nll_in_bits_per_byte_of_the_targets(tiny_args, tmp_path):
    run = tmp_path / "run"
    every = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1.0"]
    trainer = train(tiny_args(run, *every))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    datamodule = trainer.datamodule
    tokenizer = datamodule.corpus.tokenizer
    windows = datamodule.eval_dataset("val")
    labels = [w["labels"].tolist() for w in windows]
    # the test corpus is ASCII: a window's targets decode to exactly the bytes they cover
    nbytes = sum(len(tokenizer.decode(ids).encode()) for ids in labels)
    tokens = sum(len(ids) for ids in labels)
    assert logged["val/tokens"] == tokens
    expected = logged["val/loss"] / math.log(2) * tokens / nbytes
    assert logged["val/bpb"] == pytest.approx(expected, rel=1e-5)
    assert 0 < nbytes != tokens  # merges: a byte per token would make bpb a plain rescaling

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any("token_bytes" in k for k in ckpt["state_dict"])
    module = CausalLM.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert module.token_bytes is None  # set by pipeline/build.py for a run, not stored


def test_a_byte_table_of_another_vocabulary_is_refused():
    module = CausalLM({"vocab_size": 300, "d_model": 16, "n_layer": 1, "n_head": 2, "d_ff": 32})
    with pytest.raises(ValueError, match=r"shape \(299,\): the model has 300 token ids"):
        module.set_token_bytes(torch.ones(299))
