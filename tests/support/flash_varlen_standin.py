"""Stand-ins for flash-attn's varlen entry points, beside those of flash_attn_standin.py.

Transcribed from github.com/Dao-AILab/flash-attention at the tags named:
``flash_attn/flash_attn_interface.py`` (``_flash_attn_varlen_forward/_backward``: signatures,
defaults, return tuples, custom-op registration) and ``csrc/flash_attn/flash_api.cpp``
(``mha_varlen_fwd``/``mha_varlen_bwd``: every TORCH_CHECK on what we pass, and the LSE layout).

- v2.5.0: plain functions, ``window_size`` a pair; forward returns 8 values ``(out, q, k, v,
  out_padded, lse, S, rng)`` with ``softmax_lse`` float32 ``(b, h, max_seqlen_q)`` (padded);
- v2.5.9.post1: + ``block_table`` after ``return_softmax``, without a default;
- v2.6.0: + ``softcap`` after ``window_size``; LSE now ``(h, total_q)`` (``unpadded_lse``),
  which the backward reads in that layout; ``block_table`` still without a default;
- v2.6.3: defaults from ``window_size`` on, + ``leftpad_k`` (2.6.1), ``seqused_k``;
- v2.7.0 .. v2.7.2: ``torch.library`` custom ops, ``window_size_left/right``; forward returns
  ``(out, lse, S_dmask, rng_state)``; backward writes dq/dk/dv and returns ``softmax_d``;
  C++ requires head_dim % 8 == 0 in the forward too;
- v2.7.3 .. v2.8.3: + ``zero_tensors=False`` on both.

Every version: cu_seqlens int32, contiguous, ``(b + 1,)``; q ``(total_q, h, d)``; ``b > 0``;
grid ``(m_blocks, b, h)``. Unchecked upstream but asserted here, since the kernels silently
compute garbage otherwise: ``cu_seqlens[-1]`` equals the rows given, every length is at most
``max_seqlen``, the backward's LSE has the forward's layout, contiguous.

Numbers: plain float32 attention per sequence (flash_attn_standin's), on CPU tensors. Custom ops
of the two 2.7+ schemas are registered once per process, under two namespaces (the glue reads
only the schema's argument names).
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import torch

from tests.support import flash_attn_standin as base
from tests.support.cuda_contract import require

NAN = float("nan")


def _check_cu(name, cu, b, total, max_seqlen, dev):
    require(cu.dtype == torch.int32, f"{name} must have dtype int32")
    require(cu.is_contiguous(), f"{name} must be contiguous")
    require(cu.is_cuda or dev.allow_cpu, f"{name} must be on CUDA")
    require(tuple(cu.shape) == (b + 1,), f"CHECK_SHAPE({name}, batch_size + 1)")
    lengths = cu.diff()
    require(int(cu[0]) == 0 and bool((lengths >= 0).all()), f"{name} must rise from 0")
    require(int(cu[-1]) == total, f"{name}[-1] = {int(cu[-1])}, but {total} rows were given")
    require(int(lengths.max()) <= max_seqlen, f"a sequence is longer than max_seqlen={max_seqlen}")


def mha_varlen_fwd(dev, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softcap, return_softmax):
    """flash_api.cpp mha_varlen_fwd's checks."""
    base._check_common(dev, {"q": q, "k": k, "v": v}, q)
    total_q, h, d = q.shape
    b = cu_q.numel() - 1
    require(b > 0, "batch size must be positive")
    require(d <= 256, "FlashAttention forward only supports head dimension at most 256")
    if dev.release >= (2, 7, 0):
        require(
            d % 8 == 0, "query, key, value, and out_ must have a head_size that is a multiple of 8"
        )
    hk = k.shape[1]
    require(h % hk == 0, "Number of heads in key/value must divide number of heads in query")
    require(k.dim() == 3 and tuple(k.shape[1:]) == (hk, d), "CHECK_SHAPE(k, total_k, h_k, d)")
    require(k.shape == v.shape, "CHECK_SHAPE(v, total_k, h_k, d)")
    _check_cu("cu_seqlens_q", cu_q, b, total_q, max_q, dev)
    _check_cu("cu_seqlens_k", cu_k, b, k.shape[0], max_k, dev)
    require(not return_softmax or dropout_p > 0, "return_softmax requires dropout")
    require(softcap == 0.0 or dropout_p == 0.0, "Softcapping does not support dropout for now")
    require(b <= 65535 and h <= 65535, f"grid (m_blocks, b={b}, h={h}) above 65535")


