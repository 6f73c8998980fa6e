"""Relative positions applied to q and k: RoPE (Su et al., 2021) and XPOS (Sun et al., 2022).

Both rotate each pair of channels ``(x[i], x[i + D/2])`` of a head by ``position * theta_i``,
so ``q_i . k_j`` depends on ``i - j`` only. XPOS also scales channel pair ``i`` of q by
``zeta_i ** (p / gamma)`` and of k by ``zeta_i ** (-p / gamma)`` (``zeta_i`` in (0.29, 1),
``gamma = xpos_scale_base``), so the product decays as ``zeta_i ** ((i - j) / gamma)``.

The trap. Written that way, the scale of position p is ``zeta ** (p / gamma)``: at p = 32K and
gamma = 512 the official implementation's k scale is 2.6e17, at 1M it is inf even in fp32.
Only the *product* needs to be finite, and the product depends on ``i - j`` only, so any
reference point ``a`` shared by q and k cancels: ``zeta ** ((i - a) / gamma)`` times
``zeta ** ((a - j) / gamma)``. We measure positions from the centre of an *anchor block* of
``anchor`` positions that every attended (query, key) pair shares. For dilated attention with
segment lengths that divide the largest (the paper's do), the largest segment is such a block,
so the scales stay bounded by ``zeta ** (w_max / 2 / gamma)`` at any sequence length: finite at
1M positions in fp32 and bf16. Attention that can reach any earlier key (dense, sparse,
sliding) takes the whole sequence as its block, which is finite up to about 70K tokens; past
that we refuse with a clear error rather than return inf.
"""

from __future__ import annotations

import math

import torch

# exp() overflows float32 (and bf16, same exponent range) just above 88; keep a margin
_MAX_LOG_SCALE = 80.0


