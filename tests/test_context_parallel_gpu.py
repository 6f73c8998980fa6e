"""Context parallelism on NCCL, one GPU per rank (``make gpu-check`` runs this file when more
than one GPU is visible; skipped otherwise): the exactness cases of the gloo tests in float32
and bf16, causal ones included, in both layouts, so every exchange has ranks that send or
receive nothing (and, the point-to-point exchange posting no message for them, no zero-sized
message exists: what NCCL is spared, distributed._send_recv says why)."""

import functools

import pytest
import torch
import torch.distributed as dist

from models.attention import distributed
from models.attention.dilated import dilated_attention
from tests.support.context_parallel_cases import slice_of
from tests.support.distributed import spawn
from tests.test_context_parallel_attention import CASES_2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]
# the split result against the same GPU's single-process result, in the same dtype: they
# differ only by the order in which the online softmax merges the sources
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def nccl_cases(rank, world, dtype_name) -> None:
    for layout in distributed.LAYOUTS:
        with distributed.using_layout(dist.group.WORLD, layout):
            nccl_layout_cases(rank, world, dtype_name, layout)


def nccl_layout_cases(rank, world, dtype_name, layout) -> None:
    dtype = getattr(torch, dtype_name)
    dev = torch.device("cuda", rank)
    for name, (B, N, H, D, segs, rates, causal) in CASES_2.items():
        gen = torch.Generator().manual_seed(len(name))  # the same on every rank
        q, k, v, grad = (torch.randn(B, N, H, D, generator=gen).to(dev, dtype) for _ in range(4))
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = dilated_attention(*full, segs, rates, causal=causal)
        (ref.float() * grad.float()).sum().backward()
        part = functools.partial(slice_of, rank=rank, world=world, layout=layout)
        mine = [part(x).detach().clone().requires_grad_() for x in (q, k, v)]
        out = dilated_attention(*mine, segs, rates, causal=causal, group=dist.group.WORLD)
        (out.float() * part(grad).float()).sum().backward()
        tol, where = TOL[dtype], f"{name} {layout} {dtype_name} rank {rank}"
        pairs = [("output", out, part(ref))]
        pairs += [
            (f"d{x}", a.grad, part(b.grad)) for x, a, b in zip("qkv", mine, full, strict=True)
        ]
        for label, got, want in pairs:
            torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol,
                                       msg=lambda m, x=f"{where} {label}": f"{x}: {m}")  # fmt: skip
    dist.barrier()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slices_equal_the_whole_sequence_on_nccl(dtype):
    spawn(nccl_cases, 2, dtype, timeout=300, backend="nccl")
