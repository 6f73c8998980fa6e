"""Attention written from its definition, in float64 with autograd: the slow twins that every
fast path is tested against. They share no code with the implementation."""

import math

import torch


def key_multiplicity(n, n_head, segment_lengths, dilation_rates, causal):
    """count[h, i, j]: how many pairs of a dilated schedule let query i attend key j in head h
    (LongNet sec. 2.2-2.3: segments [s*w, (s+1)*w), head h keeps offsets h mod r)."""
    count = torch.zeros(n_head, n, n, dtype=torch.float64)
    p = torch.arange(n)
    for w, r in zip(segment_lengths, dilation_rates, strict=True):
        segment = p // w  # w >= n gives one segment
        offset = p - segment * w
        for h in range(n_head):
            kept = offset % r == h % r
            pair = kept[:, None] & kept[None, :] & (segment[:, None] == segment[None, :])
            if causal:
                pair &= p[None, :] <= p[:, None]
            count[h] += pair
    return count


def dilated_attention_ref(q, k, v, segment_lengths, dilation_rates, causal=True, scale=None):
    """One softmax over the multiset union of attended keys: weight of key j is count*exp(s)."""
    B, N, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    count = key_multiplicity(N, H, segment_lengths, dilation_rates, causal).to(q.device)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale + count.log()  # log 0 = -inf
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def sliding_mask(n, window):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j <= i) & (j > i - window)


def sparse_mask(n, block, summary):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    same_block = (i // block == j // block) & (j <= i)
    earlier_summary = (j // block < i // block) & (j % block >= block - summary)
    return same_block | earlier_summary


def blockwise_mask(n, block):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return (j <= i) & (j // block >= i // block - 1)


def masked_attention_ref(q, k, v, mask):
    """Dense softmax attention under a boolean (N, N) mask, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~mask.to(q.device), float("-inf")), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p, v)
