"""Repeated random sequences mixed into training windows (data.copy_fraction): which windows,
what they hold, what is scored, and that a resumed loader sees the same ones."""

import numpy as np
import pytest
import torch

from data.batch import IGNORE_INDEX
from data.config import DataConfig
from data.copying import CopyMix, frequent_tokens
from data.corpus import prepare
from data.datamodule import LongContextDataModule
from data.windows import PackedWindows
from tests.test_data import config


def period_of(labels: torch.Tensor) -> int:
    return int((labels == IGNORE_INDEX).sum())


def test_frequent_tokens_by_count_without_eod():
    tokens = np.array([5, 5, 5, 2, 2, 9, 9, 9, 9, 0, 7])
    assert frequent_tokens(tokens, 10, 3, exclude=9).tolist() == [5, 2, 0]  # ties by id
    assert frequent_tokens(tokens, 10, 50, exclude=None).tolist() == [9, 5, 2, 0, 7]


def test_replaced_window_is_a_repeated_sequence_scored_after_its_first_copy():
    alphabet = np.arange(100, 132)
    mix = CopyMix(1.0, alphabet, seq_len=64, seed=3)
    periods = set()
    for i in range(40):
        inputs, labels = mix.window(0, i)
        m = period_of(labels)
        periods.add(m)
        assert 4 <= m <= 32 and inputs.shape == labels.shape == (64,)
        stream = torch.cat([inputs, labels[-1:]])  # the L + 1 tokens; labels[-1] is scored
        assert torch.equal(stream[m:], stream[:-m])  # periodic with period m
        assert torch.equal(labels[m:], stream[m + 1 :])  # scored targets are the next tokens
        assert (labels[:m] == IGNORE_INDEX).all()  # the first copy and its wrap are not
        assert set(inputs.tolist()) <= set(alphabet.tolist())
    assert len(periods) > 10  # periods vary


def test_which_windows_depends_on_seed_epoch_and_index_only():
    alphabet = np.arange(10)
    mix = CopyMix(0.3, alphabet, seq_len=32, seed=1)
    chosen = [mix.window(0, i) is not None for i in range(2000)]
    assert 0.26 < np.mean(chosen) < 0.34
    again = CopyMix(0.3, alphabet, seq_len=32, seed=1)
    for i in range(50):
        a, b = mix.window(0, i), again.window(0, i)
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a[0], b[0])
    other_epoch = [mix.window(1, i) is not None for i in range(2000)]
    assert chosen != other_epoch  # a window replaced in one epoch is read in another
    assert all(CopyMix(0.0, alphabet, 32, 1).window(0, i) is None for i in range(100))


def test_packed_windows_mix_and_resume(tmp_path):
    corpus = prepare(config(tmp_path))
    split = corpus.split("train")
    mix = CopyMix(0.5, np.arange(3, 40), seq_len=8, seed=0)
    plain = PackedWindows(split, 8, batch_size=2, num_workers=1, seed=0)
    mixed = PackedWindows(split, 8, batch_size=2, num_workers=1, seed=0, copy=mix)
    pairs = [(a, b) for a, b, _ in zip(plain, mixed, range(40), strict=False)]
    replaced = [b for a, b in pairs if not torch.equal(a["input_ids"], b["input_ids"])]
    kept = [b for a, b in pairs if torch.equal(a["input_ids"], b["input_ids"])]
    assert replaced and kept
    assert all(period_of(b["labels"]) >= 4 for b in replaced)
    assert all(period_of(b["labels"]) == 0 for b in kept)  # natural windows score everything
    assert [a["index"] for a, _ in pairs] == [b["index"] for _, b in pairs]  # same order


def test_datamodule_resume_sees_the_same_windows(tmp_path):
    cfg = config(tmp_path, seq_len=8, copy_fraction=0.5, copy_alphabet=20)

    def batches(module, n):
        return [b["input_ids"].clone() for b, _ in zip(module.train_dataloader(), range(n),
                                                        strict=False)]  # fmt: skip

    straight = batches(LongContextDataModule(cfg), 7)
    resumed = LongContextDataModule(cfg)
    resumed.load_state_dict({"batches_consumed": 4})
    assert all(torch.equal(a, b) for a, b in zip(batches(resumed, 3), straight[4:], strict=True))
    alphabet = set(LongContextDataModule(cfg).copy_mix().alphabet.tolist())
    assert len(alphabet) == 20


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"copy_fraction": 1.5}, "data.copy_fraction must be in [0, 1], got 1.5"),
        ({"copy_alphabet": 1}, "data.copy_alphabet must be an integer >= 2, got 1"),
        ({"source": "recall", "copy_fraction": 0.1}, "applies to text sources"),
    ],
)
def test_bad_copy_settings_are_named(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DataConfig(**overrides)
