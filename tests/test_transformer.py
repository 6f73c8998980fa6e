"""TransformerLM: causality, equivalences between attention types, configs, size and cost."""

from pathlib import Path

import pytest
import torch

from models.transformer import ModelConfig, TransformerLM, flops_per_token, n_params
from settings.loading import model_config_named

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "model").glob("*.yaml"))

SMALL = dict(vocab_size=64, d_model=32, n_layer=2, n_head=4, d_ff=64)
PATTERNS = {
    "dense": {},
    "dilated": dict(segment_lengths=[8, 16], dilation_rates=[1, 2]),
    "sparse": dict(sparse_block=8, sparse_summary=2),
    "sliding": dict(window=8),
}


def small(attention, **kw):
    return ModelConfig(**SMALL, attention=attention, **{**PATTERNS[attention], **kw})


@pytest.mark.parametrize("norm", ["subln", "pre"])
@pytest.mark.parametrize("attention", list(PATTERNS))
def test_causal(attention, norm):
    """d logits[i] / d embedding[j] is exactly zero for every j > i."""
    torch.manual_seed(0)
    model = TransformerLM(small(attention, norm=norm))
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["emb"] = output

    model.embed.register_forward_hook(keep)
    tokens = torch.randint(0, 64, (1, 40))
    logits = model(tokens)
    for i in (0, 7, 8, 17, 39):
        captured["emb"].grad = None
        logits[0, i].sum().backward(retain_graph=True)
        grad = captured["emb"].grad[0]
        assert (grad[i + 1 :] == 0).all(), f"position {i} sees the future"
        assert grad[i].abs().sum() > 0


def test_dilated_single_full_pair_equals_dense():
    torch.manual_seed(1)
    dense = TransformerLM(small("dense"))
    dilated = TransformerLM(small("dilated", segment_lengths=[64], dilation_rates=[1]))
    dilated.load_state_dict(dense.state_dict())
    tokens = torch.randint(0, 64, (2, 50))
    torch.testing.assert_close(dilated(tokens), dense(tokens), atol=1e-5, rtol=1e-5)


def test_same_parameter_count_for_every_attention():
    counts = {a: n_params(small(a)) for a in PATTERNS}
    assert len(set(counts.values())) == 1, counts


def test_parameter_count_by_hand():
    cfg = small("dense")
    d, f, v, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layer
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    norms = 4 * d + 2 * d + 2 * f  # two block norms, Sub-LN inside attention and FFN
    assert n_params(cfg) == v * d + L * (per_layer + norms) + 2 * d
    assert n_params(small("dense", norm="pre")) == v * d + L * (per_layer + 4 * d) + 2 * d


@pytest.mark.parametrize("attention", list(PATTERNS))
@pytest.mark.parametrize("n", [1, 3, 33])
def test_runs_at_any_length(attention, n):
    model = TransformerLM(small(attention))
    logits = model(torch.randint(0, 64, (2, n)))
    assert logits.shape == (2, n, 64) and torch.isfinite(logits).all()


def test_flops_order_at_long_context():
    """At 32K tokens the dense model costs the most, LongNet and its matched sparse about the
    same; at 2K dense is cheapest-or-close. Attention FLOPs are counted per type."""
    cfgs = {p.stem: model_config_named(p.stem) for p in CONFIGS}
    f = {k: flops_per_token(c, 32768) for k, c in cfgs.items() if k.endswith("_base")}
    assert f["transformer_base"] > 2 * f["longnet_base"]
    assert f["sparse_transformer_base"] == pytest.approx(f["longnet_base"], rel=0.01)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_model_yaml_builds_on_meta(path):
    cfg = model_config_named(path.stem)
    with torch.device("meta"):
        model = TransformerLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == n_params(cfg)


def test_paper_sizes():
    """Parameter counts of the paper's sizes (vocabulary 32768, tied embeddings)."""
    sizes = {}
    for name in ("longnet_base", "longnet_350m", "longnet_760m", "longnet_2_7b"):
        sizes[name] = n_params(model_config_named(name))
    assert 100e6 < sizes["longnet_base"] < 150e6
    assert 300e6 < sizes["longnet_350m"] < 400e6
    assert 650e6 < sizes["longnet_760m"] < 800e6
    assert 2.4e9 < sizes["longnet_2_7b"] < 2.9e9


BAD = [
    (dict(attention="flash"), "attention must be one of"),
    (dict(position="alibi"), "position must be one of"),
    (dict(norm="post"), "norm must be one of"),
    (dict(init="xavier"), "init must be one of"),
    (dict(d_model=30), "divisible by n_head"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(dropout=1.5), "dropout must be in"),
    (dict(segment_lengths=[8, 16], dilation_rates=[2, 2]), "attending nothing"),
    (dict(segment_lengths=[8], dilation_rates=[1, 2]), "same length"),
    (dict(attention="sliding", window=0), "window must be a positive integer"),
    (dict(attention="sparse", sparse_block=4, sparse_summary=8), "at most sparse_block"),
    (dict(d_model=36, n_head=4, position="rope"), "even head dimension"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL, **overrides})


