"""Stand-in ``flash_attn`` packages: flash-attn's private entry points with the exact Python
signatures of each release generation, over the C++ checks of its ``mha_fwd``/``mha_bwd``.

Transcribed from github.com/Dao-AILab/flash-attention at the tags below:
``flash_attn/flash_attn_interface.py`` (signatures, return tuples, custom-op registration) and
``csrc/flash_attn/flash_api.cpp`` (every TORCH_CHECK on the tensors we pass).

- v2.5.0 .. v2.5.9.post1: plain functions, ``window_size`` a pair; C++ pads head_dim to a
  multiple of 8 in the forward and returns 8 values ``(out, q, k, v, out_padded, lse, S, rng)``;
  the backward needs ``q.size(3) % 8 == 0``.
- v2.6.0 .. v2.6.3: the same plus ``softcap`` between ``window_size`` and ``alibi_slopes``.
- v2.7.0 .. v2.8.3: ``torch.library.custom_op("flash_attn::_flash_attn_forward", ...)``
  (``inspect.signature`` is ``(*args, **kwargs)``), ``window_size_left/right``, forward returns
  ``(out, lse, S_dmask, rng_state)``, backward writes dq/dk/dv in place and returns
  ``softmax_d``; C++ rejects head_dim % 8 != 0 (FlashAttnFunc pads in Python).

Every version: ``softmax_lse`` is float32 ``(b, h, seqlen_q)``; the backward reads it as
contiguous without checking; grids are ``(m_blocks, b, h)`` (b, h <= 65535); sm80+ only
(before 2.7.4: sm8x or exactly sm90).

The numbers are computed in float32 with plain matmuls, so the stand-in also runs on real CPU
tensors (``allow_cpu=True``) for tests that compare the project's glue numerically; on fake
CUDA tensors it only checks and returns shapes. The custom ops are registered for every
device for the same reason (upstream: ``device_types="cuda"``).
"""

import contextlib
import sys
import types
from dataclasses import dataclass

import torch

from models.attention import backends
from tests.support.cuda_contract import require

HALF = (torch.float16, torch.bfloat16)


@dataclass
class Device:
    """What the stand-in's C++ sees: the release and the GPU."""

    release: tuple[int, int, int]
    capability: tuple[int, int] = (9, 0)
    allow_cpu: bool = False


_active: Device | None = None  # the installed stand-in (the 2.7+ custom ops are global)


def _arch_ok(dev: Device) -> bool:
    cap = dev.capability
    if dev.release >= (2, 7, 4):
        return cap[0] >= 8
    return cap[0] == 8 or cap == (9, 0)


def _check_common(dev: Device, tensors: dict, q) -> None:
    require(_arch_ok(dev), "FlashAttention only supports Ampere GPUs or newer.")
    require(q.dtype in HALF, "FlashAttention only support fp16 and bf16 data type")
    for name, x in tensors.items():
        require(x.dtype == q.dtype, f"{name} must have the dtype of query")
        require(x.is_cuda or dev.allow_cpu, f"{name} must be on CUDA")
        require(x.stride(-1) == 1, f"{name}: Input tensor must have contiguous last dimension")


def mha_fwd(dev: Device, q, k, v, dropout_p, softcap, return_softmax) -> None:
    """flash_api.cpp mha_fwd's checks."""
    _check_common(dev, {"q": q, "k": k, "v": v}, q)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    require(b > 0, "batch size must be positive")
    require(d <= 256, "FlashAttention forward only supports head dimension at most 256")
    if dev.release >= (2, 7, 0):  # 2.5/2.6 pad in C++
        require(
            d % 8 == 0, "query, key, value, and out_ must have a head_size that is a multiple of 8"
        )
    require(h % hk == 0, "Number of heads in key/value must divide number of heads in query")
    require(tuple(k.shape) == (b, sk, hk, d) == tuple(v.shape), "CHECK_SHAPE(k/v)")
    require(not return_softmax or dropout_p > 0, "return_softmax requires dropout")
    require(softcap == 0.0 or dropout_p == 0.0, "Softcapping does not support dropout for now")
    require(b <= 65535 and h <= 65535, f"grid (m_blocks, b={b}, h={h}) above 65535")


