"""LongNet's dilated attention (Ding et al., 2023, arXiv 2307.02486, sections 2.2-2.3).

A schedule is a list of pairs ``(w, r)``: segment length and dilation rate. Pair ``(w, r)``
cuts the sequence into segments ``[s*w, min((s+1)*w, N))`` (the last may be shorter; ``w >= N``
is one segment). Head ``h`` keeps the positions whose offset inside their segment is
``h mod r`` modulo ``r``; kept queries attend the kept keys of their own segment. The outputs of
the pairs that keep a query are mixed with weights proportional to their softmax denominators,
which is one softmax over the multiset union of the keys they attend (paper eq. 10).

How it is computed. Within a pair, the heads that share an offset ``c = h mod r`` keep the
same positions ``s*w + c + j*r``, so for each offset the kept rows of all segments form one dense
block that is a *strided view* of the input: ``(G, M, A, D)`` with G = batch x segments,
M = ceil((w - c) / r) rows and A heads. Nothing is gathered, padded or masked: a segment
length that ``r`` does not divide, or a shorter last segment, just gives blocks with fewer rows.

The blocks go to ``mixing.mixed_attention``, which runs each on a fused kernel that returns the
log-sum-exp, merges them online into one float32 accumulator (memory O(N) whatever the number
of pairs), and has a hand-written backward that is exact through the mixing weights. Computing
the weights from a detached log-sum-exp instead, as the official implementation does, puts
gradients tens of percent off (``tests/test_dilated_attention.py`` measures it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import nn

from models.attention import distributed
from models.attention.backends import BACKENDS, resolve_backend
from models.attention.documents import Documents, segment_calls
from models.attention.mixing import Call, Plan, StridedBlock, chunked, mixed_attention, plan
from models.attention.varlen import VarlenPlan, varlen_attention, varlen_plan

# Construction-time coverage check looks at one full period of the pattern, if it is this short.
_MAX_PERIOD_CHECKED = 2**22

DilationSchedule = tuple[tuple[int, int], ...]


# ----------------------------------------------------------------------------------------------
# input checks


def validate_schedule(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int]
) -> DilationSchedule:
    """Returns the schedule as ``((w, r), ...)`` or raises ``ValueError`` naming the bad value."""
    for name, seq in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise ValueError(f"{name} must be a list of positive integers, got {seq!r}")
        if len(seq) == 0:
            raise ValueError(f"{name} must hold at least one value, got an empty list")
        for x in seq:
            if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
                raise ValueError(f"{name} must hold positive integers, got {x!r} in {list(seq)}")
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            "segment_lengths and dilation_rates must have the same length, got "
            f"{len(segment_lengths)} ({list(segment_lengths)}) and {len(dilation_rates)} "
            f"({list(dilation_rates)})"
        )
    return tuple(zip(segment_lengths, dilation_rates, strict=True))


def unattended_offsets(pairs: DilationSchedule, n_head: int) -> list[str]:
    """What the heads leave out: pair ``(w, r)`` keeps, in each segment, the offsets ``h mod r``
    of heads ``h < n_head``; with ``r > n_head``, ``r - n_head`` of its ``r`` offsets (that
    fraction of every segment's positions) are never attended by that pair, for any head. One
    sentence per such pair (none when every rate is at most ``n_head``)."""
    return [
        f"pair (w={w}, r={r}) with n_head={n_head} never attends {r - n_head} of its {r} "
        f"offsets ({(r - n_head) / r:.0%} of each segment's positions)"
        for w, r in pairs
        if r > n_head
    ]


@lru_cache(maxsize=256)
def check_coverage(pairs: DilationSchedule, n_head: int, seq_len: int | None = None) -> None:
    """Rejects a schedule under which some (head, position) would attend nothing.

    Whether pair ``(w, r)`` keeps position p for head h depends only on ``p mod w``, so the
    pattern repeats with period ``lcm(w)``; ``seq_len=None`` checks one whole period (every N).
    """
    if any(r == 1 for _, r in pairs):
        return  # a pair with r = 1 keeps every position for every head
    period = math.lcm(*(w for w, _ in pairs))
    if seq_len is None:
        if period > _MAX_PERIOD_CHECKED:
            return  # checked at call time, against the actual length
        n = period
    else:
        n = min(seq_len, period)
    p = torch.arange(n)
    h = torch.arange(n_head)[:, None]
    covered = torch.zeros(n_head, n, dtype=torch.bool)
    for w, r in pairs:
        covered |= (p % w) % r == h % r
    if not covered.all():
        head, pos = (int(i) for i in (~covered).nonzero()[0])
        raise ValueError(
            f"schedule segment_lengths={[w for w, _ in pairs]}, dilation_rates="
            f"{[r for _, r in pairs]} leaves head {head} at position {pos} attending nothing "
            f"with n_head={n_head}; add a pair with dilation rate 1, or rates that cover every "
            "offset for every head"
        )


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-D tensor (B, N, H, D), got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got {x.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            "q, k and v must have the same shape (B, N, H, D), got "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
            f"{q.device}/{k.device}/{v.device}"
        )
    if q.shape[1] == 0:
        raise ValueError("sequence length N must be at least 1, got 0")


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    return float(scale)


# ----------------------------------------------------------------------------------------------
# geometry: every pair is a set of dense, strided blocks of the inputs


def _head_groups(r: int, n_head: int, length: int):
    """Keyword arguments of the :class:`StridedBlock` s (first offset ``pos``, heads and their
    strides, rows) that cover a segment of ``length`` positions for dilation ``r``.

    Head h keeps the positions ``c + j*r`` (c = h mod r) of each segment, so the heads of one
    offset c form a dense block (heads c, c+r, ...: ``head_stride = r``), and so do the heads
    ``a*r + c`` for a run of consecutive offsets c with equal row counts (``head_stride = 1``,
    ``head_pos_stride = 1``: the next head keeps the next position). Whichever needs fewer
    kernel calls is used.
    """
    n_a = -(-n_head // r)
    if n_a >= min(r, n_head):  # one block per offset c: heads c, c+r, c+2r, ...
        for c in range(min(r, n_head)):
            heads, rows = len(range(c, n_head, r)), -(-(length - c) // r)
            yield dict(pos=c, head=c, heads=heads, head_stride=r, head_pos_stride=0, rows=rows)
        return
    split = length % r  # offsets below it have one row more
    for a in range(n_a):  # one block per run of offsets with equal rows: heads a*r + c
        c_end = min(r, n_head - a * r)
        for lo, hi, rows in ((0, split, length // r + 1), (split, r, length // r)):
            if min(hi, c_end) > lo:
                heads = min(hi, c_end) - lo
                yield dict(pos=lo, head=a * r + lo, heads=heads, head_stride=1, head_pos_stride=1,
                           rows=rows)  # fmt: skip


def _blocks(w: int, r: int, batch: int, n: int, n_head: int) -> list[StridedBlock]:
    """The blocks of pair (w, r): strided views, nothing gathered, padded or masked."""
    w = min(w, n)  # w >= N: one segment holding the whole sequence
    n_full, tail = divmod(n, w)
    out = []
    for geometry in _head_groups(r, n_head, w):
        if geometry["rows"] <= 0:
            continue
        block = StridedBlock(**geometry, groups=n_full, group_stride=w, row_stride=r)
        if tail == 0:  # batch rows line up with segments: fold them together
            out.append(replace(block, groups=batch * n_full))
        else:
            out += [replace(block, batch=b) for b in range(batch)]
    for geometry in _head_groups(r, n_head, tail):
        if geometry["rows"] > 0:  # the last, shorter segment of every batch row
            geometry["pos"] += n_full * w
            out.append(StridedBlock(**geometry, groups=batch, group_stride=0, row_stride=r))
    return out


def pair_calls(w, r, batch, n, n_head, causal: bool, first: bool) -> list[Call]:
    """The kernel calls of one pair on a sequence of ``n`` (``first``: the schedule's first
    pair, whose calls are disjoint and so copied rather than merged)."""
    return [
        call
        for block in _blocks(w, r, batch, n, n_head)
        for call in chunked(Call(q=block, kv=block, causal=causal, first=first))
    ]


def dilated_calls(
    pairs: DilationSchedule, batch: int, n: int, n_head: int, causal: bool
) -> list[Call]:
    """The kernel calls of a schedule."""
    return [
        call
        for i, (w, r) in enumerate(pairs)
        for call in pair_calls(w, r, batch, n, n_head, causal, first=i == 0)
    ]


# ----------------------------------------------------------------------------------------------
# public interface


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    group=None,
    documents=None,
) -> torch.Tensor:
    """Dilated attention of ``q, k, v`` ``(B, N, H, D)``; returns ``(B, N, H, D)`` in q's dtype.

    ``scale`` defaults to ``1/sqrt(D)``. ``backend``: ``"auto"`` (flash-attn where it runs the
    call, torch's fused kernels otherwise, plain matmuls for float64 on CUDA), ``"torch"``,
    ``"flash"`` or ``"math"``.

    ``group``: a ``torch.distributed`` process group of P ranks over which one sequence is
    split: q, k, v are then this rank's slice ``(B, N/P, H, D)`` (consecutive slices in
    group-rank order) and the result is this rank's slice of the output on the whole sequence
    (``distributed.py``). Every rank must make the same call.

    ``documents``: boundaries of documents packed in the rows (``cu_seqlens`` or a
    ``documents.Documents``); each document then gets exactly what it gets alone, segments and
    offsets counted from its start (causal only; not with ``group``).
    """
    if documents is not None:
        docs = _documents(q, k, v, documents, causal, group)
        if not docs.whole_rows:
            return varlen_attention(
                dilated_document_plan(
                    q, k, v, segment_lengths, dilation_rates, docs, scale, backend
                )  # fmt: skip
            )
    return mixed_attention(
        dilated_plan(q, k, v, segment_lengths, dilation_rates, causal, scale, backend, group)
    )


def dilated_plan(
    q, k, v, segment_lengths, dilation_rates, causal=True, scale=None, backend="auto", group=None
) -> Plan:
    """The checked inputs and kernel calls of :func:`dilated_attention`, not yet run (with a
    ``group``, the exchanges of keys and values between ranks have run)."""
    pairs = validate_schedule(segment_lengths, dilation_rates)
    _check_qkv(q, k, v)
    B, N, H, D = q.shape
    if group is not None and dist.get_world_size(group) > 1:
        return _distributed_plan(q, k, v, pairs, bool(causal), scale, backend, group)
    check_coverage(pairs, H, N)
    scale = _check_scale(scale, D)
    backend = resolve_backend(backend, q)
    calls = dilated_calls(pairs, B, N, H, bool(causal))
    # a first pair with r = 1 keeps every (position, head): accumulators need no initialising
    covers_all = pairs[0][1] == 1
    return plan(q, [(k, v)], calls, covers_all=covers_all, scale=scale, backend=backend)


def _documents(q, k, v, documents, causal, group) -> Documents:
    _check_qkv(q, k, v)
    if not causal:
        raise ValueError("documents need causal=True: bidirectional attention is not built")
    if group is not None and dist.get_world_size(group) > 1:
        raise ValueError("documents with a sequence split across ranks (group) are not built")
    return Documents.of(documents, q.shape[0], q.shape[1], q.device)


def dilated_document_plan(
    q, k, v, segment_lengths, dilation_rates, documents, scale=None, backend="auto"
) -> VarlenPlan:
    """The gathered kernel calls of :func:`dilated_attention` on packed documents: every pair
    cut from each document's start (``documents.segment_calls``), not yet run."""
    pairs = validate_schedule(segment_lengths, dilation_rates)
    _check_qkv(q, k, v)
    B, N, H, D = q.shape
    docs = Documents.of(documents, B, N, q.device)
    check_coverage(pairs, H, docs.longest)  # offsets count from each document's start
    build = lambda: [  # noqa: E731
        call for i, (w, r) in enumerate(pairs) for call in segment_calls(docs, w, r, H, i == 0)
    ]
    calls = docs.cached(("dilated", pairs, H), build)
    scale, backend = _check_scale(scale, D), resolve_backend(backend, q)
    return varlen_plan(q, k, v, calls, scale=scale, backend=backend)


def _distributed_plan(q, k, v, pairs, causal, scale, backend, group) -> Plan:
    B, length, H, D = q.shape
    distributed.check_agreement(q, pairs, causal, group)  # every rank raises alike, or none
    at = distributed.rank_slice(group, length)
    distributed.check_split(pairs, at)
    check_coverage(pairs, H, at.total)
    scale = _check_scale(scale, D)
    backend = resolve_backend(backend, q)
    sources, calls, reverse = [(k, v)], [], []
    for i, (w, r) in enumerate(pairs):
        span = distributed.spanning(w, r, at, causal)
        if span is None:  # segments inside this rank's slice: as on one device
            calls += pair_calls(w, r, B, length, H, causal, first=i == 0)
            continue
        # every rank exchanges for every spanning pair (even with nothing to send or receive),
        # so that the collectives, forward and backward, match across ranks
        received, back = distributed.exchange(k, v, span, at, group)
        sources.append(received)
        if back is not None:
            reverse.append((len(sources) - 1, back))
        calls += distributed.spanning_calls(span, at, B, H, len(sources) - 1, first=i == 0)
    covers_all = pairs[0][1] == 1
    return plan(q, sources, calls, covers_all=covers_all, scale=scale, backend=backend,
                reverse=reverse)  # fmt: skip


class DilatedAttention(nn.Module):
    """``nn.Module`` form of :func:`dilated_attention`; holds the schedule, no parameters.

    Give ``n_head`` to have a schedule that leaves some head without keys rejected here,
    at construction, rather than at the first forward.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        causal: bool = True,
        scale: float | None = None,
        backend: str = "auto",
        n_head: int | None = None,
    ):
        super().__init__()
        self.pairs = validate_schedule(segment_lengths, dilation_rates)
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        if n_head is not None:
            if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head <= 0:
                raise ValueError(f"n_head must be a positive integer, got {n_head!r}")
            check_coverage(self.pairs, n_head)
        self.causal, self.scale, self.backend = causal, scale, backend

    @property
    def segment_lengths(self) -> list[int]:
        return [w for w, _ in self.pairs]

    @property
    def dilation_rates(self) -> list[int]:
        return [r for _, r in self.pairs]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return dilated_attention(
            q,
            k,
            v,
            self.segment_lengths,
            self.dilation_rates,
            self.causal,
            self.scale,
            self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
            f"causal={self.causal}"
        )
