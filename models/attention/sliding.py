"""Sliding-window causal attention: query i attends keys j with ``i - window < j <= i``.

The usual cheap alternative to dense attention (Longformer's local part, Mistral). Computed in
linear time and memory as two sets of dense blocks, mixed by ``mixing.mixed_attention``: the
sequence is cut into chunks of ``window`` positions; each chunk attends itself causally, and
rows ``0 .. window-2`` of each chunk also attend the previous chunk, where row ``a`` may see key
``b`` only if ``b > a`` (then ``i - j = window + a - b < window``). The mask is ``window x
window`` and shared by every chunk: nothing ``N x N`` is ever built.
"""

from __future__ import annotations

import math

import torch

from models.attention.backends import resolve_backend
from models.attention.documents import Documents, previous_calls, segment_calls
from models.attention.mixing import Call, Plan, chunked, contiguous_block, mixed_attention, plan
from models.attention.varlen import VarlenPlan, varlen_attention, varlen_plan


def check_window(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    return window


def local_calls(block: int, batch: int, n: int, n_head: int) -> list[Call]:
    """Causal attention inside consecutive blocks of ``block`` positions (the last may be
    shorter); disjoint and covering every position, so they come first and are copied."""
    block = min(block, n)
    n_full, tail = divmod(n, block)
    size = dict(rows=block, n_head=n_head)
    calls = []
    if tail == 0:  # batch rows line up with blocks: fold them together
        calls.append(contiguous_block(groups=batch * n_full, group_stride=block, **size))
    else:
        calls += [
            contiguous_block(batch=b, groups=n_full, group_stride=block, **size)
            for b in range(batch)
        ]
        calls.append(
            contiguous_block(
                pos=n_full * block, groups=batch, group_stride=0, rows=tail, n_head=n_head
            )  # fmt: skip
        )
    return [c for blk in calls for c in chunked(Call(q=blk, kv=blk, causal=True, first=True))]


def _previous_chunk_calls(window, batch, n, n_head, mask) -> list[Call]:
    """Rows of each chunk attending the whole previous chunk, under ``mask`` (rows x window)
    or, with ``mask=None``, unmasked (blockwise attention)."""
    n_full, tail = divmod(n, window)
    calls = []
    # with the sliding mask, the last row of a chunk sees none of the previous chunk
    rows = window if mask is None else window - 1
    if n_full > 1 and rows > 0:
        for b in range(batch):  # chunk 0 has no previous chunk, so batch rows cannot fold
            chunks = dict(batch=b, groups=n_full - 1, group_stride=window, n_head=n_head)
            q = contiguous_block(pos=window, rows=rows, **chunks)
            kv = contiguous_block(pos=0, rows=window, **chunks)
            calls += chunked(Call(q=q, kv=kv, causal=False, mask=_rows(mask, rows)))
    if tail and min(tail, rows) > 0:
        rows_each = dict(groups=batch, group_stride=0, n_head=n_head)
        q = contiguous_block(pos=n_full * window, rows=min(tail, rows), **rows_each)
        kv = contiguous_block(pos=(n_full - 1) * window, rows=window, **rows_each)
        calls += chunked(Call(q=q, kv=kv, causal=False, mask=_rows(mask, min(tail, rows))))
    return calls


def _rows(mask, rows):
    return None if mask is None else mask.narrow(0, 0, rows)


def chunked_plan(q, k, v, chunk, *, sliding: bool, scale=None, backend="auto") -> Plan:
    """Causal attention inside chunks of ``chunk`` positions, plus the previous chunk: under
    the sliding mask (key b seen from row a iff b > a), or whole (blockwise)."""
    chunk = check_window(chunk)
    B, N, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    backend = resolve_backend(backend, q)
    calls = local_calls(chunk, B, N, H)
    if chunk < N:
        a = torch.arange(chunk, device=q.device)
        mask = a.unsqueeze(0) > a.unsqueeze(1) if sliding else None  # (chunk, chunk)
        calls += _previous_chunk_calls(chunk, B, N, H, mask)
    return plan(q, [(k, v)], calls, covers_all=True, scale=scale, backend=backend)


def chunked_document_plan(
    q, k, v, chunk, docs, *, sliding: bool, scale=None, backend="auto"
) -> VarlenPlan:
    """:func:`chunked_plan` on packed documents: chunks counted from each document's start,
    the previous chunk only inside the same document. ``chunk=None``: the whole document
    (dense block-causal attention)."""
    B, N, H, D = q.shape
    docs = Documents.of(docs, B, N, q.device)
    chunk = docs.longest if chunk is None else check_window(chunk)
    build = lambda: [  # noqa: E731
        *segment_calls(docs, chunk, 1, H, first=True),
        *previous_calls(docs, chunk, H, sliding),
    ]
    calls = docs.cached(("chunked", chunk, sliding, H), build)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    return varlen_plan(q, k, v, calls, scale=scale, backend=resolve_backend(backend, q))


def _run(q, k, v, chunk, sliding: bool, scale, backend, documents) -> torch.Tensor:
    if chunk is None and documents is None:  # block-causal without documents: causal
        chunk = q.shape[1]
    if documents is not None:
        docs = Documents.of(documents, q.shape[0], q.shape[1], q.device)
        if not docs.whole_rows or chunk is None:
            plan_ = chunked_document_plan(q, k, v, chunk, docs, sliding=sliding, scale=scale,
                                          backend=backend)  # fmt: skip
            return varlen_attention(plan_)
    return mixed_attention(
        chunked_plan(q, k, v, chunk, sliding=sliding, scale=scale, backend=backend)
    )


def sliding_window_attention(
    q, k, v, window: int, scale: float | None = None, backend: str = "auto", documents=None
) -> torch.Tensor:
    """Causal sliding-window attention on ``(B, N, H, D)``; returns ``(B, N, H, D)``.
    ``documents`` (``cu_seqlens`` or a ``Documents``): windows inside each document only."""
    return _run(q, k, v, window, True, scale, backend, documents)


def blockwise_attention(
    q, k, v, block: int, scale: float | None = None, backend: str = "auto", documents=None
) -> torch.Tensor:
    """Blockwise causal attention (Sun et al., 2022, used to run a dense model beyond its
    training length): queries of block t attend causally inside block t and all of block t-1
    (with ``documents``: blocks counted from each document's start, inside it)."""
    return _run(q, k, v, block, False, scale, backend, documents)


def block_causal_attention(
    q, k, v, documents, scale: float | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Dense causal attention inside each document of ``documents`` (``cu_seqlens`` or a
    ``Documents``): the document mask of dense attention, ``(B, N, H, D)``."""
    return _run(q, k, v, None, False, scale, backend, documents)
