"""Dilated attention with one sequence split across processes (gloo on CPU) equals the
single-process result on the whole sequence: outputs 1e-5, gradients of q, k, v 1e-4, in both
layouts (contiguous slices; balanced: pieces j and 2P - 1 - j). One process group per world
size runs every check of that size: even forked from the preloaded server
(tests/support/distributed.py) a group costs about a second to start on 2 loaded cores, more
than most of its cases."""

import pytest

from tests.support.context_parallel_cases import attention_checks
from tests.support.distributed import spawn

# every case valid in both layouts: segments divide h = l / 2 or are multiples of it
# name: (B, N, H, D, segment_lengths, dilation_rates, causal)
CASES_2 = {
    "paper_shape_causal": (1, 64, 12, 8, [8, 16, 32, 64], [1, 2, 4, 6], True),
    "bidirectional": (1, 64, 4, 8, [8, 16, 64], [1, 2, 4], False),
    "slice_not_multiple_of_r": (1, 60, 4, 8, [5, 30, 60], [1, 4, 6], True),  # l = 30, h = 15
    "fewer_heads_than_r": (1, 48, 2, 8, [4, 24, 48], [1, 6, 12], True),
    "w_equal_to_slice": (2, 32, 4, 8, [8, 16], [1, 2], True),
    "w_above_N": (1, 40, 4, 8, [5, 80], [1, 4], True),
    "batch_2": (2, 48, 3, 8, [6, 48], [1, 3], False),
}
CASES_4 = {
    "paper_shape_causal": (1, 64, 12, 8, [4, 8, 16, 32, 64], [1, 2, 4, 6, 12], True),
    "bidirectional": (2, 64, 4, 8, [4, 16, 64], [1, 2, 4], False),
    "slice_not_multiple_of_r": (1, 120, 4, 8, [15, 30, 120], [1, 4, 6], True),  # l = 30
    "short_last_segment_group": (1, 48, 4, 8, [12, 36], [1, 4], True),  # 36 spans ranks 0-2, 3
    "w_below_slice": (1, 64, 4, 8, [4, 8], [1, 2], True),
    "first_pair_spans_ranks": (1, 64, 4, 8, [32, 64], [1, 2], True),
}


# name: (shape on rank 0, shape on rank 1, segment_lengths, dilation_rates, message)
ERRORS = {
    # segment 12 neither divides l = 16 nor is a multiple of it
    "segment_not_aligned": ((1, 16, 4, 8), (1, 16, 4, 8), [12, 32], [1, 2], r"segment length 12 "),
    "ranks_disagree": ((1, 16, 4, 8), (1, 12, 4, 8), [4], [1], r"disagree on the call"),
    "uncovered": ((1, 16, 4, 8), (1, 16, 4, 8), [16], [2], r"attending nothing"),
}


def test_two_ranks_equal_the_whole_sequence_and_refuse_bad_calls():
    """P = 2, both layouts; then bad calls raise the same ValueError on every rank (nobody
    waits on a collective); then the exchanges are in flight while the local pairs run; then
    a LongNet split across the 2 ranks, XPOS and RoPE at global positions, both layouts; and
    the ranks agree once per forward of the model: the layers (forward, backward and a
    checkpointed recomputation) read nothing on the host and gather nothing to check."""
    spawn(attention_checks, 2, list(CASES_2.items()), list(ERRORS.items()), True)


def test_four_ranks_equal_the_whole_sequence():
    spawn(attention_checks, 4, list(CASES_4.items()))


def test_balanced_pieces_must_align():
    from models.attention.distributed import RankSlice, check_split

    with pytest.raises(ValueError, match=r"segment length 10 .* piece length h = 15"):
        check_split([(10, 1), (60, 2)], RankSlice(2, 0, 30, "balanced"))  # fine contiguous
    check_split([(10, 1), (60, 2)], RankSlice(2, 0, 30, "contiguous"))
    with pytest.raises(ValueError, match=r"l = N / P = 15 must be a multiple of 2"):
        check_split([(5, 1)], RankSlice(2, 0, 15, "balanced"))


def _pairs_by_definition(pairs, n_head, total, world, causal, layout):
    """Attended (query, key) pairs of each rank's queries, straight from the definition: for
    each pair and head, query p and key j in one segment, both at the head's offset."""
    import torch

    from models.attention.distributed import token_index

    p = torch.arange(total)
    out = torch.zeros(world, dtype=torch.int64)
    for w, r in pairs:
        seg = min(w, total)
        for h in range(n_head):
            kept = (p % seg) % r == h % r
            mask = (p[:, None] // seg == p[None, :] // seg) & kept[:, None] & kept[None, :]
            if causal:
                mask &= p[None, :] <= p[:, None]
            per_token = mask.sum(1)
            out += torch.stack([per_token[token_index(world, j, total // world, layout)].sum()
                                for j in range(world)])  # fmt: skip
    return out.tolist()


@pytest.mark.parametrize("layout", ["contiguous", "balanced"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("world,cases", [(2, CASES_2), (4, CASES_4)], ids=["P=2", "P=4"])
def test_attended_pairs_per_rank_match_the_definition(world, cases, causal, layout):
    from models.attention.distributed import attended_pairs

    for name, (_, N, H, _, segs, rates, _) in cases.items():
        pairs = tuple(zip(segs, rates, strict=True))
        want = _pairs_by_definition(pairs, H, N, world, causal, layout)
        assert attended_pairs(pairs, H, N, world, causal, layout) == want, name


def test_load_balance_of_the_paper_schedule():
    """The paper's schedule at 32K, causal: the busiest rank's work over the least busy one's
    (what issue #28 counted), and one segment of the whole sequence (w = N, r = 1): 2P - 1 as
    slices grow."""
    from models.attention.distributed import attended_pairs

    pairs = tuple(zip([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12], strict=True))
    for P, ratio in ((4, 1.21), (8, 1.46), (16, 2.09)):
        work = attended_pairs(pairs, 12, 32768, P)
        assert max(work) / min(work) == pytest.approx(ratio, abs=0.005), P
    work = attended_pairs(((2**20, 1),), 1, 2**20, 4)
    assert max(work) / min(work) == pytest.approx(7, rel=1e-4)
    for P in (2, 4, 8, 16):  # the balanced layout: every rank the same work
        work = attended_pairs(pairs, 12, 32768, P, layout="balanced")
        assert max(work) / min(work) == pytest.approx(1, abs=1e-6), P
