"""experiments/studies/bpb.py end to end on two hand-written checkpoints (no training) and a
written corpus: a row per (corpus, model, method, length) with bits per byte from eval.py's
sums, both models on the same documents, the files with their provenance, and the table
experiments/report.py makes of them."""

import csv
import json
import math

from experiments import report
from experiments.studies import bpb
from pipeline import eval_files
from tests.support.corpus import write_corpus
from tests.support.hand_checkpoint import write_checkpoint


def test_bpb_study_micro(tmp_path, monkeypatch, capsys):
    own, other = write_corpus(tmp_path / "own", 12), write_corpus(tmp_path / "other", 6, seed=1)
    texts = [p.read_text() for p in sorted(own.glob("*.txt"))]
    data = {"source": "text_dir", "path": str(own), "glob": "*.txt", "test_fraction": 0.5,
            "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    models = {name: (str(write_checkpoint(tmp_path / name, data, texts, seed=seed)), name, 16)
              for seed, name in enumerate(["a", "b"])}  # fmt: skip
    monkeypatch.setattr(bpb, "MODELS", models)
    corpora = {"own": ({}, "own"), "other": ({"source": "text_dir", "path": str(other),
                                              "glob": "*.txt"}, "other")}  # fmt: skip
    monkeypatch.setattr(bpb, "CORPORA", corpora)
    # eval.py's own plots (in a folder the study discards) would be most of the time
    monkeypatch.setattr(eval_files, "_write_plots", lambda *args: None)
    out = tmp_path / "bpb"  # where report.bpb(tmp_path) reads it
    assert bpb.main(["--lengths", "8", "16", "--documents", "2", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "bpb.csv").open()))
    assert len(rows) == 2 * 2 * 2 * 2  # corpora x models x methods x lengths
    for r in rows:
        assert float(r["bpb"]) == float(r["nll"]) / int(r["bytes"]) / math.log(2)
        assert r["documents"] == "2" and r["split"] == ("test" if r["corpus"] == "own" else "all")
    strided = {r["context"]: r["stride"] for r in rows if r["method"] == "strided"}
    assert strided == {"8": "4", "16": "8"}
    same = {(r["corpus"], r["method"], r["context"]): r["bytes"] for r in rows if r["model"] == "a"}
    assert all(same[(r["corpus"], r["method"], r["context"])] == r["bytes"] for r in rows)
    assert json.loads((out / "bpb.meta.json").read_text())["command"]
    assert (out / "bpb_own.png").stat().st_size and (out / "bpb_other.png").stat().st_size
    table = report.bpb(tmp_path)
    assert table.startswith("| model | trained at | window | own @8 | own @16 | other @8 |")
    assert "Documents per corpus: own 2, other 2." in table


def test_bpb_report_before_a_measurement(tmp_path):
    assert "Not yet measured: `make bpb`" in report.bpb(tmp_path)
