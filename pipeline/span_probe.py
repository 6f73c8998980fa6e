"""The repeated-span probe: how far back a language model actually looks, without training.

In a held-out window of L tokens, the last ``span`` tokens are a span S. The probe copies S
``d`` tokens earlier (overwriting the text there) and measures the mean NLL of S's tokens after
its first, with and without the earlier copy. A model that uses context at distance d predicts
the repeated span better (the NLL drops); one that cannot see d tokens back gains nothing. The
*drop* (NLL without - NLL with, nats per token) is reported for d on a grid of powers of two
from ``span`` to ``L - span``, over the first ``windows`` in-document windows of the split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distances(length: int, span: int, wanted: list[int] | None = None) -> list[int]:
    """``wanted`` (default: the powers of two) from ``span`` up to ``length - span``: the copy
    must not overlap S and must fit before it.

    Why other distances than powers of two: a one-hop copy of the token that followed the
    earlier occurrence attends ``d - 1`` tokens back, and a dilated pair (w, r) only connects
    positions whose distance is a multiple of r; at d = 2^k the hop is odd, reachable only by
    the r = 1 pairs, so a dilated model is probed at d = 2^k + 1 as well (hop 2^k)."""
    grid = sorted(set(wanted)) if wanted is not None else [2**k for k in range(40)]
    return [d for d in grid if span <= d <= length - span]


@torch.no_grad()
def span_nll(net, inputs: torch.Tensor, start: int, span: int) -> torch.Tensor:
    """``(W,)`` mean NLL of tokens ``start + 1 .. start + span - 1`` of ``inputs (W, L)``, each
    given everything before it (positions ``start .. start + span - 2`` predict them)."""
    hidden = net.hidden(inputs)[:, start : start + span - 1]  # (W, span - 1, C): small
    logp = F.log_softmax((hidden @ net.lm_head.weight.t()).float(), dim=-1)
    targets = inputs[:, start + 1 : start + span]
    return -logp.gather(-1, targets[..., None]).squeeze(-1).double().mean(-1)


def span_mean(nll: torch.Tensor, start: int, span: int) -> torch.Tensor:
    """``(W,)`` the mean of ``nll (W, L)`` (per-target NLL, position i predicting token i + 1)
    over positions ``start .. start + span - 2``: the tokens :func:`span_nll` scores."""
    return nll[:, start : start + span - 1].double().mean(-1)


def probe(net, windows: torch.Tensor, span: int = 32, wanted: list[int] | None = None,
          nll_fn=None):  # fmt: skip
    """Rows ``{distance, windows, nll_without, nll_with, drop}`` for ``windows (W, L + 1)``
    (only the L inputs are used), at ``distances(L, span, wanted)``.

    ``nll_fn (windows (W, L + 1) -> (W, L) per-target NLL, float64)``, when given, scores
    each window instead of :func:`span_nll`; the span's tokens are the same. Why: under
    context parallelism each rank holds a slice of every window, and ``net.hidden`` on the
    whole window would run it all on every rank (P times the work and the memory, at exactly
    the lengths context parallelism exists for); eval.py passes the model's split scoring
    (``scoring.model_nll``), which runs each rank's slice and gathers the NLL, and raises
    ``scoring.RankFailed`` on every rank if any fails. Without it (one process), only the
    span's rows go through the output layer. The window's last token (a target of neither)
    is left as it is in the copies."""
    length = windows.shape[1] - 1
    start = length - span  # S = windows[:, start:length]
    if nll_fn is None:
        one = lambda w: span_nll(net, w[None, :-1], start, span)  # noqa: E731
    else:
        one = lambda w: span_mean(nll_fn(w[None]), start, span)  # noqa: E731
    one_by_one = lambda x: torch.cat([one(w) for w in x])  # noqa: E731
    without = one_by_one(windows)  # (W,): windows run one at a time (L may be long)
    rows = []
    for d in distances(length, span, wanted):
        copied = windows.clone()
        copied[:, start - d : start - d + span] = windows[:, start:length]
        with_copy = one_by_one(copied)
        rows.append({"distance": d, "windows": int(windows.shape[0]),
                     "nll_without": float(without.mean()), "nll_with": float(with_copy.mean()),
                     "drop": float((without - with_copy).mean())})  # fmt: skip
    return rows
