"""Dilated attention over a sequence split across the ranks of a process group: context
parallelism (LongNet, section 3.1), exact and causal.

P ranks hold one sequence of N = P * l tokens. The sequence is cut into equal consecutive
pieces of h tokens and each rank holds some of them, concatenated in piece order (its slice
of l tokens), as the group's layout says (:func:`set_layout`):

- ``contiguous`` (default): P pieces of h = l, rank j holds piece j.
- ``balanced``: 2P pieces of h = l/2, rank j holds pieces j and 2P - 1 - j (the "zigzag" of
  ring-flash-attention, Llama 3's load-balanced context parallelism): in a causal segment
  spanning the sequence, a rank's early piece sees few keys and its late one many, so every
  rank does the same work (the contiguous layout gives the last rank 2P - 1 times the
  first's).

For pair (w, r) let w' = min(w, N):

- w' divides h: every segment lies inside one piece; the pair is computed locally, exactly as
  on one device (segment boundaries are multiples of w', and so is every piece start).
- w' is a multiple of h: a segment spans m = w'/h consecutive pieces (the last segment may
  span fewer). For each of its pieces a rank keeps, for each head h', the rows whose offset
  from the segment start is ``h' mod r`` modulo r (offsets follow the global position, so the
  first kept row of a piece depends on where the piece starts in its segment), packs them
  into one buffer ``(B, ceil(h/r), H, D)`` for k and one for v, and sends it to the ranks
  holding pieces of its segment whose queries may see it: later ones (causal) or all others.
  A piece's kept queries attend its own kept keys (causally: the pair's local block), those
  of the segment's other pieces on the same rank (read in place) and the received ones, all
  mixed with the other pairs in one softmax by the usual engine (``mixing.py``). The backward
  sends the gradients of the received pieces back with the reverse exchange and sums them.
- anything else is rejected on every rank before any collective.

Each exchange is one batch of point-to-point messages (``batch_isend_irecv``): each piece a
destination needs, once, from the one packed buffer of the pair; one receive per piece
received, nothing posted for anyone else, so data moves only among a segment's ranks and no
empty message exists; every rank runs the same exchanges in the same order. The forward does
not wait for it: the attention runs the calls on this rank's own keys first and waits just
before it reads received rows (``mixing.IN_FLIGHT``), so the local pairs hide the transfer
(:data:`OVERLAP` off: it waits at once, for measuring what that hides). The backward's
exchange is blocking: autograd gives the received pieces' gradients only once the attention
backward is done, and the sender's gradient needs them before anything else of its own.
Per rank and pair at most ``2 * B * H * D * (w' - h) / r`` elements are received per piece,
bounded as N grows while w < N. ``EXCHANGE_BYTES`` counts what each rank sends and receives.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.attention import mixing
from models.attention.mixing import Call, StridedBlock, chunked

# bytes this process sent and received through exchanges, forward and backward together
EXCHANGE_BYTES = {"sent": 0, "received": 0}
# seconds this process spent waiting where an exchange was issued (OVERLAP off, backward)
EXCHANGE_WAIT_S = [0.0]
# whether the forward leaves an exchange in flight while the local calls run (a benchmark
# switch: False waits for every exchange where it is issued; the results are the same)
OVERLAP = True
LAYOUTS = ("contiguous", "balanced")


@dataclass(frozen=True)
class RankSlice:
    """Where this rank sits: group size, rank, slice length and the group's layout."""

    world: int
    rank: int
    length: int  # l: this rank's tokens
    layout: str = "contiguous"

    @property
    def total(self) -> int:
        return self.world * self.length

    @property
    def per_rank(self) -> int:
        return 2 if self.layout == "balanced" else 1

    @property
    def piece(self) -> int:
        """h: tokens per piece."""
        return self.length // self.per_rank

    @property
    def pieces(self) -> tuple[int, ...]:
        """The pieces this rank holds, in the order of its slice."""
        return pieces_of(self.rank, self.world, self.layout)

    def owner(self, piece: int) -> tuple[int, int]:
        """(rank, place in that rank's slice) of ``piece``."""
        if self.layout == "balanced" and piece >= self.world:
            return 2 * self.world - 1 - piece, 1
        return piece, 0


