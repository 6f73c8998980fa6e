"""LongNet's dilated attention (Ding et al., 2023, arXiv 2307.02486, sections 2.2-2.3).

A schedule is a list of pairs ``(w, r)``: segment length and dilation rate. Pair ``(w, r)``
cuts the sequence into segments ``[s*w, min((s+1)*w, N))`` (the last may be shorter; ``w >= N``
is one segment). Head ``h`` keeps the positions whose offset inside their segment is
``h mod r`` modulo ``r``; kept queries attend the kept keys of their own segment. The outputs of
the pairs that keep a query are mixed with weights proportional to their softmax denominators,
which is one softmax over the multiset union of the keys they attend (paper eq. 10).

How it is computed. For each pair the kept rows of every segment are gathered into a dense
``(G, M, H, D)`` block (G = batch x segments, M = ceil(w / r)) and handed to a fused attention
kernel (``backends.py``) that also returns the log-sum-exp (LSE). Pairs are mixed online into
one float32 accumulator, so memory stays O(N) whatever the number of pairs. A schedule whose
``w`` is not a multiple of ``r``, or an N that is not a multiple of ``w``, leaves a ragged tail
in a block: those rows are padding, always at the end of a block (so causal attention never
sees them) and masked as keys otherwise.

Gradients are exact, through the mixing weights too. A kernel's LSE carries no gradient, so
the backward is written by hand: each pair's kernel backward is run with the *mixed* output and
*mixed* LSE, which recomputes the probabilities of the union softmax and so yields the exact
gradient of the mixture (the same identity ring attention relies on). Computing the mixing
weights from a detached LSE instead, as the official implementation does, gives gradients that
are off by tens of percent (``tests/test_dilated_attention.py`` measures it).

Work is done in chunks of whole segments to bound temporary memory (a 1M-token forward fits in
a few GiB beyond q, k, v and the output). Pairs with ``r = 1`` and ``N`` a multiple of ``w``
need no gather at all: their blocks are views of the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import nn

from models.attention.backends import attention_backward, attention_forward, resolve_backend

# Rows (position x head) per chunk: 2**19 rows of D=64 fp32 is 128 MiB per gathered tensor.
CHUNK_ROWS = 2**19
# Construction-time coverage check looks at one full period of the pattern, if it is this short.
_MAX_PERIOD_CHECKED = 2**22

Schedule = tuple[tuple[int, int], ...]


# ----------------------------------------------------------------------------------------------
# input checks


def validate_schedule(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> Schedule:
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


@lru_cache(maxsize=256)
def check_coverage(pairs: Schedule, n_head: int, seq_len: int | None = None) -> None:
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


# ----------------------------------------------------------------------------------------------
# geometry of one pair


class _Pair:
    """Where pair ``(w, r)`` puts each (segment, head) of a ``(B, N, H)`` input."""

    def __init__(self, w: int, r: int, batch: int, n: int, n_head: int, device: torch.device):
        self.w = min(w, n)  # w >= N: one segment holding the whole sequence
        self.r, self.n, self.n_head, self.device = r, n, n_head, device
        self.spare = batch * n * n_head  # index of the accumulators' spare row
        self.n_seg = -(-n // self.w)
        self.m = -(-self.w // r)  # rows per (segment, head) block, padding included
        self.groups = batch * self.n_seg  # G: batch x segments
        self.is_view = r == 1 and n % self.w == 0  # blocks are plain views, nothing to gather
        self.chunk = max(1, CHUNK_ROWS // (self.m * n_head))

    def chunks(self):
        for g0 in range(0, self.groups, self.chunk):
            yield g0, min(self.groups, g0 + self.chunk)

    def index(self, g0: int, g1: int):
        """For groups [g0, g1): ``row`` (G, M, H), the row of ``x.reshape(B*N, H, D)`` each
        block entry reads (padding clamped to a real row); ``flat`` (G*M*H,), its index into
        the ``(B*N*H + 1, ...)`` accumulators (padding -> the spare last row); ``valid``."""
        dev, h = self.device, torch.arange(self.n_head, device=self.device)
        g = torch.arange(g0, g1, device=dev)[:, None, None]
        b, s = g // self.n_seg, g % self.n_seg
        local = (h % self.r) + torch.arange(self.m, device=dev)[:, None] * self.r  # (M, H)
        pos = s * self.w + local  # (G, M, H) position in the sequence
        valid = (local < self.w) & (pos < self.n)
        row = b * self.n + pos.clamp(max=self.n - 1)
        flat = torch.where(valid, row * self.n_head + h, self.spare).reshape(-1)
        return row, flat, valid

    def view(self, x: torch.Tensor, g0: int, g1: int) -> torch.Tensor:
        # (B*N, H, ...) -> (B*n_seg, w, H, ...)[g0:g1]; only for is_view pairs
        return x.view(self.groups, self.w, *x.shape[1:])[g0:g1]


def _gather(x_rows: torch.Tensor, row: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    # x_rows (B*N, H, D); row (G, M, H) -> (G, M, H, D), head h of entry read from head h
    return x_rows[row, heads]


# ----------------------------------------------------------------------------------------------
# forward and backward


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(q, k, v, pairs: Schedule, causal: bool, scale: float, backend: str):
    """Returns the mixed output ``o_acc (B*N*H + 1, D)`` and LSE ``l_acc (B*N*H + 1,)`` in the
    accumulation dtype; the last row is a spare that padding rows are sent to."""
    B, N, H, D = q.shape
    rows = B * N * H
    acc = _acc_dtype(q.dtype)
    qr, kr, vr = (x.reshape(B * N, H, D) for x in (q, k, v))
    o_acc = torch.zeros(rows + 1, D, dtype=acc, device=q.device)
    l_acc = torch.full((rows + 1,), float("-inf"), dtype=acc, device=q.device)
    heads = torch.arange(H, device=q.device)
    for i, (w, r) in enumerate(pairs):
        pair = _Pair(w, r, B, N, H, q.device)
        for g0, g1 in pair.chunks():
            if pair.is_view:
                blocks = [pair.view(x, g0, g1) for x in (qr, kr, vr)]
                out, lse = attention_forward(*blocks, causal, scale, None, backend)
                o_v = pair.view(o_acc[:rows].view(B * N, H, D), g0, g1)
                l_v = pair.view(l_acc[:rows].view(B * N, H), g0, g1)
                _mix_inplace(o_v, l_v, out, lse, fresh=i == 0)
                continue
            row, flat, valid = pair.index(g0, g1)
            key_mask = None if causal or bool(valid.all()) else valid
            blocks = [_gather(x, row, heads) for x in (qr, kr, vr)]
            out, lse = attention_forward(*blocks, causal, scale, key_mask, backend)
            _mix_indexed(o_acc, l_acc, flat, out.reshape(-1, D), lse.reshape(-1), fresh=i == 0)
    # the spare row must read as "no probability mass" in the backward: exp(s - inf) = 0
    o_acc[rows] = 0.0
    l_acc[rows] = float("inf")
    return o_acc, l_acc


def _mix_inplace(o_v, l_v, out, lse, fresh: bool) -> None:
    """Online softmax merge of one pair's (out, lse) into the accumulator views."""
    if fresh:
        o_v.copy_(out)
        l_v.copy_(lse)
        return
    new = torch.logaddexp(l_v, lse)
    o_v.mul_(torch.exp(l_v - new).unsqueeze(-1))
    o_v.add_(out * torch.exp(lse - new).unsqueeze(-1))
    l_v.copy_(new)