def _lse_shape(dev, b, h, total_q, max_q):
    return (b, h, max_q) if dev.release < (2, 6, 0) else (h, total_q)


def mha_varlen_bwd(dev, dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k):
    """flash_api.cpp mha_varlen_bwd's checks, and the LSE layout its kernel reads unchecked."""
    base._check_common(dev, {"q": q, "k": k, "v": v, "out": out, "dout": dout}, q)
    total_q, h, d = q.shape
    b = cu_q.numel() - 1
    require(b > 0, "batch size must be positive")
    require(d % 8 == 0, "head_size should be a multiple of 8")
    require(d <= 256, "FlashAttention backward only supports head dimension at most 256")
    og = dout.shape[2]
    if dev.release < (2, 7, 0):
        require(d == -(-og // 8) * 8, "head_size must be head_size_og rounded to 8")
    else:
        require(og == d, "CHECK_SHAPE(dout, total_q, num_heads, head_size)")
    require(tuple(out.shape) == (total_q, h, d), "CHECK_SHAPE(out, total_q, num_heads, head_size)")
    _check_cu("cu_seqlens_q", cu_q, b, total_q, max_q, dev)
    _check_cu("cu_seqlens_k", cu_k, b, k.shape[0], max_k, dev)
    for name, g, x in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        require(g.dtype == q.dtype, f"{name} must have the same dtype as q")
        require(g.stride(-1) == 1, f"{name} must have contiguous last dimension")
        require(g.shape == x.shape, f"CHECK_SHAPE({name})")
    shape = _lse_shape(dev, b, h, total_q, max_q)
    require(
        lse.dtype == torch.float32 and tuple(lse.shape) == shape and lse.is_contiguous(),
        f"softmax_lse is read as contiguous float32 {shape} (flash-attn "
        f"{'< 2.6: (b, h, max_seqlen_q)' if len(shape) == 3 else '>= 2.6: (h, total_q)'}): got "
        f"{lse.dtype} {tuple(lse.shape)} strides {lse.stride()}",
    )
    require(b <= 65535 and h <= 65535, f"grid (n_blocks, b={b}, h={h}) above 65535")


def _spans(cu_q, cu_k):
    for i in range(cu_q.numel() - 1):
        yield i, slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))


def _fwd(dev, q, k, v, cu_q, cu_k, max_q, scale, causal):
    """out (total_q, h, d) and the LSE in the release's layout; each sequence alone."""
    total_q, h, _ = q.shape
    out = torch.zeros_like(q)
    lse = torch.full(_lse_shape(dev, cu_q.numel() - 1, h, total_q, max_q), NAN)  # torch::empty
    for i, sq, sk in _spans(cu_q, cu_k):
        o, l_seq = base._fwd(q[sq][None], k[sk][None], v[sk][None], scale, causal)
        out[sq] = o[0]
        if lse.dim() == 3:
            lse[i, :, : sq.stop - sq.start] = l_seq[0]
        else:
            lse[:, sq] = l_seq[0]
    return out, lse


def _bwd(dev, dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, scale, causal):
    dq.zero_(), dk.zero_(), dv.zero_()
    for i, sq, sk in _spans(cu_q, cu_k):
        l_seq = lse[i, :, : sq.stop - sq.start] if lse.dim() == 3 else lse[:, sq]
        base._bwd(dout[sq][None], q[sq][None], k[sk][None], v[sk][None], out[sq][None],
                  l_seq[None], dq[sq][None], dk[sk][None], dv[sk][None], scale, causal)  # fmt: skip
    return torch.zeros(q.shape[1], q.shape[0] + 128 * (cu_q.numel() - 1))  # softmax_d


def _forward_v25(dev, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, softcap,
                 return_softmax):  # fmt: skip
    mha_varlen_fwd(dev, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softcap, return_softmax)
    D = q.shape[-1]
    qp, kp, vp = (base._pad8(x) for x in (q, k, v))  # C++ pads, returns the padded copies
    out_padded, lse = _fwd(dev, qp, kp, vp, cu_q, cu_k, max_q, scale, causal)
    rng = torch.empty(2, dtype=torch.int64)
    return out_padded.narrow(-1, 0, D), qp, kp, vp, out_padded, lse, None, rng


