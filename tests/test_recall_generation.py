"""eval.py recall_by_generation=true on a tiny trained recall checkpoint: the accuracy of the
answers decoded greedily equals the teacher-forced one at every (length, distance), both in
recall.csv, at the training length and beyond every segment, for a fixed and a stretched
dilated schedule (the stretched one's last segment grows with the length scored)."""

import csv

import pytest

from pipeline.evaluation import evaluate
from pipeline.training import train
from settings.loading import ConfigError
from tests.support.runs import tiny_run

RECALL = ["data.source=recall", "data.seq_len=64", "data.batch_size=4", "data.num_workers=0",
          "model.segment_lengths=[16,32]", "model.dilation_rates=[1,2]"]  # fmt: skip


@pytest.fixture(scope="module", params=[False, True], ids=["fixed", "stretched"])
def recall_ckpt(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("recall")
    extra = [f"model.stretch_last={str(request.param).lower()}"]
    train(tiny_run(root, root / "run", "trainer.max_steps=8", *RECALL, *extra))
    return root / "run" / "checkpoints" / "last.ckpt"


def test_generated_and_teacher_forced_accuracies_are_equal(recall_ckpt, tmp_path):
    out = tmp_path / "eval"
    [result] = evaluate([f"checkpoints=[{recall_ckpt}]", "context_lengths=[64,128]",
                         f"out_dir={out}", "recall_sequences=3", "batch_tokens=256",
                         "recall_by_generation=true"])  # fmt: skip
    rows = result.recall
    assert {(r["length"], r["distance"]) for r in rows} == {(64, 16), (64, 32), (128, 16),
                                                            (128, 32), (128, 64)}  # fmt: skip
    for r in rows:
        assert r["note"] == "" and r["queries"] > 0
        assert r["generated_correct"] == r["correct"], r
        assert r["generated_accuracy"] == r["accuracy"], r
    with open(out / "recall.csv") as f:
        written = list(csv.DictReader(f))
    assert [(w["accuracy"], w["generated_accuracy"]) for w in written] == [
        (str(r["accuracy"]), str(r["generated_accuracy"])) for r in rows
    ]


def test_recall_by_generation_is_off_by_default(recall_ckpt, tmp_path):
    [result] = evaluate([f"checkpoints=[{recall_ckpt}]", "context_lengths=[64]",
                         f"out_dir={tmp_path / 'eval'}", "recall_sequences=1"])  # fmt: skip
    assert all("generated_accuracy" not in r for r in result.recall)
    header = (tmp_path / "eval" / "recall.csv").read_text().splitlines()[0]
    assert header == "model,length,distance,queries,correct,accuracy,nll,note"


def test_recall_by_generation_is_refused_for_language_models(tiny_args, tmp_path):
    lm = tmp_path / "lm"
    train(tiny_args(lm, "trainer.max_steps=1"))
    with pytest.raises(ConfigError, match=r"recall_by_generation=true scores recall checkpoints"):
        evaluate([f"checkpoints=[{lm}/checkpoints/last.ckpt]", "context_lengths=[32]",
                  f"out_dir={tmp_path / 'lm_eval'}", "recall_by_generation=true"])  # fmt: skip
