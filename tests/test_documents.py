"""Documents inside packed windows: every attention, and the whole model, exact per document.

The reference is the definition (docs/design.md, "Documents inside packed windows"): each
document run alone as its own sequence, through the float64 references of
tests/support/references.py (which share no code with the implementation) or, for the whole
model, through TransformerLM on that document alone. Cases: rows of 3-5 documents of unequal
lengths, one of length 1, some shorter than the smallest segment (window, block), some crossing
several segments of every pair; rows with different boundaries; fp32 outputs within 1e-5 and
q/k/v gradients within 1e-4; one document per row equals today's unmasked forward.
"""

import math

import pytest
import torch

from data.config import DataConfig
from data.datamodule import LongContextDataModule
from lightning_modules.lm import CausalLM
from models.attention.dilated import dilated_attention, dilated_document_plan
from models.attention.documents import Documents, ladder
from models.attention.sliding import (
    block_causal_attention,
    blockwise_attention,
    sliding_window_attention,
)
from models.attention.sparse import sparse_attention
from models.transformer import ModelConfig, TransformerLM
from pipeline.training import train
from settings.schema import RunConfig
from tests.support.references import (
    blockwise_mask,
    dilated_attention_ref,
    masked_attention_ref,
    sliding_mask,
    sparse_mask,
)

FWD_TOL, GRAD_TOL = 1e-5, 1e-4
# per row: document lengths summing to N = 64; row 0 and row 1 differ
ROWS = [[1, 3, 37, 23], [20, 1, 5, 2, 36]]
N = 64


def cu_seqlens(rows, n=N):
    ends = [b * n + e for b, lengths in enumerate(rows) for e in torch.tensor(lengths).cumsum(0)]
    return torch.tensor([0, *ends])


def causal_ref(q, k, v):
    n = q.shape[1]
    return masked_attention_ref(q, k, v, torch.ones(n, n, dtype=torch.bool).tril())


PATTERNS = {
    # name: (fast(q, k, v, documents), reference on one document (q, k, v) -> out)
    "dilated": (
        lambda q, k, v, d: dilated_attention(q, k, v, [4, 8, 16], [1, 2, 4], documents=d),
        lambda q, k, v: dilated_attention_ref(q, k, v, [4, 8, 16], [1, 2, 4]),
    ),
    "dilated_w_not_divisible_by_r": (
        lambda q, k, v, d: dilated_attention(q, k, v, [5, 12, 30], [1, 3, 4], documents=d),
        lambda q, k, v: dilated_attention_ref(q, k, v, [5, 12, 30], [1, 3, 4]),
    ),
    "dilated_fewer_heads_than_r": (
        lambda q, k, v, d: dilated_attention(q, k, v, [6, 24], [1, 6], documents=d),
        lambda q, k, v: dilated_attention_ref(q, k, v, [6, 24], [1, 6]),
    ),
    "sliding": (
        lambda q, k, v, d: sliding_window_attention(q, k, v, 6, documents=d),
        lambda q, k, v: masked_attention_ref(q, k, v, sliding_mask(q.shape[1], 6)),
    ),
    "sparse": (
        lambda q, k, v, d: sparse_attention(q, k, v, 8, 2, documents=d),
        lambda q, k, v: masked_attention_ref(q, k, v, sparse_mask(q.shape[1], 8, 2)),
    ),
    "blockwise": (
        lambda q, k, v, d: blockwise_attention(q, k, v, 8, documents=d),
        lambda q, k, v: masked_attention_ref(q, k, v, blockwise_mask(q.shape[1], 8)),
    ),
    "dense": (lambda q, k, v, d: block_causal_attention(q, k, v, d), causal_ref),
}


def per_document(ref, rows, q, k, v):
    """The reference run on each document alone, placed back at its positions."""
    out = torch.zeros_like(q)
    for b, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            piece = slice(start, start + n)
            out[b, piece] = ref(q[b : b + 1, piece], k[b : b + 1, piece], v[b : b + 1, piece])[0]
            start += n
    return out


def inputs(B, H, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, N, H, D, generator=gen, requires_grad=True) for _ in range(3)]
    return qkv, torch.randn(B, N, H, D, generator=gen)


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("as_object", [False, True], ids=["cu_seqlens", "Documents"])
def test_every_attention_is_exact_per_document(name, as_object):
    fast, ref = PATTERNS[name]
    H = 2 if name == "dilated_fewer_heads_than_r" else 3
    (q, k, v), grad = inputs(len(ROWS), H)
    cu = cu_seqlens(ROWS)
    docs = Documents.of(cu, len(ROWS), N, q.device) if as_object else cu
    out = fast(q, k, v, docs)
    (out * grad).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = per_document(ref, ROWS, q64, k64, v64)
    (expected * grad.double()).sum().backward()
    torch.testing.assert_close(out.double(), expected, atol=FWD_TOL, rtol=0)
    for x, r in zip((q, k, v), (q64, k64, v64), strict=True):
        torch.testing.assert_close(x.grad.double(), r.grad, atol=GRAD_TOL, rtol=0)


