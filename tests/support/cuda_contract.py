"""The CUDA kernels' preconditions, asserted on fake CUDA tensors on a CPU-only torch.

``CudaContract`` is a dispatch mode that sits above ``FakeTensorMode``: every call of torch's
memory-efficient attention ops is checked against what the upstream C++ requires, then runs
on fake tensors (shapes, strides and dtypes only; no numbers). The checks are transcribed from
PyTorch 2.11-2.13 (the same code in all three):

- ``aten/src/ATen/native/transformers/cuda/attention.cu``: ``_efficient_attention_forward``
  (CHECK_NOSPARSE_LASTCONTIGUOUS_CUDA on q/k/v/bias, bias dtype and exact (B, H, M, N) shape,
  "Only fp32, half & bf16 supported at the moment");
- ``.../cuda/mem_eff_attention/kernel_forward.h`` ``check_supported``: q/k strideM and strideH
  multiples of kAlignmentQ (8 elements in fp16/bf16, 4 in fp32 on sm80+), bias strides too
  ("attn_bias is not correctly aligned (strideM)"), 16-byte aligned q/k/bias pointers;
- ``.../cuda/attention_backward.cu`` and ``kernel_backward.h``: q/k/v/bias strides multiples of
  kMinimumAlignment (4; 8 for half in practice, PR #188246), LSE float32
  (B, H, ceil(M/32)*32) with strideH and strideB multiples of 8, and for fp16/bf16 an ``out``
  whose rows are packed: ``o_strideM() = head_dim_value * num_heads`` (computeDelta);
- grids ``(x, H, B)``: B and H at most 65535 when called without the SDPA wrapper's chunking.

Pointers are checked as ``storage_offset * element_size`` (the caching allocator's blocks are
512-byte aligned).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

HALF = (torch.float16, torch.bfloat16)
EFFICIENT_DTYPES = (torch.float32, *HALF)


class ContractViolation(AssertionError):
    """A call that the real CUDA kernel would reject, or compute wrongly."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ContractViolation(message)


def _aligned_ptr(x: torch.Tensor, elements: int, name: str) -> None:
    require(
        x.storage_offset() % elements == 0,
        f"{name} is not correctly aligned: storage offset {x.storage_offset()} is not a "
        f"multiple of {elements} elements",
    )


def _check_qkv(q, k, v, *, where: str) -> None:
    for name, x in (("query", q), ("key", k), ("value", v)):
        require(x.dim() == 4, f"{where}: {name} must be 4-D, got {tuple(x.shape)}")
        require(x.is_cuda, f"{where}: {name} must be a CUDA tensor, got {x.device}")
        require(x.stride(-1) == 1, f"{where}: {name}: last dimension must be contiguous")
        require(x.dtype == q.dtype, f"{where}: {name} dtype {x.dtype} != query's {q.dtype}")
    require(
        q.dtype in EFFICIENT_DTYPES,
        f"{where}: Only fp32, half & bf16 supported at the moment (got {q.dtype})",
    )
    B, H, M, K = q.shape
    require(k.shape[0] == v.shape[0] == B, f"{where}: batch sizes differ")
    require(k.shape[1] == v.shape[1] == H, f"{where}: head counts differ (no GQA)")
    require(k.shape[2] == v.shape[2], f"{where}: key and value lengths differ")
    require(k.shape[3] == K, f"{where}: query and key head dims differ")
    require(K <= 65536 and v.shape[3] <= 65536, f"{where}: head dim above kMaxK 65536")
    require(B <= 65535 and H <= 65535, f"{where}: grid (x, H={H}, B={B}) above 65535")


def _check_bias(bias, q, k, align: int, *, where: str) -> None:
    B, H, M, _ = q.shape
    N = k.shape[2]
    require(bias.is_cuda, f"{where}: attn_bias must be a CUDA tensor")
    require(bias.dtype == q.dtype, "invalid dtype for bias - should match query's dtype")
    require(bias.dim() == 4, "Bias expected in BMHK format")
    require(
        tuple(bias.shape) == (B, H, M, N),
        f"{where}: attn_bias: wrong shape {tuple(bias.shape)}, expected {(B, H, M, N)}",
    )
    require(bias.stride(3) == 1, "attn_bias: wrong alignment (last dimension must be contiguous)")
    for dim, size, label in ((0, B, "strideB"), (1, H, "strideH"), (2, M, "strideM")):
        require(
            size <= 1 or bias.stride(dim) % align == 0,
            f"attn_bias is not correctly aligned ({label}). attn_bias.stride({dim}) = "
            f"{bias.stride(dim)}, and should be a multiple of {align}.",
        )
    _aligned_ptr(bias, align, "p.attn_bias_ptr")


def check_efficient_forward(args, kwargs) -> None:
    """aten::_scaled_dot_product_efficient_attention(q, k, v, attn_bias, compute_log_sumexp,
    dropout_p=0.0, is_causal=False, *, scale=None); q/k/v (B, H, M, K) views."""
    q, k, v, bias, compute_lse = args[:5]
    where = "_scaled_dot_product_efficient_attention"
    _check_qkv(q, k, v, where=where)
    align = 8 if q.dtype in HALF else 4  # kAlignmentQ = kAlignmentK on sm80+
    # BMHK strides: strideM = (B,H,M,K).stride(2), strideH = .stride(1)
    for name, x in (("query", q), ("key", k)):
        require(
            x.stride(2) % align == 0,
            f"{name} is not correctly aligned (strideM): {x.stride(2)} % {align}",
        )
        require(
            x.shape[1] <= 1 or x.stride(1) % align == 0,
            f"{name} is not correctly aligned (strideH): {x.stride(1)} % {align}",
        )
        _aligned_ptr(x, align, f"p.{name}_ptr")
    require(compute_lse, f"{where}: the mixing needs compute_log_sumexp=True")
    if bias is not None:
        _check_bias(bias, q, k, align, where=where)


