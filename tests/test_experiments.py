"""Each experiment script runs end to end on a micro setting and writes its outputs."""

import csv

import pytest
import torch

from experiments.bench import attention_scaling, data_throughput, model_cost
from pipeline.provenance import rows_of
from tests.support.forkserver import fork_launches


def test_attention_scaling_micro(tmp_path, capsys):
    attention_scaling.main(
        [
            "--sizes",
            "256",
            "512",
            "--repeats",
            "1",
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--dense-max",
            "512",
            "--out",
            str(tmp_path),
        ]
    )
    rows = list(csv.DictReader((tmp_path / "attention_scaling.csv").read_text().splitlines()))
    assert [int(r["n"]) for r in rows] == [256, 512]
    assert all(float(r["fwdbwd_s"]) > 0 and float(r["floor_fwdbwd_s"]) > 0 for r in rows)
    assert (tmp_path / "attention_scaling.png").stat().st_size > 0
    assert "| N | fwd s |" in capsys.readouterr().out


def test_model_cost_micro(tmp_path, capsys):
    model_cost.main(
        [
            "--models",
            "longnet_tiny",
            "sliding_window_tiny",
            "--lengths",
            "64",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    rows = list(csv.DictReader((tmp_path / "model_cost.csv").read_text().splitlines()))
    assert [r["model"] for r in rows] == ["longnet_tiny", "sliding_window_tiny"]
    assert rows[0]["params"] == rows[1]["params"]
    assert "| longnet_tiny | dilated |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "worlds", [[2], pytest.param([1, 2], marks=pytest.mark.slow)], ids=["P2", "P1-P2"]
)
def test_context_parallel_micro(tmp_path, capsys, monkeypatch, worlds):
    """One size (and one world in the fast suite: each world is a process launch): the bytes
    counted at the collectives are the formula's, and one process moves none."""
    from experiments.bench import context_parallel as bench

    fork_launches(monkeypatch, bench)
    n = 2048 if worlds == [2] else 4096  # the paper's smallest segment; 4096: two of them
    argv = ["--sizes", str(n), "--repeats", "1", "--out", str(tmp_path)]
    bench.main(["--worlds", *map(str, worlds), *argv])
    rows = rows_of(tmp_path / "context_parallel.json")
    assert [(r["P"], r["n"]) for r in rows] == [(w, n) for w in worlds]
    for r in rows:
        assert r["fwd_received"] == bench.formula_received(n, r["P"]) * 4  # fp32 bytes
        if r["P"] == 1:
            assert r["fwd_received"] == 0
        else:
            assert r["fwdbwd_sent"] + r["fwdbwd_received"] > r["fwd_received"]
    out = capsys.readouterr().out
    assert f"| 2 | {n // 1024}K |" in out and "projection, 1B tokens" in out
    assert (tmp_path / "context_parallel.png").exists()


def test_context_parallel_balance_micro(tmp_path, capsys, monkeypatch):
    """Both layouts at P = 2 with the overlap measured: every rank's blocked seconds are
    counted in both modes, and the hidden fraction comes from them (at most 1)."""
    from experiments.bench import context_parallel_balance as bench
    from experiments.report import read_csv

    fork_launches(monkeypatch, bench)
    bench.main(["--n", "4096", "--worlds", "2", "--overlap-worlds", "2", "--schedules", "paper",
                "--repeats", "1", "--cores", "2", "--out", str(tmp_path)])  # fmt: skip
    rows = read_csv(tmp_path / "balance_timing.csv")
    assert [(r["P"], r["layout"]) for r in rows] == [(2, "contiguous"), (2, "balanced")]
    for r in rows:
        assert r["fwd_wait_s"] >= 0 and r["fwd_wait_in_flight_s"] >= 0
        assert r["fwdbwd_wait_s"] >= 0 and r["fwdbwd_wait_in_flight_s"] >= 0  # the backward's too
        if r["fwd_wait_s"] > 0:
            assert r["hidden_fraction"] == pytest.approx(
                1 - r["fwd_wait_in_flight_s"] / r["fwd_wait_s"]
            )
    assert "| paper | 2 | balanced |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "modes",
    [["plain", "saving"], pytest.param(["plain", "chunked", "saving", "sublayer"],
                                       marks=pytest.mark.slow)],
    ids=["plain-saving", "all"],
)  # fmt: skip
def test_long_sequence_micro(tmp_path, capsys, monkeypatch, modes):
    """Each (N, mode) in its own process (a launch each: two modes in the fast suite; the
    modes' losses and memory are also compared in-process by tests/test_memory.py): the
    memory savers lower the peak per token and leave the loss as it is."""
    from experiments.bench import long_sequence

    fork_launches(monkeypatch, long_sequence)
    long_sequence.main(["--lengths", "2048", "--chunk", "512", "--out", str(tmp_path),
                        "--repeats", "1", "--modes", *modes])  # fmt: skip
    rows = {r["mode"]: r for r in rows_of(tmp_path / "longseq.json")}
    assert list(rows) == modes and all(r["status"] == "ok" for r in rows.values())
    assert rows["saving"]["peak_mib"] < rows["plain"]["peak_mib"]
    for mode in modes[1:]:
        assert rows[mode]["loss"] == pytest.approx(rows["plain"]["loss"], rel=1e-5)
    out = capsys.readouterr().out
    assert "| 2K | saving | ok |" in out and "| longnet_2_7b |" in out