@pytest.mark.parametrize("name", [n for n in PATTERNS if n != "dense"])
def test_one_document_per_row_is_the_unmasked_forward(name):
    fast, _ = PATTERNS[name]
    H = 2 if name == "dilated_fewer_heads_than_r" else 3
    (q, k, v), _ = inputs(2, H)
    whole = cu_seqlens([[N], [N]])
    torch.testing.assert_close(fast(q, k, v, whole), fast(q, k, v, None), atol=0, rtol=0)


def test_many_short_documents_take_few_kernel_calls():
    """Batched, not looped: 200 documents of 1-16 tokens are a handful of calls per pair."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 17, (400,), generator=gen)
    lengths = lengths[: int((lengths.cumsum(0) <= 2048).sum())].tolist()
    rows = [[*lengths, 2048 - sum(lengths)]]
    docs = Documents.of(cu_seqlens(rows, 2048), 1, 2048, torch.device("cpu"))
    q = torch.randn(1, 2048, 4, 8)
    plan = dilated_document_plan(q, q, q, [8, 32, 128], [1, 2, 4], docs)
    assert len(lengths) > 200 and len(plan.calls) <= 3 * 2 * 8
    ref = per_document(lambda *x: dilated_attention_ref(*x, [8, 32, 128], [1, 2, 4]), rows,
                       *(q.double(),) * 3)  # fmt: skip
    out = dilated_attention(q, q, q, [8, 32, 128], [1, 2, 4], documents=docs)
    torch.testing.assert_close(out.double(), ref, atol=FWD_TOL, rtol=0)


def test_ladder_pads_at_most_one_and_a_half_times():
    m = torch.arange(1, 200)
    padded = ladder(m, full=150)
    assert (padded >= torch.clamp(m, max=150)).all() and (padded <= 150).all()
    assert (padded[m <= 150] <= 1.5 * m[m <= 150]).all()
    assert len(padded.unique()) <= 2 * math.ceil(math.log2(150)) + 1


@pytest.mark.parametrize(
    "cu,message",
    [
        (torch.tensor([0, 10, 64]), "row end"),
        (torch.tensor([0, 64, 64, 128]), "rise strictly"),
        (torch.tensor([0, 64, 100]), "B\\*N=128"),
        (torch.tensor([0.0, 64.0, 128.0]), "integer"),
        ([0, 64, 128], "1-D integer tensor"),
    ],
)
def test_bad_boundaries_are_named(cu, message):
    q = torch.randn(2, N, 2, 8)
    with pytest.raises(ValueError, match=message):
        dilated_attention(q, q, q, [8], [1], documents=cu)


def test_bidirectional_documents_are_refused():
    q = torch.randn(1, N, 2, 8)
    with pytest.raises(ValueError, match="causal=True"):
        dilated_attention(q, q, q, [8], [1], causal=False, documents=cu_seqlens([[30, 34]]))


def test_starts_flags_give_the_boundaries():
    starts = torch.zeros(2, 8, dtype=torch.bool)
    starts[0, 3] = starts[1, 1] = starts[1, 2] = True  # a row's first token always starts one
    docs = Documents.from_starts(starts)
    assert docs.starts.tolist() == [0, 3, 8, 9, 10]
    assert docs.lengths.tolist() == [3, 5, 1, 1, 6]
    assert docs.positions().tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], [0, 0, 0, 1, 2, 3, 4, 5]]


# ----------------------------------------------------------------------------------------------
# the whole model: positions from each document's start


MODELS = {
    "dilated_xpos": dict(
        attention="dilated", position="xpos", segment_lengths=[4, 8, 16], dilation_rates=[1, 2, 4]
    ),  # fmt: skip
    "dilated_rope": dict(
        attention="dilated", position="rope", segment_lengths=[4, 8, 16], dilation_rates=[1, 2, 4]
    ),  # fmt: skip
    "dense_xpos": dict(attention="dense", position="xpos"),
    "dense_rope": dict(attention="dense", position="rope"),
    "sliding_xpos": dict(attention="sliding", position="xpos", window=6),
    "sparse_rope": dict(attention="sparse", position="rope", sparse_block=8, sparse_summary=2),
    "blockwise_xpos": dict(attention="dense", position="xpos", blockwise=8),
}


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, d_ff=64, **kw)
    return TransformerLM(cfg).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_model_is_exact_per_document(name):
    model = tiny_model(**MODELS[name])
    tokens = torch.randint(0, 50, (len(ROWS), N), generator=torch.Generator().manual_seed(2))
    packed = model(tokens, documents=cu_seqlens(ROWS))
    for b, lengths in enumerate(ROWS):
        start = 0
        for n in lengths:
            alone = model(tokens[b : b + 1, start : start + n])[0]
            torch.testing.assert_close(packed[b, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n


def test_model_gradients_are_exact_per_document():
    model = tiny_model(**MODELS["dilated_xpos"])
    tokens = torch.randint(0, 50, (len(ROWS), N), generator=torch.Generator().manual_seed(3))
    model(tokens, documents=cu_seqlens(ROWS)).square().mean().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0
    for b, lengths in enumerate(ROWS):
        for piece in tokens[b].split(lengths):
            total = total + model(piece[None]).square().sum()
    (total / tokens.numel() / model.config.vocab_size).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_model_with_one_document_per_row_is_unchanged():
    model = tiny_model(**MODELS["dilated_xpos"])
    tokens = torch.randint(0, 50, (2, N), generator=torch.Generator().manual_seed(4))
    starts = torch.zeros(2, N, dtype=torch.bool)
    same = model(tokens, documents=Documents.from_starts(starts))
    torch.testing.assert_close(same, model(tokens), atol=0, rtol=0)


def test_model_refuses_documents_with_a_stretched_schedule():
    model = tiny_model(**MODELS["dilated_xpos"], stretch_last=True)
    tokens = torch.zeros(1, N, dtype=torch.int64)
    with pytest.raises(ValueError, match="stretch_last"):
        model(tokens, documents=cu_seqlens([[30, 34]]))


# ----------------------------------------------------------------------------------------------
# data.document_mask: windows carry their boundaries, the LightningModule passes them


def tiny_data(corpus, **kw) -> DataConfig:
    """The tiny run's data settings (configs/debug/tiny.yaml), sharing its token cache."""
    base = dict(source="text_dir", path=str(corpus / "corpus"), cache_dir=str(corpus / "cache"),
                glob="*.txt", vocab_size=300, seq_len=32, batch_size=2, num_workers=0,
                val_fraction=0.2, test_fraction=0.2)  # fmt: skip
    return DataConfig(**{**base, **kw})


