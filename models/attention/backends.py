"""Attention kernels that return the log-sum-exp, and backwards that accept a foreign one.

Dilated attention mixes several attention patterns by their softmax denominators. That needs,
from each kernel call, the output *and* the per-query log-sum-exp (LSE), and in the backward
pass it needs to run a kernel's backward with the *mixed* output and *mixed* LSE in place of
the ones the kernel produced (the ring-attention trick). Public attention functions offer
neither, so this layer wraps the private kernel entry points of each library behind one
interface:

    out, lse = attention_forward(q, k, v, causal, scale, mask, backend)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal, scale, mask, backend)

Layouts: ``q, out, dout``: ``(G, M, H, D)`` (flash-attn's layout; G folds batch and blocks);
``k, v``: ``(G, M_kv, H, D)``; any strides with the last dimension contiguous. ``lse``:
``(G, M, H)``, float32 (float64 for float64 inputs), any strides. ``mask``: optional additive
float ``(M, M_kv)`` in q's dtype, shared by all groups and heads (``-inf`` where a query must
not see a key); ``causal`` is only used with ``M == M_kv``.

Backends:
- ``"torch"``: PyTorch's fused kernels. On CPU ``_scaled_dot_product_flash_attention_for_cpu``
  (any float dtype); on CUDA the memory-efficient kernel (fp32, fp16, bf16).
- ``"flash"``: flash-attn 2 (CUDA, fp16/bf16), when importable.
- ``"math"``: plain matmuls; materialises ``M x M`` scores per (segment, head). Slow, exact,
  runs anywhere: the fallback, and a second opinion in tests.
"""

from __future__ import annotations

import inspect
import math

import torch

BACKENDS = ("auto", "torch", "flash", "math")


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, q: torch.Tensor) -> str:
    """Picks the kernel for ``q``: flash-attn on CUDA with fp16/bf16 when importable, torch
    otherwise. A forced name is checked against what the tensor allows."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not one of {BACKENDS}")
    half = q.dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        if q.is_cuda and half and flash_attn_available():
            return "flash"
        return "torch" if q.device.type in ("cpu", "cuda") else "math"
    if name == "flash" and not (q.is_cuda and half and flash_attn_available()):
        raise ValueError(
            "backend='flash' needs flash-attn installed, a CUDA tensor and fp16/bf16; got "
            f"device={q.device}, dtype={q.dtype}, flash-attn importable={flash_attn_available()}"
        )
    if name == "torch" and q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='torch' supports cpu and cuda tensors, got {q.device}")
    return name


def _bhmd(x: torch.Tensor) -> torch.Tensor:
    # (G, M, H, D) -> (G, H, M, D) view: torch's kernels read this layout through strides.
    return x.transpose(1, 2)


def attention_forward(q, k, v, causal: bool, scale: float, mask=None, backend="torch"):
    """Returns ``out (G, M, H, D)`` in q's dtype and ``lse (G, M, H)``."""
    if backend == "math":
        return _math_forward(q, k, v, causal, scale, mask)
    if backend == "flash" and mask is None:
        return _flash_forward(q, k, v, causal, scale)
    mask = None if mask is None else mask[None, None]  # broadcast over groups and heads
    if q.is_cuda:
        return _cuda_efficient_forward(q, k, v, causal, scale, mask)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhmd(q), _bhmd(k), _bhmd(v), 0.0, causal, attn_mask=mask, scale=scale
    )
    return _bhmd(out), lse.transpose(1, 2)


def attention_backward(
    dout, q, k, v, out, lse, causal: bool, scale: float, mask=None, backend="torch"
):
    """Gradients of q, k, v for a softmax whose normaliser is ``lse`` and output ``out``
    (which may come from a larger softmax that this call is only a part of)."""
    if backend == "math":
        return _math_backward(dout, q, k, v, out, lse, causal, scale, mask)
    if backend == "flash" and mask is None:  # flash-attn takes no mask: torch's kernel does
        return _flash_backward(dout, q, k, v, out, lse, causal, scale)
    mask = None if mask is None else mask[None, None]
    if q.is_cuda:
        return _cuda_efficient_backward(dout, q, k, v, out, lse, causal, scale, mask)
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


