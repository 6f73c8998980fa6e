"""Exact incremental decoding: prefill a prompt, then one token at a time against a per-layer
key/value cache, for every attention of ``models/transformer.py``.

``Decoder(model, batch, total)`` plans for sequences of at most ``total`` tokens (prompt plus
new tokens). ``prefill(prompt)`` runs the prompt through the fused kernels in chunks, and
``step(tokens)`` feeds one token per sequence; both return logits. Every logit equals the
full forward's (``model.eval()``, no dropout) on the whole sequence at that position, up to
float rounding: ``tests/test_decoding.py`` checks 1e-5 relative for every attention and
position type. Sampling and the generation loop: ``models/generation.py``.

Positions. q and k are made by the model's own ``Attention.project`` at their global
positions, *of a sequence of ``total``*: RoPE depends on the position only, and XPOS measures
positions from the centre of an anchor block (dilated: a multiple of every segment length;
dense, sliding, sparse, stretched dilated: the whole sequence, ``0 .. total - 1``). The cache
stores keys already scaled and rotated; a later query uses the same anchor as the keys it
reads (the one the full forward of ``total`` tokens uses), so its products are the full
forward's. XPOS whose scales overflow float32 over ``total`` positions (dense beyond ~70K) is
refused when the decoder is made, before any work.

What each layer's cache stores (``rows``: per batch row and head, for k and for v alike):

- dense: every position, ``total`` rows.
- dense with ``blockwise=b``: a query of block t reads blocks t-1 and t: a ring of
  ``min(2b, total)`` rows.
- sliding (``window``): a query at p reads ``p - window < j <= p``: a ring of
  ``min(window, total)`` rows.
- sparse (``sparse_block=b``, ``sparse_summary=s``): the current block (``min(b, total)``
  rows) and the summaries of the blocks before it (``s * ((total - 1) // b)`` rows).
- dilated: for pair ``(w, r)`` (``schedule_at(config, total)``; ``w' = min(w, total)``) and
  head h of offset ``c = h mod r``, the kept keys of the current segment: row j holds
  position ``segment start + c + j*r``. ``ceil(w' / r)`` rows per pair: a query of pair i
  only ever reads the kept keys of its own segment, so nothing before the current segment of
  a pair (nor before the current largest segment) is read again. When a segment ends its
  rows are reused: a query reads rows ``0 .. l // r`` only (l: its offset in the segment), all
  written in this segment, so stale rows are never read. The pairs are mixed exactly as the
  full forward does: one softmax over the multiset union of the keys they attend.

:func:`cache_rows` is that formula; :meth:`Decoder.nbytes` measures the tensors, which equal
``n_layer * 2 * batch * n_head * head_dim * itemsize * cache_rows(config, total)``.

Prefill chunks are multiples of the attention's unit (:func:`prefill_unit`: the least common
multiple of the segment lengths, the block, the window; one position for dense), so every
chunk starts where the fused kernels need no more than the cache: a dilated chunk is
self-contained, a sparse one reads the cached summaries, a sliding or blockwise one the ring.
"""

from __future__ import annotations

import math

import torch

from models.attention.backends import resolve_backend
from models.attention.dilated import check_coverage, dilated_attention
from models.attention.mixing import Call, chunked, contiguous_block, mixed_attention, plan
from models.attention.sliding import blockwise_attention, local_calls, sliding_window_attention
from models.attention.sparse import _summaries
from models.positional import XposRangeError, check_xpos_range
from models.transformer import ModelConfig, TransformerLM, schedule_at


class DecodeError(ValueError):
    """What cannot be decoded exactly (or a bad argument); the message names the value."""


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def prefill_unit(config: ModelConfig, total: int) -> int:
    """Positions a prefill chunk is a multiple of, so that it starts where the cache suffices."""
    if config.attention == "dilated":
        return math.lcm(*(min(w, total) for w in schedule_at(config, total)[0]))
    if config.attention == "sparse":
        return config.sparse_block
    if config.attention == "sliding":
        return config.window
    return config.blockwise or 1