@pytest.mark.parametrize(
    "norm,init,embed_std,qkv_std",
    [
        ("subln", "auto", 32**-0.5, (2 / (32 + 96)) ** 0.5),  # magneto: Xavier (q, k rows)
        ("pre", "auto", 0.02, 0.02),  # gpt2
        ("pre", "magneto", 32**-0.5, (2 / (32 + 96)) ** 0.5),
        ("subln", "gpt2", 0.02, 0.02),
        ("pre", "torch", 1.0, (3 * 32) ** -0.5),  # uniform +-1/sqrt(fan_in)
    ],
)
def test_init_schemes(norm, init, embed_std, qkv_std):
    """Each scheme's scales, measured on a wide-enough sample (untied, so the embedding keeps
    its own)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**SMALL, "vocab_size": 4096}, norm=norm, init=init, tie_embeddings=False)
    model = TransformerLM(cfg)
    qk = model.blocks[0].attn.qkv.weight[: 2 * 32]  # q and k rows: no gamma on them
    assert model.embed.weight.std().item() == pytest.approx(embed_std, rel=0.05)
    assert qk.std().item() == pytest.approx(qkv_std, rel=0.1)
    biases_zero = init != "torch"
    assert (model.blocks[0].attn.qkv.bias.abs().max().item() == 0) == biases_zero


@pytest.mark.parametrize("tie", [False, True])
def test_embed_std_redraws_the_embedding_alone(tie):
    """``embed_std`` changes the input embedding (and a tied output layer with it) and nothing
    else: every other weight is the paper's init as drawn without it."""
    cfg = dict(**{**SMALL, "vocab_size": 4096}, norm="subln", init="magneto", tie_embeddings=tie)
    torch.manual_seed(0)
    plain = TransformerLM(ModelConfig(**cfg))
    torch.manual_seed(0)
    redrawn = TransformerLM(ModelConfig(**cfg, embed_std=1.0))
    assert redrawn.embed.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert plain.embed.weight.std().item() == pytest.approx(32**-0.5, rel=0.05)
    assert (redrawn.lm_head.weight is redrawn.embed.weight) == tie
    others = [n for n, _ in plain.named_parameters() if not n.startswith(("embed", "lm_head"))]
    for name in others:
        torch.testing.assert_close(
            dict(redrawn.named_parameters())[name], dict(plain.named_parameters())[name]
        )


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), True, "1"])
def test_bad_embed_std_is_rejected(bad):
    with pytest.raises(ValueError, match="embed_std must be a positive number or null, got"):
        ModelConfig(**SMALL, embed_std=bad)


def test_unknown_key_is_rejected():
    with pytest.raises(ValueError, match=r"unknown model keys \['n_layers'\]"):
        ModelConfig.from_dict({**SMALL, "n_layers": 3})


def test_bad_tokens_are_rejected():
    model = TransformerLM(small("dense"))
    with pytest.raises(ValueError, match="tokens must be"):
        model(torch.randn(2, 5))


@pytest.mark.parametrize("position", ["xpos", "rope"])
@pytest.mark.parametrize("attention", list(PATTERNS))
def test_forward_reads_no_tensor_value_on_the_host(attention, position):
    """No .item()/bool() of a tensor in a forward: on CUDA each would stall the launch queue
    per layer and break CUDA graphs and torch.compile. Fake tensors carry no values, so any
    such read raises here."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from models.attention.dilated import check_coverage, validate_schedule

    config = small(attention, position=position)
    # the schedule check is host work on its own small tensors, cached: done before fake mode
    check_coverage(validate_schedule(config.segment_lengths, config.dilation_rates), 4, 40)
    with FakeTensorMode():
        model = TransformerLM(config)
        with torch.no_grad():
            logits = model(torch.zeros(2, 40, dtype=torch.long))
    assert logits.shape == (2, 40, 64)


def test_building_a_dilated_model_says_what_its_heads_leave_out(caplog):
    """r > n_head: the pair never attends r - n_head of its offsets; said once per pair."""
    import logging

    from models import transformer
    from models.transformer import ModelConfig, TransformerLM

    schedule = dict(segment_lengths=[8, 16, 48], dilation_rates=[1, 4, 12])
    transformer._SAID.clear()
    with caplog.at_level(logging.WARNING, logger="models.transformer"):
        TransformerLM(
            ModelConfig(vocab_size=64, d_model=32, n_head=4, n_layer=1, d_ff=64, **schedule)
        )
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1
    assert "pair (w=48, r=12) with n_head=4 never attends 8 of its 12 offsets (67%" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.transformer"):
        TransformerLM(
            ModelConfig(vocab_size=64, d_model=48, n_head=12, n_layer=1, d_ff=64, **schedule)
        )
    assert not caplog.records


def test_stretch_last_widens_the_last_pair_to_the_sequence():
    """w = N and the same keys per kept query; the model runs beyond the configured segment,
    equal to a model configured with that schedule (XPOS anchored on the whole sequence)."""
    from models.transformer import ModelConfig, TransformerLM, attended_keys, schedule_at

    base = dict(vocab_size=64, d_model=32, n_head=4, n_layer=1, d_ff=64,
                segment_lengths=[8, 16], dilation_rates=[1, 2])  # fmt: skip
    cfg = ModelConfig(**base, stretch_last=True)
    assert schedule_at(cfg, 16) == ([8, 16], [1, 2]) and schedule_at(cfg, 64) == ([8, 64], [1, 8])
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    fixed = TransformerLM(ModelConfig(**{**base, "segment_lengths": [8, 64],
                                         "dilation_rates": [1, 8]}))  # fmt: skip
    fixed.load_state_dict(model.state_dict())
    fixed.blocks[0].attn.anchor = None  # the stretched model anchors XPOS on the sequence
    tokens = torch.randint(0, 64, (2, 64))
    torch.testing.assert_close(model(tokens), fixed(tokens))
    assert attended_keys(cfg, 64) == attended_keys(fixed.config, 64)