def test_long_sequence_estimate_splits_what_each_mode_keeps():
    """The estimate's coefficients reproduce the measured model, and scale as documented."""
    from experiments.bench.long_sequence import coefficients, estimate

    mib = lambda n, per_token: {"peak_mib": n * per_token / 2**20}  # noqa: E731
    rows = [{"n": 4096, "mode": m, "status": "ok", **mib(4096, b)}
            for m, b in (("plain", 200e3), ("chunked", 100e3), ("saving", 30e3),
                         ("sublayer", 20e3))]  # fmt: skip
    coef = coefficients(rows, "longnet_tiny")  # 4 layers x 256, V = 8192
    assert coef["chunked"][0] * 4 * 256 == pytest.approx(100e3)
    assert coef["logits"][0] * 8192 == pytest.approx(100e3)
    assert coef["saving"] == (4.0, pytest.approx(30e3 / 256 - 16))
    assert coef["sublayer"][0] * 4 * 256 + coef["sublayer"][1] * 256 == pytest.approx(20e3)
    table = estimate(rows, "longnet_tiny", ["longnet_tiny"], 24e9, 512)
    longest = [int(line.split("|")[6].strip()[:-1]) for line in table.splitlines()[2:]]
    assert longest == sorted(longest)  # plain, chunked, saving, sublayer: longer each time


def test_data_throughput_micro_writes_its_file(corpus, tmp_path, capsys):
    data_throughput.main(["--source", "text_dir", "--path", str(corpus / "corpus"),
                          "--cache-dir", str(corpus / "cache"), "--vocab-size", "300",
                          "--workers", "0", "--seq-len", "16", "--batch-size", "2",
                          "--batches", "3", "--out", str(tmp_path)])  # fmt: skip
    rows = list(csv.DictReader((tmp_path / "data_throughput.csv").read_text().splitlines()))
    assert [int(r["workers"]) for r in rows] == [0] and float(rows[0]["tokens_per_s"]) > 0
    assert (tmp_path / "data_throughput.meta.json").exists()
    assert "| workers | seq_len |" in capsys.readouterr().out


def test_peak_memory_reads_the_high_water_mark_with_nothing_beside_the_call():
    """CPU peak memory is the kernel's high-water mark, reset on entry: a 64 MiB tensor made
    and freed inside the block is counted, with no sampling thread running beside it."""
    from experiments.bench.measure import PeakMemory

    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(16 * 2**20)  # 64 MiB, written: resident
        del x
    assert mem.thread is None  # Linux: clear_refs reset the mark, nothing sampled
    assert 60 * 2**20 <= mem.peak < 200 * 2**20


def test_timed_measures_memory_on_a_call_apart():
    """One warm-up, one call under PeakMemory, then the timed calls (nothing measuring)."""
    from experiments.bench.measure import timed

    calls = []
    seconds, peak = timed(lambda: calls.append(torch.ones(2**20).sum()), torch.device("cpu"), 3)
    assert len(calls) == 5 and seconds >= 0 and peak >= 0