def _mix_indexed(o_acc, l_acc, flat, out, lse, fresh: bool) -> None:
    if fresh:
        o_acc.index_copy_(0, flat, out.to(o_acc.dtype))
        l_acc.index_copy_(0, flat, lse.to(l_acc.dtype))
        return
    old = l_acc[flat]
    new = torch.logaddexp(old, lse)
    mixed = o_acc[flat] * torch.exp(old - new).unsqueeze(-1) + out * torch.exp(lse - new)[:, None]
    o_acc.index_copy_(0, flat, mixed)
    l_acc.index_copy_(0, flat, new)


def _backward(dout, q, k, v, o_acc, l_acc, pairs: Schedule, causal, scale, backend):
    B, N, H, D = q.shape
    rows = B * N * H
    acc = o_acc.dtype
    qr, kr, vr, dor = (x.reshape(B * N, H, D) for x in (q, k, v, dout))
    grads = [torch.zeros(rows + 1, D, dtype=acc, device=q.device) for _ in range(3)]
    o_cast = o_acc.to(q.dtype)
    heads = torch.arange(H, device=q.device)
    for i, (w, r) in enumerate(pairs):
        pair = _Pair(w, r, B, N, H, q.device)
        for g0, g1 in pair.chunks():
            if pair.is_view:
                blocks = [pair.view(x, g0, g1) for x in (dor, qr, kr, vr)]
                o_b = pair.view(o_cast[:rows].view(B * N, H, D), g0, g1)
                l_b = pair.view(l_acc[:rows].view(B * N, H), g0, g1)
                parts = attention_backward(*blocks, o_b, l_b, causal, scale, None, backend)
                for grad, part in zip(grads, parts, strict=True):
                    g_v = pair.view(grad[:rows].view(B * N, H, D), g0, g1)
                    g_v.copy_(part) if i == 0 else g_v.add_(part)
                continue
            row, flat, valid = pair.index(g0, g1)
            key_mask = None if causal or bool(valid.all()) else valid
            blocks = [_gather(x, row, heads) for x in (dor, qr, kr, vr)]
            shape = blocks[0].shape
            o_b, l_b = o_cast[flat].view(shape), l_acc[flat].view(shape[:-1])
            parts = attention_backward(*blocks, o_b, l_b, causal, scale, key_mask, backend)
            for grad, part in zip(grads, parts, strict=True):
                grad.index_add_(0, flat, part.reshape(-1, D).to(acc))
    return [g[:rows].view(B, N, H, D).to(q.dtype) for g in grads]


