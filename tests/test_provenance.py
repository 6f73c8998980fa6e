"""Every results file says where it came from: command, commit, dirty flag, machine, date."""

import csv
import json

import pytest

from pipeline import provenance
from pipeline.provenance import rows_of, write_results


def check_meta(meta: dict) -> None:
    assert set(meta) == {"command", "commit", "dirty", "machine", "date"}
    assert meta["commit"] == "unknown" or len(meta["commit"]) == 40
    assert meta["dirty"] in (True, False, None)
    assert {"platform", "cpu", "cores", "torch"} <= set(meta["machine"])
    assert meta["date"].endswith("+00:00")  # UTC


def test_json_dict_gains_a_meta_key(tmp_path):
    path = write_results(tmp_path / "a" / "results.json", {"runs": [1, 2]}, command="x --y")
    data = json.loads(path.read_text())
    assert data["runs"] == [1, 2] and data["meta"]["command"] == "x --y"
    check_meta(data["meta"])


def test_json_list_becomes_rows_and_reads_back(tmp_path):
    rows = [{"n": 1}, {"n": 2}]
    path = write_results(tmp_path / "rows.json", rows)
    assert rows_of(path) == rows
    check_meta(json.loads(path.read_text())["meta"])
    (tmp_path / "old.json").write_text(json.dumps(rows))  # written before provenance
    assert rows_of(tmp_path / "old.json") == rows


def test_csv_gets_a_sibling_meta_file(tmp_path):
    path = write_results(tmp_path / "t.csv", [{"a": 1, "b": 2}, {"a": 3}], columns=["b", "a"])
    assert list(csv.DictReader(path.open())) == [{"b": "2", "a": "1"}, {"b": "", "a": "3"}]
    check_meta(json.loads((tmp_path / "t.meta.json").read_text()))


def test_outside_a_git_checkout_the_commit_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    meta = provenance.meta()
    assert meta["commit"] == "unknown" and meta["dirty"] is None


def test_other_suffixes_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"suffix '\.txt' is not \.json or \.csv"):
        write_results(tmp_path / "t.txt", {})
