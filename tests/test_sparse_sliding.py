"""Sparse (fixed) and sliding-window attention against dense attention with an explicit mask."""

import pytest
import torch

from models.attention.sliding import blockwise_attention, sliding_window_attention
from models.attention.sparse import (
    dilated_keys_per_query,
    match_dilated,
    sparse_attention,
    sparse_keys_per_query,
)
from tests.support.references import (
    blockwise_mask,
    key_multiplicity,
    masked_attention_ref,
    sliding_mask,
    sparse_mask,
)


def check_against(fn, mask, B, N, H, D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, N, H, D, generator=gen, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, N, H, D, generator=gen)
    out = fn(q, k, v)
    (out * grad).sum().backward()
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = masked_attention_ref(*ref_in, mask)
    (ref * grad.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    for x, r in zip((q, k, v), ref_in, strict=True):
        torch.testing.assert_close(x.grad.double(), r.grad, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "B,N,window",
    [(1, 64, 16), (2, 50, 16), (1, 40, 7), (1, 10, 32), (2, 33, 1), (1, 20, 20), (1, 21, 20)],
)
def test_sliding_matches_masked_dense(B, N, window):
    check_against(
        lambda q, k, v: sliding_window_attention(q, k, v, window),
        sliding_mask(N, window),
        B,
        N,
        3,
        8,
    )


@pytest.mark.parametrize(
    "B,N,block,summary",
    [(1, 64, 16, 4), (2, 50, 16, 2), (1, 40, 8, 8), (1, 10, 32, 4), (2, 37, 5, 1)],
)
def test_sparse_matches_masked_dense(B, N, block, summary):
    check_against(
        lambda q, k, v: sparse_attention(q, k, v, block, summary),
        sparse_mask(N, block, summary),
        B,
        N,
        3,
        8,
    )


@pytest.mark.parametrize("block,summary,n", [(16, 4, 64), (16, 4, 70), (5, 2, 23)])
def test_sparse_cost_counts_the_mask(block, summary, n):
    assert sparse_keys_per_query(block, summary, n) == pytest.approx(
        sparse_mask(n, block, summary).sum().item() / n
    )


def test_dilated_cost_counts_pairs():
    segs, rates, n, h = [8, 16, 32], [1, 2, 6], 70, 4
    count = key_multiplicity(n, h, segs, rates, causal=True)
    assert dilated_keys_per_query(segs, rates, n, h) == pytest.approx(count.sum().item() / (n * h))


def test_match_dilated_is_close_in_cost():
    segs, rates = [128, 256, 512, 1024, 2048], [1, 2, 4, 6, 12]
    block, summary = match_dilated(segs, rates, 2048, 4)
    target = dilated_keys_per_query(segs, rates, 2048, 4)
    assert abs(sparse_keys_per_query(block, summary, 2048) / target - 1) < 0.02


@pytest.mark.parametrize(
    "fn,message",
    [
        (lambda q: sliding_window_attention(q, q, q, 0), "window must be a positive integer"),
        (lambda q: sparse_attention(q, q, q, 8, 16), "at most sparse_block=8"),
        (lambda q: sparse_attention(q, q, q, -1, 1), "sparse_block must be a positive"),
    ],
)
def test_bad_patterns_are_rejected(fn, message):
    with pytest.raises(ValueError, match=message):
        fn(torch.randn(1, 8, 2, 4))


@pytest.mark.parametrize("B,N,block", [(1, 64, 16), (2, 50, 16), (1, 10, 32), (1, 21, 20)])
def test_blockwise_matches_masked_dense(B, N, block):
    check_against(
        lambda q, k, v: blockwise_attention(q, k, v, block), blockwise_mask(N, block), B, N, 3, 8
    )
