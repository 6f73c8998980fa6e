"""eval.py: perplexity by context length against a naive computation, window rules, outputs,
another corpus scored whole, and bad input."""

import csv
import math
import os

import numpy as np
import pytest
import torch

from data.corpus import split_of
from pipeline import scoring as ev
from pipeline.evaluation import evaluate as run
from pipeline.training import train
from settings.loading import ConfigError
from tests.support.corpus import write_corpus
from tests.support.distributed import spawn
from tests.support.runs import tiny_run


def write_long_documents(directory, n=4, seed=0, prefix="long", words=3000):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for d in range(n):  # a few long documents for long contexts
        text = " ".join(f"w{int(i)}" for i in rng.integers(0, 50, words))
        (directory / f"{prefix}{d}.txt").write_text(text)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_corpus(root / "corpus")
    write_long_documents(root / "corpus")
    run_dir = root / "run"
    overrides = ["trainer.max_steps=2", "data.val_fraction=0.3", "data.test_fraction=0.3"]
    train(tiny_run(root, run_dir, *overrides))
    return run_dir / "checkpoints" / "last.ckpt"


def model_and_split(ckpt, split="val"):
    model = ev.load_checked(str(ckpt), {}, False, torch.device("cpu"))
    return model, ev.corpus_split(model, split)


def test_perplexity_equals_a_naive_loop(ckpt):
    model, split = model_and_split(ckpt)
    # five of the 15 documents (about 100 windows; all of them: 750, one forward each below)
    docs = ev.check_lengths(split, [16, 64], "val")[:5]
    ppl, tokens, windows, _ = ev.perplexity(model, split, docs, 16, 100, torch.device("cpu"))
    total, count = 0.0, 0
    for d in docs:  # one window at a time, straight from the definition
        start, n = int(split.starts[d]), int(split.lengths[d])
        for off in range(0, n - 16, 16):
            w = torch.tensor(split.tokens[start + off : start + off + 17].astype(np.int64))
            logp = torch.log_softmax(model.net(w[None, :-1])[0].double(), -1)
            total -= logp[torch.arange(16), w[1:]].sum().item()
            count += 16
    assert tokens == count and windows == count // 16
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_windows_stay_in_documents_and_documents_are_shared(ckpt):
    _, split = model_and_split(ckpt)
    docs = ev.check_lengths(split, [8, 32], "val")
    assert all(split.lengths[d] >= 33 for d in docs)
    for n in (8, 32):
        for s in ev.windows_at(split, docs, n):
            d = int(np.searchsorted(split.starts, s, side="right")) - 1
            assert d in docs and s + n + 1 <= split.starts[d] + split.lengths[d]
    capped = ev.windows_at(split, docs, 8, cap=32)
    assert len(capped) == 4 * len(docs)


def test_prompting_scores_the_same_tokens(ckpt):
    _, split = model_and_split(ckpt)
    docs = ev.check_lengths(split, [64], "val")
    ends = {p: [s + p for s in ev.prompt_starts(split, docs, p, 64)] for p in (16, 32, 64)}
    assert ends[16] == ends[32] == ends[64]


