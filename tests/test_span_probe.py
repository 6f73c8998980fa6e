"""The repeated-span probe: a model that copies shows the drop at every distance it can see;
one that ignores context (a unigram model) shows none."""

import pytest
import torch

from pipeline.span_probe import distances, probe


class Copier(torch.nn.Module):
    """An induction head written out: predicts the token that followed the most recent
    earlier occurrence of the current token (within ``reach`` tokens); a unigram model when
    ``reach`` is 0."""

    def __init__(self, vocab: int, reach: int):
        super().__init__()
        self.vocab, self.reach = vocab, reach
        self.lm_head = torch.nn.Linear(vocab, vocab, bias=False)
        self.lm_head.weight.data = torch.eye(vocab)

    def hidden(self, tokens):
        out = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens.tolist()):
            last = {}
            for i, t in enumerate(row):
                if t in last and i - last[t] <= self.reach:
                    out[b, i, row[last[t] + 1]] = 20.0
                last[t] = i
        return out


def windows(n=3, length=256, vocab=2000):
    return torch.randint(0, vocab, (n, length + 1), generator=torch.Generator().manual_seed(0))


def test_grid():
    assert distances(256, 32) == [32, 64, 128]
    assert distances(2048, 32) == [32, 64, 128, 256, 512, 1024]


@pytest.mark.parametrize("reach", [1000, 100])
def test_a_copier_shows_the_drop_where_it_can_see(reach):
    rows = probe(Copier(2000, reach), windows(), span=32)
    assert [r["distance"] for r in rows] == [32, 64, 128]
    for r in rows:
        if r["distance"] <= reach - 32:  # every token of the copy within reach
            assert r["drop"] > 5.0 and r["nll_with"] < 1.0, r  # rare chance repeats
        elif r["distance"] > reach:
            assert abs(r["drop"]) < 1e-9, r


def test_a_unigram_model_shows_none():
    for r in probe(Copier(2000, 0), windows(), span=32):
        assert r["drop"] == 0.0 and r["windows"] == 3


class HopCopier(Copier):
    """A copier that can only attend a multiple of ``rate`` tokens back, as a dilated pair
    (w, r) connects only positions whose distance r divides: the token after the earlier
    occurrence lies d - 1 back."""

    def __init__(self, vocab: int, rate: int):
        super().__init__(vocab, reach=10**9)
        self.rate = rate

    def hidden(self, tokens):
        out = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens.tolist()):
            last = {}
            for i, t in enumerate(row):
                if t in last and (i - last[t] - 1) % self.rate == 0:
                    out[b, i, row[last[t] + 1]] = 20.0
                last[t] = i
        return out


def test_chosen_distances_show_the_hop_parity():
    """d = 2^k: hop 2^k - 1, odd, unreachable at r = 4; d = 2^k + 1: hop 2^k, reachable."""
    assert distances(256, 32, [33, 300, 64, 65, 8, 65]) == [33, 64, 65]
    rows = {r["distance"]: r["drop"] for r in probe(HopCopier(2000, 4), windows(), 32, [64, 65])}
    assert rows[64] < 0.5 and rows[65] > 5.0, rows  # 64: chance repeats of the random text


def test_distances_shorter_than_the_span_are_refused():
    from settings.schema import EvalConfig

    with pytest.raises(ValueError, match=r"span_distances must be >= span_length \(32.*\[16\]"):
        EvalConfig(checkpoints=["x.ckpt"], span_distances=[16, 64])


def test_scoring_whole_windows_gives_the_same_rows():
    """``nll_fn`` (the path eval.py takes under context parallelism: the model's per-target
    NLL of the whole window, split across ranks there) scores the same span tokens as the
    single-process path, which projects only the span's rows through the output layer."""
    from models.transformer import ModelConfig, TransformerLM
    from pipeline.scoring import nll

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layer=2, n_head=2, d_ff=32,
                      segment_lengths=[8, 32], dilation_rates=[1, 2])  # fmt: skip
    net = TransformerLM(cfg).eval()
    w = torch.randint(0, 50, (2, 65), generator=torch.Generator().manual_seed(1))
    alone = probe(net, w, span=8)
    whole = probe(net, w, span=8, nll_fn=lambda x: nll(net, x))
    assert [r["distance"] for r in whole] == [8, 16, 32] == [r["distance"] for r in alone]
    for a, b in zip(alone, whole, strict=True):
        assert b == pytest.approx(a, abs=1e-6), (a, b)
