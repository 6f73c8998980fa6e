"""Window methods of eval.py: which tokens of a document are scored, and given what context.

A plan is a list of ``(begin, end, score_from)`` over one document's token sequence ``seq``:
the window ``seq[begin:end]`` is run (``end - begin - 1`` inputs, each predicting the next
token) and its targets at positions ``score_from .. end - 1`` are scored. Context length L is
the most inputs any prediction sees, so a full window holds L + 1 tokens.

======== ========================================================= ============================
method   windows                                                   scored
======== ========================================================= ============================
disjoint windows of L+1 tokens at 0, L, 2L, ... that fit the span   tokens 1 .. kL (the tail of
         (each shares its first token with the last target of the  fewer than L tokens and the
         previous one: every scored token sees 1 .. L of context)   first token: not scored)
strided  YaRN's eval/perplexity.py (``--sliding-window S``, no BOS; every token 1 .. end; the
         its ``max_length`` is L + 1): windows begin at 0, S, 2S,  last window may be shorter;
         ...; each scores only the tokens the previous did not;    S = L: disjoint plus the tail
         the last ends at the document's end                        (equal when L divides n - 1)
truncate YaRN's ``--truncate``: the first L + 1 tokens, once        tokens 1 .. L of each doc
rolling  lm-evaluation-harness's ``loglikelihood_rolling``: the     every token of the document,
         document after one start token (EOD; a Hugging Face model: the first given the start
         BOS, else EOS), disjoint windows of L + 1 tokens, and a   token
         last full-length window ending at the document's end that
         scores only what is left
======== ========================================================= ============================

Disjoint is the cheapest (each token runs once) and gives each token L/2 of context on average;
strided with a small stride gives each token at least L - S (an estimate closer to "the loss
at context L", at L/S times the compute). Truncate measures the beginning of documents only.
"""

from __future__ import annotations

METHODS = ("disjoint", "strided", "truncate", "rolling")


def plan(n: int, length: int, method: str, stride: int | None = None) -> list[tuple[int, int, int]]:
    """``(begin, end, score_from)`` windows over a sequence of ``n`` tokens at context
    ``length`` (for ``rolling``, ``n`` counts the start token in front of the document)."""
    if method == "disjoint":
        return [(b, b + length + 1, b + 1) for b in range(0, n - length, length)]
    if method == "truncate":
        return [(0, length + 1, 1)] if n > length else []
    if method == "strided":
        return _strided(n, length + 1, stride or length)
    if method == "rolling":
        return _rolling(n, length)
    raise ValueError(f"window={method!r} is not one of {METHODS}")


def _strided(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """YaRN's loop (eval/perplexity.py, ``compute_perplexity``) with ``add_start_token``
    false: ``trg_len = end - prev_end`` targets of each window, shifted by one inside it."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n:
            break
    return [w for w in out if w[2] < w[1]]


def _rolling(n: int, length: int) -> list[tuple[int, int, int]]:
    """lm-eval's ``get_rolling_token_windows(tokens, prefix, max_seq_len=L, context_len=1)``
    in positions of ``[prefix] + tokens``: the first window predicts tokens 1 .. L, then each
    the next L with the L tokens before, the last one moved back to end at ``n``."""
    first = min(length, n - 1) + 1
    out, done = [(0, first, 1)], first
    while done < n:
        end = min(done + length, n)
        out.append((end - length - 1, end, done))
        done = end
    return out if n > 1 else []
