"""Documents on flash-attn's varlen kernels, against their contracts, on this CPU.

The pieces of documents run as varlen sequences (models/attention/flash_varlen.py) through
stand-ins of every varlen interface generation, 2.5.0 to 2.8.3
(tests/support/flash_varlen_standin.py: signatures, C++ checks, LSE layouts, float32 numbers per
sequence), and must give what the same plan gives on plain matmuls (the slow twin), forward,
log-sum-exp and backward.
"""

import dataclasses

import pytest
import torch

from models.attention import flash_varlen
from models.attention.dilated import dilated_document_plan
from models.attention.documents import Documents
from models.attention.sliding import chunked_document_plan
from models.attention.sparse import sparse_document_plan
from models.attention.varlen import varlen_backward, varlen_forward
from tests.support import flash_varlen_standin
from tests.support.cuda_contract import ContractViolation

ROWS = [[1, 3, 37, 23], [20, 1, 5, 2, 36]]  # tests/test_documents.py's rows, N = 64
N = 64


def documents():
    ends = [b * N + e for b, lengths in enumerate(ROWS) for e in torch.tensor(lengths).cumsum(0)]
    return Documents.of(torch.tensor([0, *ends]), len(ROWS), N, torch.device("cpu"))


PLANS = {
    "dilated": lambda q, k, v, d, b: dilated_document_plan(
        q, k, v, [4, 8, 16], [1, 2, 4], d, backend=b
    ),  # fmt: skip
    "dilated_w_not_divisible_by_r": lambda q, k, v, d, b: dilated_document_plan(
        q, k, v, [5, 12, 30], [1, 3, 4], d, backend=b
    ),
    "sliding": lambda q, k, v, d, b: chunked_document_plan(q, k, v, 6, d, sliding=True, backend=b),
    "blockwise": lambda q, k, v, d, b: chunked_document_plan(
        q, k, v, 8, d, sliding=False, backend=b
    ),  # fmt: skip
    "sparse": lambda q, k, v, d, b: sparse_document_plan(q, k, v, 8, 2, d, backend=b),
    "dense": lambda q, k, v, d, b: chunked_document_plan(
        q, k, v, None, d, sliding=False, backend=b
    ),  # fmt: skip
}


def tensors(head_dim=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, N, 4, head_dim, generator=gen).bfloat16() for _ in range(4)]


def run(plan, dout):
    out, lse = varlen_forward(plan)
    return out, lse, varlen_backward(plan, dout, out, lse)


def assert_same(flash, reference):
    (out, lse, grads), (out_r, lse_r, grads_r) = flash, reference
    torch.testing.assert_close(out.float(), out_r.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(lse, lse_r, atol=1e-3, rtol=0)
    for g, r in zip(grads, grads_r, strict=True):
        torch.testing.assert_close(g.float(), r.float(), atol=5e-2, rtol=0)


@pytest.mark.parametrize("pattern", list(PLANS))
@pytest.mark.parametrize("version", flash_varlen_standin.VERSIONS)
def test_varlen_glue_gives_the_document_numbers(version, pattern):
    """Every pattern's unmasked calls go to the varlen entry points (none to the padded
    ``_flash_attn_forward``), and the result equals plain matmuls on the padded pieces."""
    q, k, v, dout = tensors()
    reference = PLANS[pattern](q, k, v, documents(), "math")
    expected = run(reference, dout)
    with flash_varlen_standin.installed(version) as dev:
        got = run(dataclasses.replace(reference, backend="flash"), dout)
    assert_same(got, expected)
    assert dev.varlen_calls and dev.padded_calls == []


def test_a_call_packs_its_real_rows_only():
    """One sequence per (piece, head) with its kept rows, in order; no ladder padding."""
    q = torch.zeros(2, N, 4, 8)
    plan = dilated_document_plan(q, q, q, [4, 8, 16], [1, 2, 4], documents(), backend="math")
    pad = 2 * N * 4
    for call in plan.calls:
        (pk,) = call.packed(pad)
        real = call.q[call.q != pad]
        assert len(pk.q) == len(real)
        assert sorted(pk.q.tolist()) == sorted(real.tolist())
        lengths = pk.cu_q.diff()
        assert pk.cu_q.dtype == torch.int32 and (lengths > 0).all()
        assert pk.max_q == int(lengths.max()) and torch.equal(pk.q, pk.kv)
        for s in range(len(lengths)):  # a sequence: one head's rows of one piece, rising by r
            rows = pk.q[int(pk.cu_q[s]) : int(pk.cu_q[s + 1])]
            assert len(set((rows % 4).tolist())) == 1 and bool((rows.diff() > 0).all())
    padded = sum(c.q.numel() for c in plan.calls)
    packed = sum(len(c.packed(pad)[0].q) for c in plan.calls)
    assert packed < padded  # what the ladder padded, varlen does not compute


def test_calls_split_under_the_grid_limit(monkeypatch):
    """At most MAX_CUDA_GROUPS sequences per varlen call (flash-attn's gridDim.y): a small
    limit here splits the calls, with the same numbers."""
    q, k, v, dout = tensors(head_dim=16, seed=1)
    reference = PLANS["dilated"](q, k, v, documents(), "math")
    expected = run(reference, dout)
    monkeypatch.setattr(flash_varlen, "MAX_CUDA_GROUPS", 5)
    with flash_varlen_standin.installed("2.8.3") as dev:
        got = run(dataclasses.replace(reference, backend="flash"), dout)
    assert_same(got, expected)
    assert max(dev.varlen_calls) <= 5 and len(dev.varlen_calls) > len(reference.calls)


@pytest.mark.parametrize("version", ["2.5.0", "2.6.3"])
def test_the_standin_rejects_a_wrong_lse_layout_and_int64_lengths(version):
    """The stand-ins bite: the other generation's LSE layout, or int64 cu_seqlens."""
    q = torch.randn(10, 1, 8).bfloat16()
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6, max_seqlen_k=6, dropout_p=0.0,
              softmax_scale=0.3, causal=True, window_size=(-1, -1), alibi_slopes=None)  # fmt: skip
    kw = {**kw, "softcap": 0.0} if version >= "2.6" else kw
    with flash_varlen_standin.installed(version):
        from flash_attn.flash_attn_interface import (
            _flash_attn_varlen_backward,
            _flash_attn_varlen_forward,
        )

        with pytest.raises(ContractViolation, match="int32"):
            _flash_attn_varlen_forward(q, q, q, **{**kw, "cu_seqlens_q": cu.long()},
                                       return_softmax=False)  # fmt: skip
        out, *_, lse, _, _ = _flash_attn_varlen_forward(q, q, q, **kw, return_softmax=False)
        wrong = lse.new_zeros(1, 10) if lse.dim() == 3 else lse.new_zeros(2, 1, 6)
        grads = [torch.empty_like(q) for _ in range(3)]
        with pytest.raises(ContractViolation, match="softmax_lse is read as"):
            _flash_attn_varlen_backward(q, q, q, q, out, wrong, *grads, **kw,
                                        deterministic=False)  # fmt: skip
