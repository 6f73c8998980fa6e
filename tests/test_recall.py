"""data.source=recall: the generator's layout and distances are what the config says (seeded,
resumable, disjoint across ranks), and the LightningModule scores only the answers."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.batch import IGNORE_INDEX as IGNORE
from data.config import DataConfig
from data.recall import SLOT, RecallSet, RecallStream, RecallTask, sequence, sequence_rng

TASK = RecallTask(keys=64, values=32, filler=8, records=12, seq_len=256)


def pairs(task: RecallTask, seq) -> list[tuple[int, int, int, int]]:
    """(record slot start, query slot start, key id, value id) read back from the tokens."""
    t = seq.tokens
    found = []
    for q in range(0, len(t) - 2, SLOT):
        if t[q] == task.ask_id:
            key, value = t[q + 1], t[q + 2]
            records = [r for r in range(0, q, SLOT) if t[r] == task.set_id and t[r + 1] == key]
            assert len(records) == 1, "one record per key"
            assert t[records[0] + 2] == value
            found.append((records[0], q, int(key), int(value)))
    return found


@pytest.mark.parametrize("seed", range(5))
def test_task_labels_and_distances(seed):
    seq = sequence(TASK, 256, np.random.default_rng(seed))
    assert seq.tokens.shape == (257,) and seq.labels.shape == (256,)
    assert seq.tokens.min() >= 0 and seq.tokens.max() < TASK.vocab_size
    found = pairs(TASK, seq)
    assert len(found) == TASK.records  # every record queried once, all placed
    scored = np.flatnonzero(seq.labels != IGNORE)
    # the label sits at the query's key: it predicts the value that follows
    assert sorted(scored.tolist()) == sorted(q + 1 for _, q, _, _ in found)
    for r, q, key, value in found:
        assert seq.labels[q + 1] == value and seq.distances[q + 1] == q - r
        assert TASK.key_id(0) <= key < TASK.value_id(0) <= value
    assert len({key for *_, key, _ in found}) == len(found)  # distinct keys
    d = seq.distances[scored]
    assert (d % SLOT == 0).all() and d.min() >= 4 and d.max() <= 256
    filler = np.ones(257, dtype=bool)
    for r, q, *_ in found:
        filler[r : r + 3] = filler[q : q + 3] = False
    assert (seq.tokens[filler] < TASK.filler).all()  # everything else is filler


def test_distances_are_log_uniform_in_the_configured_range():
    task = RecallTask(keys=64, values=32, filler=8, records=12, seq_len=256, min_distance=8,
                      max_distance=128)  # fmt: skip
    d = np.concatenate([
        (s := sequence(task, 256, np.random.default_rng(i))).distances[s.labels != IGNORE]
        for i in range(200)
    ])  # fmt: skip
    assert d.min() >= 8 and d.max() <= 128
    logs = np.log2(d)
    # log-uniform over [8, 128]: about a quarter of queries in each octave of the four
    counts = np.histogram(logs, bins=[3, 4, 5, 6, 7.01])[0] / len(d)
    assert (counts > 0.15).all() and (counts < 0.35).all(), counts


@pytest.mark.parametrize("distance", [4, 64, 500, 1020])
def test_fixed_distance_puts_every_query_there(distance):
    seq = sequence(TASK, 1024, np.random.default_rng(0), distance=distance)
    d = seq.distances[seq.labels != IGNORE]
    assert len(d) >= 1 and (d == distance // SLOT * SLOT).all()
    assert len(d) == min(TASK.records_at(1024), 1024 // SLOT - distance // SLOT)


def test_seeded_and_streams_are_disjoint():
    a = sequence(TASK, 256, sequence_rng(1, "train", 5))
    b = sequence(TASK, 256, sequence_rng(1, "train", 5))
    assert (a.tokens == b.tokens).all()
    for other in (sequence_rng(2, "train", 5), sequence_rng(1, "train", 6),
                  sequence_rng(1, "val", 5)):  # fmt: skip
        assert (sequence(TASK, 256, other).tokens != a.tokens).any()
    val = RecallSet(TASK, 1, "val", 4, 256)
    assert (val[2]["input_ids"] == RecallSet(TASK, 1, "val", 4, 256)[2]["input_ids"]).all()


def take(stream, n):
    return [x["index"] for x in itertools.islice(iter(stream), n)]


def test_stream_is_sharded_disjoint_and_resumable():
    ranks = [take(RecallStream(TASK, 0, 4, 0, rank, 3), 40) for rank in range(3)]
    assert not set(ranks[0]) & set(ranks[1]) and not set(ranks[1]) & set(ranks[2])
    assert sorted(ranks[0] + ranks[1] + ranks[2]) == list(range(120))
    # a loader of batch 4 resumed after 6 batches continues where the first stopped
    whole = take(RecallStream(TASK, 0, 4, 0, 1, 3), 40)
    resumed = take(RecallStream(TASK, 0, 4, 0, 1, 3, skip_batches=6), 16)
    assert resumed == whole[24:40]
    first = next(iter(RecallStream(TASK, 0, 4, 0)))
    again = next(iter(RecallStream(TASK, 0, 4, 0)))
    assert (first["input_ids"] == again["input_ids"]).all()


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"seq_len": 66}, "multiple of 4"),
        ({"recall_records": 200}, "needs as many distinct keys"),
        ({"recall_max_distance": 2}, "recall_max_distance must be null or an integer >= "),
        ({"recall_keys": 0}, "data.recall_keys must be a positive integer, got 0"),
    ],
)
def test_bad_recall_settings_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(source="recall", **overrides)


def test_label_masking_scores_only_answers():
    """The training loss is the mean NLL over answer tokens; other labels do not matter."""
    from lightning_modules.lm import CausalLM

    task = RecallTask(keys=16, values=8, filler=4, records=4, seq_len=32)
    model = dict(vocab_size=task.vocab_size, d_model=32, n_layer=1, n_head=4, d_ff=64,
                 segment_lengths=[8, 16], dilation_rates=[1, 2])  # fmt: skip
    torch.manual_seed(0)
    lm = CausalLM(model)
    batch = torch.utils.data.default_collate(
        [RecallSet(task, 0, "val", 3, 32)[i] for i in range(3)]
    )
    loss = lm.training_step(batch, 0)
    logits = lm.model(batch["input_ids"])
    keep = batch["labels"] != IGNORE
    want = F.cross_entropy(logits[keep], batch["labels"][keep])
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert keep.sum() < keep.numel() / 4
    assert math.isfinite(loss.item())


def test_recall_run_trains_logs_accuracy_and_resumes_exactly(tiny_args, tmp_path):
    """train.py on data.source=recall: its word-level tokenizer beside the checkpoints, the
    answer accuracy logged, per-step losses of a resumed run equal the uninterrupted one."""
    from pipeline.outputs import metric
    from pipeline.training import train

    recall = ["data.source=recall", "data.seq_len=64", "data.batch_size=4", "data.num_workers=1",
              "model.segment_lengths=[16,32]", "model.dilation_rates=[1,2]"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_args(straight, "trainer.max_steps=8", *recall))
    train(tiny_args(split, "trainer.max_steps=4", "optim.total_steps=8", *recall))
    train(tiny_args(split, "trainer.max_steps=8", "resume=auto", *recall))
    a, b = metric(straight, "train/loss"), metric(split, "train/loss")
    assert sorted(a) == sorted(b) == list(range(8))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    accuracy = metric(straight, "val/accuracy")
    assert accuracy and all(0.0 <= v <= 1.0 for v in accuracy.values())
    assert '"SET"' in (straight / "tokenizer.json").read_text()
    from pipeline.evaluation import evaluate

    out = tmp_path / "eval"
    [result] = evaluate([f"checkpoints=[{straight}/checkpoints/last.ckpt]",
                         "context_lengths=[64]", f"out_dir={out}",
                         "recall_sequences=2"])  # fmt: skip
    rows = result.recall
    assert [r["distance"] for r in rows] == [16, 32] and (out / "recall_heatmap.png").exists()


class Oracle(torch.nn.Module):
    """Reads the answer off the sequence (the most recent ``SET key value`` of the key it
    sits on) and puts all its logit there; ``scale=0`` makes it uniform."""

    def __init__(self, task: RecallTask, scale: float = 1.0):
        super().__init__()
        self.task, self.scale = task, scale
        self.lm_head = torch.nn.Linear(task.vocab_size, task.vocab_size, bias=False)
        self.lm_head.weight.data = torch.eye(task.vocab_size)
        from models.transformer import ModelConfig

        self.config = ModelConfig(vocab_size=task.vocab_size, attention="dense")

    def hidden(self, tokens):
        out = torch.zeros(*tokens.shape, self.task.vocab_size)
        for b, row in enumerate(tokens.tolist()):
            seen = {}
            for i in range(1, len(row) - 1):
                if row[i - 1] == self.task.set_id:
                    seen[row[i]] = row[i + 1]
                if row[i - 1] == self.task.ask_id and row[i] in seen:
                    out[b, i, seen[row[i]]] = 50.0 * self.scale
        return out


@pytest.mark.parametrize("scale,accuracy", [(1.0, 1.0), (0.0, None)])
def test_recall_accuracy_of_an_oracle_and_a_uniform_model(scale, accuracy, tmp_path):
    """The oracle answers every query (accuracy 1, NLL ~0); the uniform model scores NLL
    log(vocab) exactly and the accuracy of always guessing token 0 (never an answer)."""
    from pipeline import recall_probe
    from pipeline.scoring import Model

    task = RecallTask(keys=32, values=16, filler=4, records=8, seq_len=64)
    data = DataConfig(source="recall", seq_len=64, recall_keys=32, recall_values=16,
                      recall_filler=4, recall_records=8)  # fmt: skip
    model = Model("oracle", Oracle(task, scale), 64, data, label="oracle")
    rows = recall_probe.score(model, [64, 128], None, 4, 256, torch.device("cpu"))
    assert {(r["length"], r["distance"]) for r in rows} == {(64, 16), (64, 32), (128, 16),
                                                            (128, 32), (128, 64)}  # fmt: skip
    for r in rows:
        assert r["queries"] > 0 and r["note"] == ""
        if accuracy == 1.0:
            assert r["accuracy"] == 1.0 and r["nll"] < 1e-6
        else:
            assert r["accuracy"] == 0.0
            assert r["nll"] == pytest.approx(math.log(task.vocab_size), rel=1e-6)
    written = recall_probe.write(rows, [model], tmp_path)
    assert all((tmp_path / f).exists() for f in written)
    assert "| oracle | 128 |" in recall_probe.table(rows)


def test_eval_says_distances_past_the_largest_segment_are_unreachable(caplog):
    import logging

    from models.transformer import ModelConfig
    from pipeline.recall_probe import say_reach

    cfg = ModelConfig(vocab_size=64, d_model=32, n_head=4, n_layer=1, d_ff=64,
                      segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="eval"):
        say_reach("m", cfg, 64)
        say_reach("m", cfg, 32)  # within the largest segment: nothing to say
    assert [r.getMessage()[:45] for r in caplog.records] == [
        "m: distances >= 32 (its largest segment) are "
    ]
