"""Every results table of README.md and experiments/README.md is what its committed files give
(experiments/report.py), and the markers that hold them are checked."""

import re

import pytest

from experiments import report
from experiments.report import ReportError, Table


def test_documents_match_their_results_files(capsys):
    """`make report` would change nothing: each table between markers is what its file gives."""
    assert report.main(["--check"]) == 0, capsys.readouterr().out + "\nrun `make report`"


def test_every_table_names_its_file_or_its_source():
    """Each generated block says where its numbers come from: a file and its command, or a
    formula / an estimate / the paper (numbers not measured here)."""
    for name, t in report.TABLES.items():
        text = t.make(report.RESULTS)
        assert (
            "experiments/results/" in text
            or "Not measured here" in text
            or ("not a measurement" in text)
        ), name


def _tables(**bodies):
    return {name: Table("doc.md", lambda _dir, b=body: b) for name, body in bodies.items()}


def test_replace_fills_the_block_and_keeps_the_rest():
    text = "intro\n<!-- report:a -->\nold\n<!-- /report:a -->\nafter\n"
    out = report.render(text, "doc.md", tables=_tables(a="| x |\n|---|\n| 1 |"))
    assert out == "intro\n<!-- report:a -->\n| x |\n|---|\n| 1 |\n<!-- /report:a -->\nafter\n"
    assert report.render(out, "doc.md", tables=_tables(a="| x |\n|---|\n| 1 |")) == out


@pytest.mark.parametrize(
    "text, message",
    [
        ("no markers at all\n", "report:a is missing"),
        ("<!-- report:a -->\nopen only\n", "report:a is never closed"),
        ("<!-- /report:a -->\n", "/report:a closes a block that is not open"),
        ("<!-- report:a -->\n<!-- report:b -->\n", "report:b opens inside report:a"),
        ("<!-- report:a -->\n<!-- /report:b -->\n", "/report:b closes"),
        (
            "<!-- report:a -->\n<!-- /report:a -->\n<!-- report:a -->\n<!-- /report:a -->\n",
            "report:a appears twice",
        ),
        ("<!-- report:a -->\n<!-- /report:a -->\n<!-- report:zz -->\n<!-- /report:zz -->\n",
         "report:zz names no table"),
    ],
)  # fmt: skip
def test_bad_markers_are_errors_naming_the_marker(text, message):
    with pytest.raises(ReportError, match=re.escape(message)):
        report.render(text, "doc.md", tables=_tables(a="body"))


def test_check_fails_with_a_diff_when_a_table_differs(tmp_path, monkeypatch, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- report:a -->\nstale\n<!-- /report:a -->\n")
    monkeypatch.setattr(report, "TABLES", _tables(a="fresh"))
    assert report.main(["--check"], root=tmp_path, results_dir=tmp_path) == 1
    out = capsys.readouterr()
    assert "-stale" in out.out and "+fresh" in out.out and "make report" in out.err
    assert "stale" in doc.read_text()  # --check writes nothing
    assert report.main([], root=tmp_path, results_dir=tmp_path) == 0
    assert "fresh" in doc.read_text()
    assert report.main(["--check"], root=tmp_path, results_dir=tmp_path) == 0


def test_a_missing_marker_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "doc.md").write_text("nothing here\n")
    monkeypatch.setattr(report, "TABLES", _tables(a="fresh"))
    assert report.main(["--check"], root=tmp_path, results_dir=tmp_path) == 2
    assert "doc.md: marker report:a is missing" in capsys.readouterr().err


def test_provenance_of_a_new_results_file_is_shown(tmp_path):
    """A file written by pipeline/provenance.py carries its command and commit into the
    line under its table."""
    from pipeline.provenance import write_results

    write_results(tmp_path / "b" / "rows.csv", [{"x": 1}], command="python -m some.bench")
    line = report.source(tmp_path, ["b/rows.csv"], "python -m some.bench")
    assert "Recorded in the file: `python -m some.bench` at commit" in line
    assert report.read_csv(tmp_path / "b" / "rows.csv") == [{"x": 1}]
