"""One check shared by the kernel-plan tests: a plan run through a flash-attn stand-in equals
the same plan on plain matmuls, forward (output, log-sum-exp) and backward, at bf16 tolerances."""

import dataclasses

import torch

from tests.support import flash_attn_standin


def assert_flash_equals_math(reference, forward, backward, dout, version, grads=lambda g: g):
    """``reference``: a plan with ``backend="math"``; ``forward(plan) -> (out, lse)``,
    ``backward(plan, dout, out, lse) -> gradients``; ``grads`` flattens them into a list."""
    out_ref, lse_ref = forward(reference)
    grads_ref = backward(reference, dout, out_ref, lse_ref)
    with flash_attn_standin.installed(version, allow_cpu=True):
        flash = dataclasses.replace(reference, backend="flash")
        out, lse = forward(flash)
        grads_flash = backward(flash, dout, out, lse)
    torch.testing.assert_close(out.float(), out_ref.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(lse, lse_ref, atol=1e-3, rtol=0)
    for g, r in zip(grads(grads_flash), grads(grads_ref), strict=True):
        torch.testing.assert_close(g.float(), r.float(), atol=5e-2, rtol=0)
