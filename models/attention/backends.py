"""Attention kernels that return the log-sum-exp, and backwards that accept a foreign one.

Dilated attention mixes several attention patterns by their softmax denominators. That needs,
from each kernel call, the output *and* the per-query log-sum-exp (LSE), and in the backward
pass it needs to run a kernel's backward with the *mixed* output and *mixed* LSE in place of
the ones the kernel produced (the ring-attention trick). Public attention functions offer
neither, so this layer wraps the private kernel entry points of each library behind one
interface:

    out, lse = attention_forward(q, k, v, causal=..., scale=..., mask=..., backend=...)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=..., scale=..., ...)

Layouts: ``q, out, dout``: ``(G, M, H, D)`` (flash-attn's layout; G folds batch and blocks);
``k, v``: ``(G, M_kv, H, D)``; any strides with the last dimension contiguous. ``lse``:
``(G, M, H)``, float32 (float64 for float64 inputs), any strides. ``mask``: optional additive
float ``(M, M_kv)`` in q's dtype, shared by all groups and heads (``-inf`` where a query must
not see a key; no row may be fully masked); ``causal`` is only used with ``M == M_kv``.

Backends (``resolve_backend`` picks one per call of a pattern, from the tensor and the GPU):
- ``"torch"``: PyTorch's fused kernels. On CPU ``_scaled_dot_product_flash_attention_for_cpu``
  (any float dtype); on CUDA the memory-efficient kernel (fp32, fp16, bf16 on sm80+).
- ``"flash"``: flash-attn 2.5 to 2.8 (CUDA sm80+, fp16/bf16, head_dim <= 256), when installed.
- ``"math"``: plain matmuls; materialises ``M x M`` scores per (segment, head). Slow, exact,
  runs anywhere: the fallback (float64 on CUDA), and a second opinion in tests.

The CUDA glue follows the kernels' own contracts, read from their sources (the tests hold a
stand-in for each, in ``tests/support/``): flash-attn ``flash_attn_interface.py`` and
``csrc/flash_attn/flash_api.cpp`` (v2.5.0-v2.8.3), PyTorch ``attention.cu``,
``attention_backward.cu`` and ``mem_eff_attention/kernel_{forward,backward}.h`` (2.11-2.13).
"""

from __future__ import annotations

import inspect
import re
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "flash", "math")

# flash-attn releases whose private entry points this file calls (pyproject's `flash` extra)
FLASH_VERSIONS = ((2, 5), (2, 9))  # [2.5, 2.9)
# CUDA grids put the batch (here: groups) in gridDim.y or .z, limited to 65535 (flash-attn's
# fwd/bwd launch templates; the efficient kernel's getBlocksGrid)
MAX_CUDA_GROUPS = 65535
# both CUDA kernels want q/k rows and heads 16-byte aligned: head_dim a multiple of 8 elements
_HEAD_ALIGN = 8
_FLASH_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# what is installed, what the GPU is


@lru_cache(maxsize=1)
def flash_attn_version() -> str | None:
    """The installed flash-attn's version string, or None when it cannot be imported."""
    try:
        import flash_attn
    except ImportError:
        return None
    return str(getattr(flash_attn, "__version__", "0"))


def version_tuple(version: str) -> tuple[int, int, int]:
    """ "2.7.4.post1" -> (2, 7, 4); missing or non-numeric parts count as 0."""
    parts = [re.match(r"\d*", p).group() or "0" for p in version.split("+")[0].split(".")]
    return tuple(int(p) for p in (parts + ["0"] * 3)[:3])


