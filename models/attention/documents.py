"""Documents inside packed windows: their boundaries, and the pieces each attention cuts them into.

With boundaries given, every attention computes on each document exactly what it computes for
that document run alone (docs/design.md, "Documents inside packed windows"). Boundaries are
flat cumulative lengths ``cu_seqlens (n_docs + 1,)`` over the ``B*N`` tokens of a batch read
row after row, the argument flash-attn's varlen functions take: 0, then the end of every
document, every row end ``b*N`` among them (a document never straddles rows; rows may hold
different numbers of documents). O(documents), not O(tokens), and what the attention needs per
token is one ``repeat_interleave`` away.

Pieces. Each pattern cuts a document as it would cut the document alone: consecutive pieces of
``size`` positions from its start (dilated segments, sliding chunks, sparse blocks; dense: the
document), of which head h keeps rows ``c + j*r`` (``c = h mod r``; ``r = 1`` keeps all). A
kernel call is a batch of pieces of equal padded length, given as flat row indices
``position * H + head`` of a ``(B, N, H, D)`` tensor viewed as ``(B*N*H, D)``: ``(G, M, H)``
with ``pad = B*N*H`` after each piece's last row. Lengths are rounded up the ladder 1, 2, 3, 4,
6, 8, 12, ... (never beyond the full piece), so a window of thousands of documents is a few
calls per pattern, not one per document: at most 2.25x the work on each document's last,
shorter piece, none on whole ones. Causal attention never lets a real query see the padded
keys after it; what padded queries compute is discarded (``varlen.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.attention.varlen import VarlenCall


def _ceil(a, b):
    return -(-a // b)


def ladder(m: torch.Tensor, full: int) -> torch.Tensor:
    """The padded length of pieces of ``m >= 1`` rows: the least of 1, 2, 3, 4, 6, 8, 12, ...
    at least ``m``, and at most ``full`` (a whole piece is never padded)."""
    p = torch.ones_like(m)
    big = m > 1
    p[big] = 2 ** torch.ceil(torch.log2(m[big].double())).long()  # next power of two
    three_quarters = p * 3 // 4
    return torch.where((three_quarters >= m) & (p >= 4), three_quarters, p).clamp(max=full)


@dataclass(frozen=True, eq=False)
class Documents:
    """The documents of a ``(B, N)`` batch: ``starts`` and ``lengths`` ``(n_docs,)`` int64 on
    the CPU (flat token offsets), checked. Built once per forward and shared by the layers,
    which share their kernel plans through :meth:`cached`."""

    batch: int
    seq_len: int
    starts: torch.Tensor
    lengths: torch.Tensor
    device: torch.device
    _plans: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, documents, batch: int, seq_len: int, device) -> Documents:
        """``documents``: a :class:`Documents` of this batch shape, or ``cu_seqlens``."""
        if isinstance(documents, Documents):
            if (documents.batch, documents.seq_len) != (batch, seq_len):
                raise ValueError(
                    f"documents describe a ({documents.batch}, {documents.seq_len}) batch, the "
                    f"inputs are ({batch}, {seq_len})"
                )
            return documents
        return cls(batch, seq_len, *_check_cu_seqlens(documents, batch, seq_len), device)

    @classmethod
    def from_starts(cls, starts: torch.Tensor) -> Documents:
        """From per-token flags ``(B, N)`` bool, True where a document starts (data/batch.py's
        ``document_starts``); a row's first token always starts one."""
        if not isinstance(starts, torch.Tensor) or starts.dim() != 2 or starts.dtype != torch.bool:
            got = tuple(starts.shape) if isinstance(starts, torch.Tensor) else type(starts)
            raise ValueError(f"document starts must be a (B, N) bool tensor, got {got}")
        B, N = starts.shape
        flags = starts.detach().cpu().clone()
        flags[:, 0] = True
        begin = flags.flatten().nonzero().flatten()
        cu = torch.cat([begin, torch.tensor([B * N])])
        return cls(B, N, begin, cu.diff(), starts.device)

    @property
    def whole_rows(self) -> bool:
        """One document per row: the unmasked computation."""
        return len(self.starts) == self.batch

    @property
    def longest(self) -> int:
        return int(self.lengths.max())

    def _per_token(self, values: torch.Tensor) -> torch.Tensor:
        return values.repeat_interleave(self.lengths).view(self.batch, self.seq_len)

    def positions(self) -> torch.Tensor:
        """``(B, N)`` int64: each token's position inside its document, on the device."""
        flat = torch.arange(self.batch * self.seq_len).view(self.batch, self.seq_len)
        return (flat - self._per_token(self.starts)).to(self.device)

    def token_lengths(self) -> torch.Tensor:
        """``(B, N)`` int64: the length of each token's document, on the device."""
        return self._per_token(self.lengths).to(self.device)

    def cached(self, key, build):
        """``build()``'s result, made once for this batch per ``key`` (one per pattern)."""
        if key not in self._plans:
            self._plans[key] = build()
        return self._plans[key]

    # -- pieces ----------------------------------------------------------------------------

    def cut(self, size: int):
        """Consecutive pieces of ``size`` from each document's start: flat ``start``,
        ``length`` and index ``k`` inside the document, each ``(n_pieces,)``."""
        count = _ceil(self.lengths, size)
        doc = torch.arange(len(count)).repeat_interleave(count)
        k = torch.arange(int(count.sum())) - (count.cumsum(0) - count).repeat_interleave(count)
        start = self.starts[doc] + k * size
        return start, torch.minimum(self.lengths[doc] - k * size, torch.tensor(size)), k

    def rows(self, start, length, n_head: int, r: int, M: int) -> torch.Tensor:
        """Flat row indices ``(G, M, H)`` of pieces at ``start (G,)`` of ``length (G,)``:
        head h keeps the piece's rows ``h mod r + j*r``, ``j < M``; those at or past the
        piece's end are the pad, ``B*N*H``."""
        at = torch.arange(n_head) % r + torch.arange(M)[:, None] * r  # (M, H) inside the piece
        flat = (start[:, None, None] + at) * n_head + torch.arange(n_head)  # (G, M, H)
        pad = self.batch * self.seq_len * n_head
        return flat.masked_fill(at >= length[:, None, None], pad).to(self.device)

    def buckets(self, rows: torch.Tensor, full: int):
        """Groups of pieces by padded row count: ``[(M, indices), ...]`` for pieces of
        ``rows (G,) >= 1`` kept rows (``full``: a whole piece's)."""
        padded = ladder(rows, full)
        return [(int(M), (padded == M).nonzero().flatten()) for M in padded.unique()]