def rotary_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """cos, sin ``(..., D/2)`` for ``positions (...)`` (``(N,)``, or ``(B, N)`` when rows
    differ: positions inside documents), in float64, so that angles at 1M positions keep their
    precision."""
    if head_dim % 2:
        raise ValueError(f"rotary positions need an even head dimension, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device)
    return angles.cos(), angles.sin()


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # bf16 -> fp32, fp64 stays


class _Rotate(torch.autograd.Function):
    """``x (B, N, H, D)`` -> ``(x1 c - x2 s, x1 s + x2 c)`` for the halves ``x1, x2`` of the
    last dimension and tables ``c, s (N, D/2)`` (cos and sin, times XPOS's scale when it
    applies), computed in ``_work_dtype(x)``. Four passes over x, and a backward that keeps only
    the tables: the map is linear in x, its transpose is ``(g1 c + g2 s, g2 c - g1 s)``."""

    @staticmethod
    def forward(ctx, x, c, s):
        ctx.save_for_backward(c, s)
        return _rotate_halves(x, c, s, sign=1.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        c, s = ctx.saved_tensors
        return _rotate_halves(grad, c, s, sign=-1.0), None, None


def _rotate_halves(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, sign: float):
    """Rotation by the tables' angles (``sign=1``) or its inverse (``sign=-1``), in x's dtype;
    arithmetic in ``_work_dtype(x)``."""
    dtype, h = _work_dtype(x), x.shape[-1] // 2
    # (N, D/2) -> (N, 1, D/2), or (B, N, D/2) -> (B, N, 1, D/2): broadcast over heads
    c, s = c.to(dtype).unsqueeze(-2), s.to(dtype).unsqueeze(-2)
    x1, x2 = x[..., :h].to(dtype), x[..., h:].to(dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    torch.mul(x1, c, out=out[..., :h]).addcmul_(x2, s, value=-sign)
    torch.mul(x2, c, out=out[..., h:]).addcmul_(x1, s, value=sign)
    return out.to(x.dtype)


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # x (B, N, H, D); c, s (N, D/2), float64 -> broadcast over batch and heads
    dtype = _work_dtype(x)
    return _Rotate.apply(x, c.to(dtype), s.to(dtype))


def apply_rope(q, k, positions, base: float = 10000.0):
    """RoPE on ``q, k (B, N, H, D)`` at integer ``positions (N,)``."""
    cos, sin = rotary_angles(positions, q.shape[-1], base)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def xpos_zeta(head_dim: int) -> torch.Tensor:
    """Per channel-pair decay base, in (0.29, 1): (2i + 0.4 D) / (1.4 D)."""
    return (torch.arange(0, head_dim, 2, dtype=torch.float64) + 0.4 * head_dim) / (1.4 * head_dim)


def anchor_offsets(positions: torch.Tensor, anchor: int | None, total=None):
    """``p - a(p)`` in float64: a(p) is the centre of p's anchor block (blocks of ``anchor``
    positions, the last one cut at the end of the sequence), or of the whole sequence.

    ``total``: the whole sequence is ``0 .. total - 1`` and ``positions`` may be a slice of it
    (context parallelism): every rank then finds the same centres. A tensor of ``positions``'
    shape: each position's own sequence length (positions inside packed documents, each
    anchored as the document alone is). None: ``positions`` is the whole sequence."""
    p = positions.to(torch.float64)
    if total is None:
        lo, hi = p.min(), p.max()
    elif isinstance(total, torch.Tensor):
        lo, hi = 0.0, total.to(torch.float64) - 1
    else:
        lo, hi = 0.0, float(total - 1)
    if anchor is None:
        return p - (lo + hi) / 2
    start = torch.div(positions, anchor, rounding_mode="floor").to(torch.float64) * anchor
    end = start + anchor - 1
    end = torch.minimum(end, hi) if isinstance(total, torch.Tensor) else torch.clamp(end, max=hi)
    return p - (torch.clamp(start, min=lo) + end) / 2


def xpos_max_log_scale(n_positions: int, head_dim: int, scale_base: float, anchor: int | None):
    """The largest ``|log scale|`` over ``n_positions`` consecutive positions, computed on the
    host: offsets from a block's centre are at most ``(min(anchor, n) - 1) / 2``, and the
    smallest zeta is ``0.4 / 1.4`` (channel pair 0)."""
    block = n_positions if anchor is None else min(anchor, n_positions)
    return max(block - 1, 0) / 2 / scale_base * -math.log(0.4 / 1.4)


class XposRangeError(ValueError):
    """XPOS scales that would overflow float32 at the requested length."""


def check_xpos_range(n_positions: int, head_dim: int, scale_base: float, anchor: int | None):
    """Raises ValueError when XPOS scales of ``n_positions`` consecutive positions would
    overflow float32. Pure host arithmetic: no device sync, safe under CUDA graphs."""
    worst = xpos_max_log_scale(n_positions, head_dim, scale_base, anchor)
    if worst > _MAX_LOG_SCALE:
        span = "the whole sequence" if anchor is None else f"anchor blocks of {anchor}"
        raise XposRangeError(
            f"XPOS scales reach exp({worst:.0f}) for {n_positions} positions measured from "
            f"the centre of {span} (xpos_scale_base={scale_base}): float32 overflows above "
            f"exp({_MAX_LOG_SCALE:.0f}). Use position='rope', a shorter sequence, a larger "
            "xpos_scale_base, or dilated attention whose segment lengths divide the largest"
        )


def xpos_log_scale(positions, head_dim: int, scale_base: float, anchor: int | None, total=None):
    """``log(zeta) * (p - a(p)) / gamma``, ``(N, D/2)`` float64, for consecutive integer
    ``positions (N,)`` (of a sequence of ``total``, default N); q is scaled by its exp, k by the
    exp of its negation. Raises if that would overflow float32 (checked on the host, without
    reading ``positions``)."""
    if isinstance(total, torch.Tensor):  # per-document lengths: none exceeds the row
        check_xpos_range(positions.shape[-1], head_dim, scale_base, anchor)
    else:
        check_xpos_range(total or positions.numel(), head_dim, scale_base, anchor)
    offsets = anchor_offsets(positions, anchor, total)
    return offsets[..., None] / scale_base * xpos_zeta(head_dim).log().to(positions.device)


def apply_xpos(q, k, positions, scale_base: float = 512.0, anchor: int | None = None, total=None):
    """XPOS on ``q, k (B, N, H, D)`` at consecutive integer ``positions (N,)`` (a slice of a
    sequence of ``total`` positions, default N); exact relative products for every (query, key)
    pair inside one anchor block (see the module docstring)."""
    D = q.shape[-1]
    cos, sin = rotary_angles(positions, D)
    log_scale = xpos_log_scale(positions, D, scale_base, anchor, total)
    up, down = log_scale.exp(), (-log_scale).exp()  # (N, D/2) float64: q's and k's scales
    return _rotate(q, cos * up, sin * up), _rotate(k, cos * down, sin * down)


def dilated_anchor(segment_lengths) -> int:
    """An anchor block for a dilated schedule: a multiple of every segment length, so every
    segment of every pair lies inside one block."""
    return math.lcm(*segment_lengths)