def _probs(q, k, lse, causal, scale, mask):
    s = torch.einsum("gqhd,gkhd->ghqk", q, k).float() * scale  # (G, H, M, M_kv)
    if causal:
        m = q.shape[1]
        keep = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s + mask.float()
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)  # (G, H, M)
    return torch.exp(s - lse[..., None]), lse


def _math_forward(q, k, v, causal, scale, mask):
    p, lse = _probs(q, k, None, causal, scale, mask)
    out = torch.einsum("ghqk,gkhd->gqhd", p, v.float())
    return out.to(q.dtype), lse.transpose(1, 2)


def _math_backward(dout, q, k, v, out, lse, causal, scale, mask):
    p, _ = _probs(q, k, lse.transpose(1, 2).float(), causal, scale, mask)
    do = dout.float()
    dv = torch.einsum("ghqk,gqhd->gkhd", p, do)
    dp = torch.einsum("gqhd,gkhd->ghqk", do, v.float())
    delta = (do * out.float()).sum(-1).transpose(1, 2)[..., None]  # (G, H, M, 1)
    ds = p * (dp - delta) * scale
    dq = torch.einsum("ghqk,gkhd->gqhd", ds, k.float())
    dk = torch.einsum("ghqk,gqhd->gkhd", ds, q.float())
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# CUDA: torch's memory-efficient kernel (takes fp32 too). Its LSE may be padded to 32 columns.


def _cuda_efficient_forward(q, k, v, causal, scale, mask):
    if mask is not None:  # the kernel wants a bias of the full (G, H, M, M_kv) shape
        mask = mask.expand(q.shape[0], q.shape[2], -1, -1)
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhmd(q), _bhmd(k), _bhmd(v), mask, True, 0.0, causal, scale=scale
    )
    return _bhmd(out), lse[..., : q.shape[1]].transpose(1, 2)


def _cuda_efficient_backward(dout, q, k, v, out, lse, causal, scale, mask):
    m = q.shape[1]
    lse = lse.transpose(1, 2).float()  # (G, H, M)
    pad = math.ceil(m / 32) * 32 - m
    lse = torch.nn.functional.pad(lse, (0, pad)).contiguous()
    zero = torch.zeros((), dtype=torch.int64, device=q.device)
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[2], -1, -1)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        _bhmd(dout),
        _bhmd(q),
        _bhmd(k),
        _bhmd(v),
        mask,
        _bhmd(out),
        lse,
        zero,
        zero,
        0.0,
        [True, True, True, False],
        causal,
        scale=scale,
    )
    return _bhmd(dq), _bhmd(dk), _bhmd(dv)


# ----------------------------------------------------------------------------------------------
# flash-attn 2: private entry points whose keyword names changed across releases; we pass only
# the keywords the installed version declares.


def _call_with_known_kwargs(fn, **kwargs):
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        kwargs["window_size"] = (kwargs.get("window_size_left"), kwargs.get("window_size_right"))
    return fn(**{name: val for name, val in kwargs.items() if name in params})


# no dropout, no window, no softcap, no ALiBi: the same in the forward and the backward
_FLASH_PLAIN = dict(
    dropout_p=0.0, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None
)


def _flash_forward(q, k, v, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_forward

    res = _call_with_known_kwargs(
        _flash_attn_forward,
        q=q,
        k=k,
        v=v,
        softmax_scale=scale,
        causal=causal,
        return_softmax=False,
        **_FLASH_PLAIN,
    )
    # 2.6+: (out, lse, S_dmask, rng_state); older: (out, q, k, v, out_padded, lse, S, rng)
    out, lse = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])
    return out, lse.transpose(1, 2)  # lse (G, H, M) -> (G, M, H)


def _flash_backward(dout, q, k, v, out, lse, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_backward

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call_with_known_kwargs(
        _flash_attn_backward,
        dout=dout.contiguous(),
        q=q,
        k=k,
        v=v,
        out=out.contiguous(),
        softmax_lse=lse.transpose(1, 2).float().contiguous(),
        dq=dq,
        dk=dk,
        dv=dv,
        softmax_scale=scale,
        causal=causal,
        deterministic=False,
        rng_state=None,
        **_FLASH_PLAIN,
    )
    return dq, dk, dv
