"""XPOS and RoPE: relative, finite at 1M positions, and equal to the textbook formula."""

import math

import pytest
import torch

from models.positional import (
    anchor_offsets,
    apply_rope,
    apply_xpos,
    rotary_angles,
    xpos_log_scale,
    xpos_zeta,
)


def xpos_naive(x, positions, scale_base, sign, centre=0.0):
    """The definition in float64, positions measured from 0: rotate, then scale by
    zeta ** (sign * (p - centre) / gamma). Overflows for long sequences, which is the point."""
    x = x.double()
    D = x.shape[-1]
    theta = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = positions.double()[:, None] * theta
    x1, x2 = x.chunk(2, -1)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    rot = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)
    scale = xpos_zeta(D)[None, :] ** (sign * (positions.double()[:, None] - centre) / scale_base)
    return rot * scale.repeat(1, 2)[None, :, None]


def scores(q, k):
    return torch.einsum("bihd,bjhd->bhij", q.double(), k.double())


@pytest.mark.parametrize("anchor", [None, 16, 64])
def test_xpos_products_equal_the_definition(anchor):
    """Inside one anchor block, anchored XPOS gives the textbook q.k exactly."""
    gen = torch.Generator().manual_seed(0)
    n = 64
    q, k = (torch.randn(1, n, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    pos = torch.arange(n)
    qa, ka = apply_xpos(q, k, pos, scale_base=32.0, anchor=anchor)
    want = scores(xpos_naive(q, pos, 32.0, +1), xpos_naive(k, pos, 32.0, -1))
    got = scores(qa, ka)
    block = pos // (anchor or n)
    same = block[:, None] == block[None, :]
    torch.testing.assert_close(got[..., same], want[..., same], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["xpos", "rope"])
def test_rotation_gradients_equal_autograd_of_the_definition(kind):
    """The rotation's hand-written backward (it keeps only its tables) against autograd
    through the textbook formula, float64; and q, k of a non-contiguous view, as the model
    passes them."""
    gen = torch.Generator().manual_seed(2)
    n, pos = 40, torch.arange(40)
    qkv = torch.randn(1, n, 3, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    g_q, g_k = (torch.randn(1, n, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    q, k, _ = qkv.unbind(2)
    if kind == "xpos":
        qa, ka = apply_xpos(q, k, pos, scale_base=32.0, anchor=None)
        centre = (n - 1) / 2  # no anchor: the whole sequence's centre
        qw, kw = xpos_naive(q, pos, 32.0, +1, centre), xpos_naive(k, pos, 32.0, -1, centre)
    else:
        qa, ka = apply_rope(q, k, pos)
        qw, kw = xpos_naive(q, pos, math.inf, 1), xpos_naive(k, pos, math.inf, 1)
    torch.testing.assert_close(qa, qw, atol=1e-12, rtol=1e-12)
    got = torch.autograd.grad(((qa * g_q).sum() + (ka * g_k).sum()), qkv)[0]
    want = torch.autograd.grad(((qw * g_q).sum() + (kw * g_k).sum()), qkv)[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda x: apply_rope(x, x, pos[:6])[0],
                                    torch.randn(1, 6, 1, 4, dtype=torch.float64,
                                                requires_grad=True))  # fmt: skip


def test_rope_products_are_relative():
    gen = torch.Generator().manual_seed(1)
    qv, kv = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    pos = torch.tensor([3, 10, 1003, 1010])
    q = qv.expand(1, 4, 1, 8)
    k = kv.expand(1, 4, 1, 8)
    qr, kr = apply_rope(q, k, pos)
    s = scores(qr, kr)[0, 0]
    assert s[1, 0].item() == pytest.approx(s[3, 2].item(), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xpos_is_finite_and_relative_near_one_million(dtype):
    """A 1M-token sequence with the paper's anchor (its largest segment): every scale finite,
    and q_i . k_j depends only on i - j for pairs that share an anchor block."""
    n, D, anchor = 1 << 20, 16, 32768
    pos = torch.arange(n)
    log_scale = xpos_log_scale(pos, D, 512.0, anchor)
    assert torch.isfinite(log_scale.exp().to(dtype)).all()
    assert torch.isfinite((-log_scale).exp().to(dtype)).all()
    assert (log_scale.exp().to(dtype) > 0).all()

    gen = torch.Generator().manual_seed(2)
    qv, kv = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
    # the same q and k vectors at two pairs of positions with equal distance 300,
    # near 1M and 64K earlier; each pair inside one anchor block
    picks = torch.tensor([n - 400, n - 100, n - 400 - 65536, n - 100 - 65536])
    blocks = (picks // anchor).tolist()
    assert blocks[0] == blocks[1] and blocks[2] == blocks[3]
    x = torch.zeros(1, n, 1, D, dtype=dtype)
    qs, ks = x.clone(), x.clone()
    qs[0, picks, 0] = qv.to(dtype)
    ks[0, picks, 0] = kv.to(dtype)
    qx, kx = apply_xpos(qs, ks, pos, 512.0, anchor)
    near = (qx[0, picks[1], 0].double() * kx[0, picks[0], 0].double()).sum()
    far = (qx[0, picks[3], 0].double() * kx[0, picks[2], 0].double()).sum()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert near.item() == pytest.approx(far.item(), abs=tol * (1 + abs(far.item())))
    # and equal to the definition at small positions (no overflow there)
    small = torch.tensor([0, 300])
    qd = xpos_naive(qv.view(1, 1, 1, D).expand(1, 2, 1, D), small, 512.0, +1)
    kd = xpos_naive(kv.view(1, 1, 1, D).expand(1, 2, 1, D), small, 512.0, -1)
    assert near.item() == pytest.approx((qd[0, 1, 0] * kd[0, 0, 0]).sum().item(), abs=tol)


def test_unanchored_scale_would_overflow():
    """The official formulation (no shared anchor) overflows float32 at 1M positions."""
    zeta_min = xpos_zeta(64).min().item()
    assert math.isinf(torch.tensor(zeta_min, dtype=torch.float32).pow(-(1 << 19) / 512).item())


def test_xpos_refuses_to_overflow():
    with pytest.raises(ValueError, match="XPOS scales reach"):
        xpos_log_scale(torch.arange(200_000), 64, 512.0, anchor=None)


def test_anchor_offsets_center_each_block():
    off = anchor_offsets(torch.arange(10), 4)
    # blocks [0..3], [4..7], [8..9] -> centres 1.5, 5.5, 8.5
    assert off.tolist() == [-1.5, -0.5, 0.5, 1.5, -1.5, -0.5, 0.5, 1.5, -0.5, 0.5]


def test_rotary_needs_even_dim():
    with pytest.raises(ValueError, match="even head dimension"):
        rotary_angles(torch.arange(3), 7)