def mha_bwd(dev: Device, dout, q, k, v, out, softmax_lse, dq, dk, dv) -> None:
    """flash_api.cpp mha_bwd's checks, and the LSE layout its kernel assumes unchecked."""
    _check_common(dev, {"q": q, "k": k, "v": v, "out": out, "dout": dout}, q)
    b, sq, h, d = q.shape
    require(d % 8 == 0, "head_size should be a multiple of 8")
    require(d <= 256, "FlashAttention backward only supports head dimension at most 256")
    if d > 192 and dev.release < (2, 6, 3):
        require(
            dev.capability in ((8, 0), (9, 0)),
            "FlashAttention backward for head dim > 192 requires A100/A800 or H100/H800",
        )
    og = dout.shape[3]
    if dev.release < (2, 7, 0):
        require(d == -(-og // 8) * 8, "head_size must be head_size_og rounded to 8")
    else:
        require(og == d, "CHECK_SHAPE(dout, batch_size, seqlen_q, num_heads, head_size)")
    require(tuple(dout.shape[:3]) == (b, sq, h), "CHECK_SHAPE(dout)")
    require(tuple(out.shape) == tuple(q.shape[:3]) + (og,) or out.shape == q.shape, "out shape")
    for name, g, x in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        require(g.dtype == q.dtype, f"{name} must have the same dtype as q")
        require(g.is_cuda or dev.allow_cpu, f"{name} must be on CUDA")
        require(g.stride(-1) == 1, f"{name} must have contiguous last dimension")
        require(g.shape == x.shape, f"CHECK_SHAPE({name})")
    # unchecked upstream: the kernel indexes (bidb * h + bidh) * seqlen_q, in float32
    require(
        softmax_lse.dtype == torch.float32
        and tuple(softmax_lse.shape) == (b, h, sq)
        and softmax_lse.is_contiguous(),
        "softmax_lse is read as contiguous float32 (b, h, seqlen_q): got "
        f"{softmax_lse.dtype} {tuple(softmax_lse.shape)} strides {softmax_lse.stride()}",
    )
    require(b <= 65535 and h <= 65535, f"grid (n_blocks, b={b}, h={h}) above 65535")


# ----------------------------------------------------------------------------------------------
# the numbers: plain float32 attention (shapes only on fake tensors)


def _scores(q, k, scale, causal):
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if causal:  # bottom-right aligned in flash-attn >= 2.1; equal to top-left when sq == sk
        sq, sk = q.shape[1], k.shape[1]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        s = s.masked_fill(keep.logical_not(), float("-inf"))
    return s


def _fwd(q, k, v, scale, causal):
    s = _scores(q, k, scale, causal)
    lse = torch.logsumexp(s, dim=-1)  # (b, h, sq) float32
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype).contiguous(), lse.contiguous()


def _bwd(dout, q, k, v, out, lse, dq, dk, dv, scale, causal):
    p = torch.exp(_scores(q, k, scale, causal) - lse.unsqueeze(-1))
    do = dout.float()
    dv.copy_(torch.einsum("bhqk,bqhd->bkhd", p, do))
    dp = torch.einsum("bqhd,bkhd->bhqk", do, v.float())
    delta = (do * out.float()).sum(-1).transpose(1, 2).unsqueeze(-1)
    ds = p * (dp - delta) * scale
    dq.copy_(torch.einsum("bhqk,bkhd->bqhd", ds, k.float()))
    dk.copy_(torch.einsum("bhqk,bqhd->bkhd", ds, q.float()))
    return torch.zeros(q.shape[0], q.shape[2], -(-q.shape[1] // 128) * 128, device=q.device)


def _pad8(x):
    pad = -x.shape[-1] % 8
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


# ----------------------------------------------------------------------------------------------
# v2.5.x and v2.6.x: plain functions (flash_attn_interface.py, verbatim signatures)


def _fwd_v25(dev, q, k, v, dropout_p, softmax_scale, causal, softcap, return_softmax):
    mha_fwd(dev, q, k, v, dropout_p, softcap, return_softmax)
    D = q.shape[-1]
    qp, kp, vp = (_pad8(x) for x in (q, k, v))  # C++ pads, returns the padded copies
    out_padded, lse = _fwd(qp, kp, vp, softmax_scale, causal)
    rng_state = torch.empty(2, dtype=torch.int64, device=q.device)
    return out_padded.narrow(-1, 0, D), qp, kp, vp, out_padded, lse, None, rng_state


def _bwd_v25(dev, dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal):
    mha_bwd(dev, dout, q, k, v, out, softmax_lse, dq, dk, dv)
    d = _bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
    return dq, dk, dv, d


def _interface_v25(dev: Device) -> types.ModuleType:
    def _flash_attn_forward(
        q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_softmax
    ):
        require(window_size == (-1, -1) and alibi_slopes is None, "stand-in: plain calls only")
        return _fwd_v25(dev, q, k, v, dropout_p, softmax_scale, causal, 0.0, return_softmax)

    def _flash_attn_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
        window_size, alibi_slopes, deterministic, rng_state=None,
    ):  # fmt: skip
        return _bwd_v25(dev, dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)

    def flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        alibi_slopes=None, deterministic=False, return_attn_probs=False,
    ):  # fmt: skip
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        return _flash_attn_forward(q, k, v, dropout_p, scale, causal, window_size, None, False)[0]

    return _module(_flash_attn_forward, _flash_attn_backward, flash_attn_func)


def _interface_v26(dev: Device) -> types.ModuleType:
    def _flash_attn_forward(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        return_softmax,
    ):  # fmt: skip
        require(window_size == (-1, -1) and alibi_slopes is None, "stand-in: plain calls only")
        return _fwd_v25(dev, q, k, v, dropout_p, softmax_scale, causal, softcap, return_softmax)

    def _flash_attn_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, rng_state=None,
    ):  # fmt: skip
        return _bwd_v25(dev, dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)

    def flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
    ):  # fmt: skip
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        return _flash_attn_forward(
            q, k, v, dropout_p, scale, causal, window_size, softcap, None, False
        )[0]

    return _module(_flash_attn_forward, _flash_attn_backward, flash_attn_func)


