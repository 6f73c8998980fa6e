"""The output layer and cross-entropy in chunks of tokens: no ``N x vocab`` tensor, ever.

At long contexts the logits dominate a training step's memory: N tokens x V vocabulary x 4
bytes, kept for the backward and again for their gradient (32K tokens x 8192 = 1 GiB; at the
paper's 100K vocabulary, 400 KB per token). :func:`chunked_nll` computes, ``chunk`` tokens at
a time, ``logits = hidden @ weight.T``, their log-sum-exp and the target's negative
log-likelihood, and keeps only one float per token (the log-sum-exp). The backward recomputes
each chunk's logits and turns them into gradients of ``hidden`` and ``weight`` at once:
``d logits = softmax(logits) * g - onehot(target) * g``. A call that fits in one chunk keeps
that chunk's probabilities instead of recomputing them (the memory plain cross-entropy uses,
at most ``chunk x V``).
"""

from __future__ import annotations

import torch


def check_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"loss chunk must be a positive integer (tokens), got {chunk!r}")
    return chunk


def _logits(h: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(T_c, V) float32 logits, the matmul in ``dtype`` in the forward and the backward alike
    (autocast is off here: the backward runs outside it, and must see the same logits)."""
    with torch.autocast(h.device.type, enabled=False):
        return (h.to(dtype) @ weight.to(dtype).t()).float()


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return h.dtype


class _ChunkedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(nll)
        ctx.dtype = dtype = _compute_dtype(hidden)
        probs = None
        for s in range(0, hidden.shape[0], chunk):
            logits = _logits(hidden[s : s + chunk], weight, dtype)
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[s : s + chunk, None]).squeeze(1)
            nll[s : s + chunk] = lse[s : s + chunk] - picked
            if hidden.shape[0] <= chunk:  # one chunk: keep its probabilities, as plain CE would
                probs = torch.exp(logits.sub_(lse[:, None]))
        ctx.save_for_backward(hidden, weight, targets, lse, probs)
        ctx.chunk = chunk
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hidden, weight, targets, lse, probs = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[s : s + ctx.chunk], grad[s : s + ctx.chunk].float()
            if probs is None:  # recompute this chunk's probabilities
                d_logits = _logits(h, weight, ctx.dtype)  # in place from here: one chunk x V
                d_logits = d_logits.sub_(lse[s : s + ctx.chunk, None]).exp_()
            else:
                d_logits = probs
            d_logits.mul_(g[:, None])
            d_logits.scatter_add_(1, targets[s : s + ctx.chunk, None], -g[:, None])
            d_logits = d_logits.to(ctx.dtype)
            if grad_hidden is not None:
                grad_hidden[s : s + ctx.chunk] = d_logits @ weight.to(ctx.dtype)
            grad_weight.add_((d_logits.t() @ h.to(ctx.dtype)).float())
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
    """Per-token negative log-likelihood ``(T,)`` in float32 of ``hidden (T, C)`` under the
    output layer ``weight (V, C)`` (no bias), ``chunk`` tokens at a time, for targets ``(T,)``.
    Equal to ``cross_entropy(hidden @ weight.T, targets, reduction="none")``, gradients too."""
    check_chunk(chunk)
    return _ChunkedNLL.apply(hidden, weight, targets.long(), chunk)
