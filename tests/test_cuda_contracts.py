"""The CUDA glue against the real kernels' contracts, on this CPU: fake CUDA tensors through
a dispatch mode that asserts the upstream C++ preconditions (tests/support/cuda_contract.py),
and stand-in flash_attn packages with the exact signatures of 2.5, 2.6 and 2.7+
(tests/support/flash_attn_standin.py). No GPU runs here; `make gpu-check` is the GPU side.
"""

import warnings

import pytest
import torch

from models.attention import backends
from models.attention.backends import attention_backward, attention_forward, efficient_lse
from models.attention.dilated import dilated_plan
from models.attention.mixing import mixed_backward, mixed_forward
from tests.support import flash_attn_standin
from tests.support.cuda_contract import fake_cuda
from tests.support.fake_runs import PATTERNS, fake_forward_backward
from tests.support.flash_compare import assert_flash_equals_math

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp64": torch.float64}  # fmt: skip
HEAD_DIMS = (16, 40, 64, 128)
FLASH = ("2.5.0", "2.6.3", "2.8.3")  # one per interface generation; every tag below


@pytest.fixture
def h200(monkeypatch):
    """The backend layer sees an sm90 GPU (fake CUDA tensors have no real device)."""
    monkeypatch.setattr(backends, "cuda_capability", lambda device: (9, 0))


def check_result(plan, out, grads, dtype, head_dim):
    B, N, H = plan.q.shape[:3]
    assert out.shape == (B, N, H, head_dim) and out.dtype == dtype and out.is_cuda
    for g in grads:
        assert g.shape == (B, N, H, head_dim) and g.dtype == dtype


# ----------------------------------------------------------------------------------------------
# the matrix: every pattern x dtype x head_dim, torch's kernels and each flash-attn generation


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_torch_kernels_meet_their_contract(h200, pattern, dtype, head_dim):
    contract, plan, out, grads = fake_forward_backward(pattern, DTYPES[dtype], head_dim)
    check_result(plan, out, grads, DTYPES[dtype], head_dim)
    if dtype == "fp64":  # no CUDA kernel takes float64: plain matmuls
        assert plan.backend == "math" and contract.calls == []
    else:
        assert plan.backend == "torch"
        assert "_scaled_dot_product_efficient_attention_backward" in contract.calls


@pytest.mark.parametrize("head_dim", (*HEAD_DIMS, 20, 250))
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("version", FLASH)
def test_flash_attn_meets_its_contract(h200, version, pattern, dtype, head_dim):
    with flash_attn_standin.installed(version):
        contract, plan, out, grads = fake_forward_backward(pattern, DTYPES[dtype], head_dim)
    check_result(plan, out, grads, DTYPES[dtype], head_dim)
    assert plan.backend == "flash"
    masked = pattern == "sliding"  # flash-attn takes no mask: those calls go to torch's kernel
    assert bool(contract.calls) == masked


@pytest.mark.parametrize("version", flash_attn_standin.VERSIONS)
def test_every_flash_release_is_called_correctly(h200, version):
    with flash_attn_standin.installed(version):
        contract, plan, out, grads = fake_forward_backward("dilated", torch.bfloat16, 64)
    assert plan.backend == "flash" and contract.calls == []


# ----------------------------------------------------------------------------------------------
# one test per defect found in review (each failed on the code before the fix; see the note)


def test_flash_27_custom_ops_are_called_by_their_schema_names(h200):
    """Defect 1: 2.7+ entry points are torch.library custom ops whose inspect.signature is
    (*args, **kwargs); filtering keywords by it dropped every argument."""
    with flash_attn_standin.installed("2.8.3"):
        params = backends.flash_parameters(flash_attn_standin._flash_attn_forward_v27)
        assert [name for name, _ in params][:3] == ["q", "k", "v"]
        with fake_cuda():
            q = torch.randn(2, 64, 4, 64, device="cuda", dtype=torch.bfloat16)
            kw = dict(causal=True, scale=0.125, backend="flash")
            out, lse = attention_forward(q, q, q, **kw)
            grads = attention_backward(out, q, q, q, out, lse, **kw)
    assert out.shape == q.shape and lse.shape == (2, 64, 4) and grads[0].shape == q.shape


def test_half_backward_gets_packed_output_rows(h200):
    """Defect 2: the fp16/bf16 efficient backward reads `out` rows at head_dim * num_heads
    (kernel_backward.h o_strideM); a strided view of the mixed output gave wrong gradients."""
    contract, *_ = fake_forward_backward("dilated", torch.bfloat16, 64)
    assert "_scaled_dot_product_efficient_attention_backward" in contract.calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_masks_are_aligned_for_windows_not_a_multiple_of_8(h200, dtype):
    """Defect 3: a bias row stride of 12 elements: "attn_bias is not correctly aligned
    (strideM)". The bias is now stored with rows padded to 8, as public SDPA does."""
    contract, *_ = fake_forward_backward("sliding", dtype, 64)
    assert "_scaled_dot_product_efficient_attention" in contract.calls


@pytest.mark.parametrize("head_dim,backend", [(20, "flash"), (36, "flash"), (288, "torch")])
def test_head_dims_flash_cannot_take_are_padded_or_fall_back(h200, head_dim, backend):
    """Defect 4: head_dim % 8 != 0 (padded to a multiple of 8, as FlashAttnFunc does) or
    above 256 (torch's kernel, which takes up to 65536)."""
    with flash_attn_standin.installed("2.8.3"):
        contract, plan, out, grads = fake_forward_backward("dilated", torch.float16, head_dim)
    assert plan.backend == backend
    check_result(plan, out, grads, torch.float16, head_dim)


