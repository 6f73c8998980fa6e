"""Documents -> splits -> tokenizer -> a token cache on disk, built once per source and settings.

The cache holds, for each split, every document's tokens followed by the end-of-document token,
as one flat array on disk (``<split>.bin``, uint16 or uint32, read through ``np.memmap``), and
the start, length and name of every document. Training and evaluation windows are slices of it,
so data never holds back a model, memory does not grow with the corpus, and any window (hence a
resume point) is reached in O(1). The cache directory is keyed by the source's content
fingerprint and every setting that changes the tokens; the tokenizer is saved in it.

Several runs may share a cache directory: one builds while the others wait on a file lock, and
every file's size and hash are recorded when it is built (``data/cache_files.py``), so that a
truncated or altered cache is rebuilt rather than read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.cache_files import damage, file_lock, write_manifest
from data.config import DataConfig
from data.sources import DataError, documents

log = logging.getLogger(__name__)

EOD = "<|endoftext|>"
SPLITS = ("train", "val", "test")


def split_of(name: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a hash of the document's name: stable across runs and
    machines, and a document is in exactly one split."""
    u = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def train_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (every byte is a token, so nothing is ever unknown) with one special
    token, the end of document."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.tokenizer_path={str(path)!r} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"data.tokenizer_path={str(path)!r} is not a tokenizer.json ({first})"
        ) from err
    if tok.token_to_id(EOD) is None:
        raise DataError(f"data.tokenizer_path={str(path)!r}: the tokenizer has no {EOD!r} token")
    return tok


@dataclass
class Split:
    """One split of the cache: flat tokens and the documents inside them."""

    tokens: np.ndarray  # (T,) uint16/uint32 memmap: documents, each followed by EOD
    starts: np.ndarray  # (n_docs,) int64 offset of each document's first token
    lengths: np.ndarray  # (n_docs,) int64 tokens of each document, EOD excluded
    names: list[str]

    def document_at(self, offset: int) -> tuple[int, int]:
        """(document index, position inside it) of flat token ``offset``."""
        doc = int(np.searchsorted(self.starts, offset, side="right")) - 1
        return doc, offset - int(self.starts[doc])


class Corpus:
    """The prepared cache of one DataConfig: tokenizer, and the train/val/test splits."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        self.tokenizer = load_tokenizer(directory / "tokenizer.json")
        self.eod = self.tokenizer.token_to_id(EOD)
        self._splits: dict[str, Split] = {}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def split(self, name: str) -> Split:
        """``train``, ``val``, ``test``, or ``all`` (the three, in that order, read into memory:
        for scoring a corpus none of whose documents a model saw)."""
        if name == "all" and name not in self._splits:
            parts = [self.split(s) for s in SPLITS]
            offsets = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
            self._splits[name] = Split(
                np.concatenate([np.asarray(p.tokens) for p in parts]),
                np.concatenate([p.starts + o for p, o in zip(parts, offsets, strict=True)]),
                np.concatenate([p.lengths for p in parts]),
                [n for p in parts for n in p.names],
            )
        if name not in self._splits:
            index = np.load(self.dir / f"{name}.index.npz")
            dtype = np.dtype(self.meta["dtype"])
            size = (self.dir / f"{name}.bin").stat().st_size // dtype.itemsize
            tokens = (
                np.memmap(self.dir / f"{name}.bin", dtype=dtype, mode="r", shape=(size,))
                if size
                else np.zeros(0, dtype=dtype)
            )
            names = json.loads((self.dir / f"{name}.names.json").read_text())
            self._splits[name] = Split(tokens, index["starts"], index["lengths"], names)
        return self._splits[name]


def cache_key(cfg: DataConfig, fingerprint: str) -> str:
    tok = "trained"
    if cfg.tokenizer_path:
        tok = hashlib.sha256(Path(cfg.tokenizer_path).read_bytes()).hexdigest()[:12]
    settings = f"{fingerprint}|{cfg.vocab_size}|{tok}|{cfg.val_fraction}|{cfg.test_fraction}"
    return f"{fingerprint}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"


def prepare(cfg: DataConfig) -> Corpus:
    """Returns the corpus of ``cfg``, building its cache first if needed: once per key, however
    many processes ask at once (a file lock), and again (with a warning) if the cache on disk
    is damaged, never read as it is."""
    if cfg.tokenizer_path:
        load_tokenizer(cfg.tokenizer_path)  # fail now, before reading the corpus
    docs, fingerprint = documents(cfg)
    directory = Path(cfg.cache_dir) / cache_key(cfg, fingerprint)
    if damage(directory) is None:  # the common case: built and intact, no lock needed
        return Corpus(directory)
    with file_lock(directory.with_name(directory.name + ".lock")):
        problem = damage(directory)  # another process may have built it while we waited
        if problem is not None:
            if directory.exists():
                log.warning("token cache %s is damaged (%s): rebuilding it", directory, problem)
                shutil.rmtree(directory)
            for stale in directory.parent.glob(directory.name + ".tmp*"):  # killed builds
                shutil.rmtree(stale, ignore_errors=True)
            _build(cfg, docs, directory)
    return Corpus(directory)


class _SplitWriter:
    """Appends encoded documents to each split's flat token file (every document followed by
    EOD) and records where each starts, how long it is and its name."""

    def __init__(self, directory: Path, dtype: type, eod: int):
        self.dir, self.dtype, self.eod = directory, dtype, eod
        self.files = {s: open(directory / f"{s}.bin", "wb") for s in SPLITS}  # noqa: SIM115
        self.index = {s: {"starts": [], "lengths": [], "names": []} for s in SPLITS}
        self.offsets = dict.fromkeys(SPLITS, 0)

    def add(self, split: str, name: str, ids: list[int]) -> None:
        self.files[split].write(np.asarray([*ids, self.eod], dtype=self.dtype).tobytes())
        self.index[split]["starts"].append(self.offsets[split])
        self.index[split]["lengths"].append(len(ids))
        self.index[split]["names"].append(name)
        self.offsets[split] += len(ids) + 1

    def close(self) -> None:
        """Closes the token files and writes each split's index and names beside them."""
        for s in SPLITS:
            self.files[s].close()
            np.savez(
                self.dir / f"{s}.index.npz",
                starts=np.asarray(self.index[s]["starts"], dtype=np.int64),
                lengths=np.asarray(self.index[s]["lengths"], dtype=np.int64),
            )
            (self.dir / f"{s}.names.json").write_text(json.dumps(self.index[s]["names"]))