def _backward_v25(dev, dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale,
                  causal):  # fmt: skip
    mha_varlen_bwd(dev, dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k)
    d = _bwd(dev, dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, scale, causal)
    return dq, dk, dv, d


def _plain(window_size, alibi_slopes, block_table=None, leftpad_k=None, seqused_k=None):
    require(tuple(window_size) == (-1, -1) and alibi_slopes is None, "stand-in: plain calls only")
    require(block_table is None and leftpad_k is None and seqused_k is None, "no paged KV")


def _v25(dev, with_block_table: bool) -> dict:
    def _flash_attn_varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, causal, window_size, alibi_slopes, return_softmax,
    ):  # fmt: skip
        _plain(window_size, alibi_slopes)
        return _forward_v25(dev, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            dropout_p, softmax_scale, causal, 0.0, return_softmax)  # fmt: skip

    def _flash_attn_varlen_forward_259(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, causal, window_size, alibi_slopes, return_softmax, block_table,
    ):  # fmt: skip
        _plain(window_size, alibi_slopes, block_table)
        return _forward_v25(dev, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            dropout_p, softmax_scale, causal, 0.0, return_softmax)  # fmt: skip

    def _flash_attn_varlen_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
        deterministic, rng_state=None,
    ):  # fmt: skip
        _plain(window_size, alibi_slopes)
        lengths = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        grads = (dq, dk, dv)
        return _backward_v25(dev, dout, q, k, v, out, softmax_lse, *grads, *lengths,
                             softmax_scale, causal)  # fmt: skip

    fwd = _flash_attn_varlen_forward_259 if with_block_table else _flash_attn_varlen_forward
    return dict(
        _flash_attn_varlen_forward=fwd, _flash_attn_varlen_backward=_flash_attn_varlen_backward
    )


def _v26(dev, defaults: bool) -> dict:
    def _flash_attn_varlen_forward_260(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, causal, window_size, softcap, alibi_slopes, return_softmax, block_table,
    ):  # fmt: skip
        _plain(window_size, alibi_slopes, block_table)
        return _forward_v25(dev, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            dropout_p, softmax_scale, causal, softcap, return_softmax)  # fmt: skip

    def _flash_attn_varlen_forward_263(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
        return_softmax=False, block_table=None, leftpad_k=None, seqused_k=None,
    ):  # fmt: skip
        _plain(window_size, alibi_slopes, block_table, leftpad_k, seqused_k)
        return _forward_v25(dev, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            dropout_p, softmax_scale, causal, softcap, return_softmax)  # fmt: skip

    def _flash_attn_varlen_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, rng_state=None,
    ):  # fmt: skip
        _plain(window_size, alibi_slopes)
        lengths = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        grads = (dq, dk, dv)
        return _backward_v25(dev, dout, q, k, v, out, softmax_lse, *grads, *lengths,
                             softmax_scale, causal)  # fmt: skip

    fwd = _flash_attn_varlen_forward_263 if defaults else _flash_attn_varlen_forward_260
    return dict(
        _flash_attn_varlen_forward=fwd, _flash_attn_varlen_backward=_flash_attn_varlen_backward
    )


# ----------------------------------------------------------------------------------------------
# 2.7+: custom ops. 2.7.0-2.7.2's schemas lack zero_tensors: registered as flash_attn_v270::


def _op_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, wl, wr, softcap,
                alibi, return_softmax, block_table, leftpad_k, seqused_k):  # fmt: skip
    dev = base._active
    mha_varlen_fwd(dev, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softcap, return_softmax)
    _plain((wl, wr), alibi, block_table, leftpad_k, seqused_k)
    out, lse = _fwd(dev, q, k, v, cu_q, cu_k, max_q, scale, causal)
    return out, lse, torch.empty(0, dtype=q.dtype), torch.empty(2, dtype=torch.int64)


def _op_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, causal,
                 wl, wr, alibi):  # fmt: skip
    dev = base._active
    mha_varlen_bwd(dev, dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k)
    _plain((wl, wr), alibi)
    return _bwd(dev, dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, scale, causal)