def pieces_of(rank: int, world: int, layout: str) -> tuple[int, ...]:
    return (rank, 2 * world - 1 - rank) if layout == "balanced" else (rank,)


# ----------------------------------------------------------------------------------------------
# layouts: which tokens of the sequence each rank of a group holds

_LAYOUTS: dict[int, str] = {}


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"context-parallel layout {layout!r} is not one of {LAYOUTS}")
    return layout


def set_layout(group, layout: str) -> None:
    """Every rank of ``group`` must set the same layout (before the group's first forward):
    the attention reads it here, and so do the model's positions (:func:`positions`) and
    whatever cuts windows into slices (:func:`take_slice`)."""
    _LAYOUTS[_key(group)] = check_layout(layout)


def layout_of(group) -> str:
    return _LAYOUTS.get(_key(group), "contiguous")


@contextmanager
def using_layout(group, layout: str):
    """``set_layout`` inside, the group's previous layout after."""
    before = layout_of(group)
    set_layout(group, layout)
    try:
        yield
    finally:
        set_layout(group, before)


def token_index(world: int, rank: int, length: int, layout: str = "contiguous"):
    """Global positions ``(l,)`` of the l tokens rank ``rank`` holds, in its slice's order."""
    at = RankSlice(world, rank, length, check_layout(layout))
    if layout == "balanced" and length % 2:
        raise ValueError(f"the balanced layout needs an even slice length l, got l = {length}")
    h = at.piece
    return torch.cat([torch.arange(p * h, (p + 1) * h) for p in at.pieces])


def positions(group, length: int, device=None) -> torch.Tensor:
    """Global positions of this rank's ``length`` tokens under the group's layout."""
    index = token_index(dist.get_world_size(group), dist.get_rank(group), length, layout_of(group))
    return index.to(device)