def flash_version_supported(version: str) -> bool:
    lo, hi = FLASH_VERSIONS
    return lo <= version_tuple(version)[:2] < hi


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (tests replace this function)."""
    return torch.cuda.get_device_capability(device)


def flash_unsupported(q: torch.Tensor) -> str | None:
    """Why flash-attn cannot run ``q``'s attention here, or None when it can.

    flash_api.cpp (2.5-2.8): CUDA, fp16/bf16, sm80+ (2.5-2.7.3: sm8x or sm90 exactly), head_dim
    at most 256 (we pad it to a multiple of 8, as FlashAttnFunc does from 2.7). Before 2.6.3 the
    backward with head_dim > 192 needs an sm80 or sm90 (A100/H100), not an sm86/sm89.
    """
    version = flash_attn_version()
    if version is None:
        return "flash-attn is not installed"
    if not flash_version_supported(version):
        return f"flash-attn {version} is outside the supported range >=2.5,<2.9"
    if not q.is_cuda:
        return f"flash-attn needs a CUDA tensor, got device={q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16 or bf16, got dtype={q.dtype}"
    head_dim = _padded(q.shape[-1])
    if head_dim > _FLASH_MAX_HEAD_DIM:
        return f"flash-attn needs head_dim <= {_FLASH_MAX_HEAD_DIM}, got {q.shape[-1]}"
    cap, release = tuple(cuda_capability(q.device)), version_tuple(version)
    if cap[0] < 8 or (release < (2, 7, 4) and cap[0] > 8 and cap != (9, 0)):
        return f"flash-attn {version} does not run on compute capability {cap}"
    if head_dim > 192 and release < (2, 6, 3) and cap not in ((8, 0), (9, 0)):
        return f"flash-attn {version} backward with head_dim > 192 needs sm80/sm90, got {cap}"
    return None


def torch_cuda_unsupported(q: torch.Tensor) -> str | None:
    """Why torch's memory-efficient CUDA kernel cannot run ``q``, or None: fp32/fp16 on sm50+,
    bf16 on sm80+; no float64 (attention.cu: "Only fp32, half & bf16 supported")."""
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"torch's CUDA attention kernel supports fp32, fp16 and bf16, got dtype={q.dtype}"
    cap = cuda_capability(q.device)
    least = (8, 0) if q.dtype == torch.bfloat16 else (5, 0)
    if cap < least:
        return f"torch's CUDA attention kernel needs compute capability >= {least} for {q.dtype}"
    return None


_warned: set[str] = set()


def resolve_backend(name: str, q: torch.Tensor) -> str:
    """Picks the kernel for ``q``: flash-attn when it can run it, else torch's fused kernel,
    else plain matmuls. A forced name that cannot run ``q`` is a ValueError saying why."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS}")
    if name == "math":
        return name
    if name == "flash":
        reason = flash_unsupported(q)
        if reason:
            raise ValueError(f"backend='flash' cannot run this call: {reason}")
        return name
    if q.device.type == "cpu":
        return "torch"
    if q.device.type != "cuda":
        if name == "torch":
            raise ValueError(f"backend='torch' supports cpu and cuda tensors, got {q.device}")
        return "math"
    if name == "auto":
        reason = flash_unsupported(q)
        if reason is None:
            return "flash"
        version = flash_attn_version()
        if version and not flash_version_supported(version) and version not in _warned:
            _warned.add(version)
            warnings.warn(f"{reason}; using torch's kernels", stacklevel=2)
    reason = torch_cuda_unsupported(q)
    if reason is None:
        return "torch"
    if name == "torch":
        raise ValueError(f"backend='torch' cannot run this call: {reason}; use 'auto' or 'math'")
    return "math"  # float64 on CUDA, bf16 before sm80


def _bhmd(x: torch.Tensor) -> torch.Tensor:
    # (G, M, H, D) -> (G, H, M, D) view: torch's kernels read this layout through strides.
    return x.transpose(1, 2)


def _padded(head_dim: int) -> int:
    return -(-head_dim // _HEAD_ALIGN) * _HEAD_ALIGN


def _head(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    # x[..., :head_dim], written as narrow: Python indexing needs a device guard, which fake
    # CUDA tensors on a CPU-only build (the contract tests) cannot give
    return x.narrow(-1, 0, head_dim)


def _pad_head_dim(*xs: torch.Tensor) -> list[torch.Tensor]:
    """Zero-pads the last dimension to a multiple of 8: q.k and p.v are unchanged, the extra
    output columns are zero (what FlashAttnFunc does from flash-attn 2.7)."""
    pad = _padded(xs[0].shape[-1]) - xs[0].shape[-1]
    return [F.pad(x, (0, pad)) if pad else x for x in xs]


def attention_forward(q, k, v, *, causal: bool, scale: float, mask=None, backend="torch"):
    """Returns ``out (G, M, H, D)`` in q's dtype and ``lse (G, M, H)``."""
    if backend == "math":
        return _math_forward(q, k, v, causal, scale, mask)
    if backend == "flash" and mask is None:
        return _flash_forward(q, k, v, causal, scale)
    if q.is_cuda:
        return _cuda_efficient_forward(q, k, v, causal, scale, mask)
    mask = None if mask is None else mask[None, None]  # broadcast over groups and heads
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhmd(q), _bhmd(k), _bhmd(v), 0.0, causal, attn_mask=mask, scale=scale
    )
    return _bhmd(out), lse.transpose(1, 2)


def attention_backward(
    dout, q, k, v, out, lse, *, causal: bool, scale: float, mask=None, backend="torch"
):
    """Gradients of q, k, v for a softmax whose normaliser is ``lse`` and output ``out``
    (which may come from a larger softmax that this call is only a part of)."""
    if backend == "math":
        return _math_backward(dout, q, k, v, out, lse, causal, scale, mask)
    if backend == "flash" and mask is None:  # flash-attn takes no mask: torch's kernel does
        return _flash_backward(dout, q, k, v, out, lse, causal, scale)
    if q.is_cuda:
        return _cuda_efficient_backward(dout, q, k, v, out, lse, causal, scale, mask)
    mask = None if mask is None else mask[None, None]
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *(_bhmd(x) for x in (dout, q, k, v, out)),
        lse.transpose(1, 2),
        0.0,
        causal,
        attn_mask=mask,
        scale=scale,
    )
    return tuple(_bhmd(g) for g in grads)


