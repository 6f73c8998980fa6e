"""Window methods (pipeline/windows.py): which tokens each scores, that strided at stride L is
disjoint, and that every method's NLL is the naive sum over its windows."""

import numpy as np
import pytest
import torch

from pipeline import scoring as sc
from pipeline import windows as wn
from tests.support.scoring_models import random_model, random_split

CPU = torch.device("cpu")


def scored(plan):
    """Positions scored, in order (each target of each window from score_from on)."""
    return [j for b, e, f in plan for j in range(f, e)]


@pytest.mark.parametrize("n", [17, 33, 40, 100])
@pytest.mark.parametrize("length", [4, 8, 16])
def test_plans_score_each_token_at_most_once_inside_the_window(n, length):
    for method, stride in [("disjoint", None), ("strided", 1), ("strided", 3),
                           ("strided", length), ("truncate", None), ("rolling", None)]:  # fmt: skip
        plan = wn.plan(n, length, method, stride)
        got = scored(plan)
        assert got == sorted(set(got)), (method, stride)
        assert all(0 <= b < f < e <= n and e - b <= length + 1 for b, e, f in plan)
        if method in ("strided", "rolling"):  # every token after the first
            assert got == list(range(1, n))
    assert scored(wn.plan(n, length, "truncate")) == list(range(1, length + 1))


def test_strided_sees_at_least_length_minus_stride():
    for b, _e, f in wn.plan(100, 16, "strided", 4)[1:]:
        assert f - b >= 16 - 4  # the first scored target has this much context


def test_strided_at_stride_length_is_disjoint_where_length_divides_the_span():
    assert wn.plan(65, 16, "strided", 16) == wn.plan(65, 16, "disjoint")
    # otherwise strided adds the tail that disjoint leaves
    tail = wn.plan(70, 16, "strided", 16)
    assert tail[:4] == wn.plan(70, 16, "disjoint") and tail[4] == (64, 70, 65)


def test_rolling_is_disjoint_plus_a_last_full_window():
    plan = wn.plan(45, 16, "rolling")  # 44 tokens after the start token
    assert plan == [(0, 17, 1), (16, 33, 17), (28, 45, 33)]


def test_unknown_method_names_the_accepted_ones():
    with pytest.raises(ValueError, match="'sliding' is not one of .*strided"):
        wn.plan(10, 4, "sliding")


def naive(model, split, docs, length, method, stride=None, cap=None):
    """NLL summed window by window from the plan, one forward each, log-softmax in float64."""
    total, count = 0.0, 0
    for d in docs:
        ids, _ = sc.document(model, split, d, cap, start=method == "rolling")
        for b, e, f in wn.plan(len(ids), length, method, stride):
            w = torch.from_numpy(ids[b:e])
            logp = torch.log_softmax(model.net(w[None, :-1])[0].double(), -1)
            nll = -logp[torch.arange(e - b - 1), w[1:]]
            total += nll[f - b - 1 :].sum().item()
            count += e - f
    return total, count


@pytest.mark.parametrize("method,stride", [("disjoint", None), ("strided", 5), ("truncate", None),
                                           ("rolling", None)])  # fmt: skip
def test_measure_equals_the_naive_sum(method, stride):
    model, split = random_model(), random_split()
    got = sc.measure(model, split, [0, 1, 2], 16, 50, CPU, window=method, stride=stride)
    total, count = naive(model, split, [0, 1, 2], 16, method, stride)
    assert got.tokens == count and got.bytes == count  # one byte per token here
    assert got.nll == pytest.approx(total, rel=1e-6)  # float32 logits


class Counter:
    """A progress bar that adds up what it is told."""

    n = 0

    def update(self, k):
        self.n += k


@pytest.mark.parametrize("method,stride", [("disjoint", None), ("strided", 5), ("truncate", None),
                                           ("rolling", None)])  # fmt: skip
def test_the_progress_total_is_what_measure_runs(method, stride):
    model, split = random_model(), random_split()
    bar = Counter()
    sc.measure(model, split, [0, 1, 2], 16, 50, CPU, cap=60, bar=bar, window=method, stride=stride)
    assert bar.n == sc.planned_tokens(split, [0, 1, 2], 16, 60, method, stride)


def test_measure_strided_at_stride_length_equals_disjoint():
    model, split = random_model(), random_split()
    a = sc.measure(model, split, [0, 1, 2], 8, 64, CPU, cap=32, window="disjoint")
    b = sc.measure(model, split, [0, 1, 2], 8, 64, CPU, cap=32, window="strided", stride=8)
    assert (a.tokens, a.windows) == (b.tokens, b.windows) == (96, 12)
    assert a.nll == pytest.approx(b.nll, rel=1e-12)


def test_disjoint_measure_is_todays_perplexity():
    model, split = random_model(), random_split()
    ppl, tokens, windows, _ = sc.perplexity(model, split, [0, 2], 16, 40, CPU)
    starts = sc.windows_at(split, [0, 2], 16)
    assert windows == len(starts) and tokens == 16 * len(starts)
    total = sum(
        -torch.log_softmax(model.net(w[None, :-1])[0].double(), -1)[torch.arange(16), w[1:]]
        .sum()
        .item()
        for w in (torch.from_numpy(split.tokens[s : s + 17].astype(np.int64)) for s in starts)
    )
    assert ppl == pytest.approx(np.exp(total / tokens), rel=1e-6)