def take_slice(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice ``(B, l, ...)`` of a whole window ``x (B, N, ...)`` under the
    group's layout (for ``contiguous`` a view)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    length, layout = x.shape[1] // world, layout_of(group)
    if layout == "contiguous":
        return x[:, rank * length : (rank + 1) * length]
    return x[:, token_index(world, rank, length, layout).to(x.device)]


def rank_slice(group, length: int) -> RankSlice:
    return RankSlice(dist.get_world_size(group), dist.get_rank(group), length, layout_of(group))


# ----------------------------------------------------------------------------------------------
# checks, before any collective of the attention


def check_split(pairs, at: RankSlice) -> None:
    """Each pair's segment ``w' = min(w, N)`` must divide the piece or be a multiple of it."""
    if at.length % at.per_rank:
        raise ValueError(
            f"the {at.layout} layout holds {at.per_rank} pieces per rank: the slice length "
            f"l = N / P = {at.length} must be a multiple of {at.per_rank}"
        )
    for w, _ in pairs:
        seg = min(w, at.total)
        if at.piece % seg and seg % at.piece:
            raise ValueError(
                f"segment length {w} (w' = min(w, N) = {seg}) neither divides the piece length "
                f"h = {at.piece} nor is a multiple of it (N = {at.total}, P = {at.world}, "
                f"{at.layout} layout: l = N / P = {at.length} in {at.per_rank} piece(s)); "
                "choose segment lengths that divide h or are multiples of it"
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
    schedule = fingerprint(pairs, causal, layout_of(group))
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
    """The exchanges of one attention call, in order: ``(sends, receives, shape of the pair's
    buffer (2, pieces per rank, B, ceil(h/r), H, D))`` per spanning pair; what
    :func:`exchange` issues."""
    plan = []
    for w, r in pairs:
        spans = spanning(w, r, at, causal)
        if spans is not None:
            sends, receives = messages(spans, at)
            shape = (2, at.per_rank, batch, -(-at.piece // r), n_head, head_dim)
            plan.append((sends, receives, shape))
    return plan


def drain(scope: ForwardScope, plan: list, group, dtype: torch.dtype, device) -> None:
    """Issues, with zeros, the exchanges of ``plan`` (a whole forward's, in order) that this
    rank has not issued yet: what a rank that failed part-way through a forward does so that
    the others, which go on through theirs, are never left waiting in an exchange. The data
    is thrown away; the ranks then learn together (:func:`any_rank`) that the forward failed.
    Buffers are small (the kept rows of one pair), and are allocated after the failed forward's
    tensors are released (the caller leaves its ``except`` first)."""
    mixing.wait_in_flight()  # receives launched before the failure (their senders sent)
    for sends, receives, shape in plan[scope.issued :]:
        _send_recv(torch.zeros(shape, dtype=dtype, device=device), sends, receives, group)
        scope.issued += 1


# ----------------------------------------------------------------------------------------------
# the exchange


class _Reverse:
    """The backward's reverse exchange of one :class:`_Exchange`, launched early: the
    attention backward calls :meth:`launch` with the received pieces' gradients as soon as
    they are complete (before its calls on this rank's own keys), and the exchange's backward
    only waits (:meth:`result`). Every rank launches every pair's reverse exchange at the same
    point, in the plan's source order, so the messages match across ranks as before."""

    def __init__(self, sends, receives, group, shape, dtype):
        self.sends, self.receives, self.group = sends, receives, group
        self.shape, self.dtype = shape, dtype  # of the received buffer (2, n_recv, B, R, H, D)
        self.works: list | None = None

    def launch(self, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """``dk, dv (n_recv * B, R, H, D)``: the gradients of the received keys and values."""
        grad = torch.stack([dk, dv]).to(self.dtype).view(self.shape)
        self.works = []
        self.back = _send_recv(grad, self.receives, self.sends, self.group, own=False,
                               wait=False, into=self.works)  # fmt: skip
        self.sent = grad  # alive until the wait

    def result(self) -> torch.Tensor | None:
        """What came back (``(2, n_send, B, R, H, D)``) once waited for, or None if the
        attention backward did not launch it (the exchange's backward then does it all)."""
        if self.works is None:
            return None
        start = time.perf_counter()
        for work, _ in self.works:
            work.wait()
        EXCHANGE_WAIT_S[0] += time.perf_counter() - start
        back, self.works, self.back, self.sent = self.back, None, None, None
        return back


class _Exchange(torch.autograd.Function):
    """Sends pieces of the pair's one ``buffer (2, n, B, R, H, D)`` (k and v of this rank's n
    pieces): ``sends`` lists ``(rank, piece place)``, each a message; receives ``(2, n_recv,
    B, R, H, D)``, one per ``(rank, piece place)`` of ``receives``, in that order. The forward
    does not wait (with :data:`OVERLAP`): the receives are left in ``mixing.IN_FLIGHT`` and the
    attention waits for them just before it reads them. The backward sends each received
    piece's gradient back to its source and sums what comes back into the pieces sent; with
    :data:`OVERLAP` the attention backward has already launched that (``reverse``,
    :class:`_Reverse`) before its calls on this rank's own keys, and this only waits."""

    @staticmethod
    def forward(ctx, buffer, sends, receives, group, reverse):
        ctx.messages, ctx.group, ctx.pieces = (sends, receives), group, buffer.shape[1]
        ctx.reverse = reverse
        out = _send_recv(buffer, sends, receives, group, wait=not OVERLAP)
        scope = _SCOPES.get(_key(group))
        if scope is not None:  # (a recomputation in the backward counts too)
            scope.issued += 1
        return out

    @staticmethod
    def backward(ctx, grad):
        sends, receives = ctx.messages
        back = ctx.reverse.result()  # launched by the attention backward, or not
        if back is None:
            back = _send_recv(grad, receives, sends, ctx.group, own=False)  # (2, n_send, B, ...)
        out = grad.new_zeros((2, ctx.pieces, *grad.shape[2:]))
        for i, (_, place) in enumerate(sends):
            out[:, place] += back[:, i]
        return out, None, None, None, None


def _send_recv(send, sends, receives, group, own=True, wait=True, into=None):
    """Point-to-point messages of k/v pieces: ``send (2, n, ...)``; message i of ``sends =
    [(rank, place)]`` is ``send[:, place]`` (``own=False``: ``send[:, i]``, the i-th received
    piece's gradient going back), two tensors (k, v), each a contiguous view of the one
    buffer: no copy per destination. Received into ``(2, len(receives), ...)``. All posted in
    one ``batch_isend_irecv``; ``wait=False`` leaves the receives in ``mixing.IN_FLIGHT`` (or
    in the list ``into``).

    Only real messages are posted: a rank with nothing to send or receive posts nothing, and
    no zero-byte message ever exists (every message is a piece's kept rows, ceil(h/r) >= 1
    rows of B * H * D). We rely on that, and on both sides listing the same messages
    (:func:`messages` is computed alike on every rank), not on NCCL's handling of empty
    messages. NCCL's maintainers state that zero-size send/recv are supported
    (NVIDIA/nccl#345), but NCCL 2.11-2.12.7 hung on zero-byte send/recv in grouped all-to-alls
    ("Fix bug with zero-bytes send/recv operations", 2.12.10; NVIDIA/nccl#695, #696);
    PyTorch's NCCL ``all_to_all_single`` skips the peers whose count is 0 (torch/csrc/cuda/
    nccl.cpp: ``if (count != 0)`` around ncclSend/ncclRecv), and all_to_all_single still hung
    where some ranks sent nothing (pytorch/pytorch#146468, NVIDIA/nccl#1593, NCCL 2.21.5);
    RCCL went the other way (ROCm/rccl#1349). Posting no empty message keeps this code off
    every one of those paths. NCCL's rule that a batch of point-to-point operations
    must not be the first operation of a communicator unless every rank takes part is met
    because the ranks' agreement (an all-gather, :func:`enter_forward` or
    :func:`check_agreement`) always comes first. Messages between two ranks match in posting
    order, which is the same on both: each side lists them by (the sender's piece place)."""
    shape = send.shape[2:]  # one piece of k or v
    out = send.new_empty((2, len(receives), *shape))
    peer = lambda p: dist.get_global_rank(group, p)  # noqa: E731 - P2POp takes global ranks
    ops = []
    for i, (p, place) in enumerate(sends):
        piece = send[:, place] if own else send[:, i]
        ops += [dist.P2POp(dist.isend, piece[kv].contiguous(), peer(p), group) for kv in (0, 1)]
    for i, (p, _) in enumerate(receives):
        ops += [dist.P2POp(dist.irecv, out[kv, i], peer(p), group) for kv in (0, 1)]
    works = dist.batch_isend_irecv(ops) if ops else []
    if wait:
        start = time.perf_counter()
        for work in works:
            work.wait()
        EXCHANGE_WAIT_S[0] += time.perf_counter() - start
    else:  # the sent tensors and the receive buffer live until the wait
        (mixing.IN_FLIGHT if into is None else into).extend((work, (ops, out)) for work in works)
    EXCHANGE_BYTES["sent"] += len(sends) * 2 * shape.numel() * send.element_size()
    EXCHANGE_BYTES["received"] += out.numel() * out.element_size()
    return out


# ----------------------------------------------------------------------------------------------
# geometry of a pair that spans pieces


def _kept(phase: int, r: int, length: int) -> int:
    """Rows ``phase, phase + r, ... < length``."""
    return max(0, -(-(length - phase) // r))


@dataclass(frozen=True)
class Spanning:
    """Pair (w, r) whose segments span ``m`` pieces, seen from one piece of this rank."""

    r: int
    members: tuple[int, ...]  # the pieces of this piece's segment, in order
    index: int  # this piece's position among them
    causal: bool
    place: int  # where the piece sits in this rank's slice (0, or 1 in the balanced layout)

    def phase(self, c: int, index: int, length: int) -> int:
        """First row of offset class c in the segment's piece ``index`` (pieces of h)."""
        return (c - index * length) % self.r

    @property
    def sources(self) -> list[int]:
        """Indices (in members) whose kept keys this piece's queries see."""
        if self.causal:
            return list(range(self.index))
        return [i for i in range(len(self.members)) if i != self.index]

    @property
    def destinations(self) -> list[int]:
        if self.causal:
            return list(range(self.index + 1, len(self.members)))
        return [i for i in range(len(self.members)) if i != self.index]


def spanning(w: int, r: int, at: RankSlice, causal: bool) -> list[Spanning] | None:
    """One :class:`Spanning` per piece of this rank, or None when the pair is local."""
    seg = min(w, at.total)
    if at.piece % seg == 0:
        return None  # local
    m, n_pieces = seg // at.piece, at.world * at.per_rank
    out = []
    for place, piece in enumerate(at.pieces):
        first = piece // m * m
        members = tuple(range(first, min(first + m, n_pieces)))
        out.append(Spanning(r, members, piece - first, causal, place))
    return out


def messages(spans: list[Spanning], at: RankSlice):
    """``(sends, receives)``: the ``(rank, piece place)`` messages of this rank's exchange for
    one pair, each list sorted by (rank, the sending rank's place). A piece goes to another
    rank once if some piece there sees it; the segment's pieces on this rank are read in
    place."""
    sends, receives = set(), set()
    for span in spans:
        for i in span.destinations:
            rank, _ = at.owner(span.members[i])
            if rank != at.rank:
                sends.add((rank, span.place))
        for i in span.sources:
            rank, place = at.owner(span.members[i])
            if rank != at.rank:
                receives.add((rank, place))
    return sorted(sends), sorted(receives)


def _classes(r: int, n_head: int):
    """(offset class c, its heads c, c + r, ...)."""
    for c in range(min(r, n_head)):
        yield c, len(range(c, n_head, r))


def _kept_block(span: Spanning, c: int, heads: int, index: int, h: int, **where):
    """The kept rows of class c of the segment's piece ``index`` as a block of ``B`` batch
    rows: strided in place (``pos``, ``row_stride=r``) or packed (``batch``), or None."""
    rows = _kept(span.phase(c, index, h), span.r, h)
    if rows == 0:
        return None
    return StridedBlock(groups=where.pop("groups"), group_stride=0, head=c, heads=heads,
                        head_stride=span.r, rows=rows, **where)  # fmt: skip


def pack(x: torch.Tensor, spans: list[Spanning], h: int) -> torch.Tensor:
    """(B, l, H, D) -> (n, B, ceil(h/r), H, D), n pieces: for each piece and head, its kept
    rows first (zeros after): rows ``phase(head mod r) + j*r`` of the piece."""
    B, _, H, D = x.shape
    r = spans[0].r
    out = x.new_zeros((len(spans), B, -(-h // r), H, D))
    for span in spans:
        for c, heads in _classes(r, H):
            phase = span.phase(c, span.index, h)
            src = _kept_block(span, c, heads, span.index, h, groups=B,
                              pos=span.place * h + phase, row_stride=r)  # fmt: skip
            if src is not None:
                dst = _kept_block(span, c, heads, span.index, h, groups=B)
                dst.view(out[span.place]).copy_(src.view(x))
    return out


def exchange(k: torch.Tensor, v: torch.Tensor, spans: list[Spanning], at: RankSlice, group):
    """The received kept keys and values, each ``(n_recv * B, ceil(h/r), H, D)``: received
    piece i's rows for batch row b are batch row ``i * B + b``; and the :class:`_Reverse` the
    attention backward launches with their gradients (None without :data:`OVERLAP`)."""
    B, _, H, D = k.shape
    buffer = torch.stack([pack(k, spans, at.piece), pack(v, spans, at.piece)])  # (2,n,B,R,H,D)
    sends, receives = messages(spans, at)
    R = buffer.shape[3]
    reverse = _Reverse(sends, receives, group, (2, len(receives), B, R, H, D), k.dtype)
    got = _Exchange.apply(buffer, sends, receives, group, reverse)  # (2, n_recv, B, R, H, D)
    n_recv = got.shape[1]
    # (n_recv, B, R, H, D) -> (n_recv * B, R, H, D), views (the data may still be arriving):
    # batch rows of received piece i follow each other
    views = got[0].view(n_recv * B, R, H, D), got[1].view(n_recv * B, R, H, D)
    return views, reverse if OVERLAP else None


def spanning_calls(
    spans: list[Spanning], at: RankSlice, batch: int, n_head: int, source: int, first: bool
):
    """The pair's calls on this rank, per piece: its own kept rows (causally), those of the
    segment's pieces on this rank (source 0, in place) and the received ones (``source``)."""
    _, receives = messages(spans, at)
    h, calls = at.piece, []
    for span in spans:
        for c, heads in _classes(span.r, n_head):
            pos = span.place * h + span.phase(c, span.index, h)
            q = _kept_block(span, c, heads, span.index, h, groups=batch, pos=pos,
                            row_stride=span.r)  # fmt: skip
            if q is None:
                continue
            calls += chunked(Call(q=q, kv=q, causal=span.causal, first=first))
            for i in span.sources:
                rank, place = at.owner(span.members[i])
                if rank == at.rank:  # a piece of the segment held here: read in place
                    pos = place * h + span.phase(c, i, h)
                    kv = _kept_block(span, c, heads, i, h, groups=batch, pos=pos,
                                     row_stride=span.r)  # fmt: skip
                    where = 0
                else:
                    at_batch = receives.index((rank, place)) * batch
                    kv = _kept_block(span, c, heads, i, h, groups=batch, batch=at_batch)
                    where = source
                if kv is not None:
                    calls += chunked(Call(q=q, kv=kv, causal=False, source=where))
    return calls


# ----------------------------------------------------------------------------------------------
# load balance, from the geometry above


def attended_pairs(pairs, n_head: int, total: int, world: int, causal: bool = True,
                   layout: str = "contiguous") -> list[int]:  # fmt: skip
    """Attended (query, key) pairs of each rank, per batch row, summed over heads and the
    schedule's pairs (a key attended by two pairs counts twice: the union softmax computes
    both): the attention work each rank does when ``total`` tokens are split across
    ``world`` ranks in ``layout``, counted from the same geometry the code runs (local pairs
    as on one device, spanning pairs per piece as own kept rows plus every source piece's).
    Causal work grows with the piece's place in a spanning segment (later pieces see more
    earlier keys): contiguous, with w = N, r = 1, the last rank does 2P - 1 times the first's;
    balanced, every rank the same. Raises like :func:`check_split`."""
    if total % world:
        raise ValueError(f"total={total} tokens do not split into world={world} equal slices")
    out = []
    for rank in range(world):
        at = RankSlice(world, rank, total // world, check_layout(layout))
        check_split(pairs, at)
        out.append(sum(_pair_work(w, r, n_head, at, causal) for w, r in pairs))
    return out


def _pair_work(w: int, r: int, n_head: int, at: RankSlice, causal: bool) -> int:
    spans, h = spanning(w, r, at, causal), at.piece
    count = 0
    for c, heads in _classes(r, n_head):
        if spans is None:  # l / w' whole segments of w' inside the slice
            seg = min(w, at.total)
            m = _kept(c, r, seg)
            count += heads * (at.length // seg) * (m * (m + 1) // 2 if causal else m * m)
            continue
        for span in spans:
            mine = _kept(span.phase(c, span.index, h), r, h)
            seen = sum(_kept(span.phase(c, i, h), r, h) for i in span.sources)
            own = mine * (mine + 1) // 2 if causal else mine * mine
            count += heads * (own + mine * seen)
    return count


def imbalance(pairs, n_head: int, total: int, world: int, causal: bool = True,
              layout: str = "contiguous") -> float:  # fmt: skip
    """The busiest rank's attended pairs over the mean (1.0: balanced)."""
    work = attended_pairs(pairs, n_head, total, world, causal, layout)
    return max(work) * len(work) / sum(work)
