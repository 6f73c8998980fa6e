"""The union-softmax engine of ``mixing.py`` over gathered pieces: attention per document.

``mixing.py`` runs blocks that are strided views of q, k, v; the pieces of documents
(``documents.py``) start anywhere, so here every kernel call gathers its rows by index: ``(G, M,
H)`` flat rows ``position * H + head`` of the ``(B*N*H, D)`` view, the pad ``B*N*H`` after each
piece's last row. The kernels, the online merge of calls into one float32 accumulator and the
exact hand-written backward (each call's kernel backward run with the *mixed* output and
log-sum-exp) are mixing.py's; what is new is where rows come from and go to:

- gathers read the pad as row 0 (any real row): a padded query's output is discarded and a
  padded key is only ever seen by padded queries (pads come after a piece's real rows, and only
  causal calls pad their keys);
- results go to accumulators with one extra row, the pad's, dropped at the end;
- in the backward the pad's log-sum-exp is ``+inf``: its probabilities are 0, so it adds
  nothing to any gradient, whatever was gathered for it.

With flash-attn (CUDA, fp16/bf16) an unmasked call skips the padding altogether: its real rows
run as flash-attn's varlen kernels, one sequence per (piece, head) (``flash_varlen.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from models.attention import flash_varlen
from models.attention.backends import MAX_CUDA_GROUPS, attention_backward, attention_forward
from models.attention.mixing import CHUNK_ROWS, CPU_CHUNK_ROWS, _acc_dtype, _additive


@dataclass(frozen=True)
class VarlenCall:
    """One kernel call: queries at rows ``q (G, M, H)`` attend keys and values at rows
    ``kv (G, M_kv, H)`` (causal, or under ``mask``: bool ``(M, M_kv)``, True where allowed,
    shared by every piece). ``first``: the calls of a pattern's first part, disjoint, whose
    results are copied rather than merged."""

    q: torch.Tensor
    kv: torch.Tensor
    causal: bool
    mask: torch.Tensor | None = None
    first: bool = False

    def pieces(self, rows: int) -> list[VarlenCall]:
        """This call in pieces of at most ``rows`` query rows (whole groups)."""
        G, M, H = self.q.shape
        per = min(MAX_CUDA_GROUPS, max(1, rows // (M * H)))
        if G <= per:
            return [self]
        return [
            replace(self, q=self.q[g : g + per], kv=self.kv[g : g + per]) for g in range(0, G, per)
        ]

    def packed(self, pad: int) -> list[flash_varlen.Packed]:
        """This call as flash-attn varlen calls (real rows only), made once per call: the
        plan's calls are shared by the layers. Kept in the instance's ``__dict__``, as
        ``functools.cached_property`` does on a frozen dataclass."""
        if "_packed" not in self.__dict__:
            self.__dict__["_packed"] = flash_varlen.pack(self.q, self.kv, pad, self.causal)
        return self.__dict__["_packed"]


@dataclass(frozen=True)
class VarlenPlan:
    """Union-softmax attention of ``q, k, v (B, N, H, D)`` over gathered ``calls``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    calls: tuple[VarlenCall, ...]
    scale: float
    backend: str

    def varlen(self, call: VarlenCall) -> bool:
        """Whether ``call`` runs through flash-attn's varlen kernels (which take no mask)."""
        return self.backend == "flash" and call.mask is None

    def runs(self) -> list[VarlenCall]:
        """The calls, those of the padded path in pieces of bounded rows."""
        rows = CPU_CHUNK_ROWS if self.q.device.type == "cpu" else CHUNK_ROWS
        return [
            piece
            for call in self.calls
            for piece in ([call] if self.varlen(call) else call.pieces(rows))
        ]

    def with_tensors(self, q, k, v) -> VarlenPlan:
        return replace(self, q=q, k=k, v=v)


def _rows(x: torch.Tensor) -> torch.Tensor:
    # (B, N, H, D) -> (B*N*H, D), a view when x is contiguous
    return x.reshape(-1, x.shape[-1])


