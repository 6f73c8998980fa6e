"""flash-attn's varlen kernels for the pieces of documents: no padding, one call per bucket.

On CUDA with flash-attn, a gathered call of ``documents.py`` (pieces padded up a ladder of
lengths) runs instead as flash-attn's variable-length attention: every (piece, head) is one
sequence of exactly its real rows, so a dilated (pair, offset) block of every document costs
what it holds, nothing for the ladder's padding. Heads are folded into the sequences (one head
per sequence): with dilation the heads of one piece keep different numbers of rows (head h
keeps rows ``h mod r + j*r``), which varlen's one-length-per-sequence cannot express otherwise.

The contracts, read from ``flash_attn/flash_attn_interface.py`` and ``csrc/flash_attn/
flash_api.cpp`` (``mha_varlen_fwd``/``mha_varlen_bwd``) at v2.5.0 .. v2.8.3 (stand-ins in
``tests/support/flash_varlen_standin.py``):

- q ``(total_q, h, d)``, k/v ``(total_k, h_k, d)``, last dim contiguous, fp16/bf16;
  ``cu_seqlens_q/k`` int32, contiguous, ``(b + 1,)``, on the device; ``b > 0``, grid
  ``(m_blocks, b, h)`` so ``b <= 65535``. Unchecked: ``cu_seqlens[-1] == total`` and
  ``max_seqlen >= every length`` (rows past ``max_seqlen_q`` are never computed).
- ``softmax_lse``: float32 ``(b, h, max_seqlen_q)`` padded (2.5.x) or ``(h, total_q)``
  unpadded (2.6.0+, ``unpadded_lse``); the backward reads it in the same layout, contiguous,
  unchecked.
- 2.5.9 and 2.6.0 declare ``block_table`` without a default (we pass None); 2.6.1+ add
  ``leftpad_k``, 2.6.3+ ``seqused_k`` (defaults None), 2.7.3+ ``zero_tensors`` (default
  False). Head dims: 2.5/2.6 pad to a multiple of 8 in C++, 2.7+ require it (we pad, as the
  non-varlen glue in ``backends.py`` does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.attention.backends import (
    MAX_CUDA_GROUPS,
    _flash_call,
    _head,
    _pad_head_dim,
    flash_attn_version,
    version_tuple,
)

# arguments varlen calls take beside the plain ones of backends._flash_call
_VARLEN_PLAIN = dict(block_table=None, leftpad_k=None, seqused_k=None, zero_tensors=False)


@dataclass(frozen=True)
class Packed:
    """Sequences of one varlen call: flat rows of the ``(B*N*H, D)`` views, sequence after
    sequence, and their cumulative lengths (int32, on the device)."""

    q: torch.Tensor  # (total_q,) int64
    kv: torch.Tensor  # (total_k,) int64
    cu_q: torch.Tensor  # (S + 1,) int32
    cu_k: torch.Tensor  # (S + 1,) int32
    max_q: int
    max_k: int
    causal: bool


def _sequences(rows: torch.Tensor, pad: int):
    # (G, M, H) -> (G*H, M): one (piece, head) per row, its pads after its real rows
    seqs = rows.transpose(1, 2).reshape(-1, rows.shape[1])
    real = seqs != pad
    return seqs, real, real.sum(1)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32).contiguous()


def pack(q_rows: torch.Tensor, kv_rows: torch.Tensor, pad: int, causal: bool) -> list[Packed]:
    """A gathered call (``q_rows (G, M, H)``, ``kv_rows (G, M_kv, H)``, ``pad`` after each
    piece's real rows) as varlen calls of at most ``MAX_CUDA_GROUPS`` sequences; (piece, head)
    pairs with no query rows are dropped (they would only add empty sequences)."""
    sq, rq, lq = _sequences(q_rows, pad)
    sk, rk, lk = _sequences(kv_rows, pad)
    keep = (lq > 0).nonzero().flatten()
    calls = []
    for i in keep.split(MAX_CUDA_GROUPS):
        calls.append(
            Packed(
                q=sq[i][rq[i]],
                kv=sk[i][rk[i]],
                cu_q=_cumulative(lq[i]),
                cu_k=_cumulative(lk[i]),
                max_q=int(lq[i].max()),
                max_k=int(lk[i].max()),
                causal=causal,
            )
        )
    return calls


def _padded_lse() -> bool:
    """flash-attn before 2.6.0 lays varlen LSE out as (b, h, max_seqlen_q)."""
    return version_tuple(flash_attn_version() or "0") < (2, 6, 0)


def _rows_of(pk: Packed):
    """(sequence, position in it) of each packed query row, both ``(total_q,)``."""
    lengths = pk.cu_q.diff().long()
    seq = torch.arange(len(lengths), device=lengths.device).repeat_interleave(lengths)
    return seq, torch.arange(len(seq), device=seq.device) - pk.cu_q.long()[seq]


def _lengths(pk: Packed) -> dict:
    return dict(
        cu_seqlens_q=pk.cu_q,
        cu_seqlens_k=pk.cu_k,
        max_seqlen_q=pk.max_q,
        max_seqlen_k=pk.max_k,
        causal=pk.causal,
    )


def varlen_forward(q, k, v, pk: Packed, scale: float):
    """``q (total_q, D)``, ``k, v (total_k, D)`` -> ``out (total_q, D)``, ``lse (total_q,)``
    float32."""
    from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

    D = q.shape[-1]
    qp, kp, vp = _pad_head_dim(q[:, None], k[:, None], v[:, None])  # (total, 1, Dp)
    res = _flash_call(
        _flash_attn_varlen_forward, q=qp, k=kp, v=vp, softmax_scale=scale,
        return_softmax=False, **_lengths(pk), **_VARLEN_PLAIN,
    )  # fmt: skip
    # 2.7+: (out, lse, S_dmask, rng_state); 2.5-2.6: (out, q, k, v, out_padded, lse, S, rng)
    out, lse = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])
    if _padded_lse():  # (S, 1, max_seqlen_q)
        seq, pos = _rows_of(pk)
        lse = lse[seq, 0, pos]
    else:  # (1, total_q)
        lse = lse[0]
    return _head(out, D)[:, 0], lse


def varlen_backward(dout, q, k, v, out, lse, pk: Packed, scale: float):
    """Gradients ``(dq, dk, dv)`` of packed rows for a softmax whose normaliser is ``lse
    (total_q,)`` (the mixed one) and output ``out (total_q, D)``."""
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

    D = q.shape[-1]
    doutp, qp, kp, vp, outp = _pad_head_dim(*(x[:, None] for x in (dout, q, k, v, out)))
    dq, dk, dv = (torch.empty_like(x) for x in (qp, kp, vp))
    lse = lse.float()
    if _padded_lse():
        seq, pos = _rows_of(pk)
        full = lse.new_full((len(pk.cu_q) - 1, 1, pk.max_q), float("inf"))
        full[seq, 0, pos] = lse
        lse = full
    else:
        lse = lse[None].contiguous()  # (1, total_q)
    _flash_call(
        _flash_attn_varlen_backward, dout=doutp, q=qp, k=kp, v=vp, out=outp, softmax_lse=lse,
        dq=dq, dk=dk, dv=dv, softmax_scale=scale, deterministic=False, rng_state=None,
        **_lengths(pk), **_VARLEN_PLAIN,
    )  # fmt: skip
    return tuple(_head(g, D)[:, 0] for g in (dq, dk, dv))
