"""What keeps a long training step's memory down: the chunked output layer and loss (no
N x vocab tensor, same numbers), and activation checkpointing (same gradients, dropout on)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models.loss import chunked_nll
from models.transformer import ModelConfig, TransformerLM
from settings.loading import ConfigError, load_run_config


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_the_plain_one(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (64,), generator=gen)
    grad = torch.rand(64, generator=gen)
    plain = F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    want = torch.autograd.grad((plain * grad).sum(), (hidden, weight))
    got = chunked_nll(hidden, weight, targets, chunk)
    grads = torch.autograd.grad((got * grad).sum(), (hidden, weight))
    assert rel(got, plain) < 1e-6
    assert rel(grads[0], want[0]) < 1e-6 and rel(grads[1], want[1]) < 1e-6


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns (whose last dimension is
    ``last_dim``, when given)."""

    def __init__(self, last_dim: int | None = None):
        super().__init__()
        self.largest, self.last_dim = 0, last_dim

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and self.last_dim in (None, t.shape[-1:].numel()):
                self.largest = max(self.largest, t.numel())
        return out


def small(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=512, d_model=32, n_layer=2, n_head=4, d_ff=64,
                       segment_lengths=[8, 16], dilation_rates=[1, 2], window=8,
                       sparse_block=8, sparse_summary=2, **kw)  # fmt: skip


def test_no_tokens_x_vocab_tensor_in_a_training_step():
    """Forward and backward of the loss at N = 256, V = 512: the plain loss makes N x V
    tensors; the chunked one (chunk 32) never makes one larger than the weights."""
    torch.manual_seed(0)
    model = TransformerLM(small())
    tokens = torch.randint(0, 512, (1, 257))
    n_by_v = 256 * 512
    with LargestTensor() as seen:
        hidden = model.hidden(tokens[:, :-1])
        chunked_nll(hidden.flatten(0, 1), model.lm_head.weight, tokens[0, 1:], 32).mean().backward()
    assert seen.largest < n_by_v / 4  # the embedding (512 x 32) and 32 x 512 chunks
    with LargestTensor() as plain:
        F.cross_entropy(model(tokens[:, :-1])[0], tokens[0, 1:]).backward()
    assert plain.largest >= n_by_v


@pytest.mark.parametrize("dropout", [0.2, 0.0])
@pytest.mark.parametrize("attention", ["dilated", "dense", "sparse", "sliding"])
def test_checkpointing_gives_the_same_gradients(attention, dropout):
    """Blocks recomputed in the backward, dropout on: the same masks, the same gradients;
    sublayer recomputes its token-wise parts in pieces of 16 tokens (40 = 16 + 16 + 8)."""
    grads = {}
    for mode in ("none", "layer", "sublayer"):
        torch.manual_seed(0)
        cfg = small(attention=attention, dropout=dropout, checkpointing=mode, recompute_chunk=16)
        model = TransformerLM(cfg)
        tokens = torch.randint(0, 512, (2, 41), generator=torch.Generator().manual_seed(1))
        hidden = model.hidden(tokens[:, :-1])
        nll = chunked_nll(hidden.flatten(0, 1), model.lm_head.weight, tokens[:, 1:].flatten(), 16)
        nll.mean().backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, want in grads["none"].items():
        for mode in ("layer", "sublayer"):
            assert rel(grads[mode][name], want) < 1e-6, (mode, name)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["loss_chunk=0"], "loss chunk must be a positive integer"),
        (["model.checkpointing=full"], r"expected one of \['none', 'layer', 'sublayer'\]"),
    ],
)
def test_bad_settings_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config([], overrides)


def test_sublayer_recomputation_never_holds_a_whole_feed_forward():
    """With ``checkpointing=sublayer`` the feed-forward runs on pieces of ``recompute_chunk``
    tokens in the forward and in the recomputation: no N x d_ff tensor exists, which every
    other mode makes."""
    n, d_ff = 512, 64
    largest = {}
    for mode in ("none", "layer", "sublayer"):
        torch.manual_seed(0)
        model = TransformerLM(small(checkpointing=mode, recompute_chunk=16))
        tokens = torch.randint(0, 512, (1, n + 1), generator=torch.Generator().manual_seed(1))
        with LargestTensor(last_dim=d_ff) as seen:
            hidden = model.hidden(tokens[:, :-1])
            chunked_nll(hidden[0], model.lm_head.weight, tokens[0, 1:], 32).mean().backward()
        largest[mode] = seen.largest
    assert largest["none"] >= n * d_ff and largest["layer"] >= n * d_ff
    assert largest["sublayer"] < n * d_ff, largest
