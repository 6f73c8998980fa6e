"""Each experiment script runs end to end on a micro setting and writes its outputs."""

import csv

import pytest

from experiments.bench import attention_scaling, model_cost
from experiments.provenance import rows_of


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


def test_context_parallel_micro(tmp_path, capsys):
    """Two worlds, one size: the bytes counted at the collectives are the formula's."""
    from experiments.bench import context_parallel as bench

    bench.main(["--worlds", "1", "2", "--sizes", "4096", "--repeats", "1", "--out", str(tmp_path)])
    rows = rows_of(tmp_path / "context_parallel.json")
    assert [(r["P"], r["n"]) for r in rows] == [(1, 4096), (2, 4096)]
    assert rows[0]["fwd_received"] == 0
    assert rows[1]["fwd_received"] == bench.formula_received(4096, 2) * 4  # fp32 bytes
    assert rows[1]["fwdbwd_sent"] + rows[1]["fwdbwd_received"] > rows[1]["fwd_received"]
    out = capsys.readouterr().out
    assert "| 2 | 4K |" in out and "projection, 1B tokens" in out
    assert (tmp_path / "context_parallel.png").exists()


def test_long_sequence_micro(tmp_path, capsys):
    """Each (N, mode) in its own process: the memory savers lower the peak per token."""
    from experiments.bench import long_sequence

    long_sequence.main(["--lengths", "2048", "--chunk", "512", "--out", str(tmp_path),
                        "--repeats", "1"])  # fmt: skip
    rows = {r["mode"]: r for r in rows_of(tmp_path / "longseq.json")}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["saving"]["peak_mib"] < rows["plain"]["peak_mib"]
    for mode in ("chunked", "saving", "sublayer"):
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
