"""On a CUDA GPU: every attention pattern, forward and gradients, against the float64
references, in fp32, bf16 and fp16, through torch's kernels and flash-attn (when installed).
Skipped without CUDA (`make gpu-check` runs them and reports). The CPU side of the same
contracts: tests/test_cuda_contracts.py."""

import pytest
import torch

from models.attention.backends import flash_unsupported, resolve_backend
from models.attention.dilated import dilated_attention
from models.attention.sliding import blockwise_attention, sliding_window_attention
from models.attention.sparse import sparse_attention
from models.transformer import ModelConfig, TransformerLM
from tests.support.references import (
    blockwise_mask,
    dilated_attention_ref,
    masked_attention_ref,
    sliding_mask,
    sparse_mask,
)

pytestmark = pytest.mark.gpu

SEGS, RATES = [16, 40, 100, 200], [1, 2, 4, 6]
PATTERNS = {
    # name: (run(q, k, v, backend), reference(q, k, v) in float64)
    "dilated": (
        lambda q, k, v, b: dilated_attention(q, k, v, SEGS, RATES, backend=b),
        lambda q, k, v: dilated_attention_ref(q, k, v, SEGS, RATES),
    ),
    "dilated_bidirectional": (
        lambda q, k, v, b: dilated_attention(q, k, v, [24, 64], [1, 4], causal=False, backend=b),
        lambda q, k, v: dilated_attention_ref(q, k, v, [24, 64], [1, 4], causal=False),
    ),
    "sparse": (
        lambda q, k, v, b: sparse_attention(q, k, v, 16, 4, backend=b),
        lambda q, k, v: masked_attention_ref(q, k, v, sparse_mask(q.shape[1], 16, 4)),
    ),
    "sliding": (
        lambda q, k, v, b: sliding_window_attention(q, k, v, 12, backend=b),
        lambda q, k, v: masked_attention_ref(q, k, v, sliding_mask(q.shape[1], 12)),
    ),
    "blockwise": (
        lambda q, k, v, b: blockwise_attention(q, k, v, 40, backend=b),
        lambda q, k, v: masked_attention_ref(q, k, v, blockwise_mask(q.shape[1], 40)),
    ),
}
# output tolerance per dtype (fp32 allows TF32 matmuls); gradients get 10x
TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float64: 1e-10}


def compare(pattern, dtype, backend, head_dim, B=2, N=200, H=6, seed=0):
    run, ref = PATTERNS[pattern]
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(B, N, H, head_dim, generator=gen) for _ in range(4))
    leaves = [x.cuda().to(dtype).detach().requires_grad_() for x in (q, k, v)]
    out = run(*leaves, backend)
    (out.double() * grad.cuda().double()).sum().backward()
    ref_in = [x.detach().double().cuda().requires_grad_() for x in (q, k, v)]
    want = ref(*ref_in)
    (want * grad.cuda().double()).sum().backward()
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == (B, N, H, head_dim)
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=0)
    for name, leaf, r in zip("qkv", leaves, ref_in, strict=True):
        torch.testing.assert_close(leaf.grad.double(), r.grad, atol=10 * tol, rtol=0,
                                   msg=lambda m, n=name: f"grad {n}: {m}")  # fmt: skip


def skip_unless_flash(dtype, head_dim):
    probe = torch.empty(1, 1, 1, head_dim, device="cuda", dtype=dtype)
    reason = flash_unsupported(probe)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("head_dim", [64, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])  # fmt: skip
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_torch_kernels_match_reference(pattern, dtype, head_dim):
    compare(pattern, dtype, "torch", head_dim)


@pytest.mark.parametrize("head_dim", [64, 128, 20])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_flash_attn_matches_reference(pattern, dtype, head_dim):
    skip_unless_flash(dtype, head_dim)
    compare(pattern, dtype, "flash", head_dim)


@pytest.mark.parametrize("pattern", ["dilated", "sliding"])
def test_float64_runs_on_plain_matmuls(pattern):
    assert resolve_backend("auto", torch.empty(1, device="cuda", dtype=torch.float64)) == "math"
    compare(pattern, torch.float64, "auto", 32)


def test_head_dim_above_256_falls_back_to_torch():
    compare("dilated", torch.bfloat16, "auto", 288, N=100, H=2)


def test_long_sequence_many_groups():
    """A window of 2 over 140K tokens: calls are cut at the grid's 65535 groups."""
    q = torch.randn(1, 140_000, 1, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = blockwise_attention(q, q, q, 2)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("attention", ["dilated", "dense", "sparse", "sliding"])
def test_training_step_bf16_autocast(attention):
    config = ModelConfig(
        vocab_size=256, d_model=128, n_layer=2, n_head=4, d_ff=256, attention=attention,
        segment_lengths=[32, 64, 128], dilation_rates=[1, 2, 4], window=32, sparse_block=32,
        sparse_summary=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = TransformerLM(config).cuda()
    tokens = torch.randint(0, 256, (2, 300), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