def _tokenizer_for(cfg: DataConfig, docs, split) -> Tokenizer:
    """The tokenizer at ``data.tokenizer_path``, or one trained on the train split's texts."""
    if cfg.tokenizer_path:
        return load_tokenizer(cfg.tokenizer_path)
    log.info("training a %d-token byte-level BPE on the train split", cfg.vocab_size)
    return train_tokenizer((row["text"] for row in docs if split(row) == "train"), cfg.vocab_size)


def _write_documents(docs, tok: Tokenizer, split, writer: _SplitWriter, batch: int = 64) -> None:
    """Every document, encoded ``batch`` at a time (``encode_batch`` runs them in parallel),
    into its split."""
    rows: list[dict] = []

    def flush():
        encoded = tok.encode_batch([row["text"] for row in rows])
        for row, enc in zip(rows, encoded, strict=True):
            writer.add(split(row), row["name"], enc.ids)
        rows.clear()

    for row in docs:
        rows.append(row)
        if len(rows) == batch:
            flush()
    flush()


def _check_not_empty(cfg: DataConfig, writer: _SplitWriter) -> None:
    """Raises DataError if no document has any text, or none is left to train a tokenizer on."""
    if not any(writer.index[s]["lengths"] and max(writer.index[s]["lengths"]) for s in SPLITS):
        raise DataError(
            f"the corpus of data.source={cfg.source!r} has no document with any text "
            f"(is it empty? data.path={cfg.path!r})"
        )
    if writer.offsets["train"] == 0 and not cfg.tokenizer_path:
        raise DataError(
            f"the corpus of data.source={cfg.source!r} has no training document to train a "
            f"tokenizer on (data.path={cfg.path!r}); give data.tokenizer_path"
        )


def _write_meta(directory: Path, cfg: DataConfig, tok: Tokenizer, writer: _SplitWriter) -> None:
    meta = {
        "dtype": np.dtype(writer.dtype).name,
        "vocab_size": tok.get_vocab_size(),
        "documents": {s: len(writer.index[s]["names"]) for s in SPLITS},
        "tokens": writer.offsets,
        "config": cfg.to_dict(),
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))


def _build(cfg: DataConfig, docs, directory: Path) -> None:
    """Builds the cache in a fresh sibling folder and renames it into place once complete, so
    a reader never sees half a cache (a killed build leaves only a ``.tmp*`` folder)."""
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    split = lambda row: split_of(row["name"], cfg.val_fraction, cfg.test_fraction)  # noqa: E731
    tok = _tokenizer_for(cfg, docs, split)
    tok.save(str(tmp / "tokenizer.json"))
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    writer = _SplitWriter(tmp, dtype, tok.token_to_id(EOD))
    _write_documents(docs, tok, split, writer)
    writer.close()
    _check_not_empty(cfg, writer)
    _write_meta(tmp, cfg, tok, writer)
    write_manifest(tmp)
    tmp.rename(directory)
