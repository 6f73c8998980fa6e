"""The Sparse Transformer's fixed pattern (Child et al., 2019), the baseline LongNet is compared
with: query i, in block ``t = i // block``, attends causally inside its own block, plus the last
``summary`` positions of every earlier block.

Computed as two sets of dense blocks mixed by ``mixing.mixed_attention`` (one softmax over
the union): causal attention inside each block, and, for each block ``t >= 1``, attention to
the first ``t * summary`` rows of a small gathered tensor of summary keys and values
(``N * summary / block`` rows). Nothing ``N x N`` is built; memory is linear in N. Time is
``N * (block + N * summary / block) / 2`` key visits per head, which is why the paper matches
its FLOPs to LongNet's at one training length: :func:`match_dilated` picks the pattern.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from models.attention.backends import resolve_backend
from models.attention.documents import Documents, segment_calls, summary_calls
from models.attention.mixing import Call, Plan, chunked, contiguous_block, mixed_attention, plan
from models.attention.sliding import local_calls
from models.attention.varlen import VarlenPlan, varlen_attention, varlen_plan


def check_pattern(block: int, summary: int) -> tuple[int, int]:
    for name, x in (("sparse_block", block), ("sparse_summary", summary)):
        if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
            raise ValueError(f"{name} must be a positive integer, got {x!r}")
    if summary > block:
        raise ValueError(f"sparse_summary must be at most sparse_block={block}, got {summary}")
    return block, summary


def _summaries(x: torch.Tensor, block: int, summary: int) -> torch.Tensor:
    # (B, N, H, D) -> (B, n_full * summary, H, D): the last `summary` rows of each full block
    B, N, H, D = x.shape
    n_full = N // block
    blocks = x.narrow(1, 0, n_full * block).reshape(B, n_full, block, H, D)
    return blocks.narrow(2, block - summary, summary).reshape(B, n_full * summary, H, D)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: int,
    summary: int,
    scale: float | None = None,
    backend: str = "auto",
    documents=None,
) -> torch.Tensor:
    """Fixed-pattern causal sparse attention on ``(B, N, H, D)``; returns ``(B, N, H, D)``.
    ``documents`` (``cu_seqlens`` or a ``Documents``): blocks counted from each document's
    start, summaries of its own earlier blocks only."""
    if documents is not None:
        docs = Documents.of(documents, q.shape[0], q.shape[1], q.device)
        if not docs.whole_rows:
            return varlen_attention(sparse_document_plan(q, k, v, block, summary, docs, scale,
                                                         backend))  # fmt: skip
    return mixed_attention(sparse_plan(q, k, v, block, summary, scale, backend))


def sparse_document_plan(q, k, v, block, summary, docs, scale=None, backend="auto") -> VarlenPlan:
    """The gathered kernel calls of :func:`sparse_attention` on the documents ``docs``."""
    block, summary = check_pattern(block, summary)
    H, D = q.shape[2], q.shape[3]
    build = lambda: [  # noqa: E731
        *segment_calls(docs, block, 1, H, first=True),
        *summary_calls(docs, block, summary, H),
    ]
    calls = docs.cached(("sparse", block, summary, H), build)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    return varlen_plan(q, k, v, calls, scale=scale, backend=resolve_backend(backend, q))


def sparse_plan(q, k, v, block, summary, scale=None, backend="auto") -> Plan:
    """The kernel calls of :func:`sparse_attention`, not yet run."""
    block, summary = check_pattern(block, summary)
    B, N, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    backend = resolve_backend(backend, q)
    calls = local_calls(block, B, N, H)
    sources = [(k, v)]
    if N > block:
        sources.append((_summaries(k, block, summary), _summaries(v, block, summary)))
        for t in range(1, -(-N // block)):  # block t sees the summaries of blocks 0 .. t-1
            rows = min(block, N - t * block)
            q_blk = contiguous_block(pos=t * block, groups=B, group_stride=0, rows=rows, n_head=H)
            kv_blk = contiguous_block(groups=B, group_stride=0, rows=t * summary, n_head=H)
            calls += chunked(Call(q=q_blk, kv=kv_blk, causal=False, source=1))
    return plan(q, sources, calls, covers_all=True, scale=scale, backend=backend)


# ----------------------------------------------------------------------------------------------
# cost, and the pattern whose cost matches a dilated schedule


def sparse_keys_per_query(block: int, summary: int, seq_len: int) -> float:
    """Average number of keys a query attends (causal), exactly."""
    n_full, tail = divmod(seq_len, block)
    local = n_full * block * (block + 1) / 2 + tail * (tail + 1) / 2
    # full block t (t = 0 .. n_full-1) sees t*summary summaries; the tail block n_full*summary
    far = block * summary * n_full * (n_full - 1) / 2 + tail * summary * n_full
    return (local + far) / seq_len


def dilated_keys_per_query(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], seq_len: int, n_head: int
) -> float:
    """Average keys per query (causal) summed over pairs: the work the kernel does, exactly."""
    total = 0
    for w, r in zip(segment_lengths, dilation_rates, strict=True):
        w = min(w, seq_len)
        n_full, tail = divmod(seq_len, w)
        for h in range(n_head):
            c = h % r
            for length, count in ((w, n_full), (tail, 1)):
                m = max(0, -(-(length - c) // r))  # kept positions in such a segment
                total += count * m * (m + 1) // 2
    return total / (seq_len * n_head)


def match_dilated(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    seq_len: int,
    n_head: int,
    summaries: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    block_step: int = 16,
) -> tuple[int, int]:
    """(block, summary) whose attention FLOPs at ``seq_len`` are closest to the schedule's.

    Searches block sizes in multiples of ``block_step`` and the given summary counts; among
    near-equal costs (within 1%), prefers more summaries (a longer reach), then smaller blocks.
    """
    target = dilated_keys_per_query(segment_lengths, dilation_rates, seq_len, n_head)
    best = None
    for summary in summaries:
        for block in range(max(block_step, summary), seq_len + 1, block_step):
            err = abs(sparse_keys_per_query(block, summary, seq_len) - target) / target
            key = (round(err, 2), -summary, block)
            if best is None or key < best[0]:
                best = (key, (block, summary))
    return best[1]
