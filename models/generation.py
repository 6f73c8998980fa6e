"""Sampling and the generation loop on top of :class:`models.decoding.Decoder`: greedy,
temperature, top-k and nucleus (top-p) sampling, seeded through a ``torch.Generator``; prefill
and decode timed apart; each new token handed to a callback as it is made (streaming)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from models.decoding import DecodeError, Decoder
from models.transformer import TransformerLM


def check_sampling(temperature: float, top_k: int | None, top_p: float) -> None:
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise DecodeError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise DecodeError(f"top_k must be a positive integer or None, got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise DecodeError(f"top_p must be in (0, 1], got {top_p!r}")


def sample(logits, temperature=1.0, top_k=None, top_p=1.0, generator=None) -> torch.Tensor:
    """``logits (B, vocab)`` -> tokens ``(B,)``: greedy at ``temperature == 0``; otherwise
    drawn from softmax(logits / temperature) restricted to the ``top_k`` most likely tokens,
    then to the fewest whose probabilities sum to at least ``top_p`` (nucleus)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # tokens after the nucleus is complete
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    """``tokens (B, P + new)``: prompt and continuation (after an end token, that token
    again); seconds spent in prefill and in decoding."""

    tokens: torch.Tensor
    prompt_len: int
    prefill_s: float
    decode_s: float
    cache_bytes: int

    @property
    def new_tokens(self) -> int:
        return self.tokens.shape[1] - self.prompt_len


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def generate(
    model: TransformerLM,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    prefill_chunk: int | None = None,
    on_token=None,
) -> Generation:
    """Continues each row of ``prompt (B, P)`` by up to ``max_new_tokens`` tokens; stops early
    once every row has produced ``eos_id`` (None: never). ``on_token(tokens (B,))`` is
    called with each new column as it is made (streaming)."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise DecodeError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    device = prompt.device
    decoder = Decoder(model, prompt.shape[0], prompt.shape[-1] + max(max_new_tokens, 1))
    start = _clock(device)
    logits = decoder.prefill(prompt, chunk=prefill_chunk)
    prefill_s, columns = _clock(device) - start, [prompt]
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        columns.append(token[:, None])
        if on_token is not None:
            on_token(token)
        if i + 1 == max_new_tokens or bool(done.all()):
            break
        logits = decoder.step(token)
    decode_s = _clock(device) - start - prefill_s
    tokens = torch.cat(columns, 1)  # (B, P + new)
    return Generation(tokens, prompt.shape[1], prefill_s, decode_s, decoder.nbytes())
