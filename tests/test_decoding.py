"""models/decoding.py and models/generation.py: prefill + token-by-token decoding gives the
full forward's logits at every position (the full forward is the reference twin), for every
attention and position type; chunked prefill, batches, seeded sampling, the cache's size, and
what is refused."""

import math

import pytest
import torch

from models.decoding import DecodeError, Decoder, cache_bytes, cache_rows, prefill_unit
from models.generation import generate, sample
from models.transformer import ModelConfig, TransformerLM

SMALL = dict(vocab_size=50, d_model=32, n_layer=2, d_ff=64, xpos_scale_base=32.0)
ATTENTIONS = {
    # the schedule: n_head = 2 < r = 4, segments of every pair crossed several times
    "dilated": dict(attention="dilated", n_head=2, segment_lengths=[8, 16, 48],
                    dilation_rates=[1, 2, 4]),
    # w not divisible by r, heads < r, a largest segment that does not divide the length
    "dilated_odd": dict(attention="dilated", n_head=4, segment_lengths=[7, 18, 45],
                        dilation_rates=[1, 4, 6]),
    "dilated_stretch": dict(attention="dilated", n_head=2, segment_lengths=[8, 32],
                            dilation_rates=[1, 2], stretch_last=True),
    "dense": dict(attention="dense", n_head=2),
    "blockwise": dict(attention="dense", n_head=2, blockwise=16),
    "sliding": dict(attention="sliding", n_head=2, window=12),
    "sparse": dict(attention="sparse", n_head=2, sparse_block=16, sparse_summary=3),
}  # fmt: skip
POSITIONS = ["xpos", "rope", "none"]
PROMPT, NEW = 5, 120  # the prompt ends mid-segment of every pair


