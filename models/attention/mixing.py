"""Attention as a union of dense blocks, mixed by softmax denominators, with an exact backward.

Dilated, sparse (fixed) and sliding-window attention are all the same computation: every query
attends the union of several dense blocks of keys, and the union is one softmax. Each pattern
only says which blocks: a list of :class:`Call`, each a strided view of the queries, a strided
view of some keys and values, and whether the block is causal or carries a small mask. This
module runs such a list.

Forward: each call goes to a fused kernel (``backends.py``) that returns output and
log-sum-exp (LSE); results are merged online, in place through the same views, into one
float32 accumulator (memory O(N) whatever the number of calls).

Backward: the kernel's LSE carries no gradient, so the backward is written by hand. Each call's
kernel backward is run with the *mixed* output and *mixed* LSE, which recomputes the
probabilities of the union softmax: the gradient is exact, through the mixing weights too (the
identity ring attention relies on). Computing mixing weights from a detached LSE, as the
official LongNet implementation does, puts gradients tens of percent off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from models.attention.backends import MAX_CUDA_GROUPS, attention_backward, attention_forward

# Rows (position x head) per kernel call: 2**19 rows of D=64 fp32 is 128 MiB per tensor. On
# CPU, calls run in pieces of CPU_CHUNK_ROWS: a piece's copies and gradients in the kernels are
# what a call adds to a step's memory (about 8 tensors of 16 MiB at D=64 fp32), and CPU kernels
# gain nothing from longer calls; on GPUs, longer calls spend less time launching kernels.
CHUNK_ROWS = 2**19
CPU_CHUNK_ROWS = 2**16


@dataclass(frozen=True, kw_only=True)
class StridedBlock:
    """A dense ``(G, M, A)`` block of (group, row, head) that is a strided view of a
    ``(B, L, H, ...)`` tensor: row j of head i in group g sits at position
    ``pos + g*group_stride + j*row_stride + i*head_pos_stride`` and head
    ``head + i*head_stride`` of batch row ``batch`` (or ``batch + g`` when
    ``group_stride == 0``: groups are then batch rows). Strides count positions and heads.
    """

    batch: int = 0  # first batch row
    pos: int = 0  # position of row 0, head 0, group 0
    groups: int  # G
    group_stride: int  # positions between groups (0: one group per batch row)
    head: int = 0  # first head
    heads: int  # A
    head_stride: int = 1  # heads between consecutive heads of the block
    head_pos_stride: int = 0  # positions between consecutive heads of the block
    rows: int  # M
    row_stride: int = 1  # positions between consecutive rows

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H, ...) strided tensor -> (G, M, A, ...) view, no copy."""
        s_b, s_n, s_h, *rest = x.stride()
        group = self.group_stride * s_n if self.group_stride else s_b
        return x.as_strided(
            (self.groups, self.rows, self.heads, *x.shape[3:]),
            (
                group,
                self.row_stride * s_n,
                self.head_pos_stride * s_n + self.head_stride * s_h,
                *rest,
            ),
            x.storage_offset() + self.batch * s_b + self.pos * s_n + self.head * s_h,
        )

    def take_groups(self, start: int, count: int) -> StridedBlock:
        """Groups [start, start + count) of this block."""
        if self.group_stride:
            return replace(self, groups=count, pos=self.pos + start * self.group_stride)
        return replace(self, groups=count, batch=self.batch + start)


def contiguous_block(*, batch=0, pos=0, groups, group_stride, rows, n_head) -> StridedBlock:
    """All heads of ``rows`` consecutive positions, in ``groups`` groups."""
    return StridedBlock(
        batch=batch, pos=pos, groups=groups, group_stride=group_stride, heads=n_head, rows=rows
    )


@dataclass(frozen=True, kw_only=True)
class Call:
    """One kernel call: queries ``q`` attend keys/values ``kv`` of source ``source``.

    ``mask``: optional bool ``(M_q, M_kv)``, True where a query may attend a key; shared by
    every group and head. Calls of the first group (``first=True``) must have ``kv == q`` on
    source 0 and be disjoint, so their results can be copied rather than merged.
    """

    q: StridedBlock
    kv: StridedBlock
    causal: bool
    source: int = 0
    mask: torch.Tensor | None = None
    first: bool = False