# ----------------------------------------------------------------------------------------------
# v2.7.0 .. v2.8.3: torch.library custom ops, registered once per process


@torch.library.custom_op("flash_attn::_flash_attn_forward", mutates_args=())
def _flash_attn_forward_v27(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    return_softmax: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mha_fwd(_active, q, k, v, dropout_p, softcap, return_softmax)
    require((window_size_left, window_size_right) == (-1, -1), "stand-in: plain calls only")
    out, lse = _fwd(q, k, v, softmax_scale, causal)
    empty = torch.empty(0, dtype=q.dtype, device=q.device)
    return out, lse, empty, torch.empty(2, dtype=torch.int64, device=q.device)


@_flash_attn_forward_v27.register_fake
def _(q, k, v, dropout_p, softmax_scale, causal, wl, wr, softcap, alibi_slopes, return_softmax):
    mha_fwd(_active, q, k, v, dropout_p, softcap, return_softmax)
    b, sq, h, _ = q.shape
    return (
        torch.empty_like(q),
        q.new_empty((b, h, sq), dtype=torch.float32),
        q.new_empty((0,)),
        q.new_empty((2,), dtype=torch.int64),
    )


@torch.library.custom_op("flash_attn::_flash_attn_backward", mutates_args=("dq", "dk", "dv"))
def _flash_attn_backward_v27(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    softmax_lse: torch.Tensor,
    dq: torch.Tensor | None,
    dk: torch.Tensor | None,
    dv: torch.Tensor | None,
    dropout_p: float,
    softmax_scale: float,
    causal: bool,
    window_size_left: int,
    window_size_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    mha_bwd(_active, dout, q, k, v, out, softmax_lse, dq, dk, dv)
    return _bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)


@_flash_attn_backward_v27.register_fake
def _(dout, q, k, v, out, softmax_lse, dq, dk, dv, *rest, **kw):
    mha_bwd(_active, dout, q, k, v, out, softmax_lse, dq, dk, dv)
    b, sq, h, _ = q.shape
    return q.new_empty((b, h, -(-sq // 128) * 128), dtype=torch.float32)


def _interface_v27(dev: Device) -> types.ModuleType:
    def flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
    ):  # fmt: skip
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        D = q.shape[-1]
        qp, kp, vp = (_pad8(x) for x in (q, k, v))  # FlashAttnFunc pads in Python from 2.7
        out = _flash_attn_forward_v27(
            qp, kp, vp, dropout_p, scale, causal=causal, window_size_left=window_size[0],
            window_size_right=window_size[1], softcap=softcap, alibi_slopes=alibi_slopes,
            return_softmax=False,
        )[0]  # fmt: skip
        return out.narrow(-1, 0, D)

    return _module(_flash_attn_forward_v27, _flash_attn_backward_v27, flash_attn_func)


def _module(fwd, bwd, func) -> types.ModuleType:
    interface = types.ModuleType("flash_attn.flash_attn_interface")
    interface._flash_attn_forward = fwd
    interface._flash_attn_backward = bwd
    interface.flash_attn_func = func
    return interface


VERSIONS = ("2.5.0", "2.5.9.post1", "2.6.0", "2.6.3", "2.7.0.post2", "2.7.4.post1", "2.8.3")


@contextlib.contextmanager
def installed(version: str, capability=(9, 0), allow_cpu: bool = False):
    """Puts a stand-in ``flash_attn`` of ``version`` in ``sys.modules`` (and tells the
    project's backend layer which GPU it runs on); yields the stand-in's Device."""
    global _active
    release = backends.version_tuple(version)
    dev = Device(release, tuple(capability), allow_cpu)
    if release >= (2, 7, 0):
        interface = _interface_v27(dev)
    elif release >= (2, 6, 0):
        interface = _interface_v26(dev)
    else:
        interface = _interface_v25(dev)
    package = types.ModuleType("flash_attn")
    package.__version__ = version
    package.flash_attn_interface = interface
    package.flash_attn_func = interface.flash_attn_func
    names = ("flash_attn", "flash_attn.flash_attn_interface")
    saved = {name: sys.modules.get(name) for name in names}
    saved_capability = backends.cuda_capability
    sys.modules.update(dict(zip(names, (package, interface), strict=True)))
    backends.cuda_capability = lambda device: dev.capability
    backends.flash_attn_version.cache_clear()
    _active = dev
    try:
        yield dev
    finally:
        _active = None
        backends.cuda_capability = saved_capability
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        backends.flash_attn_version.cache_clear()