class _DilatedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pairs, causal, scale, backend):
        o_acc, l_acc = _forward(q, k, v, pairs, causal, scale, backend)
        ctx.save_for_backward(q, k, v, o_acc, l_acc)
        ctx.args = (pairs, causal, scale, backend)
        B, N, H, D = q.shape
        return o_acc[: B * N * H].view(B, N, H, D).to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, o_acc, l_acc = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, o_acc, l_acc, *ctx.args)
        return dq, dk, dv, None, None, None, None


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
) -> torch.Tensor:
    """Dilated attention of ``q, k, v`` ``(B, N, H, D)``; returns ``(B, N, H, D)`` in q's dtype.

    ``scale`` defaults to ``1/sqrt(D)``. ``backend``: ``"auto"`` (flash-attn on CUDA with
    fp16/bf16 when installed, torch otherwise), ``"torch"``, ``"flash"`` or ``"math"``.
    """
    pairs = validate_schedule(segment_lengths, dilation_rates)
    _check_qkv(q, k, v)
    B, N, H, D = q.shape
    check_coverage(pairs, H, N)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0:
        raise ValueError(f"scale must be a positive number or None, got {scale!r}")
    backend = resolve_backend(backend, q)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _DilatedAttentionFn.apply(q, k, v, pairs, bool(causal), float(scale), backend)
    o_acc, _ = _forward(q, k, v, pairs, bool(causal), float(scale), backend)
    return o_acc[: B * N * H].view(B, N, H, D).to(q.dtype)


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
        if backend not in ("auto", "torch", "flash", "math"):
            raise ValueError(f"backend={backend!r} is not one of auto, torch, flash, math")
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