# ----------------------------------------------------------------------------------------------
# math: explicit scores, in float32 at least


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def _probs(q, k, lse, causal, scale, mask):
    acc = _acc(q)
    s = torch.einsum("gqhd,gkhd->ghqk", q.to(acc), k.to(acc)) * scale  # (G, H, M, M_kv)
    if causal:
        m = q.shape[1]
        keep = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(keep.logical_not(), float("-inf"))
    if mask is not None:
        s = s + mask.to(s.dtype)
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)  # (G, H, M)
    return torch.exp(s - lse.unsqueeze(-1)), lse


def _math_forward(q, k, v, causal, scale, mask):
    p, lse = _probs(q, k, None, causal, scale, mask)
    out = torch.einsum("ghqk,gkhd->gqhd", p, v.to(p.dtype))
    return out.to(q.dtype), lse.transpose(1, 2)


def _math_backward(dout, q, k, v, out, lse, causal, scale, mask):
    p, _ = _probs(q, k, lse.transpose(1, 2).to(_acc(q)), causal, scale, mask)
    acc = p.dtype
    do = dout.to(acc)
    dv = torch.einsum("ghqk,gqhd->gkhd", p, do)
    dp = torch.einsum("gqhd,gkhd->ghqk", do, v.to(acc))
    delta = (do * out.to(acc)).sum(-1).transpose(1, 2).unsqueeze(-1)  # (G, H, M, 1)
    ds = p * (dp - delta) * scale
    dq = torch.einsum("ghqk,gkhd->gqhd", ds, k.to(acc))
    dk = torch.einsum("ghqk,gqhd->gkhd", ds, q.to(acc))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# CUDA: torch's memory-efficient kernel (attention.cu, attention_backward.cu). Its contract:
# - q/k/v: last dim contiguous; row and head strides and the data pointer 16-byte aligned
#   (multiples of 8 elements in half, 4 in fp32): we pad head_dim to a multiple of 8.
# - bias: exactly (G, H, M, M_kv) in q's dtype (stride-0 expansion allowed), its row stride a
#   multiple of 8 ("attn_bias is not correctly aligned (strideM)"): stored padded, as SDPA does.
# - backward `out`: for fp16/bf16 the kernel reads its rows as packed (kernel_backward.h:
#   o_strideM() = head_dim_value * num_heads), so it must be (G, M, H, D)-contiguous.
# - backward LSE: float32 (G, H, ceil(M/32)*32), +inf in the padding, as the forward writes it.


def _cuda_bias(mask, groups, heads):
    """(M, M_kv) additive mask -> (G, H, M, M_kv) stride-0 expansion of a copy whose row stride
    is a multiple of 8 elements (its storage starts at an aligned allocation)."""
    if mask is None:
        return None
    m, m_kv = mask.shape
    storage = mask.new_zeros(m, _padded(m_kv))
    bias = storage.narrow(1, 0, m_kv)
    bias.copy_(mask)
    return bias.expand(groups, heads, m, m_kv)


def _cuda_efficient_forward(q, k, v, causal, scale, mask):
    G, M, H, D = q.shape
    bias = _cuda_bias(mask, G, H)
    qp, kp, vp = _pad_head_dim(q, k, v)
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhmd(qp), _bhmd(kp), _bhmd(vp), bias, True, 0.0, causal, scale=scale
    )
    # out: (G, H, M, Dp) view of a (G, M, H, Dp) tensor; lse: (G, H, ceil(M/32)*32)
    return _head(_bhmd(out), D), lse.narrow(-1, 0, M).transpose(1, 2)