Tensor, Opt = torch.Tensor, torch.Tensor | None


@torch.library.custom_op("flash_attn::_flash_attn_varlen_forward", mutates_args=())
def _varlen_forward_v273(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
    window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0,
    alibi_slopes: Opt = None, return_softmax: bool = False, block_table: Opt = None,
    leftpad_k: Opt = None, seqused_k: Opt = None, zero_tensors: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    return _op_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                       softmax_scale, causal, window_size_left, window_size_right, softcap,
                       alibi_slopes, return_softmax, block_table, leftpad_k, seqused_k)  # fmt: skip


@torch.library.custom_op("flash_attn_v270::_flash_attn_varlen_forward", mutates_args=())
def _varlen_forward_v270(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
    window_size_left: int = -1, window_size_right: int = -1, softcap: float = 0.0,
    alibi_slopes: Opt = None, return_softmax: bool = False, block_table: Opt = None,
    leftpad_k: Opt = None, seqused_k: Opt = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    return _op_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                       softmax_scale, causal, window_size_left, window_size_right, softcap,
                       alibi_slopes, return_softmax, block_table, leftpad_k, seqused_k)  # fmt: skip


@torch.library.custom_op("flash_attn::_flash_attn_varlen_backward", mutates_args=("dq", "dk", "dv"))
def _varlen_backward_v273(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
    dq: Opt, dk: Opt, dv: Opt, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
    window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: Opt,
    deterministic: bool, rng_state: Opt = None, zero_tensors: bool = False,
) -> Tensor:  # fmt: skip
    return _op_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size_left,
                        window_size_right, alibi_slopes)  # fmt: skip


@torch.library.custom_op(
    "flash_attn_v270::_flash_attn_varlen_backward", mutates_args=("dq", "dk", "dv")
)
def _varlen_backward_v270(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
    dq: Opt, dk: Opt, dv: Opt, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, dropout_p: float, softmax_scale: float, causal: bool,
    window_size_left: int, window_size_right: int, softcap: float, alibi_slopes: Opt,
    deterministic: bool, rng_state: Opt = None,
) -> Tensor:  # fmt: skip
    return _op_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size_left,
                        window_size_right, alibi_slopes)  # fmt: skip


def _entry_points(dev) -> dict:
    release = dev.release
    if release >= (2, 7, 3):
        return dict(_flash_attn_varlen_forward=_varlen_forward_v273,
                    _flash_attn_varlen_backward=_varlen_backward_v273)  # fmt: skip
    if release >= (2, 7, 0):
        return dict(_flash_attn_varlen_forward=_varlen_forward_v270,
                    _flash_attn_varlen_backward=_varlen_backward_v270)  # fmt: skip
    if release >= (2, 6, 0):
        return _v26(dev, defaults=release >= (2, 6, 3))
    return _v25(dev, with_block_table=release >= (2, 5, 9))


VERSIONS = ("2.5.0", "2.5.9.post1", "2.6.0", "2.6.3", "2.7.0.post2", "2.8.3")


@contextlib.contextmanager
def installed(version: str, capability=(9, 0), allow_cpu: bool = True):
    """flash_attn_standin's package of ``version``, with its varlen entry points added; yields
    the Device and counts calls: ``dev.varlen_calls`` (each with its number of sequences) and
    ``dev.padded_calls`` (the non-varlen forward)."""
    with base.installed(version, capability, allow_cpu) as dev:
        interface = sys.modules["flash_attn.flash_attn_interface"]
        dev.varlen_calls, dev.padded_calls = [], []
        for name, fn in _entry_points(dev).items():
            setattr(interface, name, _counted(fn, dev.varlen_calls, name.endswith("forward")))
        interface._flash_attn_forward = _counted(interface._flash_attn_forward, dev.padded_calls)
        yield dev


def _counted(fn, calls, record=True):
    """``fn`` that logs its sequences; the wrapper keeps the custom op's schema readable."""

    def counted(*args, **kwargs):
        if record:
            cu = kwargs.get("cu_seqlens_q")
            calls.append(None if cu is None else cu.numel() - 1)
        return fn(*args, **kwargs)

    op = getattr(fn, "_opoverload", None)
    if op is not None:
        counted._opoverload = op
    else:
        counted.__signature__ = inspect.signature(fn)
    return counted
