"""Each experiment script runs end to end on a micro setting and writes its outputs."""

import csv

from experiments import attention_scaling, model_cost


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