def test_eval_writes_its_outputs(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    results = run(
        [
            f"checkpoints=[{ckpt}]",
            "context_lengths=[16,32,64]",
            "split=val",
            "suffix=8",
            f"out_dir={out}",
        ]
    )
    assert set(results[0].lengths) == {16, 32, 64} and results[0].prompting
    assert all(a.ppl > 1 and a.reason is None for a in results[0].lengths.values())
    for name in (
        "ppl_vs_context.csv",
        "ppl_vs_context.json",
        "ppl_vs_context.png",
        "prompting.csv",
        "prompting.png",
        "positions.csv",
        "documents.csv",
    ):
        assert (out / name).stat().st_size > 0, name
    assert "| 16 | 32 | 64 |" in capsys.readouterr().out
    with open(out / "positions.csv") as f:  # the per-position profile at every length
        rows = list(csv.DictReader(f))
    assert {int(r["length"]) for r in rows} == {16, 32, 64}
    assert max(int(r["to"]) for r in rows if r["length"] == "32") == 32


@pytest.mark.parametrize(
    "extra,message",
    [
        (["checkpoints=[/nonexistent.ckpt]"], "does not exist"),
        (["context_lengths=[100000]"], "longer than every document .* longest has"),
        (["evaluate=1"], "unknown key evaluate"),
        (["data.source=text_dir", "data.path=/nonexistent"], "is not a directory"),
    ],
)
def test_bad_input(ckpt, tmp_path, extra, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    base = [f"checkpoints=[{ckpt}]", "context_lengths=[16]", "split=val", f"out_dir={out}"]
    with pytest.raises(ConfigError, match=message):
        run([*base, *extra])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.ckpt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ConfigError, match="not a checkpoint of this project"):
        run([f"checkpoints=[{bad}]", f"out_dir={tmp_path / 'o'}"])


def test_empty_corpus(ckpt, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(3):
        (empty / f"{i}.txt").write_text("")
    with pytest.raises(ConfigError, match="has no document with any text"):
        run(
            [
                f"checkpoints=[{ckpt}]",
                "data.source=text_dir",
                f"data.path={empty}",
                f"data.cache_dir={tmp_path / 'cache'}",
                f"out_dir={tmp_path / 'o'}",
            ]
        )


def test_another_corpus_is_scored_whole(ckpt, tmp_path, capsys):
    """Three documents the model never saw: the hash split would leave them in any split;
    split=auto scores all of them and says which."""
    books = tmp_path / "books"
    write_long_documents(books, n=3, seed=7, prefix="book", words=300)  # each > 64 tokens
    out = tmp_path / "out"
    results = run([f"checkpoints=[{ckpt}]", "context_lengths=[16,64]", f"out_dir={out}",
                   "data.source=text_dir", f"data.path={books}", "data.glob=*.txt",
                   f"data.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    assert sorted(results[0].documents) == ["book0.txt", "book1.txt", "book2.txt"]
    assert "book0.txt" in (out / "documents.csv").read_text()
    assert "all split" in (out / "ppl_vs_context.json").read_text()
    # split=test picks the documents the hash puts there (the checkpoint's fractions, 0.3/0.3)
    in_test = sorted(n for n in results[0].documents if split_of(n, 0.3, 0.3) == "test")
    args = [f"checkpoints=[{ckpt}]", "context_lengths=[16]", f"out_dir={tmp_path / 'o2'}",
            "split=test", "data.source=text_dir", f"data.path={books}", "data.glob=*.txt",
            f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    if in_test:
        assert sorted(run(args)[0].documents) == in_test
    else:
        with pytest.raises(ConfigError, match="test split of the corpus is empty"):
            run(args)


def test_a_bug_is_not_reported_as_not_reached(ckpt, tmp_path, monkeypatch):
    """Only out of memory and XPOS range become "not reached"; anything else propagates."""
    from models.positional import XposRangeError

    base = [f"checkpoints=[{ckpt}]", "context_lengths=[16,32]", "split=val", "suffix=8"]
    calls = {"n": 0}
    real = ev.nll

    def flaky(net, windows, group=None, chunk=8192):
        calls["n"] += 1
        if windows.shape[1] == 33:  # length 32 cannot run here
            raise XposRangeError("XPOS scales reach exp(99) for 32 positions")
        return real(net, windows, group, chunk)

    monkeypatch.setattr(ev, "nll", flaky)
    res = run([*base, f"out_dir={tmp_path / 'a'}"])[0]
    assert res.lengths[16].ppl and res.lengths[32].ppl is None
    assert res.lengths[32].reason.startswith("not reached: XPOS scales reach")
    assert "not reached: XPOS" in (tmp_path / "a" / "ppl_vs_context.csv").read_text()

    def broken(net, windows, group=None, chunk=8192):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(ev, "nll", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run([*base, f"out_dir={tmp_path / 'b'}"])
    assert not (tmp_path / "b").exists()


def test_progress_in_a_log_is_lines(ckpt, tmp_path, capsys):
    run([f"checkpoints=[{ckpt}]", "context_lengths=[16]", "split=val", "suffix=8",
         f"out_dir={tmp_path / 'o'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert "100% (" in err and "\r" not in err


def assert_same_scores(one, out_dir) -> None:
    """``out_dir``'s perplexities, prompting curve and repeated-span rows equal the
    single-process Result ``one``."""
    import csv
    import json

    rows = json.loads((out_dir / "ppl_vs_context.json").read_text())["rows"]
    assert {row["context_length"] for row in rows} == set(one.lengths)
    for row in rows:
        want = one.lengths[row["context_length"]]
        assert row["ppl"] == pytest.approx(want.ppl, rel=1e-5) and row["tokens"] == want.tokens
    with open(out_dir / "prompting.csv", newline="") as f:
        prompting = {int(r["prompt_length"]): float(r["mean_nll"]) for r in csv.DictReader(f)}
    assert prompting.keys() == one.prompting.keys()
    for p, v in one.prompting.items():
        assert prompting[p] == pytest.approx(v, abs=1e-6), p
    # the span probe ran (SPLIT_ARGS: span_length=8 at 64) and, split, scores the same tokens
    with open(out_dir / "repeated_span.csv", newline="") as f:
        span = [{k: float(v) for k, v in r.items() if k != "model"} for r in csv.DictReader(f)]
    assert [r["distance"] for r in one.span] == [8, 16, 32] == [r["distance"] for r in span]
    for got, want in zip(span, one.span, strict=True):
        assert got == pytest.approx(want, abs=1e-5), (got, want)


def evaluate_rank(rank, world, args):
    """One process of ``torchrun eval.py``: eval.py's function, which makes the group itself
    from the variables torchrun sets."""
    run(args)


# span_length=8: the repeated-span probe runs at 64 (distances 8, 16, 32, across the ranks)
SPLIT_ARGS = ["context_lengths=[16,64]", "split=val", "suffix=8", "span_length=8"]


def test_windows_split_across_processes_score_the_same(ckpt, tmp_path):
    """context_parallel=2 in two processes, each finding torchrun's variables and making its
    group as under torchrun: each window split across them gives the single-process
    perplexities, prompting curve and repeated-span probe (split too). (The launch by
    torchrun itself, three more interpreters to start: the slow test below.)"""
    args = [f"checkpoints=[{ckpt}]", *SPLIT_ARGS]
    one = run([*args, f"out_dir={tmp_path / 'one'}"])[0]
    two = [*args, f"out_dir={tmp_path / 'two'}", "context_parallel=2"]
    spawn(evaluate_rank, 2, two, timeout=120, init=False)
    assert_same_scores(one, tmp_path / "two")


def evaluate_rank_in_layout(rank, world, args, layout):
    """:func:`evaluate_rank`, checking that every split forward ran in ``layout``."""
    from models.attention import distributed

    seen, real = [], ev.split_nll

    def split_nll(net, inputs, targets, group, chunk):
        seen.append(distributed.layout_of(group))
        return real(net, inputs, targets, group, chunk)

    ev.split_nll = split_nll
    try:
        run(args)
    finally:
        ev.split_nll = real
    assert seen and set(seen) == {layout}, seen


def test_balanced_layout_scores_the_same(ckpt, tmp_path):
    """context_parallel=2 with context_parallel_layout=balanced (each rank pieces j and
    2P - 1 - j of every window): the single-process perplexities, prompting curve (the last
    targets of each window: wrong if the gathered NLL were not put back in sequence order),
    repeated-span probe and position profile."""
    args = [f"checkpoints=[{ckpt}]", *SPLIT_ARGS]
    one = run([*args, f"out_dir={tmp_path / 'one'}"])[0]
    two = [*args, f"out_dir={tmp_path / 'two'}", "context_parallel=2",
           "context_parallel_layout=balanced"]  # fmt: skip
    spawn(evaluate_rank_in_layout, 2, two, "balanced", timeout=120, init=False)
    assert_same_scores(one, tmp_path / "two")
    with open(tmp_path / "two" / "positions.csv", newline="") as f:
        profile = [(int(r["length"]), int(r["from"]), float(r["mean_nll"]))
                   for r in csv.DictReader(f)]  # fmt: skip
    assert [(n, a) for n, a, _ in profile] == [(n, a) for n, a, _, _ in one.positions]
    for (_, _, got), (n, a, _, want) in zip(profile, one.positions, strict=True):
        assert got == pytest.approx(want, abs=1e-6), (n, a)


def test_short_strided_windows_split_across_processes(ckpt, tmp_path):
    """window=strided ends each document with a shorter window; split across 2 processes it
    is padded to the context length (causal: no earlier position sees the padding) and scores
    as in one process, instead of slices that no longer fit the layout."""
    args = [f"checkpoints=[{ckpt}]", *SPLIT_ARGS, "window=strided", "stride=12"]
    one = run([*args, f"out_dir={tmp_path / 'one'}"])[0]
    two = [*args, f"out_dir={tmp_path / 'two'}", "context_parallel=2",
           "context_parallel_layout=balanced"]  # fmt: skip
    spawn(evaluate_rank, 2, two, timeout=120, init=False)
    assert_same_scores(one, tmp_path / "two")


@pytest.mark.slow
def test_eval_py_under_torchrun_scores_as_one_process(ckpt, tmp_path):
    """eval.py launched by torchrun with context_parallel=2 (the command a user types)."""
    import subprocess
    import sys
    from pathlib import Path

    args = [f"checkpoints=[{ckpt}]", *SPLIT_ARGS]
    one = run([*args, f"out_dir={tmp_path / 'one'}"])[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "eval.py", *args, f"out_dir={tmp_path / 'two'}", "context_parallel=2"]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_scores(one, tmp_path / "two")
