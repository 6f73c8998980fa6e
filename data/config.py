"""DataConfig: every data setting in one place, checked where it enters. The comment beside
each field is its documentation (configs/default.yaml is generated from it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from data.sources import SOURCES, Source


def _is_int(value) -> bool:
    """An int and not a bool (YAML's ``true`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DataConfig:
    source: Source = "stdlib_code"  # the documents: Python's stdlib, a directory, or the hub
    path: str | None = None  # text_dir: the directory
    glob: str = "**/*.txt"  # text_dir: which files, relative to path
    hf_name: str | None = None  # hf: dataset name
    hf_config: str | None = None  # hf: dataset config
    hf_split: str = "train"  # hf: split to read
    hf_text_field: str = "text"  # hf: field holding the text
    seq_len: int = 2048  # tokens per training window (inputs; targets are shifted by one)
    batch_size: int = 8  # windows per batch, per device
    num_workers: int = 2  # DataLoader workers
    vocab_size: int = 8192  # of the byte-level BPE trained on the train split
    tokenizer_path: str | None = None  # load this tokenizer.json instead of training one
    cache_dir: str = ".cache/data"  # tokenizer and token cache, keyed by source and settings
    val_fraction: float = 0.05  # of documents, assigned by a hash of the document's name
    test_fraction: float = 0.05  # of documents, likewise
    seed: int = 1234  # order of training windows
    document_mask: bool = False  # attention stays inside each document of a packed window
    copy_fraction: float = 0.0  # training windows replaced by a random sequence repeated
    copy_alphabet: int = 512  # copy: drawn from this many most frequent train tokens
    recall_keys: int = 128  # recall: distinct keys (a sequence uses each at most once)
    recall_values: int = 64  # recall: distinct values
    recall_filler: int = 16  # recall: filler tokens (the noise between records and queries)
    recall_records: int = 24  # recall: records (each queried once) per seq_len tokens
    recall_min_distance: int = 4  # recall: shortest record-to-query distance, tokens
    recall_max_distance: int | None = None  # recall: longest (log-uniform between); null: seq_len
    recall_eval_sequences: int = 256  # recall: held-out sequences per validation / test set

    def __post_init__(self):
        # in this order: a config with several faults reports the first of them
        self._check_source()
        self._check_counts()
        self._check_copy()
        self._check_vocab()
        self._check_fractions()

    def _check_source(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r} is not one of {SOURCES}")
        if self.source == "text_dir" and not self.path:
            raise ValueError("data.source='text_dir' needs data.path (a directory of text files)")

    def _check_counts(self) -> None:
        for name in ("seq_len", "batch_size", "vocab_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if not _is_int(self.num_workers) or self.num_workers < 0:
            raise ValueError(f"data.num_workers must be an integer >= 0, got {self.num_workers!r}")

    def _check_copy(self) -> None:
        if not 0.0 <= self.copy_fraction <= 1.0:
            raise ValueError(f"data.copy_fraction must be in [0, 1], got {self.copy_fraction!r}")
        if not _is_int(self.copy_alphabet) or self.copy_alphabet < 2:
            raise ValueError(
                f"data.copy_alphabet must be an integer >= 2, got {self.copy_alphabet!r}"
            )
        if self.source == "recall" and self.document_mask:
            raise ValueError(
                "data.document_mask applies to text sources (stdlib_code, text_dir, hf), whose "
                "windows pack documents; data.source='recall' has one sequence per window"
            )
        if self.source == "recall" and self.copy_fraction > 0:
            raise ValueError(
                "data.copy_fraction applies to text sources (stdlib_code, text_dir, hf); "
                f"data.source='recall' got {self.copy_fraction}"
            )

    def _check_vocab(self) -> None:
        """A recall task checks its own token space (data/recall.py); a text source's
        byte-level BPE needs every byte and the end of document."""
        if self.source == "recall":
            from data.recall import check_recall_task

            check_recall_task(self)
        elif self.vocab_size < 257:
            raise ValueError(
                f"data.vocab_size must be at least 257 (bytes + end of document), "
                f"got {self.vocab_size}"
            )

    def _check_fractions(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"data.{name} must be in [0, 1), got {value!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"data.val_fraction + data.test_fraction must leave documents for training, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown data keys {unknown}; accepted: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)
