"""Hugging Face causal LMs in eval.py (``hf:PATH``): NLL equal to the model's own loss, the
YaRN perplexity loop transcribed from its source equal to ``window=strided``, and the error
without transformers."""

import builtins
import math

import numpy as np
import pytest
import torch

from pipeline import eval_files
from pipeline import scoring as sc
from pipeline.evaluation import evaluate
from pipeline.hf_models import hf_nll, load_hf
from settings.loading import ConfigError
from tests.support.hf_tiny import documents, save_tiny

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def hf_path(request, tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return documents(tmp_path_factory.mktemp("docs"))


def loaded(hf_path, corpus):
    from data.config import DataConfig

    data = DataConfig(source="text_dir", path=str(corpus), glob="*.txt")
    model = load_hf(f"hf:{hf_path}", data, CPU)
    return model, sc.corpus_split(model, "all")


def test_nll_is_the_models_own_loss(hf_path, corpus):
    model, split = loaded(hf_path, corpus)
    ids = torch.from_numpy(np.asarray(split.tokens[:65], dtype=np.int64))[None]
    with torch.no_grad():
        loss = model.net(input_ids=ids, labels=ids).loss.double()  # mean over 64 targets
    ours = hf_nll(model.net, ids)
    assert ours.shape == (1, 64)
    assert ours.sum().item() == pytest.approx(64 * loss.item(), rel=1e-6)


def yarn_nll(model, tokenizer, encodings, max_length, sliding_window):
    """YaRN's ``compute_perplexity`` (github.com/jquesnelle/yarn, eval/perplexity.py, commit
    995db5b), its window loop as written, with two changes only: NLL summed over scored
    tokens in float64 (``loss x scored``) instead of a mean of window means, and no device or
    memory options. ``add_start_token`` is ``tokenizer.bos_token is not None`` as in its main."""
    add_start_token = tokenizer.bos_token is not None
    max_tokenized_len = max_length - 1 if add_start_token else max_length
    total, count = 0.0, 0
    for encoding_index in range(0, len(encodings)):
        labels = torch.tensor(encodings[encoding_index : encoding_index + 1])
        seq_len = labels.size(1)
        prev_end_loc = 0
        for begin_loc in range(0, seq_len, sliding_window):
            end_loc = min(begin_loc + max_tokenized_len, seq_len)
            trg_len = end_loc - prev_end_loc
            input_ids = labels[:, begin_loc:end_loc]
            if add_start_token:
                bos = torch.tensor([[tokenizer.bos_token_id]] * input_ids.size(dim=0))
                input_ids = torch.cat([bos, input_ids], dim=1)
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            with torch.no_grad():
                outputs = model(input_ids, labels=target_ids)
            scored = int((target_ids[:, 1:] != -100).sum())
            total += outputs.loss.double().item() * scored
            count += scored
            prev_end_loc = end_loc
            if end_loc == seq_len:
                break
    return total, count


@pytest.mark.parametrize("length,stride", [(32, 8), (32, 32), (64, 17)])
def test_strided_equals_yarns_loop(hf_path, corpus, length, stride):
    """eval.py's context length L is YaRN's max_length L + 1 without a BOS token (a window
    of L + 1 tokens makes L predictions). The two shortest documents (a few hundred tokens):
    YaRN's loop runs one window at a time."""
    model, split = loaded(hf_path, corpus)
    docs = sorted(range(len(split.names)), key=lambda d: split.lengths[d])[:2]
    encodings = [split.tokens[split.starts[d] : split.starts[d] + split.lengths[d]].tolist()
                 for d in docs]  # fmt: skip
    total, count = yarn_nll(model.net, model.tokenizer, encodings, length + 1, stride)
    got = sc.measure(model, split, docs, length, 4096, CPU, window="strided", stride=stride)
    assert got.tokens == count == sum(split.lengths[d] - 1 for d in docs)
    assert got.nll == pytest.approx(total, rel=1e-6)


def test_eval_scores_a_checkpoint_and_an_hf_model_by_bytes(hf_path, corpus, tmp_path,
                                                           monkeypatch):  # fmt: skip
    # the plots are most of eval.py's time on tiny models, and tests/test_eval.py checks them
    monkeypatch.setattr(eval_files, "_write_plots", lambda *args: None)
    out = tmp_path / "out"
    args = [f"checkpoints=[hf:{hf_path}]", "context_lengths=[16,32]", "suffix=8",
            "data.source=text_dir", f"data.path={corpus}", "data.glob=*.txt",
            f"data.cache_dir={tmp_path / 'cache'}", "window=rolling", f"out_dir={out}"]  # fmt: skip
    (res,) = evaluate(args)
    text_bytes = sum(len(p.read_text().encode()) for p in corpus.glob("*.txt"))
    at = res.lengths[32]
    assert at.bytes == text_bytes  # rolling: every byte of every document
    assert at.bpb == pytest.approx(at.nll / at.bytes / math.log(2))
    assert "bpb" in (out / "ppl_vs_context.csv").read_text().splitlines()[0]


def test_without_transformers_hf_says_how_to_install(monkeypatch, corpus, tmp_path):
    real = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("no transformers")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    args = ["checkpoints=[hf:/some/model]", "context_lengths=[16]", "data.source=text_dir",
            f"data.path={corpus}", f"out_dir={tmp_path}"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"transformers .*pip install -e '\.\[hf\]'"):
        evaluate(args)
