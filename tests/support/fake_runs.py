"""Runs an attention pattern's forward and backward on fake CUDA tensors, under the contract.

Autograd cannot run on fake CUDA tensors in a CPU-only build (its engine asks for a CUDA
device guard), so the forward and backward that ``mixing._MixedAttentionFn`` would run are
called directly: ``mixed_forward`` then ``mixed_backward``, the same functions.
"""

from __future__ import annotations

import torch

from models.attention.dilated import check_coverage, dilated_plan, validate_schedule
from models.attention.mixing import mixed_backward, mixed_forward
from models.attention.sliding import chunked_plan
from models.attention.sparse import sparse_plan
from tests.support.cuda_contract import fake_cuda

# pattern name -> builder of its plan on (q, k, v); small, with lengths no kernel likes
PATTERNS = {
    "dilated": lambda q, k, v, backend: dilated_plan(
        q, k, v, [12, 36, 100], [1, 3, 6], causal=True, backend=backend
    ),
    "dilated_bidirectional": lambda q, k, v, backend: dilated_plan(
        q, k, v, [16, 40], [1, 4], causal=False, backend=backend
    ),
    "sparse": lambda q, k, v, backend: sparse_plan(q, k, v, 12, 4, backend=backend),
    "sliding": lambda q, k, v, backend: chunked_plan(q, k, v, 12, sliding=True, backend=backend),
    "blockwise": lambda q, k, v, backend: chunked_plan(q, k, v, 20, sliding=False, backend=backend),
}
# not in the matrix: a window of 2 over a long sequence (many groups per call)
EXTRA = {
    "blockwise_2": lambda q, k, v, backend: chunked_plan(q, k, v, 2, sliding=False, backend=backend)
}
SHAPE = (2, 70, 6)  # B, N, H: N a multiple of none of the lengths above


def prime_caches(B: int, N: int, H: int) -> None:
    """Coverage checks compute on (CPU) tensors and are cached: run them before fake mode."""
    for segs, rates in (([12, 36, 100], [1, 3, 6]), ([16, 40], [1, 4])):
        check_coverage(validate_schedule(segs, rates), H, N)


def fake_forward_backward(pattern: str, dtype, head_dim: int, backend="auto", shape=SHAPE):
    """Returns (contract, out, grads) of one fake CUDA forward + backward."""
    B, N, H = shape
    prime_caches(B, N, H)
    with fake_cuda() as contract:
        q, k, v = (torch.randn(B, N, H, head_dim, device="cuda", dtype=dtype) for _ in range(3))
        plan = {**PATTERNS, **EXTRA}[pattern](q, k, v, backend)
        out, lse = mixed_forward(plan)
        dq, dkv = mixed_backward(plan, torch.randn_like(out), out, lse)
        grads = (dq, *dkv[0])
        return contract, plan, out, grads
