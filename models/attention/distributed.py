"""Dilated attention over a sequence split across the ranks of a process group: context
parallelism (LongNet, section 3.1), exact and causal.

P ranks hold one sequence of N = P * l tokens in P consecutive slices of l, in group-rank
order. For pair (w, r) let w' = min(w, N):

- w' divides l: every segment lies inside one rank; the pair is computed locally, exactly as
  on one device (segment boundaries are multiples of w', and so is every slice start).
- w' is a multiple of l: a segment spans m = w'/l consecutive ranks (the last segment may
  span fewer). Each rank keeps, for each head h, the rows of its slice whose offset from the
  segment start is ``h mod r`` modulo r (offsets follow the global position, so the first kept
  row of a slice depends on where the slice starts in its segment), packs them into one buffer
  ``(B, ceil(l/r), H, D)`` for k and one for v, and sends it to the ranks of its segment whose
  queries may see it: the later ones (causal) or all the others. A rank's kept queries attend
  its own kept keys (causally: the pair's local block) and the received ones, all mixed with
  the other pairs in one softmax by the usual engine (``mixing.py``). The backward sends the
  gradients of the received buffers back with the reverse exchange and sums them.
- anything else is rejected on every rank before any collective.

Each exchange is one batch of point-to-point messages (``batch_isend_irecv``): the one
buffer to each destination, one receive per source, nothing posted for anyone else, so data
moves only among a segment's ranks and no empty message exists; every rank runs the same
exchanges in the same order. The forward does not wait for it: the attention runs the
calls on this rank's own keys first and waits just before it reads received rows
(``mixing.IN_FLIGHT``), so the local pairs hide the transfer. Per rank and pair at most
``2 * B * H * D * (w' - l) / r`` elements are received (the segment's other ranks' kept
rows), bounded as N grows while w < N.
``EXCHANGE_BYTES`` counts what each rank sends and receives (for the benchmark).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.attention import mixing
from models.attention.mixing import Call, StridedBlock, chunked

# bytes this process sent and received through exchanges, forward and backward together
EXCHANGE_BYTES = {"sent": 0, "received": 0}


@dataclass(frozen=True)
class RankSlice:
    """Where this rank sits: group size, rank, slice length and the whole length."""

    world: int
    rank: int
    length: int  # l: this rank's tokens

    @property
    def total(self) -> int:
        return self.world * self.length


def rank_slice(group, length: int) -> RankSlice:
    return RankSlice(dist.get_world_size(group), dist.get_rank(group), length)


# ----------------------------------------------------------------------------------------------
# checks, before any collective of the attention


def check_split(pairs, at: RankSlice) -> None:
    """Each pair's segment ``w' = min(w, N)`` must divide the slice or be a multiple of it."""
    for w, _ in pairs:
        seg = min(w, at.total)
        if at.length % seg and seg % at.length:
            raise ValueError(
                f"segment length {w} (w' = min(w, N) = {seg}) neither divides the slice length "
                f"l = N / P = {at.length} nor is a multiple of it (N = {at.total}, "
                f"P = {at.world}); choose segment lengths that divide l or are multiples of it"
            )


def _dtype_code(dtype: torch.dtype) -> int:
    return int(hashlib.sha256(str(dtype).encode()).hexdigest()[:6], 16)


def _signature_rows(mine: torch.Tensor, group) -> list[tuple[int, ...]]:
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return [tuple(int(x) for x in t.tolist()) for t in every]  # one host sync


def check_agreement(q: torch.Tensor, pairs, causal: bool, group) -> None:
    """Every rank passes the same shapes, dtype, schedule and causality, or every rank raises
    a ValueError naming them (one small all_gather: no rank is left waiting).

    Inside :func:`agreed_forward` for this group (a model's forward: the ranks agreed once on
    its input) nothing is exchanged and nothing is read on the host: the call is compared with
    the agreed input locally. Every layer's call is a function of that input and of the model,
    which the ranks agreed on, so a layer cannot disagree where the input did not; a per-layer
    collective read on the host would stall a GPU's kernel queue once per layer."""
    scope = _SCOPES.get(_key(group))
    if scope is not None:
        if tuple(q.shape[:2]) != scope.tokens:
            raise ValueError(
                f"attention call of (B, l) = {tuple(q.shape[:2])} inside a forward agreed on "
                f"tokens (B, l) = {scope.tokens}: a layer changed the sequence length"
            )
        return
    B, L, H, D = q.shape
    schedule = int(hashlib.sha256(repr((pairs, causal)).encode()).hexdigest()[:12], 16)
    mine = torch.tensor([B, L, H, D, _dtype_code(q.dtype), schedule], device=q.device)
    rows = _signature_rows(mine, group)
    if any(row != rows[0] for row in rows):
        shapes = {rank: row[:4] for rank, row in enumerate(rows)}
        raise ValueError(
            "the ranks of the group disagree on the call: (B, l, H, D) by rank "
            f"{shapes}; dtype or schedule/causal agree: "
            f"{len({row[4] for row in rows}) == 1} / {len({row[5] for row in rows}) == 1}"
        )