def check_efficient_backward(args, kwargs) -> None:
    """aten::_scaled_dot_product_efficient_attention_backward(grad_out, q, k, v, attn_bias,
    out, logsumexp, philox_seed, philox_offset, dropout_p, grad_input_mask, is_causal)."""
    dout, q, k, v, bias, out, lse, seed, offset, dropout_p, mask = args[:11]
    where = "_scaled_dot_product_efficient_attention_backward"
    _check_qkv(q, k, v, where=where)
    B, H, M, K = q.shape
    Kv = v.shape[3]
    align = 8 if q.dtype in HALF else 4  # kMinimumAlignment 4; 8 for half (PR #188246)
    for name, x in (("query", q), ("key", k), ("value", v)):
        for dim, size, label in ((0, B, "strideB"), (1, H, "strideH"), (2, 2, "strideM")):
            require(
                size <= 1 or x.stride(dim) % align == 0,
                f"{name} is not correctly aligned ({label}): {x.stride(dim)} % {align}",
            )
        _aligned_ptr(x, align, f"p.{name}_ptr")
    require(tuple(dout.shape) == (B, H, M, Kv), f"{where}: grad_out shape {tuple(dout.shape)}")
    require(dout.is_cuda and dout.dtype == q.dtype, f"{where}: grad_out dtype/device")
    require(tuple(out.shape) == (B, H, M, Kv), f"{where}: out shape {tuple(out.shape)}")
    require(out.is_cuda and out.dtype == q.dtype, f"{where}: out dtype {out.dtype}")
    require(out.stride(-1) == 1, f"{where}: out: last dimension must be contiguous")
    _aligned_ptr(out, align, "p.output_ptr")
    if q.dtype in HALF and H > 1:
        require(
            out.stride(2) == H * Kv,
            "kernel_backward.h computeDelta reads out's rows at o_strideM() = "
            f"head_dim_value * num_heads = {H * Kv}, but out's row stride is {out.stride(2)}: "
            "silently wrong gradients",
        )
    lse_len = -(-M // 32) * 32
    require(
        lse.is_cuda and lse.dtype == torch.float32,
        f"{where}: logsumexp must be float32 on CUDA, got {lse.dtype} on {lse.device}",
    )
    require(
        tuple(lse.shape) == (B, H, lse_len) and lse.stride(-1) == 1,
        f"{where}: logsumexp must be (B, H, ceil(M/32)*32) = {(B, H, lse_len)} with a "
        f"contiguous last dim, got {tuple(lse.shape)} strides {lse.stride()}",
    )
    require(H <= 1 or lse.stride(1) % 8 == 0, "LSE is not correctly aligned (strideH)")
    require(B <= 1 or lse.stride(0) % 8 == 0, "LSE is not correctly aligned (strideB)")
    for name, x in (("philox_seed", seed), ("philox_offset", offset)):
        require(x.dim() == 0 and x.dtype == torch.int64, f"{where}: {name} must be 0-dim int64")
    require(dropout_p == 0.0, f"{where}: dropout must match the forward's 0.0")
    if bias is not None:
        _check_bias(bias, q, k, align, where=where)
    require(not mask[3] or bias is not None, "bias_requires_grad is true but no bias was provided")


_CHECKS = {
    "aten::_scaled_dot_product_efficient_attention": check_efficient_forward,
    "aten::_scaled_dot_product_efficient_attention_backward": check_efficient_backward,
}
_CPU_ONLY = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)


@dataclass
class CudaContract(TorchDispatchMode):
    """Asserts the preconditions above on every call; ``calls`` lists the kernels reached."""

    calls: list[str] = field(default_factory=list)

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _CHECKS:
            _CHECKS[name](args, kwargs)
            self.calls.append(name.split("::")[1])
        elif name in _CPU_ONLY:
            require(
                not any(isinstance(a, torch.Tensor) and a.is_cuda for a in args),
                f"{name} is a CPU kernel, called with CUDA tensors",
            )
        return func(*args, **kwargs)


def _copy_(self, src, non_blocking=False):
    return torch.ops.aten.copy_.default(self, src, non_blocking)


def _contiguous(self, memory_format=torch.contiguous_format):
    if self.is_contiguous(memory_format=memory_format):
        return self
    return torch.ops.aten.clone.default(self, memory_format=memory_format)


_UNGUARDED = {"copy_": _copy_, "contiguous": _contiguous}


@contextlib.contextmanager
def fake_cuda():
    """Fake CUDA tensors (no memory, no numbers) under the contract: yields the contract.

    On a CPU-only build, the hand-written Python bindings of ``Tensor.copy_``,
    ``Tensor.contiguous`` and of indexing take a CUDA device guard, which fails; the same aten
    ops called directly do not. Inside this context those two methods go straight to their
    aten ops (the library code avoids indexing tensors that may be on CUDA).
    """
    contract = CudaContract()
    saved = {name: getattr(torch.Tensor, name) for name in _UNGUARDED}
    for name, fn in _UNGUARDED.items():
        setattr(torch.Tensor, name, fn)
    try:
        with FakeTensorMode(), contract:
            yield contract
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