def chunked(call: Call, rows: int | None = None) -> list[Call]:
    """Cuts a call into calls of at most ``rows`` (default CHUNK_ROWS) query rows (whole
    groups), and at most MAX_CUDA_GROUPS groups (the CUDA kernels' grid limit)."""
    rows = CHUNK_ROWS if rows is None else rows
    per = min(MAX_CUDA_GROUPS, max(1, rows // (call.q.rows * call.q.heads)))
    if call.q.groups <= per:
        return [call]
    return [
        replace(call, q=call.q.take_groups(g0, n), kv=call.kv.take_groups(g0, n))
        for g0 in range(0, call.q.groups, per)
        for n in [min(per, call.q.groups - g0)]
    ]


def strided_ok(x: torch.Tensor) -> torch.Tensor:
    """Blocks fold batch rows with groups, so batch rows must be L positions apart and the head
    dimension contiguous; anything else (an expanded gradient, say) is copied once."""
    B, L, H, D = x.shape
    s_b, s_n, s_h, s_d = x.stride()
    if s_d == 1 and s_h == D and s_n >= H * D and (B == 1 or s_b == L * s_n):
        return x
    return x.contiguous()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(mask.logical_not(), float("-inf"))


@dataclass(frozen=True)
class Plan:
    """One union-softmax attention, ready to run: queries ``q (B, N, H, D)``, key/value
    ``sources`` ``((k, v), ...)`` each ``(B, L, H, D)``, the kernel ``calls`` over their
    blocks, and how to run them. Built by :func:`plan`; each attention pattern (dilated,
    sparse, sliding) is a function that makes one. ``covers_all``: the ``first`` calls together
    cover every (position, head) of q, so accumulators need no initialisation."""

    q: torch.Tensor
    sources: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    calls: tuple[Call, ...]
    covers_all: bool
    scale: float
    backend: str
    # (source, launcher) per received source whose gradient goes back to other ranks
    # (context parallelism): mixed_backward launches it as soon as that gradient is complete
    reverse: tuple = ()

    def with_tensors(self, q: torch.Tensor, kv) -> Plan:
        """The same plan over other tensors of the same layout (the autograd inputs)."""
        sources = tuple(tuple(kv[i : i + 2]) for i in range(0, len(kv), 2))
        return replace(self, q=q, sources=sources)

    @property
    def kv(self) -> list[torch.Tensor]:
        return [x for src in self.sources for x in src]

    def runs(self) -> list[Call]:
        """The calls as they run on q's device: on CPU in pieces of CPU_CHUNK_ROWS."""
        if self.q.device.type != "cpu":
            return list(self.calls)
        return [piece for call in self.calls for piece in chunked(call, CPU_CHUNK_ROWS)]


def plan(q, sources, calls, *, covers_all: bool, scale: float, backend: str, reverse=()) -> Plan:
    """A :class:`Plan`; tensors whose batch rows or heads are not laid out as blocks expect
    are copied once (:func:`strided_ok`). Every (position, head) of q must be covered."""
    return Plan(
        strided_ok(q),
        tuple(tuple(strided_ok(x) for x in src) for src in sources),
        tuple(calls),
        covers_all,
        float(scale),
        backend,
        tuple(reverse),
    )


# Receives still in flight (context parallelism, distributed.py): ``(work, tensors kept
# alive)`` filling sources 1, 2, ... of the plan about to run. mixed_forward runs the calls on
# source 0 (this rank's own keys) first and waits only before the first call that reads a
# received source: the local pairs are computed while the other ranks' rows travel.
IN_FLIGHT: list = []
# seconds this process spent blocked in wait_in_flight: what the local calls did not hide (a
# benchmark counter, beside distributed.EXCHANGE_WAIT_S for exchanges waited where issued)
IN_FLIGHT_WAIT_S = [0.0]


def wait_in_flight() -> None:
    if not IN_FLIGHT:
        return
    start = time.perf_counter()
    while IN_FLIGHT:
        work, _ = IN_FLIGHT.pop(0)
        work.wait()
    IN_FLIGHT_WAIT_S[0] += time.perf_counter() - start


def mixed_forward(p: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixed output ``(B, N, H, D)`` in q's dtype and the mixed LSE ``(B, N, H)`` in the
    accumulation dtype (float32, or float64 for float64 inputs). With receives in flight
    (:data:`IN_FLIGHT`), calls on received sources run last (a stable sort: ``first`` calls,
    all on source 0, keep their place), each after the wait."""
    q = p.q
    B, N, H, D = q.shape
    acc = _acc_dtype(q.dtype)
    new = torch.empty if p.covers_all else torch.zeros
    o = new((B, N, H, D), dtype=acc, device=q.device)
    lse = torch.empty((B, N, H), dtype=acc, device=q.device)
    if not p.covers_all:
        lse.fill_(float("-inf"))
    calls = p.runs()
    if IN_FLIGHT:
        calls = sorted(calls, key=lambda call: call.source > 0)
    for call in calls:
        if call.source > 0:
            wait_in_flight()
        k, v = p.sources[call.source]
        views = (call.q.view(q), call.kv.view(k), call.kv.view(v))
        out, l_blk = attention_forward(*views, **_kernel_args(p, call))
        _merge(call.q.view(o), call.q.view(lse), out, l_blk, fresh=call.first)
    wait_in_flight()  # nothing leaves with a receive pending
    return o.to(q.dtype), lse


def _kernel_args(p: Plan, call: Call) -> dict:
    """The keyword arguments of one call's kernel, forward and backward alike."""
    mask = _additive(call.mask, p.q.dtype)
    return dict(causal=call.causal, scale=p.scale, mask=mask, backend=p.backend)


def _merge(o, lse, out, l_blk, fresh: bool) -> None:
    """Online softmax merge of one call's (out, lse) into the accumulator views, in place."""
    if fresh:
        o.copy_(out)
        lse.copy_(l_blk)
        return
    new = torch.logaddexp(lse, l_blk)
    o.mul_(torch.exp(lse - new).unsqueeze(-1))
    o.addcmul_(out, torch.exp(l_blk - new).unsqueeze(-1))
    lse.copy_(new)


def mixed_backward(p: Plan, dout, out, lse):
    """Gradients ``(dq, [(dk, dv), ...])`` in the inputs' dtypes: each call's kernel backward,
    run with the mixed output ``out`` (q's dtype, as the kernels take it) and mixed LSE."""
    wait_in_flight()
    q, acc = p.q, lse.dtype
    dout = strided_ok(dout)
    dq = (torch.empty if p.covers_all else torch.zeros)(q.shape, dtype=acc, device=q.device)
    dkv = [
        [
            (torch.empty if p.covers_all and i == 0 else torch.zeros)(
                x.shape, dtype=acc, device=x.device
            )
            for x in src
        ]
        for i, src in enumerate(p.sources)
    ]
    calls = p.runs()
    if p.reverse:  # received sources' calls right after the first ones, then launch them back
        order = lambda call: 0 if call.first else 1 if call.source > 0 else 2  # noqa: E731
        calls = sorted(calls, key=order)  # stable: each group keeps its order
    launch_at = sum(1 for call in calls if call.first or call.source > 0) if p.reverse else -1
    for n, call in enumerate(calls):
        if n == launch_at:
            _launch_reverse(p, dkv)
        k, v = p.sources[call.source]
        views = [call.q.view(dout), call.q.view(q), call.kv.view(k), call.kv.view(v)]
        views += [call.q.view(out), call.q.view(lse)]
        parts = attention_backward(*views, **_kernel_args(p, call))
        targets = [call.q.view(dq), *(call.kv.view(g) for g in dkv[call.source])]
        for target, part in zip(targets, parts, strict=True):
            target.copy_(part) if call.first else target.add_(part)
    if launch_at >= len(calls):  # no call on this rank's own keys after them
        _launch_reverse(p, dkv)
    return dq.to(q.dtype), [
        [g.to(x.dtype) for g, x in zip(gs, src, strict=True)]
        for gs, src in zip(dkv, p.sources, strict=True)
    ]


def _launch_reverse(p: Plan, dkv) -> None:
    """The received sources' gradients are complete: send them back now, in source order on
    every rank, while the calls on this rank's own keys run (the exchange's backward waits)."""
    for source, reverse in p.reverse:
        reverse.launch(*dkv[source])


class _MixedAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: Plan, q, *kv):
        p = p.with_tensors(q, kv)
        out, lse = mixed_forward(p)  # out in q's dtype: no float32 copy is kept
        ctx.save_for_backward(q, out, lse, *kv)
        ctx.plan = p.with_tensors(None, [None] * len(kv))  # tensors live in saved_tensors
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, out, lse, *kv = ctx.saved_tensors
        dq, dkv = mixed_backward(ctx.plan.with_tensors(q, kv), dout, out, lse)
        return None, dq, *(g for pair in dkv for g in pair)


def mixed_attention(p: Plan) -> torch.Tensor:
    """Runs a :class:`Plan`: union-softmax attention, ``(B, N, H, D)`` in q's dtype, with the
    exact backward when any input needs a gradient."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (p.q, *p.kv)):
        return _MixedAttentionFn.apply(p, p.q, *p.kv)
    return mixed_forward(p)[0]