def test_forced_flash_with_a_head_dim_it_cannot_take_names_it(h200):
    with flash_attn_standin.installed("2.8.3"), fake_cuda():
        q = torch.randn(1, 16, 2, 288, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="head_dim <= 256, got 288"):
            dilated_plan(q, q, q, [8], [1], backend="flash")


def test_float64_on_cuda_uses_plain_matmuls(h200):
    """Defect 5: backend='auto' picked the efficient kernel, which has no float64."""
    contract, plan, *_ = fake_forward_backward("dilated", torch.float64, 64)
    assert plan.backend == "math" and contract.calls == []
    with fake_cuda():
        q = torch.randn(1, 16, 2, 8, device="cuda", dtype=torch.float64)
        with pytest.raises(ValueError, match="fp32, fp16 and bf16, got dtype=torch.float64"):
            dilated_plan(q, q, q, [8], [1], backend="torch")


def test_no_call_exceeds_the_cuda_grid(h200):
    """Batch x segments folded into one call: at most 65535 groups (flash-attn's gridDim.y)."""
    with flash_attn_standin.installed("2.8.3"):
        # window 2, 140000 tokens: 70000 chunks of 2 rows would be one call of 70000 groups
        contract, plan, *_ = fake_forward_backward("blockwise_2", torch.bfloat16, 16,
                                                   shape=(1, 140_000, 1))  # fmt: skip
    assert max(c.q.groups for c in plan.calls) <= backends.MAX_CUDA_GROUPS


def test_backward_lse_is_padded_with_inf():
    """The efficient backward reads LSE rows up to a multiple of 32: padded rows must weigh 0,
    as the forward writes them (+inf), whatever the padded queries hold."""
    lse = torch.randn(3, 40, 2)
    padded = efficient_lse(lse)
    assert padded.shape == (3, 2, 64) and padded.is_contiguous()
    assert torch.equal(padded[..., :40], lse.transpose(1, 2))
    assert torch.isinf(padded[..., 40:]).all() and (padded[..., 40:] > 0).all()


# ----------------------------------------------------------------------------------------------
# choosing a kernel: GPU generation, flash-attn release, dtype


@pytest.mark.parametrize(
    "version,capability,dtype,head_dim,expected",
    [
        ("2.8.3", (9, 0), torch.bfloat16, 64, "flash"),
        ("2.8.3", (12, 0), torch.bfloat16, 64, "flash"),  # 2.7.4+: any sm >= 80
        ("2.7.0", (12, 0), torch.bfloat16, 64, "torch"),  # before: sm8x or sm90 only
        ("2.5.0", (8, 6), torch.float16, 64, "flash"),
        ("2.5.0", (8, 9), torch.float16, 256, "torch"),  # bwd hd > 192 needs sm80/sm90
        ("2.6.3", (8, 9), torch.float16, 256, "flash"),
        ("2.8.3", (7, 5), torch.float16, 64, "torch"),  # flash needs sm80
        ("2.8.3", (7, 5), torch.bfloat16, 64, "math"),  # bf16 kernels need sm80
        ("2.8.3", (9, 0), torch.float32, 64, "torch"),
        ("2.8.3", (9, 0), torch.float64, 64, "math"),
    ],
)
def test_auto_picks_a_kernel_that_runs(version, capability, dtype, head_dim, expected):
    with flash_attn_standin.installed(version, capability), fake_cuda():
        q = torch.randn(1, 8, 2, head_dim, device="cuda", dtype=dtype)
        assert backends.resolve_backend("auto", q) == expected


def test_unsupported_flash_release_is_skipped_with_a_warning():
    with flash_attn_standin.installed("2.9.1"), fake_cuda():
        q = torch.randn(1, 8, 2, 64, device="cuda", dtype=torch.bfloat16)
        backends._warned.discard("2.9.1")
        with pytest.warns(UserWarning, match="2.9.1 is outside the supported range"):
            assert backends.resolve_backend("auto", q) == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per version
            backends.resolve_backend("auto", q)
        with pytest.raises(ValueError, match=r"outside the supported range >=2.5,<2.9"):
            backends.resolve_backend("flash", q)


def test_version_parsing():
    assert backends.version_tuple("2.7.4.post1") == (2, 7, 4)
    assert backends.version_tuple("2.8.3+cu130torch2.11") == (2, 8, 3)
    assert backends.version_tuple("2.10") == (2, 10, 0)
    assert [backends.flash_version_supported(v) for v in ("2.4.2", "2.5.0", "2.8.3", "2.9.0")] \
        == [False, True, True, False]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# the glue's numbers: each stand-in computes real attention on CPU tensors


@pytest.mark.parametrize("head_dim", [20, 64])
@pytest.mark.parametrize("version", FLASH)
def test_flash_glue_gives_the_mixed_attention_numbers(version, head_dim):
    """Dilated attention through each flash-attn interface (padding, LSE layouts, in-place
    gradients included) equals the same plan on plain matmuls."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (
        torch.randn(2, 50, 4, head_dim, generator=gen).to(torch.bfloat16) for _ in range(4)
    )
    reference = dilated_plan(q, k, v, [10, 25], [1, 3], backend="math")
    assert_flash_equals_math(reference, mixed_forward, mixed_backward, dout, version,
                             grads=lambda g: [g[0], *g[1][0]])  # fmt: skip