def _gather(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``rows (R, D)`` at ``idx (G, M, H)`` -> ``(G, M, H, D)``; the pad ``R`` reads row 0."""
    return rows[idx.masked_fill(idx == rows.shape[0], 0)]


def _kernel_args(p: VarlenPlan, call: VarlenCall) -> dict:
    mask = _additive(call.mask, p.q.dtype)
    return dict(causal=call.causal, scale=p.scale, mask=mask, backend=p.backend)


def _forward_parts(p: VarlenPlan, call: VarlenCall, q, k, v):
    """``(at (T,), out (T, D), lse (T,))`` of one call: flat rows and their results."""
    if p.varlen(call):  # flash-attn varlen: real rows only
        for pk in call.packed(q.shape[0]):
            out, l_blk = flash_varlen.varlen_forward(q[pk.q], k[pk.kv], v[pk.kv], pk, p.scale)
            yield pk.q, out, l_blk
        return
    views = _gather(q, call.q), _gather(k, call.kv), _gather(v, call.kv)
    out, l_blk = attention_forward(*views, **_kernel_args(p, call))
    yield call.q.flatten(), out.reshape(-1, q.shape[-1]), l_blk.flatten()


def _backward_parts(p: VarlenPlan, call: VarlenCall, dout, q, k, v, out, lse_rows):
    """``[(q_at, dq), (kv_at, dk), (kv_at, dv)]`` per kernel call of ``call``."""
    if p.varlen(call):
        for pk in call.packed(q.shape[0]):
            views = dout[pk.q], q[pk.q], k[pk.kv], v[pk.kv], out[pk.q], lse_rows[pk.q]
            parts = flash_varlen.varlen_backward(*views, pk, p.scale)
            yield zip((pk.q, pk.kv, pk.kv), parts, strict=True)
        return
    views = [_gather(dout, call.q), _gather(q, call.q), _gather(k, call.kv)]
    views += [_gather(v, call.kv), _gather(out, call.q), lse_rows[call.q]]
    parts = attention_backward(*views, **_kernel_args(p, call))
    D = q.shape[-1]
    yield zip((call.q.flatten(), call.kv.flatten(), call.kv.flatten()),
              (part.reshape(-1, D) for part in parts), strict=True)  # fmt: skip


def varlen_forward(p: VarlenPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixed output ``(B, N, H, D)`` in q's dtype and log-sum-exp ``(B, N, H)`` in the
    accumulation dtype; a (position, head) no call covers gets 0 and ``-inf``."""
    B, N, H, D = p.q.shape
    acc = _acc_dtype(p.q.dtype)
    o = torch.zeros(B * N * H + 1, D, dtype=acc, device=p.q.device)  # + the pad's row
    lse = torch.full((B * N * H + 1,), float("-inf"), dtype=acc, device=p.q.device)
    q, k, v = _rows(p.q), _rows(p.k), _rows(p.v)
    for call in p.runs():
        for at, out, l_blk in _forward_parts(p, call, q, k, v):
            out, l_blk = out.to(acc), l_blk.to(acc)
            if call.first:
                o[at], lse[at] = out, l_blk
                continue
            old = lse[at]
            new = torch.logaddexp(old, l_blk)
            o[at] = o[at] * torch.exp(old - new)[:, None] + out * torch.exp(l_blk - new)[:, None]
            lse[at] = new
    return o[:-1].view(B, N, H, D).to(p.q.dtype), lse[:-1].view(B, N, H)


def varlen_backward(p: VarlenPlan, dout, out, lse):
    """``(dq, dk, dv)`` in the inputs' dtypes: each call's kernel backward with the mixed
    ``out`` and ``lse``, added into float32 accumulators through the same indices."""
    B, N, H, D = p.q.shape
    acc = lse.dtype
    grads = [torch.zeros(B * N * H + 1, D, dtype=acc, device=p.q.device) for _ in range(3)]
    lse_rows = torch.cat([lse.reshape(-1), lse.new_full((1,), float("inf"))])  # pad: +inf
    q, k, v, dout, out = (_rows(x) for x in (p.q, p.k, p.v, dout.contiguous(), out))
    for call in p.runs():
        for parts in _backward_parts(p, call, dout, q, k, v, out, lse_rows):
            for g, (at, part) in zip(grads, parts, strict=True):
                g.index_add_(0, at, part.to(acc))
    return tuple(
        g[:-1].view(B, N, H, D).to(x.dtype) for g, x in zip(grads, (p.q, p.k, p.v), strict=True)
    )


class _VarlenFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: VarlenPlan, q, k, v):
        p = p.with_tensors(q, k, v)
        out, lse = varlen_forward(p)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = p.with_tensors(None, None, None)  # tensors live in saved_tensors
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return None, *varlen_backward(ctx.plan.with_tensors(q, k, v), dout, out, lse)


def varlen_attention(p: VarlenPlan) -> torch.Tensor:
    """Runs a :class:`VarlenPlan`, with the exact backward when an input needs a gradient."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (p.q, p.k, p.v)):
        return _VarlenFn.apply(p, p.q, p.k, p.v)
    return varlen_forward(p)[0]


def varlen_plan(q, k, v, calls, *, scale: float, backend: str) -> VarlenPlan:
    """A plan over contiguous copies of q, k, v where they are not already contiguous."""
    return VarlenPlan(q.contiguous(), k.contiguous(), v.contiguous(), tuple(calls), scale, backend)
