"""The document-mask benchmark and study (issue #26) are runnable: the study's YAML plans its
shared stage and two runs that differ only in data.document_mask; the benchmark's window
boundaries are the data module's, and its table reads its rows."""

import torch

from experiments.bench import documents as bench
from experiments.studies import document_mask
from experiments.studies.runner import ROOT
from experiments.studies.schema import load_study

CONFIG = ROOT / "configs" / "study" / "document_mask_recipe.yaml"


def test_the_study_plans_a_shared_stage_and_two_runs(tmp_path):
    spec = load_study(CONFIG, document_mask.DocumentMaskSpec)
    runs = document_mask.plan(spec, [], tmp_path)
    assert [r.name for r in runs] == ["unmasked.64", "unmasked", "masked"]
    stage, plain, masked = (r.cfg for r in runs)
    assert stage.model.attention == "dense" and not stage.data.document_mask
    assert not plain.data.document_mask and masked.data.document_mask
    same = lambda c: (c.model, c.data.seq_len, c.data.batch_size, c.seed)  # noqa: E731
    assert same(plain) == same(masked) and plain.init_from == masked.init_from


def test_the_bench_cuts_windows_where_the_data_module_does(monkeypatch):
    eod = 0
    tokens = torch.tensor([5, 6, eod, 7, 8, 9, eod, 4])

    class Corpus:
        def split(self, name):
            return type("S", (), {"tokens": tokens.numpy()})

    corpus = Corpus()
    corpus.eod = eod
    monkeypatch.setattr("data.corpus.prepare", lambda cfg: corpus)
    docs = bench.window_documents(8, 0)
    assert docs.starts.tolist() == [0, 2, 6] and docs.lengths.tolist() == [2, 4, 2]
    row = {"n": 8192, "documents": 3, "median_doc": 2, "attention": "dilated",
           "unmasked_s": 1.0, "masked_s": 1.2, "ratio": 1.2, "unmasked_mem": 2**20,
           "masked_mem": 2**21}  # fmt: skip
    assert "| 8K | dilated | 3 (2) | 1.00 | 1.20 | 1.20 | 1 | 2 |" in bench.table([row])