def cache_rows(config: ModelConfig, total: int) -> int:
    """Cached rows per layer, batch row and head (for k and for v alike): the module
    docstring's formula. Dilated: independent of ``total`` once it passes every segment."""
    if config.attention == "dilated":
        return sum(
            _ceil(min(w, total), r) for w, r in zip(*schedule_at(config, total), strict=True)
        )
    if config.attention == "sparse":
        block, summary = config.sparse_block, config.sparse_summary
        return min(block, total) + summary * ((total - 1) // block)
    if config.attention == "sliding":
        return min(config.window, total)
    if config.blockwise is not None:
        return min(2 * config.blockwise, total)
    return total


def cache_bytes(config: ModelConfig, batch: int, total: int, dtype=torch.float32) -> int:
    """Bytes of every layer's cached keys and values."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_row = 2 * batch * config.n_head * (config.d_model // config.n_head) * itemsize
    return config.n_layer * per_row * cache_rows(config, total)


# ----------------------------------------------------------------------------------------------
# one query per sequence against cached keys: plain matmuls, exact


def _union_attention(q, parts, scale: float) -> torch.Tensor:
    """``q (B, H, D)`` -> ``(B, H, D)``: one softmax over the keys of every part, a part being
    ``(k, v, valid)`` with ``k, v (B, H, L, D)`` and ``valid`` a bool ``(H, L)`` or None. A key
    in two parts counts twice (dilated pairs: the multiset union). Computed in float32."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc).unsqueeze(2) * scale  # (B, H, 1, D)
    scores = []
    for k, _, valid in parts:
        s = (qf @ k.to(acc).transpose(-1, -2)).squeeze(2)  # (B, H, L)
        scores.append(s if valid is None else s.masked_fill(~valid, float("-inf")))
    probs = torch.softmax(torch.cat(scores, -1), -1).split([s.shape[-1] for s in scores], -1)
    out = sum(
        (p.unsqueeze(2) @ v.to(acc)).squeeze(2) for p, (_, v, _) in zip(probs, parts, strict=True)
    )
    return out.to(q.dtype)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # (B, n, H, D) <-> (B, H, n, D), a view


# ----------------------------------------------------------------------------------------------
# the caches: prefill(q, k, v, p0) for a chunk at a unit boundary, step(q, k, v, p) for one token


class _Cache:
    """Key and value tensors ``(B, H, rows, D)`` of one layer."""

    def __init__(self, shape, like: torch.Tensor, scale: float):
        self.k = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros_like(self.k)
        self.scale = scale

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v]


class DenseCache(_Cache):
    """Every position: row p holds position p."""

    def prefill(self, q, k, v, p0):
        B, n, H, D = q.shape
        block = dict(groups=B, group_stride=0, n_head=H)
        calls = chunked(
            Call(
                q=contiguous_block(rows=n, **block),
                kv=contiguous_block(rows=n, **block),
                causal=True,
                first=True,
            )
        )
        sources = [(k, v)]
        if p0:  # the cached prefix, whole: (B, p0, H, D)
            sources.append((_heads_first(self.k[:, :, :p0]), _heads_first(self.v[:, :, :p0])))
            calls += chunked(
                Call(
                    q=contiguous_block(rows=n, **block),
                    kv=contiguous_block(rows=p0, **block),
                    causal=False,
                    source=1,
                )
            )
        self.k[:, :, p0 : p0 + n], self.v[:, :, p0 : p0 + n] = _heads_first(k), _heads_first(v)
        backend = resolve_backend("auto", q)
        return mixed_attention(plan(q, sources, calls, covers_all=True, scale=self.scale,
                                    backend=backend))  # fmt: skip

    def step(self, q, k, v, p):
        self.k[:, :, p], self.v[:, :, p] = k[:, 0], v[:, 0]
        parts = [(self.k[:, :, : p + 1], self.v[:, :, : p + 1], None)]
        return _union_attention(q[:, 0], parts, self.scale).unsqueeze(1)


