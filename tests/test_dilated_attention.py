"""Dilated attention against a reference written from the definition (LongNet, sec. 2.2-2.3).

The reference (tests/support/references.py) builds, for every (head, query), the multiset of
keys that the pairs selecting that query attend, and takes one softmax over it, in float64,
with autograd for gradients. It shares no code with the implementation. GPU runs of the same
comparison: tests/test_gpu.py.
"""

import math

import pytest
import torch

from models.attention.dilated import DilatedAttention, dilated_attention
from tests.support.references import dilated_attention_ref, key_multiplicity

FWD_TOL, GRAD_TOL = 1e-5, 1e-4


def detached_mixing_ref(q, k, v, segment_lengths, dilation_rates, causal=True):
    """The official implementation's shortcut: per-pair softmax, mixing weights under no_grad."""
    B, N, H, D = q.shape
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    outs, lses = [], []
    for w, r in zip(segment_lengths, dilation_rates, strict=True):
        allowed = key_multiplicity(N, H, [w], [r], causal) > 0
        masked = s.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(masked, -1)  # (B, H, N), -inf where the query is not kept
        probs = torch.exp(masked - lse[..., None]).nan_to_num(0.0)
        outs.append(torch.einsum("bhij,bjhd->bihd", probs, v))
        lses.append(lse)
    with torch.no_grad():
        weights = torch.softmax(torch.stack(lses), dim=0).nan_to_num(0.0)  # (P, B, H, N)
    return sum(o * wt.permute(0, 2, 1)[..., None] for o, wt in zip(outs, weights, strict=True))


def run_both(B, N, H, D, segs, rates, causal, seed=0, backend="auto"):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, N, H, D, generator=gen, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(B, N, H, D, generator=gen)
    out = dilated_attention(q, k, v, segs, rates, causal=causal, backend=backend)
    (out * grad_out).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dilated_attention_ref(q64, k64, v64, segs, rates, causal)
    (ref * grad_out.double()).sum().backward()
    return (out, q.grad, k.grad, v.grad), (ref, q64.grad, k64.grad, v64.grad)


CASES = {
    # name: (B, N, H, D, segment_lengths, dilation_rates)
    "N_not_multiple_of_any_w": (1, 53, 4, 8, [8, 16], [1, 2]),
    "w_longer_than_N": (1, 40, 4, 8, [16, 64], [1, 4]),
    "w_not_divisible_by_r": (1, 64, 6, 8, [10, 22], [1, 6]),
    "H_not_multiple_of_r": (1, 48, 3, 8, [8, 16, 32], [1, 2, 4]),
    "fewer_heads_than_r": (1, 48, 2, 8, [8, 24], [1, 6]),
    "batch_of_three": (3, 37, 4, 8, [8, 16], [1, 2]),
    "paper_schedule_small": (2, 300, 12, 8, [16, 32, 64, 128, 256], [1, 2, 4, 6, 12]),
    "one_pair_r_gt_1_covering_w_eq_r": (1, 30, 4, 8, [1, 4], [1, 4]),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, causal):
    B, N, H, D, segs, rates = CASES[case]
    got, want = run_both(B, N, H, D, segs, rates, causal)
    assert got[0].dtype == torch.float32 and got[0].shape == (B, N, H, D)
    torch.testing.assert_close(got[0].double(), want[0], atol=FWD_TOL, rtol=0)
    for name, g, w in zip("qkv", got[1:], want[1:], strict=True):
        torch.testing.assert_close(g.double(), w, atol=GRAD_TOL, rtol=0, msg=f"grad {name}")