def test_packed_windows_start_documents_at_end_of_document_inputs(corpus):
    data = LongContextDataModule(tiny_data(corpus, document_mask=True))
    data.setup()
    eod = data.corpus.eod
    batches = iter(data.train_dataloader())
    seen = 0
    for _ in range(20):
        batch = next(batches)
        starts, inputs = batch["document_starts"], batch["input_ids"]
        assert starts.dtype == torch.bool and starts.shape == inputs.shape
        assert starts[:, 0].all()
        assert torch.equal(starts[:, 1:], inputs[:, 1:] == eod)
        seen += int(starts[:, 1:].sum())
    assert seen > 0  # the tiny corpus's documents are shorter than a few windows
    plain = next(iter(LongContextDataModule(tiny_data(corpus)).train_dataloader()))
    assert "document_starts" not in plain


def test_the_module_passes_the_documents(corpus):
    data = LongContextDataModule(tiny_data(corpus, document_mask=True))
    batch = next(iter(data.train_dataloader()))
    model = dict(vocab_size=data.vocab_size, d_model=32, n_layer=2, n_head=4, d_ff=64,
                 segment_lengths=[8, 16], dilation_rates=[1, 2])  # fmt: skip
    module = CausalLM(model).eval()
    with torch.no_grad():
        masked = module._scored(batch)[0]
        plain = module._scored({k: v for k, v in batch.items() if k != "document_starts"})[0]
        docs = Documents.from_starts(batch["document_starts"])
        logits = module.model(batch["input_ids"], documents=docs).flatten(0, 1)
    expected = torch.nn.functional.cross_entropy(
        logits, batch["labels"].flatten(), reduction="none"
    )
    torch.testing.assert_close(masked, expected, atol=1e-5, rtol=1e-5)
    assert batch["document_starts"][:, 1:].any() and not torch.allclose(masked, plain)


def test_training_smoke_with_document_mask(tiny_args, tmp_path):
    run = tmp_path / "documents"
    trainer = train(tiny_args(run, "data.document_mask=true", "trainer.max_steps=3"))
    assert trainer.global_step == 3 and (run / "checkpoints" / "last.ckpt").exists()
    assert trainer.callback_metrics["train/loss"].isfinite()


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(context_parallel=2), "context_parallel=2 is not built"),
        (dict(model=ModelConfig(stretch_last=True)), "stretch_last=true is not built"),
    ],
)
def test_document_mask_refused_where_not_built(kw, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(data=DataConfig(document_mask=True), **kw)


def test_document_mask_needs_a_text_source():
    with pytest.raises(ValueError, match="document_mask applies to text sources"):
        DataConfig(source="recall", document_mask=True, vocab_size=512)
