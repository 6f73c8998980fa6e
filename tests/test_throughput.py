"""experiments/bench/throughput.py runs end to end on a micro setting and writes its outputs."""

import csv
import json

import pytest

from experiments.bench import throughput

MODELS = ["longnet_tiny", "transformer_tiny", "sparse_transformer_tiny"]


def test_throughput_micro(tmp_path, capsys):
    throughput.main(
        ["--models", *MODELS, "--lengths", "64", "128", "--repeats", "1", "--out", str(tmp_path)]
    )
    rows = list(csv.DictReader((tmp_path / "throughput.csv").read_text().splitlines()))
    assert [(r["model"], int(r["n"])) for r in rows] == [(m, n) for m in MODELS for n in (64, 128)]
    assert all(r["status"] == "ok" and float(r["tokens_per_s"]) > 0 for r in rows)
    assert (tmp_path / "throughput.png").stat().st_size > 0
    summary = json.loads((tmp_path / "throughput.json").read_text())
    assert summary["machine"]["threads"] > 0 and len(summary["rows"]) == len(rows)
    out = capsys.readouterr().out
    assert "| N | longnet_tiny tok/s | longnet_tiny peak MiB |" in out
    assert "| 128 |" in out
    assert "LongNet overtakes dense at N=" in out or "LongNet does not overtake dense" in out


def test_throughput_skips_longer_lengths_past_the_time_budget(tmp_path):
    throughput.main(
        ["--models", "transformer_tiny", "--lengths", "64", "128", "--repeats", "1"]
        + ["--max-seconds", "1e-9", "--out", str(tmp_path)]
    )
    rows = list(csv.DictReader((tmp_path / "throughput.csv").read_text().splitlines()))
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"].startswith("skipped (step at 64 took")


def test_crossover_needs_longnet_ahead_at_every_longer_length():
    def row(model, attention, n, speed):
        return {
            "model": model,
            "attention": attention,
            "n": n,
            "status": "ok",
            "tokens_per_s": speed,
        }

    rows = [row("t", "dense", n, s) for n, s in ((1, 10), (2, 10), (4, 10), (8, 10))]
    rows += [row("l", "dilated", n, s) for n, s in ((1, 5), (2, 11), (4, 9), (8, 12))]
    assert throughput.crossover(rows).startswith("LongNet overtakes dense at N=8 (l vs t)")
    rows[-1]["tokens_per_s"] = 1
    assert throughput.crossover(rows).startswith("LongNet does not overtake dense")


def test_unknown_model_names_the_known_ones(tmp_path):
    from settings.loading import ConfigError

    with pytest.raises(ConfigError, match="known: .*longnet_tiny"):
        throughput.main(["--models", "no_such_model", "--out", str(tmp_path)])