def _check_cu_seqlens(cu, batch: int, seq_len: int):
    """``(starts, lengths)`` of checked flat cumulative lengths, or a ValueError naming them."""
    total = batch * seq_len
    ok = isinstance(cu, torch.Tensor) and cu.dim() == 1 and not cu.is_floating_point()
    if not ok or cu.dtype == torch.bool or len(cu) < 2:
        got = f"{tuple(cu.shape)} {cu.dtype}" if isinstance(cu, torch.Tensor) else type(cu)
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor (n_docs + 1,), got {got}")
    cu = cu.detach().cpu().long()
    ends = set(range(0, total + 1, seq_len))
    bad = (
        int(cu[0]) != 0
        or int(cu[-1]) != total
        or bool((cu.diff() <= 0).any())
        or not ends <= set(cu.tolist())
    )
    if bad:
        shown = cu.tolist() if len(cu) <= 20 else f"{cu[:10].tolist()}...{cu[-10:].tolist()}"
        raise ValueError(
            f"cu_seqlens must rise strictly from 0 to B*N={total} and hold every row end "
            f"(multiples of N={seq_len}), got {shown}"
        )
    return cu[:-1], cu.diff()


# ----------------------------------------------------------------------------------------------
# the calls of each pattern, on every document at once


def segment_calls(docs: Documents, size: int, r: int, n_head: int, first: bool) -> list:
    """Causal attention inside consecutive pieces of ``size`` from each document's start, head
    h on the rows ``h mod r + j*r`` of each: a dilated pair ``(size, r)``; with ``r = 1`` the
    local chunks of sliding, sparse and blockwise attention, and dense block-causal attention
    (``size`` >= every document)."""
    start, length, _ = docs.cut(size)
    calls = []
    for M, i in docs.buckets(_ceil(length, r), full=_ceil(size, r)):
        rows = docs.rows(start[i], length[i], n_head, r, M)
        calls.append(VarlenCall(q=rows, kv=rows, causal=True, first=first))
    return calls


def previous_calls(docs: Documents, window: int, n_head: int, sliding: bool) -> list:
    """Rows of each document's chunk t >= 1 attending the whole chunk t - 1: under the sliding
    mask (row a sees key b iff b > a; the last row sees none of it), or all of it (blockwise)."""
    start, length, k = docs.cut(window)
    start, length = start[k >= 1], length[k >= 1]
    limit = window - 1 if sliding else window
    if len(start) == 0 or limit == 0:
        return []
    a = torch.arange(window)
    mask = (a[None, :] > a[:, None]).to(docs.device) if sliding else None  # (window, window)
    calls = []
    q_rows = torch.clamp(length, max=limit)
    for M, i in docs.buckets(q_rows, full=limit):
        q = docs.rows(start[i], q_rows[i], n_head, 1, M)
        kv = docs.rows(start[i] - window, torch.full_like(i, window), n_head, 1, window)
        calls.append(VarlenCall(q=q, kv=kv, causal=False, mask=_first_rows(mask, M)))
    return calls


def _first_rows(mask, rows):
    return None if mask is None else mask[:rows]


def summary_calls(docs: Documents, block: int, summary: int, n_head: int) -> list:
    """Each document's block t >= 1 attending the last ``summary`` positions of its blocks
    ``0 .. t-1``: one set of calls per t, as without documents (t * summary keys each)."""
    start, length, k = docs.cut(block)
    calls = []
    for t in k[k >= 1].unique().tolist():
        s_start, s_len = start[k == t], length[k == t]
        offsets = torch.arange(t)[:, None] * block + block - summary + torch.arange(summary)
        keys = s_start[:, None] - t * block + offsets.flatten()  # (G, t * summary) positions
        kv = (keys[:, :, None] * n_head + torch.arange(n_head)).to(docs.device)
        for M, i in docs.buckets(s_len, full=block):
            q = docs.rows(s_start[i], s_len[i], n_head, 1, M)
            calls.append(VarlenCall(q=q, kv=kv[i.to(docs.device)], causal=False))
    return calls