def model_of(name: str, position: str = "xpos", seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(ModelConfig(**SMALL, **ATTENTIONS[name], position=position))
    return model.eval()


def tokens_of(batch: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, SMALL["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed)
    )


def decoded_logits(model, tokens, prompt=PROMPT, chunk=None) -> torch.Tensor:
    """Prefill ``prompt`` tokens, then feed the rest one at a time: logits (B, N, vocab)."""
    decoder = Decoder(model, tokens.shape[0], tokens.shape[1])
    out = [decoder.prefill(tokens[:, :prompt], chunk=chunk, all_logits=True)]
    out += [decoder.step(tokens[:, p])[:, None] for p in range(prompt, tokens.shape[1])]
    return torch.cat(out, 1)


def assert_every_position_close(got, want, rel=1e-5):
    err = (got - want).abs().amax(dim=(0, 2)) / want.abs().amax(dim=(0, 2))  # per position
    assert err.max() <= rel, f"position {int(err.argmax())}: relative error {float(err.max()):.2e}"


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_decoding_equals_the_full_forward(name, position):
    model = model_of(name, position)
    tokens = tokens_of(2, PROMPT + NEW)
    with torch.no_grad():
        want = model(tokens)
    assert_every_position_close(decoded_logits(model, tokens), want)


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_chunked_prefill_equals_one_shot(name):
    model = model_of(name)
    tokens = tokens_of(1, 110)
    with torch.no_grad():
        want = model(tokens)
    one_shot = decoded_logits(model, tokens, prompt=100)
    chunked = decoded_logits(model, tokens, prompt=100, chunk=1)  # rounded up to the unit
    assert prefill_unit(model.config, 110) < 100 or name.startswith("dilated")
    assert_every_position_close(chunked, one_shot)
    assert_every_position_close(chunked, want)


@pytest.mark.parametrize("name", ["dilated", "sparse", "sliding"])
def test_batch_equals_each_alone(name):
    model = model_of(name)
    tokens = tokens_of(3, 60)
    together = decoded_logits(model, tokens)
    for b in range(3):
        assert_every_position_close(together[b : b + 1], decoded_logits(model, tokens[b : b + 1]))


def test_seeded_sampling_is_reproducible():
    model, prompt = model_of("dilated"), tokens_of(2, PROMPT)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        kw = dict(temperature=0.9, top_k=20, top_p=0.9, generator=generator)
        return generate(model, prompt, 40, **kw).tokens

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_greedy_generation_feeds_back_the_argmax():
    """Reference twin of generate(): a loop over the full forward, re-run on the whole
    sequence for every new token."""
    model, prompt = model_of("dilated_odd"), tokens_of(2, 9)
    got = generate(model, prompt, 30, temperature=0).tokens
    want = prompt
    with torch.no_grad():
        for _ in range(30):
            want = torch.cat([want, model(want)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, want)


def test_generation_stops_when_every_row_has_ended():
    model, prompt = model_of("sliding"), tokens_of(2, PROMPT)
    first = generate(model, prompt, 1, temperature=0).tokens[:, -1]
    out = generate(model, prompt, 50, temperature=0, eos_id=int(first[0]))
    if first[0] == first[1]:  # both rows end at once
        assert out.new_tokens == 1
    row0 = out.tokens[0, PROMPT:]
    assert (row0 == first[0]).all()  # after its end token, a row repeats it


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_cache_bytes_equal_the_formula_after_every_step(name):
    model, total = model_of(name), PROMPT + NEW
    decoder = Decoder(model, 2, total)
    expected = cache_bytes(model.config, 2, total)
    decoder.prefill(tokens_of(2, PROMPT))
    for p in range(PROMPT, total):
        assert decoder.nbytes() == expected
        decoder.step(tokens_of(2, 1, seed=p)[:, 0])
    assert decoder.nbytes() == expected


def test_dilated_cache_is_bounded_by_the_schedule_not_the_context():
    cfg = model_of("dilated").config  # w = [8, 16, 48], r = [1, 2, 4]
    bound = sum(math.ceil(w / r) for w, r in zip([8, 16, 48], [1, 2, 4], strict=True))
    assert [cache_rows(cfg, n) for n in (48, 1000, 10**6)] == [bound] * 3
    assert cache_rows(cfg, 20) == 8 + 8 + 5  # segments longer than the sequence are cut
    dense = model_of("dense").config
    assert cache_rows(dense, 10**6) == 10**6
    assert cache_rows(model_of("sliding").config, 10**6) == 12


def test_sampling_keeps_only_the_top_k_and_the_nucleus():
    """Reference twin of sample(): the allowed tokens, from the definitions, by a loop."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    probs = logits.softmax(-1)[0].tolist()
    order = sorted(range(6), key=lambda i: -probs[i])
    nucleus, mass = set(), 0.0
    for i in order:  # the fewest most likely tokens whose mass reaches top_p
        if mass >= 0.8:
            break
        nucleus.add(i)
        mass += probs[i]
    generator = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, 1.0, None, 0.8, generator)) for _ in range(300)}
    assert drawn == nucleus
    drawn = {int(sample(logits, 1.0, 2, 1.0, generator)) for _ in range(300)}
    assert drawn == set(order[:2])
    assert int(sample(logits, 0.0)) == 5


def test_refuses_what_it_cannot_decode_exactly():
    dense = TransformerLM(
        ModelConfig(**{**SMALL, "xpos_scale_base": 1.0}, attention="dense", n_head=2)
    )
    with pytest.raises(DecodeError, match="cannot decode 200 positions.*XPOS"):
        Decoder(dense, 1, 200)  # XPOS scales over the whole sequence overflow float32
    dilated = TransformerLM(
        ModelConfig(**{**SMALL, **ATTENTIONS["dilated"], "xpos_scale_base": 1.0})
    )
    Decoder(dilated, 1, 10_000)  # anchored per largest segment: fine at any length
    stretched = TransformerLM(
        ModelConfig(
            **{**SMALL, "n_layer": 1, "d_model": 24},
            n_head=3,
            segment_lengths=[5],
            dilation_rates=[1],
            stretch_last=True,
        )  # fmt: skip
    )  # at 135 tokens its one pair is (135, 27): heads 0-2 see 3 of 27 offsets
    with pytest.raises(DecodeError, match="cannot decode 135 positions: .* attending nothing"):
        Decoder(stretched, 1, 135)  # the full forward refuses it too
    decoder = Decoder(model_of("dense"), 1, 6)
    with pytest.raises(DecodeError, match="step needs a prefilled prompt"):
        decoder.step(tokens_of(1, 1)[:, 0])
    with pytest.raises(DecodeError, match="at least one token"):
        decoder.prefill(tokens_of(1, 0))
    decoder.prefill(tokens_of(1, 6))
    with pytest.raises(DecodeError, match="7 positions exceed the decoder's total=6"):
        decoder.step(tokens_of(1, 1)[:, 0])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(temperature=-0.5), "temperature must be >= 0.*-0.5"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=0), "top_k must be a positive integer or None, got 0"),
    ],
)
def test_bad_sampling_arguments_are_named(kw, match):
    with pytest.raises(DecodeError, match=match):
        generate(model_of("dense"), tokens_of(1, 3), 2, **kw)


def test_decode_benchmark_runs_on_tiny_sizes(tmp_path):
    """experiments/bench/decode.py end to end at two tiny contexts (its numbers are not
    asserted: tests never assert a time); the cache it reports is the formula's."""
    from experiments.bench import decode

    rows = decode.main(["--sizes", "16", "40", "--new", "2", "--out", str(tmp_path)])
    assert (tmp_path / "decode.csv").exists() and len(rows) == 3 * 2
    dense = [r["cache_mib"] for r in rows if r["model"] == "transformer_tiny"]
    assert dense[1] > dense[0]  # dense grows with the context