def efficient_lse(lse: torch.Tensor) -> torch.Tensor:
    """Mixed ``lse (G, M, H)`` -> the kernel's layout: float32 ``(G, H, ceil(M/32)*32)``,
    contiguous, padded with +inf (as its forward writes it: padded rows then weigh 0)."""
    G, M, H = lse.shape
    out = torch.full((G, H, -(-M // 32) * 32), float("inf"), dtype=torch.float32, device=lse.device)
    out.narrow(-1, 0, M).copy_(lse.transpose(1, 2))
    return out


def _cuda_efficient_backward(dout, q, k, v, out, lse, causal, scale, mask):
    G, M, H, D = q.shape
    bias = _cuda_bias(mask, G, H)
    # packed rows for the half kernels' in-kernel delta (kernel_backward.h: o_strideM)
    doutp, qp, kp, vp, outp = _pad_head_dim(dout, q, k, v, out.contiguous())
    seed = offset = torch.zeros((), dtype=torch.int64)  # read (on the host) only with dropout
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        _bhmd(doutp),
        _bhmd(qp),
        _bhmd(kp),
        _bhmd(vp),
        bias,
        _bhmd(outp),
        efficient_lse(lse),
        seed,
        offset,
        0.0,
        [True, True, True, False],
        causal,
        scale=scale,
    )
    return _head(_bhmd(dq), D), _head(_bhmd(dk), D), _head(_bhmd(dv), D)


# ----------------------------------------------------------------------------------------------
# flash-attn 2: private entry points whose parameters changed across releases. 2.5: window_size
# (a pair); 2.6: + softcap; 2.7+: torch.library custom ops (inspect.signature gives only
# (*args, **kwargs): the names are in the op's schema), window_size_left/right. We pass, by
# name, exactly the parameters the installed version declares, as its FlashAttnFunc does.


@lru_cache(maxsize=8)
def flash_parameters(fn) -> tuple[tuple[str, bool], ...]:
    """``((name, has_default), ...)`` of a flash-attn entry point: a plain function (2.5, 2.6)
    or a ``torch.library.custom_op`` (2.7+), whose schema names its arguments."""
    op = getattr(fn, "_opoverload", None)
    if op is not None:
        return tuple((a.name, a.has_default_value()) for a in op._schema.arguments)
    return tuple(
        (p.name, p.default is not p.empty) for p in inspect.signature(fn).parameters.values()
    )


def _flash_call(fn, **kwargs):
    """Calls ``fn`` with the keywords it declares: no dropout, window, softcap or ALiBi."""
    params = flash_parameters(fn)
    names = {name for name, _ in params}
    plain = {"dropout_p": 0.0, "alibi_slopes": None, "softcap": 0.0}
    if "window_size_left" in names:
        plain.update(window_size_left=-1, window_size_right=-1)
    else:
        plain["window_size"] = (-1, -1)
    args = {n: x for n, x in {**plain, **kwargs}.items() if n in names}
    missing = [name for name, has_default in params if not has_default and name not in args]
    if missing:
        raise RuntimeError(
            f"flash-attn {flash_attn_version()}: {fn} takes parameters {missing} that this "
            f"project does not know; supported flash-attn: >=2.5,<2.9"
        )
    return fn(**args)


def _flash_forward(q, k, v, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_forward

    D = q.shape[-1]
    qp, kp, vp = _pad_head_dim(q, k, v)
    res = _flash_call(
        _flash_attn_forward,
        q=qp,
        k=kp,
        v=vp,
        softmax_scale=scale,
        causal=causal,
        return_softmax=False,
    )
    # 2.7+: (out, lse, S_dmask, rng_state); 2.5-2.6: (out, q, k, v, out_padded, lse, S, rng)
    out, lse = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])
    return _head(out, D), lse.transpose(1, 2)  # lse (G, H, M) float32 -> (G, M, H)


def _flash_backward(dout, q, k, v, out, lse, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_backward

    D = q.shape[-1]
    doutp, qp, kp, vp, outp = _pad_head_dim(dout, q, k, v, out)
    dq, dk, dv = (torch.empty_like(x) for x in (qp, kp, vp))
    # the kernel reads softmax_lse as contiguous float32 (G, H, M); nothing checks it
    _flash_call(
        _flash_attn_backward,
        dout=doutp,
        q=qp,
        k=kp,
        v=vp,
        out=outp,
        softmax_lse=lse.transpose(1, 2).float().contiguous(),
        dq=dq,
        dk=dk,
        dv=dv,
        softmax_scale=scale,
        causal=causal,
        deterministic=False,
        rng_state=None,
    )
    return _head(dq, D), _head(dk, D), _head(dv, D)