class RingCache(_Cache):
    """The last ``size`` positions, position j in row ``j mod size``. Sliding window: a query
    at p reads ``j > p - window``; blockwise (block b): ``j >= (p // b - 1) * b``."""

    def __init__(self, shape, like, scale, window: int | None = None, block: int | None = None):
        super().__init__(shape, like, scale)
        self.window, self.block, self.size = window, block, shape[2]

    def _lowest(self, p: int) -> int:
        if self.window is not None:
            return p - self.window + 1
        return (p // self.block - 1) * self.block

    def _write(self, k, v, p0):
        n = k.shape[1]
        m = min(n, self.size)  # the last m positions of the chunk stay
        slots = torch.arange(p0 + n - m, p0 + n, device=k.device) % self.size
        self.k[:, :, slots], self.v[:, :, slots] = (
            _heads_first(k[:, n - m :]),
            _heads_first(v[:, n - m :]),
        )

    def prefill(self, q, k, v, p0):
        # p0 is a multiple of the window (block): the previous window (block) sits in order
        back = 0 if p0 == 0 else (self.window or self.block)
        if back:
            first = (p0 - back) % self.size
            past = [_heads_first(t[:, :, first : first + back]) for t in (self.k, self.v)]
            q = torch.cat([torch.zeros_like(past[0]), q], 1)  # (B, back + n, H, D)
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
        if self.window is not None:
            y = sliding_window_attention(q, k, v, self.window)
        else:
            y = blockwise_attention(q, k, v, self.block)
        self._write(k[:, back:], v[:, back:], p0)
        return y[:, back:]

    def step(self, q, k, v, p):
        self._write(k, v, p)
        rows = torch.arange(self.size, device=q.device)
        held = p - (p - rows) % self.size  # the position each row holds
        valid = (held >= max(self._lowest(p), 0)).expand(q.shape[2], -1)  # (H, size)
        return _union_attention(q[:, 0], [(self.k, self.v, valid)], self.scale).unsqueeze(1)


class SparseCache:
    """The current block (row l: position ``t*block + l``) and the last ``summary`` positions
    of each earlier block (block t's at rows ``t*summary ..``)."""

    def __init__(self, cfg: ModelConfig, batch, total, like, scale):
        H, D = cfg.n_head, cfg.d_model // cfg.n_head
        self.block, self.summary, self.scale = cfg.sparse_block, cfg.sparse_summary, scale
        self.local = _Cache((batch, H, min(self.block, total), D), like, scale)
        self.summaries = _Cache(
            (batch, H, self.summary * ((total - 1) // self.block), D), like, scale
        )

    def tensors(self):
        return self.local.tensors() + self.summaries.tensors()

    def _keep(self, k, v, p0):
        """Positions ``p0 ..`` of ``k, v (B, n, H, D)`` into the block and the summaries."""
        n, b, s = k.shape[1], self.block, self.summary
        for t in range(p0 // b, (p0 + n - 1) // b + 1):
            lo, hi = max(t * b, p0), min((t + 1) * b, p0 + n)
            self.local.k[:, :, lo - t * b : hi - t * b] = _heads_first(k[:, lo - p0 : hi - p0])
            self.local.v[:, :, lo - t * b : hi - t * b] = _heads_first(v[:, lo - p0 : hi - p0])
            if hi == (t + 1) * b and (t + 1) * s <= self.summaries.k.shape[2]:  # block complete
                for mine, theirs in (
                    (self.summaries.k, self.local.k),
                    (self.summaries.v, self.local.v),
                ):
                    mine[:, :, t * s : (t + 1) * s] = theirs[:, :, b - s :]

    def prefill(self, q, k, v, p0):
        B, n, H, D = q.shape
        b, s, t0 = self.block, self.summary, p0 // self.block
        past = [_heads_first(x[:, :, : t0 * s]) for x in self.summaries.tensors()]
        sk = torch.cat([past[0], _summaries(k, b, s)], 1)  # (B, (t0 + n // b) * s, H, D)
        sv = torch.cat([past[1], _summaries(v, b, s)], 1)
        calls = local_calls(b, B, n, H)
        for u in range(_ceil(n, b)):  # block t0 + u reads the summaries of the blocks before it
            if t0 + u == 0:
                continue
            q_blk = contiguous_block(pos=u * b, groups=B, group_stride=0, rows=min(b, n - u * b),
                                     n_head=H)  # fmt: skip
            kv_blk = contiguous_block(groups=B, group_stride=0, rows=(t0 + u) * s, n_head=H)
            calls += chunked(Call(q=q_blk, kv=kv_blk, causal=False, source=1))
        self._keep(k, v, p0)
        backend = resolve_backend("auto", q)
        return mixed_attention(plan(q, [(k, v), (sk, sv)], calls, covers_all=True,
                                    scale=self.scale, backend=backend))  # fmt: skip

    def step(self, q, k, v, p):
        self._keep(k, v, p)
        t, l = divmod(p, self.block)
        parts = [
            (
                self.summaries.k[:, :, : t * self.summary],
                self.summaries.v[:, :, : t * self.summary],
                None,
            ),
            (self.local.k[:, :, : l + 1], self.local.v[:, :, : l + 1], None),
        ]
        return _union_attention(q[:, 0], parts, self.scale).unsqueeze(1)


class DilatedCache:
    """Per pair ``(w, r)``, tensors ``(B, H, ceil(w' / r), D)``: row j of head h holds
    position ``segment start + (h mod r) + j*r`` of the current segment (module docstring)."""

    def __init__(self, pairs, batch, n_head, head_dim, total, like, scale):
        self.pairs, self.scale = pairs, scale
        self.caches = [
            _Cache((batch, n_head, _ceil(min(w, total), r), head_dim), like, scale)
            for w, r in pairs
        ]
        self.offsets = [torch.arange(n_head, device=like.device) % r for _, r in pairs]  # (H,)
        # per pair and offset c: the heads that keep it, as indices (no host sync on GPUs)
        self.heads = [[(o == c).nonzero().squeeze(1) for c in range(r)]
                      for o, (_, r) in zip(self.offsets, pairs, strict=True)]  # fmt: skip

    def tensors(self):
        return [t for c in self.caches for t in c.tensors()]

    def prefill(self, q, k, v, p0):
        # p0 is a multiple of every segment length: the chunk's segments are its own
        y = dilated_attention(q, k, v, [w for w, _ in self.pairs], [r for _, r in self.pairs])
        end = p0 + q.shape[1]
        for (w, r), cache, offsets in zip(self.pairs, self.caches, self.offsets, strict=True):
            start = (end - 1) // w * w  # the current segment (>= p0)
            for c in range(min(r, q.shape[2])):
                heads = offsets == c
                kept = slice(start + c - p0, end - p0, r)  # (B, m, H, D) rows of offset c
                m = len(range(start + c, end, r))
                cache.k[:, heads, :m] = _heads_first(k[:, kept])[:, heads]
                cache.v[:, heads, :m] = _heads_first(v[:, kept])[:, heads]
        return y

    def step(self, q, k, v, p):
        parts = []
        for i, ((w, r), cache) in enumerate(zip(self.pairs, self.caches, strict=True)):
            j, c = divmod(p % w, r)  # row and offset of p in its segment
            heads = self.heads[i][c]  # the heads that keep p (none when c >= n_head)
            cache.k[:, heads, j], cache.v[:, heads, j] = k[:, 0, heads], v[:, 0, heads]
            rows = torch.arange(cache.k.shape[2], device=q.device)
            valid = (self.offsets[i] == c)[:, None] & (rows <= j)[None, :]  # (H, rows)
            parts.append((cache.k, cache.v, valid))
        return _union_attention(q[:, 0], parts, self.scale).unsqueeze(1)


def make_cache(config: ModelConfig, batch: int, total: int, like: torch.Tensor):
    """One layer's empty cache for ``batch`` sequences of at most ``total`` tokens."""
    H, D = config.n_head, config.d_model // config.n_head
    scale = D**-0.5
    if config.attention == "dilated":
        pairs = list(zip(*schedule_at(config, total), strict=True))
        return DilatedCache(pairs, batch, H, D, total, like, scale)
    if config.attention == "sparse":
        return SparseCache(config, batch, total, like, scale)
    shape = (batch, H, cache_rows(config, total), D)
    if config.attention == "sliding":
        return RingCache(shape, like, scale, window=config.window)
    if config.blockwise is not None:
        return RingCache(shape, like, scale, block=config.blockwise)
    return DenseCache(shape, like, scale)


# ----------------------------------------------------------------------------------------------
# the model


class Decoder:
    """A model's per-layer caches for ``batch`` sequences of at most ``total`` tokens.

    ``prefill(tokens (B, P))`` once, then ``step(tokens (B,))`` per new token; each returns
    logits. All sequences of a batch share their length (a prompt each, of the same length).
    Dropout is never applied: the logits are those of ``model.eval()``."""

    def __init__(self, model: TransformerLM, batch: int, total: int):
        cfg = model.config
        for name, value in (("batch", batch), ("total", total)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DecodeError(f"{name} must be a positive integer, got {value!r}")
        if cfg.position == "xpos":
            try:  # the anchor the full forward of `total` tokens uses
                check_xpos_range(total, cfg.d_model // cfg.n_head, cfg.xpos_scale_base,
                                 model.blocks[0].attn.anchor)  # fmt: skip
            except XposRangeError as err:
                raise DecodeError(
                    f"cannot decode {total} positions (prompt plus max_new_tokens) exactly: {err}"
                ) from None
        if cfg.attention == "dilated":  # stretch_last: the schedule at `total` may leave gaps
            pairs = tuple(zip(*schedule_at(cfg, total), strict=True))
            try:
                check_coverage(pairs, cfg.n_head, total)
            except ValueError as err:
                raise DecodeError(f"cannot decode {total} positions: {err}") from None
        like = model.lm_head.weight
        self.model, self.batch, self.total, self.position = model, batch, total, 0
        self.caches = [make_cache(cfg, batch, total, like) for _ in model.blocks]
        self.unit = prefill_unit(cfg, total)

    def nbytes(self) -> int:
        """Bytes of the cached keys and values (``cache_bytes`` says it ahead)."""
        return sum(t.nbytes for c in self.caches for t in c.tensors())

    def _check(self, tokens: torch.Tensor, n: int) -> None:
        integer = tokens.dtype in (torch.int64, torch.int32)
        if tokens.dim() != 2 or tokens.shape[0] != self.batch or not integer:
            raise DecodeError(
                f"tokens must be int64 or int32 ({self.batch}, n), got {tuple(tokens.shape)} "
                f"{tokens.dtype}"
            )
        if self.position + n > self.total:
            raise DecodeError(
                f"{self.position + n} positions exceed the decoder's total={self.total} "
                "(prompt plus max_new_tokens)"
            )

    def _run(self, tokens: torch.Tensor, prefill: bool) -> torch.Tensor:
        """Hidden states ``(B, n, C)`` of ``tokens (B, n)`` at the next positions: the
        model's blocks (``Block.forward`` in eval mode) with this decoder's attention."""
        model, p0, n = self.model, self.position, tokens.shape[1]
        positions = torch.arange(p0, p0 + n, device=tokens.device)
        x = model.embed(tokens)
        for block, cache in zip(model.blocks, self.caches, strict=True):
            q, k, v = block.attn.project(block.norm1(x), positions, self.total)  # (B, n, H, Dh)
            y = cache.prefill(q, k, v, p0) if prefill else cache.step(q, k, v, p0)
            x = x + block.attn.output(y)
            x = x + block.ffn(block.norm2(x))
        self.position += n
        return model.norm(x)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, chunk: int | None = None, all_logits=False):
        """Runs the prompt ``tokens (B, P)`` in chunks of ``chunk`` positions (None: at once),
        rounded up to a multiple of :func:`prefill_unit`. Returns the logits of the last
        position ``(B, vocab)``, or of every position ``(B, P, vocab)``."""
        if self.position:
            raise DecodeError(f"prefill starts a sequence; {self.position} tokens were fed")
        P = tokens.shape[1] if tokens.dim() == 2 else 0
        if P == 0:
            raise DecodeError(f"the prompt must hold at least one token, got {tuple(tokens.shape)}")
        self._check(tokens, P)
        if chunk is not None and (
            isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1
        ):
            raise DecodeError(f"chunk must be a positive integer or None, got {chunk!r}")
        size = P if chunk is None else _ceil(chunk, self.unit) * self.unit
        hidden = [self._run(piece, prefill=True) for piece in tokens.split(size, dim=1)]
        if not all_logits:
            return self.model.lm_head(hidden[-1][:, -1])
        return self.model.lm_head(torch.cat(hidden, 1))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence, ``tokens (B,)`` -> logits ``(B, vocab)`` at its position."""
        if self.position == 0:
            raise DecodeError("step needs a prefilled prompt first (Decoder.prefill)")
        tokens = tokens.reshape(-1, 1)  # (B, 1)
        self._check(tokens, 1)
        return self.model.lm_head(self._run(tokens, prefill=False)[:, 0])
