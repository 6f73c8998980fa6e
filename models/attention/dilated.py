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
M = ceil((w - c) / r) rows and A heads. Each block goes straight to a fused attention kernel
(``backends.py``) that also returns the log-sum-exp (LSE); nothing is gathered, padded or
masked, and a segment length that ``r`` does not divide, or a last segment that is shorter,
just gives blocks with fewer rows. Pairs are mixed online into one float32 accumulator, in
place through the same views, so memory stays O(N) whatever the number of pairs.

Gradients are exact, through the mixing weights too. A kernel's LSE carries no gradient, so
the backward is written by hand: each pair's kernel backward is run with the *mixed* output and
*mixed* LSE, which recomputes the probabilities of the union softmax and so yields the exact
gradient of the mixture (the same identity ring attention relies on). Computing the mixing
weights from a detached LSE instead, as the official implementation does, gives gradients that
are off by tens of percent (``tests/test_dilated_attention.py`` measures it).

Blocks are cut into chunks of whole segments (``CHUNK_ROWS``) to bound the kernel's temporary
memory, so a 1M-token forward needs little beyond q, k, v and the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
# geometry: every pair is a set of dense, strided blocks of the inputs


@dataclass(frozen=True)
class _Block:
    """One kernel call: a dense ``(G, M, A)`` block of (group, row, head) that is a strided view
    of the input. Row j of head i in group g sits at position
    ``pos + g*group_step + j*step + i*head_pos`` and head ``head + i*head_step``.

    Head h keeps the positions ``c + j*r`` (c = h mod r) of each segment, so the heads of one
    offset c form a block (``head_step = r, head_pos = 0``), and so do the heads ``a*r + c`` for
    consecutive c (``head_step = 1, head_pos = 1``): whichever needs fewer kernel calls is used.
    Nothing is gathered, padded or masked.
    """

    batch: int  # first batch row
    pos: int  # position of row 0 of head 0 in group 0
    groups: int  # G
    group_step: int  # positions between groups; 0 means groups are batch rows
    head: int  # first head
    heads: int  # A
    head_step: int
    head_pos: int  # positions between heads
    rows: int  # M
    step: int  # r: positions between rows

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H, ...) strided tensor -> (G, M, A, ...) view of this block."""
        s_b, s_n, s_h, *rest = x.stride()
        group = self.group_step * s_n if self.group_step else s_b
        return x.as_strided(
            (self.groups, self.rows, self.heads, *x.shape[3:]),
            (group, self.step * s_n, self.head_pos * s_n + self.head_step * s_h, *rest),
            x.storage_offset() + self.batch * s_b + self.pos * s_n + self.head * s_h,
        )


def _head_groups(r: int, n_head: int, length: int):
    """(first offset c, first head, heads, head_step, head_pos, rows) of the blocks that cover
    a segment of ``length`` positions; rows = ceil((length - c) / r) must agree within one."""
    n_a = -(-n_head // r)
    if n_a >= min(r, n_head):  # one block per offset c: heads c, c+r, c+2r, ...
        for c in range(min(r, n_head)):
            yield c, c, len(range(c, n_head, r)), r, 0, -(-(length - c) // r)
        return
    split = length % r  # offsets below it have one row more
    for a in range(n_a):  # one block per run of offsets with equal rows: heads a*r + c
        c_end = min(r, n_head - a * r)
        for lo, hi, rows in ((0, split, length // r + 1), (split, r, length // r)):
            if min(hi, c_end) > lo:
                yield lo, a * r + lo, min(hi, c_end) - lo, 1, 1, rows


def _blocks(w: int, r: int, batch: int, n: int, n_head: int) -> list[_Block]:
    """The blocks of pair (w, r), chunked so that none holds more than CHUNK_ROWS rows."""
    w = min(w, n)  # w >= N: one segment holding the whole sequence
    n_full, tail = divmod(n, w)
    out = []
    for c, head, heads, h_step, h_pos, rows in _head_groups(r, n_head, w):
        if rows <= 0:
            continue
        block = _Block(0, c, n_full, w, head, heads, h_step, h_pos, rows, r)
        if tail == 0:  # batch rows line up with segments: fold them together
            out += _chunked(replace(block, groups=batch * n_full))
        else:
            out += [blk for b in range(batch) for blk in _chunked(replace(block, batch=b))]
    for c, head, heads, h_step, h_pos, rows in _head_groups(r, n_head, tail):
        if rows > 0:  # the last, shorter segment of every batch row
            out += _chunked(
                _Block(0, n_full * w + c, batch, 0, head, heads, h_step, h_pos, rows, r)
            )
    return out


def _chunked(block: _Block) -> list[_Block]:
    per = max(1, CHUNK_ROWS // (block.rows * block.heads))
    if block.groups <= per:
        return [block]
    step = block.group_step
    return [
        replace(
            block,
            groups=min(per, block.groups - g0),
            pos=block.pos + g0 * step if step else block.pos,
            batch=block.batch if step else block.batch + g0,
        )
        for g0 in range(0, block.groups, per)
    ]


def _strided_ok(x: torch.Tensor) -> torch.Tensor:
    """Blocks fold batch rows with segments, so batch rows must be N positions apart and the
    head dimension contiguous; anything else (an expanded gradient, say) is copied once."""
    B, N, H, D = x.shape
    s_b, s_n, s_h, s_d = x.stride()
    if s_d == 1 and s_h == D and s_n >= H * D and (B == 1 or s_b == N * s_n):
        return x
    return x.contiguous()


# ----------------------------------------------------------------------------------------------
# forward and backward


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _new_acc(pairs: Schedule, shape, dtype, device, fill: float) -> torch.Tensor:
    # a first pair with r = 1 writes every row, so its buffer needs no initialisation
    if pairs[0][1] == 1:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, fill, dtype=dtype, device=device)


def _forward(q, k, v, pairs: Schedule, causal: bool, scale: float, backend: str):
    """Returns the mixed output ``o (B, N, H, D)`` and LSE ``lse (B, N, H)``, both in the
    accumulation dtype (float32, or float64 for float64 inputs)."""
    B, N, H, D = q.shape
    acc = _acc_dtype(q.dtype)
    o = _new_acc(pairs, (B, N, H, D), acc, q.device, 0.0)
    lse = _new_acc(pairs, (B, N, H), acc, q.device, float("-inf"))
    for i, (w, r) in enumerate(pairs):
        for blk in _blocks(w, r, B, N, H):
            out, l_blk = attention_forward(blk.view(q), blk.view(k), blk.view(v), causal, scale,
                                           backend)  # fmt: skip
            _mix(blk.view(o), blk.view(lse), out, l_blk, fresh=i == 0)
    return o, lse


def _mix(o, lse, out, l_blk, fresh: bool) -> None:
    """Online softmax merge of one block's (out, lse) into the accumulator views, in place."""
    if fresh:
        o.copy_(out)
        lse.copy_(l_blk)
        return
    new = torch.logaddexp(lse, l_blk)
    o.mul_(torch.exp(lse - new).unsqueeze(-1))
    o.addcmul_(out, torch.exp(l_blk - new).unsqueeze(-1))
    lse.copy_(new)


