"""What each rank runs in the context-parallel attention tests: the distributed result on its
slice against the single-process result on the whole sequence (forward 1e-5, gradients 1e-4)."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from models.attention.dilated import dilated_attention

FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def slice_of(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    length = x.shape[1] // world
    return x[:, rank * length : (rank + 1) * length]


def compare_case(rank, world, case) -> None:
    name, (B, N, H, D, segs, rates, causal) = case
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # the same on every rank
    q, k, v, grad = (torch.randn(B, N, H, D, generator=gen) for _ in range(4))
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = dilated_attention(*full, segs, rates, causal=causal)
    (ref * grad).sum().backward()
    mine = [slice_of(x, rank, world).clone().requires_grad_() for x in (q, k, v)]
    out = dilated_attention(*mine, segs, rates, causal=causal, group=dist.group.WORLD)
    (out * slice_of(grad, rank, world)).sum().backward()
    where = f"{name} (rank {rank} of {world})"
    torch.testing.assert_close(out, slice_of(ref, rank, world), atol=FWD_TOL, rtol=0,
                               msg=lambda m: f"{where} output: {m}")  # fmt: skip
    for label, leaf, whole in zip("qkv", mine, full, strict=True):
        want = slice_of(whole.grad, rank, world)
        torch.testing.assert_close(leaf.grad, want, atol=GRAD_TOL, rtol=0,
                                   msg=lambda m, n=label: f"{where} grad {n}: {m}")  # fmt: skip


def compare_cases(rank, world, cases) -> None:
    for case in cases:
        compare_case(rank, world, case)


def expect_errors(rank, world, cases) -> None:
    """Every rank raises the same ValueError (nobody waits on a collective)."""
    import re

    for name, (*shapes, segs, rates, message) in cases:
        q = torch.randn(*shapes[rank])
        try:
            dilated_attention(q, q, q, segs, rates, group=dist.group.WORLD)
        except ValueError as err:
            assert re.search(message, str(err)), f"{name}: {err}"
        else:
            raise AssertionError(f"{name}: rank {rank} did not raise")
    dist.barrier()  # every rank got here: nobody hung


def compare_model(rank, world, position) -> None:
    """A LongNet on a sequence split across ranks: logits equal the single-process slice, and
    parameter gradients summed over ranks equal the single-process ones (XPOS/RoPE at global
    positions, anchors shared across ranks)."""
    from models.transformer import ModelConfig, TransformerLM

    sizes = dict(vocab_size=50, d_model=32, n_layer=2, n_head=4, d_ff=64)
    cfg = ModelConfig(**sizes, segment_lengths=[8, 32, 64], dilation_rates=[1, 2, 4],
                      position=position)  # fmt: skip
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    tokens = torch.randint(0, 50, (2, 64), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    full.square().mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    mine = model(slice_of(tokens, rank, world), group=dist.group.WORLD)
    (mine.square().sum() / full.numel()).backward()
    torch.testing.assert_close(mine, slice_of(full, rank, world), atol=FWD_TOL, rtol=0)
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad)
        torch.testing.assert_close(p.grad, want[name], atol=GRAD_TOL, rtol=1e-4,
                                   msg=lambda m, n=name: f"{position} grad {n}: {m}")  # fmt: skip
