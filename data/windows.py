"""Token windows cut from a split: packed for training, inside one document for evaluation.

Training (``PackedWindows``): the split is one stream of documents separated by end-of-document
tokens; window i is tokens ``[i*L, i*L + L + 1)`` (inputs the first L, targets the last L), so
consecutive windows share one token and nothing is dropped but the tail. Every epoch visits the
windows in a fresh permutation (seed + epoch). The stream of each (rank, DataLoader worker) is
its own disjoint slice of that order, and a DataLoader takes batches from its workers in turn,
so batch b of a rank is batch ``b // W`` of worker ``b % W``: after ``n`` batches a resumed
loader makes each worker skip exactly its share, in O(1) because any window is an offset.

With ``document_eod`` (``data.document_mask``), each training window also carries
``document_starts``: a document starts at its first token and at every end-of-document input
(the EOD that ends one document begins the next), so that the model attends inside documents.

Evaluation (``DocumentWindows``): disjoint windows of L + 1 tokens that never leave their
document; a document shorter than L + 1 tokens gives none.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from data.copying import CopyMix
from data.corpus import Split


class PackedWindows(IterableDataset):
    """Endless training windows of one rank; yields ``{"input_ids", "labels", "index", "doc",
    "offset"}`` (the document and offset of the window's first token).

    ``skip_batches``: batches this rank's loader already delivered (resume point);
    ``batch_size`` and ``num_workers`` must be those of the DataLoader that iterates it.
    ``copy``: replaces a fraction of the windows by repeated random sequences
    (data/copying.py); which ones depends on (seed, epoch, index) only, so resume stays exact.
    ``document_eod``: the end-of-document token, to yield ``document_starts`` (data/batch.py);
    a repeated-sequence window is one document.
    """

    def __init__(
        self,
        split: Split,
        seq_len: int,
        batch_size: int,
        num_workers: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        skip_batches: int = 0,
        copy: CopyMix | None = None,
        document_eod: int | None = None,
    ):
        self.copy, self.document_eod = copy, document_eod
        self.split, self.tokens, self.seq_len, self.seed = split, split.tokens, seq_len, seed
        self.n_windows = (len(split.tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(
                f"the train split has {len(split.tokens)} tokens, fewer than one "
                f"window of data.seq_len + 1 = {seq_len + 1}"
            )
        self.batch_size, self.workers = batch_size, max(1, num_workers)
        self.rank, self.world_size, self.skip_batches = rank, world_size, skip_batches
        self.n_shards = world_size * self.workers
        if self.n_windows < self.n_shards * batch_size:
            raise ValueError(
                f"the train split has {self.n_windows} windows of {seq_len} tokens, fewer than "
                f"one batch ({batch_size}) for each of {self.n_shards} ranks x workers"
            )

    def shard_indices(self, shard: int, epoch: int) -> np.ndarray:
        """Window indices of one shard in one epoch: every n_shards-th of the permutation,
        cut to a whole number of batches so that all shards give the same count."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        per_shard = self.n_windows // self.n_shards // self.batch_size * self.batch_size
        return order[shard :: self.n_shards][:per_shard]

    def window(self, i: int, epoch: int = 0) -> dict:
        """Window i of ``epoch``, with the document its first token belongs to and the offset
        there (of the natural window it replaces, when it is a repeated sequence)."""
        start = int(i) * self.seq_len
        doc, offset = self.split.document_at(start)
        replaced = self.copy.window(epoch, i) if self.copy is not None else None
        if replaced is not None:
            inputs, labels = replaced
        else:
            chunk = self.tokens[start : start + self.seq_len + 1].astype(np.int64)
            chunk = torch.from_numpy(chunk)
            inputs, labels = chunk[:-1], chunk[1:]
        window = {"input_ids": inputs, "labels": labels, "index": int(i), "doc": doc,
                  "offset": offset}  # fmt: skip
        if self.document_eod is not None:
            starts = torch.zeros(self.seq_len, dtype=torch.bool)
            if replaced is None:
                starts = inputs == self.document_eod
            starts[0] = True
            window["document_starts"] = starts
        return window

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise ValueError(
                f"PackedWindows built for {self.workers} workers, iterated by {info.num_workers}"
            )
        shard = self.rank * self.workers + worker
        # batches of this worker already delivered: those b < skip with b % workers == worker
        done = max(0, -(-(self.skip_batches - worker) // self.workers))
        skip = done * self.batch_size
        per_epoch = len(self.shard_indices(shard, 0))
        epoch, pos = divmod(skip, per_epoch)
        while True:
            indices = self.shard_indices(shard, epoch)
            for i in indices[pos:]:
                yield self.window(i, epoch)
            epoch, pos = epoch + 1, 0


class DocumentWindows(Dataset):
    """Disjoint windows of ``seq_len + 1`` tokens inside documents of at least ``min_tokens``
    tokens (default: one window); each item knows its document and offset."""

    def __init__(
        self, split: Split, seq_len: int, min_tokens: int | None = None, split_name: str = "val"
    ):
        self.tokens, self.seq_len, self.names = split.tokens, seq_len, split.names
        need = max(seq_len + 1, min_tokens or 0)
        docs, offsets = [], []
        for d, length in enumerate(split.lengths):
            if length >= need:
                for off in range(0, int(length) - seq_len, seq_len):
                    docs.append(d)
                    offsets.append(off)
        if not docs:
            longest = int(split.lengths.max()) if len(split.lengths) else 0
            raise ValueError(
                f"data.seq_len={seq_len} leaves no window inside a document of the {split_name} "
                f"split: its longest document has {longest} tokens ({len(split.lengths)} "
                "documents); use a shorter seq_len or a corpus with longer documents"
            )
        self.doc = np.asarray(docs, dtype=np.int64)
        self.offset = np.asarray(offsets, dtype=np.int64)
        self.starts = split.starts

    def __len__(self) -> int:
        return len(self.doc)

    def __getitem__(self, i: int) -> dict:
        start = int(self.starts[self.doc[i]] + self.offset[i])
        chunk = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))
        return {
            "input_ids": chunk[:-1],
            "labels": chunk[1:],
            "doc": int(self.doc[i]),
            "offset": int(self.offset[i]),
        }
