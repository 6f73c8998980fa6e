"""Data the user named that cannot be read as asked ends train.py as a bad config does: one
line on stderr and exit status 2 (settings/cli.py), before anything trains; one case per
source (data/sources.py DataError)."""

import pytest

import data.sources
from data.sources import DataError
from pipeline.training import train
from settings.cli import run_cli
from settings.loading import load_run_config
from tests.support.forkserver import run_script


def test_train_py_on_a_missing_directory_is_one_line_and_exit_2(tmp_path):
    """The command line as a user types it (train.py run as __main__ in a child process, forked
    with torch and Lightning imported): no traceback, the message names the setting."""
    status, _, stderr = run_script("train.py", ["data.source=text_dir", "data.path=/nonexistent",
                                                f"run_dir={tmp_path / 'run'}"])  # fmt: skip
    assert status == 2, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "error: data.path='/nonexistent' is not a directory"


def _run(tmp_path, capsys, *overrides) -> str:
    """train.py's entry in this process: asserts exit 2 and returns the one error line."""
    argv = [
        f"run_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.max_steps=1",
        "validate_first=false",
        *overrides,
    ]  # short if it does run
    assert run_cli(train, argv, load=load_run_config) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines
    return lines[-1]


def test_text_dir_glob_matching_nothing(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("text")
    line = _run(tmp_path, capsys, "data.source=text_dir", f"data.path={tmp_path / 'docs'}",
                "data.glob=*.md")  # fmt: skip
    assert "data.glob='*.md' matches no file" in line


def test_text_dir_without_any_text(tmp_path, capsys):
    """Files that are all empty (or unreadable: skipped with a warning) leave no corpus."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text("")
    line = _run(tmp_path, capsys, "data.source=text_dir", f"data.path={docs}")
    assert "has no document with any text" in line


def test_hf_out_of_reach(tmp_path, capsys):
    """Offline (the tests set HF_HUB_OFFLINE=1): it says so at once, and what to use instead."""
    line = _run(tmp_path, capsys, "data.source=hf", "data.hf_name=someone/some_dataset")
    assert "needs the Hugging Face hub, which is not reachable" in line
    assert "data.source=stdlib_code" in line


def test_hf_without_a_name(tmp_path, capsys):
    assert "needs data.hf_name" in _run(tmp_path, capsys, "data.source=hf")


def test_hf_missing_text_field_and_missing_dataset(monkeypatch):
    """At the first row (before any tokenizer training reads further), and at load."""
    monkeypatch.setattr(data.sources.datasets, "load_dataset",
                        lambda *a, **k: iter([{"content": "x", "id": 1}]))  # fmt: skip
    with pytest.raises(DataError, match=r"data.hf_text_field='text' is not a field of d: "
                                        r"fields are \['content', 'id'\]"):  # fmt: skip
        next(data.sources._hf_documents("d", None, "train", "text"))

    def missing(*args, **kwargs):
        raise data.sources.datasets.exceptions.DatasetNotFoundError("no such dataset")

    monkeypatch.setattr(data.sources.datasets, "load_dataset", missing)
    with pytest.raises(DataError, match="data.hf_name='d' .* cannot be loaded: no such dataset"):
        next(data.sources._hf_documents("d", None, "train", "text"))


def test_stdlib_tokenizer_path_missing_or_not_a_tokenizer(tmp_path, capsys):
    line = _run(tmp_path, capsys, f"data.tokenizer_path={tmp_path / 'none.json'}")
    assert line == f"error: data.tokenizer_path='{tmp_path / 'none.json'}' does not exist"
    bad = tmp_path / "bad.json"
    bad.write_text("not a tokenizer")
    line = _run(tmp_path, capsys, f"data.tokenizer_path={bad}")
    assert f"data.tokenizer_path='{bad}' is not a tokenizer.json" in line


def test_stdlib_empty_corpus(tmp_path, capsys, monkeypatch):
    """A Python whose standard library holds no sources (stripped installs exist)."""
    (tmp_path / "lib").mkdir()
    monkeypatch.setattr(data.sources, "stdlib_root", lambda: tmp_path / "lib")
    line = _run(tmp_path, capsys, "data.source=stdlib_code")
    assert "the corpus of data.source='stdlib_code' has no document with any text" in line


def test_recall_layout(tmp_path, capsys):
    line = _run(tmp_path, capsys, "data.source=recall", "data.seq_len=102")
    assert "data.source='recall' needs data.seq_len a multiple of" in line
    line = _run(tmp_path, capsys, "data.source=recall", "data.recall_keys=4",
                "data.recall_records=8")  # fmt: skip
    assert "data.recall_records=8 needs as many distinct keys" in line