# ----------------------------------------------------------------------------------------------
# one agreement per forward of a model, and decisions the ranks take together


@dataclass
class ForwardScope:
    """A model forward the ranks of ``group`` agreed on: its tokens ``(B, l)`` and how many
    exchanges this rank has issued in it (forward direction), so that a rank that fails
    part-way can issue the rest (:func:`drain`) and leave nobody waiting."""

    tokens: tuple[int, int]
    issued: int = 0


_SCOPES: dict[int, ForwardScope] = {}


def _key(group) -> int:
    return id(group)


def fingerprint(*parts) -> int:
    """A 48-bit hash of ``repr(parts)``: what must be equal on every rank (a model's config,
    dtypes, whether gradients are taken), compared as one integer."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)


def enter_forward(group, tokens: torch.Tensor, fingerprint_: int) -> ForwardScope:
    """One small all_gather of ``(B, l, fingerprint)``: every rank raises the same ValueError
    if they differ, or every rank enters the scope (replacing an earlier one of the group).
    The attention calls of the forward (and of its recomputation in the backward) then check
    only locally. Leave it with :func:`leave_forward`, or use :func:`agreed_forward`."""
    B, L = tokens.shape[:2]
    mine = torch.tensor([B, L, fingerprint_], dtype=torch.int64, device=tokens.device)
    rows = _signature_rows(mine, group)
    if any(row != rows[0] for row in rows):
        raise ValueError(
            "the ranks of the group disagree on the forward: (B, l, model fingerprint) by rank "
            f"{dict(enumerate(rows))}; every rank must run the same model on its slice of the "
            "same windows"
        )
    scope = _SCOPES[_key(group)] = ForwardScope((B, L))
    return scope


def leave_forward(group) -> None:
    _SCOPES.pop(_key(group), None)


@contextmanager
def agreed_forward(group, tokens: torch.Tensor, fingerprint_: int):
    """``with agreed_forward(group, tokens, fp) as scope:`` one model forward (see
    :func:`enter_forward`)."""
    scope = enter_forward(group, tokens, fingerprint_)
    try:
        yield scope
    finally:
        leave_forward(group)


def any_rank(flag: bool, group, device=None) -> bool:
    """Whether ``flag`` is true on some rank of ``group``: one all_reduce of one number and a
    host read. Every decision a rank could take alone before a collective (a length failed, a
    batch was bad, a check failed) goes through it, so that no rank enters a collective the
    others skip (NCCL would wait forever; gloo until its timeout)."""
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def exchange_plan(pairs, at: RankSlice, batch: int, n_head: int, head_dim: int, causal: bool):
    """The exchanges of one attention call, in order: ``(send_counts, recv_counts, shape of
    one buffer (2, B, ceil(l/r), H, D))`` per spanning pair; what :func:`exchange` issues."""
    plan = []
    for w, r in pairs:
        span = spanning(w, r, at, causal)
        if span is not None:
            send_counts, recv_counts = _counts(span, at)
            plan.append(
                (send_counts, recv_counts, (2, batch, -(-at.length // r), n_head, head_dim))
            )
    return plan


def drain(scope: ForwardScope, plan: list, group, dtype: torch.dtype, device) -> None:
    """Issues, with zeros, the exchanges of ``plan`` (a whole forward's, in order) that this
    rank has not issued yet: what a rank that failed part-way through a forward does so that
    the others, which go on through theirs, are never left waiting in an exchange. The data
    is thrown away; the ranks then learn together (:func:`any_rank`) that the forward failed.
    Buffers are small (the kept rows of one pair), and are allocated after the failed forward's
    tensors are released (the caller leaves its ``except`` first)."""
    mixing.wait_in_flight()  # receives launched before the failure (their senders sent)
    for send_counts, recv_counts, shape in plan[scope.issued :]:
        _send_recv(torch.zeros(shape, dtype=dtype, device=device), send_counts, recv_counts, group)
        scope.issued += 1


# ----------------------------------------------------------------------------------------------
# the exchange


class _Exchange(torch.autograd.Function):
    """Sends the pair's one ``buffer (2, B, R, H, D)`` (k and v) to the group ranks with a 1
    in ``send_counts`` and returns ``(2, n_src, B, R, H, D)`` from those with a 1 in
    ``recv_counts``, in rank order. The forward does not wait: the receives are left in
    ``mixing.IN_FLIGHT`` and the attention waits for them just before it reads them. The
    backward sends each received buffer's gradient back to its source and sums what comes
    back from the destinations (blocking)."""

    @staticmethod
    def forward(ctx, buffer, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        out = _send_recv(buffer, send_counts, recv_counts, group, wait=False)
        scope = _SCOPES.get(_key(group))
        if scope is not None:  # (a recomputation in the backward counts too)
            scope.issued += 1
        return out

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        back = _send_recv(grad, recv_counts, send_counts, ctx.group, per_peer=True)
        return back.sum(1), None, None, None


def _send_recv(send, send_counts, recv_counts, group, per_peer=False, wait=True):
    """Point-to-point exchange of k/v buffers: ``send (2, ...)`` (k and v) to every
    destination, the same buffer to each (one buffer per pair, no copy per destination;
    ``per_peer``: ``send (2, n_dst, ...)``, ``send[:, i]`` to the i-th), received into
    ``(2, n_src, ...)``; two messages per peer (k, v), each a contiguous tensor. All posted in
    one ``batch_isend_irecv``; ``wait=False`` leaves the receives in ``mixing.IN_FLIGHT``.

    Only real messages are posted: a rank with nothing to send or receive posts nothing, and
    no zero-byte message ever exists (zero-byte point-to-point messages have hung some NCCL
    releases; PyTorch's own NCCL all-to-all skips zero counts for the same reason). NCCL's
    rule that a batch of point-to-point operations must not be the first operation of a
    communicator unless every rank takes part is met because the ranks' agreement (an
    all-gather, :func:`enter_forward` or :func:`check_agreement`) always comes first. Messages
    between two ranks match in posting order, which is the same on every rank (the same
    exchanges in the same order)."""
    dst = [p for p, c in enumerate(send_counts) if c]
    src = [p for p, c in enumerate(recv_counts) if c]
    shape = send.shape[2:] if per_peer else send.shape[1:]  # one of k, v for one peer
    out = send.new_empty((2, len(src), *shape))
    peer = lambda p: dist.get_global_rank(group, p)  # noqa: E731 - P2POp takes global ranks
    ops = []
    for i, p in enumerate(dst):
        piece = send[:, i] if per_peer else send
        ops += [dist.P2POp(dist.isend, piece[kv].contiguous(), peer(p), group) for kv in (0, 1)]
    for i, p in enumerate(src):
        ops += [dist.P2POp(dist.irecv, out[kv, i], peer(p), group) for kv in (0, 1)]
    works = dist.batch_isend_irecv(ops) if ops else []
    if wait:
        for work in works:
            work.wait()
    else:  # the sent tensors and the receive buffer live until the wait
        mixing.IN_FLIGHT.extend((work, (ops, out)) for work in works)
    EXCHANGE_BYTES["sent"] += len(dst) * 2 * shape.numel() * send.element_size()
    EXCHANGE_BYTES["received"] += out.numel() * out.element_size()
    return out


# ----------------------------------------------------------------------------------------------
# geometry of a pair that spans ranks


def _kept(phase: int, r: int, length: int) -> int:
    """Rows ``phase, phase + r, ... < length``."""
    return max(0, -(-(length - phase) // r))


@dataclass(frozen=True)
class Spanning:
    """Pair (w, r) whose segments span ``m`` ranks, seen from one rank."""

    r: int
    members: tuple[int, ...]  # the ranks of this rank's segment, in order
    index: int  # this rank's position among them
    causal: bool

    def phase(self, c: int, index: int, length: int) -> int:
        """First local row of offset class c on the segment's rank ``index``."""
        return (c - index * length) % self.r

    @property
    def sources(self) -> list[int]:
        """Indices (in members) whose kept keys this rank's queries see."""
        if self.causal:
            return list(range(self.index))
        return [i for i in range(len(self.members)) if i != self.index]

    @property
    def destinations(self) -> list[int]:
        if self.causal:
            return list(range(self.index + 1, len(self.members)))
        return [i for i in range(len(self.members)) if i != self.index]


def spanning(w: int, r: int, at: RankSlice, causal: bool) -> Spanning | None:
    seg = min(w, at.total)
    if at.length % seg == 0:
        return None  # local
    m = seg // at.length
    first = at.rank // m * m
    members = tuple(range(first, min(first + m, at.world)))
    return Spanning(r, members, at.rank - first, causal)


def _classes(r: int, n_head: int):
    """(offset class c, its heads c, c + r, ...)."""
    for c in range(min(r, n_head)):
        yield c, len(range(c, n_head, r))


def pack(x: torch.Tensor, span: Spanning, length: int) -> torch.Tensor:
    """(B, l, H, D) -> (B, ceil(l/r), H, D): for each head h, its kept rows first (zeros
    after): rows ``phase(h mod r) + j*r`` of the slice."""
    B, _, H, D = x.shape
    R = -(-length // span.r)
    out = x.new_zeros((B, R, H, D))
    for c, heads in _classes(span.r, H):
        phase = span.phase(c, span.index, length)
        rows = _kept(phase, span.r, length)
        if rows:
            src = StridedBlock(groups=B, group_stride=0, pos=phase, head=c, heads=heads,
                               head_stride=span.r, rows=rows, row_stride=span.r)  # fmt: skip
            dst = StridedBlock(
                groups=B, group_stride=0, head=c, heads=heads, head_stride=span.r, rows=rows
            )
            dst.view(out).copy_(src.view(x))
    return out


def _counts(span: Spanning, at: RankSlice) -> tuple[list[int], list[int]]:
    """Buffers sent to and received from each rank of the group (0 or 1)."""
    dst = {span.members[i] for i in span.destinations}
    src = {span.members[i] for i in span.sources}
    return [int(p in dst) for p in range(at.world)], [int(p in src) for p in range(at.world)]


def exchange(k: torch.Tensor, v: torch.Tensor, span: Spanning, at: RankSlice, group):
    """The received kept keys and values, each ``(n_src * B, ceil(l/r), H, D)``: source i's
    rows for batch row b are batch row ``i * B + b``."""
    B, _, H, D = k.shape
    buffer = torch.stack([pack(k, span, at.length), pack(v, span, at.length)])  # (2, B, R, H, D)
    send_counts, recv_counts = _counts(span, at)
    got = _Exchange.apply(buffer, send_counts, recv_counts, group)  # (2, n_src, B, R, H, D)
    _, n_src, _, R, _, _ = got.shape
    # (n_src, B, R, H, D) -> (n_src * B, R, H, D), views (the data may still be arriving):
    # batch rows of source i follow each other
    return got[0].view(n_src * B, R, H, D), got[1].view(n_src * B, R, H, D)


def spanning_calls(
    span: Spanning, at: RankSlice, batch: int, n_head: int, source: int, first: bool
):
    """The pair's calls on this rank: its own kept rows (causally, on source 0) and the
    received rows of each source rank (on ``source``)."""
    calls = []
    for c, heads in _classes(span.r, n_head):
        phase = span.phase(c, span.index, at.length)
        rows = _kept(phase, span.r, at.length)
        if rows == 0:
            continue
        q = StridedBlock(groups=batch, group_stride=0, pos=phase, head=c, heads=heads,
                         head_stride=span.r, rows=rows, row_stride=span.r)  # fmt: skip
        calls += chunked(Call(q=q, kv=q, causal=span.causal, first=first))
        for n, i in enumerate(span.sources):
            kv_rows = _kept(span.phase(c, i, at.length), span.r, at.length)
            if kv_rows == 0:
                continue
            kv = StridedBlock(batch=n * batch, groups=batch, group_stride=0, head=c, heads=heads,
                              head_stride=span.r, rows=kv_rows)  # fmt: skip
            calls += chunked(Call(q=q, kv=kv, causal=False, source=source))
    return calls


# ----------------------------------------------------------------------------------------------
# load balance, from the geometry above


def attended_pairs(pairs, n_head: int, total: int, world: int, causal: bool = True) -> list[int]:
    """Attended (query, key) pairs of each rank, per batch row, summed over heads and the
    schedule's pairs (a key attended by two pairs counts twice: the union softmax computes
    both): the attention work each rank does when ``total`` tokens are split across
    ``world`` ranks, counted from the same geometry the code runs (local pairs as on one
    device, spanning pairs as own kept rows plus every source's). Causal work grows with the
    rank inside a spanning segment (later ranks see more earlier keys): with w = N, r = 1 the
    last rank does 2P - 1 times the first's. Raises like :func:`check_split`."""
    if total % world:
        raise ValueError(f"total={total} tokens do not split into world={world} equal slices")
    out = []
    for rank in range(world):
        at = RankSlice(world, rank, total // world)
        check_split(pairs, at)
        count = 0
        for w, r in pairs:
            span = spanning(w, r, at, causal)
            for c, heads in _classes(r, n_head):
                if span is None:  # l / w' whole segments of w' inside the slice
                    seg = min(w, total)
                    m = _kept(c, r, seg)
                    count += heads * (at.length // seg) * (m * (m + 1) // 2 if causal else m * m)
                    continue
                mine = _kept(span.phase(c, span.index, at.length), r, at.length)
                seen = sum(_kept(span.phase(c, i, at.length), r, at.length) for i in span.sources)
                own = mine * (mine + 1) // 2 if causal else mine * mine
                count += heads * (own + mine * seen)
        out.append(count)
    return out


def imbalance(pairs, n_head: int, total: int, world: int, causal: bool = True) -> float:
    """The busiest rank's attended pairs over the mean (1.0: balanced)."""
    work = attended_pairs(pairs, n_head, total, world, causal)
    return max(work) * len(work) / sum(work)