def _backward(dout, q, k, v, o, lse, pairs: Schedule, causal, scale, backend):
    """Each block's kernel backward, run with the mixed output and mixed LSE."""
    B, N, H, D = q.shape
    grads = [_new_acc(pairs, (B, N, H, D), o.dtype, q.device, 0.0) for _ in range(3)]
    o = o.to(q.dtype)
    for i, (w, r) in enumerate(pairs):
        for blk in _blocks(w, r, B, N, H):
            views = [blk.view(x) for x in (dout, q, k, v, o)]
            parts = attention_backward(*views, blk.view(lse), causal, scale, backend)
            for grad, part in zip(grads, parts, strict=True):
                g = blk.view(grad)
                g.copy_(part) if i == 0 else g.add_(part)
    return [g.to(q.dtype) for g in grads]


class _DilatedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pairs, causal, scale, backend):
        o, lse = _forward(q, k, v, pairs, causal, scale, backend)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (pairs, causal, scale, backend)
        return o.to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(_strided_ok(dout), q, k, v, o, lse, *ctx.args)
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
    q, k, v = (_strided_ok(x) for x in (q, k, v))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _DilatedAttentionFn.apply(q, k, v, pairs, bool(causal), float(scale), backend)
    return _forward(q, k, v, pairs, bool(causal), float(scale), backend)[0].to(q.dtype)


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
