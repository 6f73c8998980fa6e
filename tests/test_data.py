"""Data: sources, splits, tokenizer cache, packing invariants, sharding and exact resume.

Every test runs offline on text it writes (or on a few standard library files)."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from data.config import DataConfig
from data.corpus import EOD, prepare, split_of
from data.datamodule import LongContextDataModule
from data.sources import DataError, read_text, stdlib_root, stdlib_units
from data.windows import DocumentWindows, PackedWindows
from tests.support.corpus import write_corpus


def config(tmp_path, **kw) -> DataConfig:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        write_corpus(corpus)
    base = dict(
        source="text_dir",
        path=str(corpus),
        glob="*.txt",
        vocab_size=300,
        seq_len=16,
        batch_size=2,
        num_workers=0,
        cache_dir=str(tmp_path / "cache"),
        val_fraction=0.2,
        test_fraction=0.2,
    )
    return DataConfig(**{**base, **kw})


@pytest.fixture
def corpus(tmp_path):
    return prepare(config(tmp_path))


# ----------------------------------------------------------------------------------------------
# splits and the cache


def test_splits_are_disjoint_and_stable(tmp_path, corpus):
    names = {s: set(corpus.split(s).names) for s in ("train", "val", "test")}
    assert names["train"] and names["val"] and names["test"]
    assert not (
        names["train"] & names["val"]
        or names["train"] & names["test"]
        or names["val"] & names["test"]
    )
    assert sum(len(v) for v in names.values()) == 60
    for s, members in names.items():  # the split is a function of the name alone
        assert all(split_of(n, 0.2, 0.2) == s for n in members)
    again = prepare(config(tmp_path, cache_dir=str(tmp_path / "cache2")))
    assert again.split("val").names == corpus.split("val").names


def test_cache_is_reused_and_tokenizer_saved(tmp_path, corpus, monkeypatch):
    import data.corpus

    monkeypatch.setattr(data.corpus, "_build", lambda *a: pytest.fail("cache rebuilt"))
    same = prepare(config(tmp_path))
    assert same.dir == corpus.dir
    assert (corpus.dir / "tokenizer.json").exists()
    assert corpus.tokenizer.token_to_id(EOD) == corpus.eod


def test_documents_end_with_eod_and_decode_back(tmp_path, corpus):
    split = corpus.split("train")
    for start, length in zip(split.starts, split.lengths, strict=True):
        assert split.tokens[start + length] == corpus.eod
        assert corpus.eod not in split.tokens[start : start + length]
    s0, n0 = int(split.starts[0]), int(split.lengths[0])
    first = corpus.tokenizer.decode(split.tokens[s0 : s0 + n0].tolist())
    assert first == (Path(config(tmp_path).path) / split.names[0]).read_text()


# ----------------------------------------------------------------------------------------------
# packing


def test_training_windows_are_shifted_and_inside_the_stream(corpus):
    split = corpus.split("train")
    ds = PackedWindows(split, 16, batch_size=2, num_workers=1, seed=0)
    flat = torch.from_numpy(split.tokens.astype(np.int64))
    for item, _ in zip(ds, range(3 * ds.n_windows), strict=False):
        i = item["index"]
        assert torch.equal(item["input_ids"], flat[i * 16 : i * 16 + 16])
        assert torch.equal(item["labels"], flat[i * 16 + 1 : i * 16 + 17])
        doc, off = item["doc"], item["offset"]
        assert split.starts[doc] + off == i * 16 and off <= split.lengths[doc]
    assert (ds.n_windows - 1) * 16 + 17 <= len(flat)


def test_document_windows_stay_inside_documents(corpus):
    split = corpus.split("val")
    ds = DocumentWindows(split, 8)
    assert len(ds) > 0
    for i in range(len(ds)):
        item = ds[i]
        doc, off = item["doc"], item["offset"]
        assert off + 9 <= split.lengths[doc]
        assert corpus.eod not in item["input_ids"] and corpus.eod not in item["labels"]
        assert torch.equal(item["input_ids"][1:], item["labels"][:-1])
    # disjoint: consecutive windows of a document are seq_len apart
    pairs = {(int(d), int(o)) for d, o in zip(ds.doc, ds.offset, strict=True)}
    assert len(pairs) == len(ds)


def test_seq_len_longer_than_every_document_is_rejected(corpus):
    longest = int(corpus.split("test").lengths.max())
    with pytest.raises(ValueError, match=f"longest document has {longest} tokens"):
        DocumentWindows(corpus.split("test"), longest + 5, split_name="test")


# ----------------------------------------------------------------------------------------------
# sharding and resume


def test_shards_of_two_ranks_and_two_workers_are_disjoint_and_cover(corpus):
    split = corpus.split("train")
    shards = [PackedWindows(split, 8, 2, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in (0, 1):
        seen = [
            set(ds.shard_indices(r * 2 + w, epoch).tolist())
            for r, ds in enumerate(shards)
            for w in range(2)
        ]
        union = set().union(*seen)
        assert sum(len(s) for s in seen) == len(union)  # disjoint
        assert len(set(range(shards[0].n_windows)) - union) < 4 * 2  # all but a remainder


def _batches(module, n):
    loader = module.train_dataloader()
    out = []
    for batch, _ in zip(loader, range(n), strict=False):
        out.append(batch["index"].clone())
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_batch_sequence(tmp_path, workers):
    cfg = config(tmp_path, num_workers=workers, seq_len=8)
    straight = _batches(LongContextDataModule(cfg), 7)
    resumed = LongContextDataModule(cfg)
    resumed.load_state_dict({"batches_consumed": 4})
    assert [b.tolist() for b in _batches(resumed, 3)] == [b.tolist() for b in straight[4:]]


def test_datamodule_counts_batches_only_while_training(tmp_path):
    module = LongContextDataModule(config(tmp_path))
    module.on_after_batch_transfer({}, 0)  # no trainer: not counted
    assert module.state_dict()["batches_consumed"] == 0


# ----------------------------------------------------------------------------------------------
# reading files and bad input


def test_latin1_and_crlf_files_read_correctly(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9 na\xefve\r\nline two\r\n".encode("latin-1"))
    (tmp_path / "utf8.txt").write_bytes("caf\u00e9\r\nok".encode())
    assert read_text(tmp_path / "latin.txt") == "caf\u00e9 na\u00efve\nline two\n"
    assert read_text(tmp_path / "utf8.txt") == "caf\u00e9\nok"


def test_unreadable_file_is_skipped_with_its_name(tmp_path, caplog, monkeypatch):
    bad = tmp_path / "bad.txt"
    bad.write_text("x")
    real = Path.read_bytes

    def fail(self):
        if self.name == "bad.txt":
            raise PermissionError("denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", fail)
    with caplog.at_level(logging.WARNING):
        assert read_text(bad) is None
    assert "bad.txt" in caplog.text


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (dict(path="/nonexistent/dir"), DataError, "is not a directory"),
        (dict(glob="*.md"), DataError, r"data.glob='\*.md' matches no file"),
        (dict(source="s3"), ValueError, "is not one of"),
        (dict(seq_len=0), ValueError, "seq_len must be a positive integer"),
        (dict(val_fraction=0.6, test_fraction=0.5), ValueError, "must leave documents"),
        (dict(tokenizer_path="/nonexistent/tok.json"), DataError, "does not exist"),
    ],
)
def test_bad_input_is_named(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        prepare(config(tmp_path, **overrides))


def test_empty_directory_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="matches no file"):
        prepare(config(tmp_path, path=str(tmp_path / "empty")))


def test_hf_source_fails_fast_offline(tmp_path, monkeypatch):
    """Offline, nothing is even dialled: the error comes before any connection."""
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("dialled"))
    with pytest.raises(DataError, match="not reachable"):
        prepare(config(tmp_path, source="hf", hf_name="bigcode/the-stack"))


def test_stdlib_documents():
    units = stdlib_units(stdlib_root())
    names = [n for n, _ in units]
    assert len(units) > 600
    assert "asyncio" in names and "os.py" in names and any(n.startswith("test/") for n in names)
    assert not any(n.split("/")[0] in ("encodings", "pydoc_data", "site-packages") for n in names)
    assert len(set(names)) == len(names)