@pytest.mark.parametrize("causal", [True, False])
def test_single_full_pair_is_dense_attention(causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 33, 4, 16, generator=gen) for _ in range(3))
    out = dilated_attention(q, k, v, [64], [1], causal=causal)
    dense = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal
    ).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=FWD_TOL, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_math_backend_agrees(causal):
    segs, rates = [8, 20], [1, 3]
    got, _ = run_both(2, 45, 3, 8, segs, rates, causal, backend="torch")
    alt, _ = run_both(2, 45, 3, 8, segs, rates, causal, backend="math")
    for a, b in zip(got, alt, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("limit", ["CHUNK_ROWS", "CPU_CHUNK_ROWS"])
def test_chunked_path_matches(monkeypatch, limit):
    """Chunks of a few segments (as long sequences use), planned or cut at run time on CPU,
    give the same result as one chunk."""
    import models.attention.mixing as mixing

    whole, _ = run_both(2, 70, 4, 8, [8, 16, 32], [1, 2, 4], True, seed=3)
    monkeypatch.setattr(mixing, limit, 40)
    chunked, _ = run_both(2, 70, 4, 8, [8, 16, 32], [1, 2, 4], True, seed=3)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_detached_mixing_weights_give_wrong_gradients():
    """The bug we do not ship: mixing weights computed under no_grad are off by 10s of %."""
    segs, rates = [16, 32, 64], [1, 2, 4]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    grad_out = torch.randn(1, 64, 4, 8, generator=gen, dtype=torch.float64)
    rel = {}
    for name, fn in (("exact", dilated_attention_ref), ("detached", detached_mixing_ref)):
        qq = q.clone().requires_grad_()
        (fn(qq, k, v, segs, rates) * grad_out).sum().backward()
        rel[name] = qq.grad
    ours = q.clone().float().requires_grad_()
    (dilated_attention(ours, k.float(), v.float(), segs, rates) * grad_out.float()).sum().backward()
    exact = rel["exact"]
    assert ((ours.grad.double() - exact).norm() / exact.norm()).item() < 1e-5
    assert ((rel["detached"] - exact).norm() / exact.norm()).item() > 0.05


def test_module_and_inference_mode():
    attn = DilatedAttention([8, 16], [1, 2], causal=True, n_head=4)
    assert "segment_lengths=[8, 16]" in repr(attn)
    q, k, v = (torch.randn(1, 40, 4, 8) for _ in range(3))
    with torch.inference_mode():
        out = attn(q, k, v)
    torch.testing.assert_close(
        out.double(), dilated_attention_ref(q, k, v, [8, 16], [1, 2]), atol=FWD_TOL, rtol=0
    )


def test_strided_inputs_from_a_fused_projection():
    """q, k, v unbound from one (B, N, 3, H, D) projection are strided views: no copy needed."""
    qkv = torch.randn(2, 30, 3, 4, 8, requires_grad=True)
    q, k, v = qkv.unbind(2)
    out = dilated_attention(q, k, v, [8, 16], [1, 2])
    out.sum().backward()
    ref = dilated_attention_ref(q.detach(), k.detach(), v.detach(), [8, 16], [1, 2])
    torch.testing.assert_close(out.double(), ref, atol=FWD_TOL, rtol=0)
    assert torch.isfinite(qkv.grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype):
    """float64 stays exact; bf16 runs the kernel in bf16 and mixes in float32."""
    segs, rates = [8, 16], [1, 2]
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 40, 4, 8, generator=gen) for _ in range(3))
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = dilated_attention(*leaves, segs, rates)
    out.float().sum().backward()
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref = dilated_attention_ref(*ref_in, segs, rates)
    ref.sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 3e-2
    assert out.dtype == dtype and leaves[0].grad.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)
    for leaf, r in zip(leaves, ref_in, strict=True):
        torch.testing.assert_close(leaf.grad.double(), r.grad, atol=10 * tol, rtol=0)


@pytest.mark.slow
def test_paper_schedule_at_2k_tokens_chunked(monkeypatch):
    """The paper's schedule divided by 16, at N = 2000, cut into many chunks."""
    import models.attention.mixing as mixing

    monkeypatch.setattr(mixing, "CHUNK_ROWS", 4096)
    segs, rates = [128, 256, 512, 1024, 2048], [1, 2, 4, 6, 12]
    for causal in (True, False):
        got, want = run_both(1, 2000, 12, 16, segs, rates, causal, seed=5)
        torch.testing.assert_close(got[0].double(), want[0], atol=FWD_TOL, rtol=0)
        for g, w in zip(got[1:], want[1:], strict=True):
            torch.testing.assert_close(g.double(), w, atol=GRAD_TOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# bad input

BAD_SCHEDULES = [
    ([8, 16], [1], "same length"),
    ([], [], "at least one"),
    ([8, 0], [1, 2], "positive integers"),
    ([8, 16], [1, -2], "positive integers"),
    ([8, 16.0], [1, 2], "positive integers"),
    ("8", [1], "list of positive integers"),
    ([8], [2], "attending nothing"),  # r=2 alone: odd positions of head 0 get no key
]


@pytest.mark.parametrize("segs,rates,message", BAD_SCHEDULES)
def test_bad_schedule_is_rejected(segs, rates, message):
    q = torch.randn(1, 16, 2, 8)
    with pytest.raises(ValueError, match=message):
        dilated_attention(q, q, q, segs, rates)
    with pytest.raises(ValueError, match=message):
        DilatedAttention(segs, rates, n_head=2)


def test_uncovered_schedule_names_head_and_position():
    with pytest.raises(ValueError, match=r"head 0 at position 1 .* n_head=3"):
        DilatedAttention([8, 12], [2, 4], n_head=3)


@pytest.mark.parametrize(
    "shapes,message",
    [
        (((1, 8, 2, 4), (1, 8, 2, 4), (1, 9, 2, 4)), "same shape"),
        (((8, 2, 4), (8, 2, 4), (8, 2, 4)), "4-D"),
        (((1, 0, 2, 4), (1, 0, 2, 4), (1, 0, 2, 4)), "at least 1"),
    ],
)
def test_bad_tensors_are_rejected(shapes, message):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        dilated_attention(q, k, v, [8], [1])


def test_bad_backend_and_scale_are_rejected():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="not one of"):
        dilated_attention(q, q, q, [8], [1], backend="cudnn")
    with pytest.raises(ValueError, match="flash-attn"):
        dilated_attention(q, q, q, [8], [1], backend="flash")
    with pytest.raises(ValueError, match="scale"):
        dilated_attention(q, q, q, [8], [1], scale=-1.0)
