"""``data.source=recall``: distance-controlled multi-query associative recall (in the spirit of
MQAR, Arora et al. 2023, "Zoology"), a task whose answer sits a chosen distance back.

A sequence is a row of 4-token slots. A *record* slot ``SET k v f`` binds key ``k`` to value
``v``; a later *query* slot ``ASK k v f`` asks for it, and the query's ``v`` is the only scored
token (its label; every other label is ``IGNORE_INDEX``, not scored: data/batch.py). Every
other slot is filler: four tokens drawn from ``filler`` noise tokens (``f`` above is one too).
The *distance* of a query is the number of tokens from its record's slot to its own, a
multiple of 4, at least 4: to answer, the model must carry ``v`` from the record to the query,
``distance`` positions ahead. Keys are distinct inside a sequence, so every answer is
unambiguous; values are drawn independently.

Training sequences draw each query's distance log-uniformly in ``[min_distance, max_distance]``
(``recall_max_distance`` null: the sequence length); evaluation sequences (:func:`sequence`
with ``distance=d``) put every query at exactly ``d``. Records per sequence keep the training
density (``recall_records`` per ``seq_len`` tokens) at any length, up to the number of keys.

The vocabulary is the task's own (no BPE): filler ``F0..``, ``SET``, ``ASK``, keys ``K0..``,
values ``V0..``, saved as a word-level ``tokenizer.json`` so that any tokenizer-reading code
decodes it. Sequence ``i`` of a stream is a pure function of ``(seed, stream, i)``: the
training stream is endless, sharded across ranks and DataLoader workers exactly like
:class:`data.windows.PackedWindows` (shard ``s`` takes indices ``s, s + n_shards, ...``, so
shards are disjoint) and resumes in O(1) after any number of batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from data.batch import IGNORE_INDEX

SLOT = 4  # tokens per slot
STREAMS = {"train": 0, "val": 1, "test": 2}  # disjoint random streams


@dataclass(frozen=True)
class RecallTask:
    """The task's vocabulary and sizes (from the ``recall_*`` fields of a DataConfig)."""

    keys: int = 128
    values: int = 64
    filler: int = 16
    records: int = 24  # per seq_len tokens
    seq_len: int = 256
    min_distance: int = 4
    max_distance: int | None = None  # None: the sequence length

    @classmethod
    def of(cls, cfg) -> RecallTask:
        return cls(cfg.recall_keys, cfg.recall_values, cfg.recall_filler, cfg.recall_records,
                   cfg.seq_len, cfg.recall_min_distance, cfg.recall_max_distance)  # fmt: skip

    # token ids: filler, SET, ASK, keys, values
    @property
    def set_id(self) -> int:
        return self.filler

    @property
    def ask_id(self) -> int:
        return self.filler + 1

    def key_id(self, k):
        return self.filler + 2 + k

    def value_id(self, v):
        return self.filler + 2 + self.keys + v

    @property
    def vocab_size(self) -> int:
        return self.filler + 2 + self.keys + self.values

    def names(self) -> list[str]:
        filler = [f"F{i}" for i in range(self.filler)]
        keys, values = [f"K{i}" for i in range(self.keys)], [f"V{i}" for i in range(self.values)]
        return filler + ["SET", "ASK"] + keys + values

    def records_at(self, length: int) -> int:
        """Records per sequence of ``length`` tokens: the training density, at most one per key
        and at most what fits (two slots each)."""
        density = round(self.records * length / self.seq_len)
        return max(1, min(self.keys, density, length // SLOT // 2))

    def save_tokenizer(self, path: str | Path) -> Path:
        """A word-level ``tokenizer.json`` of the task's vocabulary."""
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {name: i for i, name in enumerate(self.names())}
        tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
        return path


def check_recall_task(cfg) -> None:
    """The ``recall_*`` settings of a DataConfig; a ValueError naming the bad value."""
    for name in ("recall_keys", "recall_values", "recall_filler", "recall_records",
                 "recall_min_distance"):  # fmt: skip
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
    if cfg.seq_len % SLOT or cfg.seq_len < 2 * SLOT:
        raise ValueError(
            f"data.source='recall' needs data.seq_len a multiple of {SLOT} (slots of {SLOT} "
            f"tokens) and at least {2 * SLOT}, got {cfg.seq_len}"
        )
    if cfg.recall_records > cfg.recall_keys:
        raise ValueError(
            f"data.recall_records={cfg.recall_records} needs as many distinct keys, got "
            f"data.recall_keys={cfg.recall_keys}"
        )
    top = cfg.recall_max_distance
    if top is not None and (not isinstance(top, int) or top < cfg.recall_min_distance):
        raise ValueError(
            f"data.recall_max_distance must be null or an integer >= recall_min_distance="
            f"{cfg.recall_min_distance}, got {top!r}"
        )


@dataclass
class Sequence:
    """One sequence: ``tokens (L + 1,)`` int64; ``labels (L,)`` the next token where it is an
    answer, else IGNORE_INDEX; ``distances (L,)`` the answer's distance there, else 0."""

    tokens: np.ndarray
    labels: np.ndarray
    distances: np.ndarray


def sequence(task: RecallTask, length: int, rng: np.random.Generator,
             distance: int | None = None) -> Sequence:  # fmt: skip
    """A sequence of ``length`` input tokens (plus one, the last target). ``distance``: every
    query at exactly that many tokens after its record (rounded down to a multiple of 4);
    None: each drawn log-uniformly in the task's range (capped at ``length``)."""
    n_slots = (length + 1 + SLOT - 1) // SLOT  # slots covering the L + 1 tokens
    tokens = rng.integers(0, task.filler, size=n_slots * SLOT)  # filler everywhere first
    free = np.ones(n_slots, dtype=bool)
    free[-1] = (length + 1) % SLOT == 0  # a partial last slot cannot hold a whole query
    lo = max(1, task.min_distance // SLOT)
    hi = max(lo, min(task.max_distance or length, length) // SLOT)
    labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
    distances = np.zeros(length, dtype=np.int64)
    keys = rng.permutation(task.keys)[: task.records_at(length)]
    for key in keys:
        room = None
        for _ in range(1 if distance is not None else 8):  # a distance with room for the pair
            if distance is not None:
                gap = distance // SLOT
            else:
                gap = min(max(int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))), lo), hi)
            if 1 <= gap < n_slots:
                room = np.flatnonzero(free[:-gap] & free[gap:])  # record slots r with r + gap
                if len(room):
                    break
        if room is None or not len(room):
            continue  # no room left at this distance: fewer records in this sequence
        r = int(rng.choice(room))
        q = r + gap
        free[r] = free[q] = False
        value = int(rng.integers(task.values))
        k_id, v_id = task.key_id(int(key)), task.value_id(value)
        tokens[r * SLOT : r * SLOT + 3] = (task.set_id, k_id, v_id)
        tokens[q * SLOT : q * SLOT + 3] = (task.ask_id, k_id, v_id)
        answer = q * SLOT + 2  # the value's position; it is the label of the position before
        labels[answer - 1] = tokens[answer]
        distances[answer - 1] = gap * SLOT
    tokens = tokens[: length + 1].astype(np.int64)
    return Sequence(tokens, labels, distances)


def sequence_rng(seed: int, stream: str, index: int, distance: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, STREAMS[stream], int(index), int(distance)])


def item(seq: Sequence, index: int) -> dict:
    """A batch row as every source yields it (data/batch.py): only the answers are scored."""
    return {
        "input_ids": torch.from_numpy(seq.tokens[:-1].copy()),
        "labels": torch.from_numpy(seq.labels),
        "index": int(index),
    }


class RecallStream(IterableDataset):
    """Endless training sequences of one rank, sharded and resumable like PackedWindows:
    ``skip_batches`` batches already delivered by a loader of ``batch_size`` and
    ``num_workers``."""

    def __init__(self, task: RecallTask, seed: int, batch_size: int, num_workers: int,
                 rank: int = 0, world_size: int = 1, skip_batches: int = 0):  # fmt: skip
        self.task, self.seed, self.batch_size = task, seed, batch_size
        self.workers, self.rank, self.skip_batches = max(1, num_workers), rank, skip_batches
        self.n_shards = world_size * self.workers

    def indices(self, shard: int, start: int = 0):
        """Sequence indices of a shard, from its ``start``-th item on."""
        k = start
        while True:
            yield k * self.n_shards + shard
            k += 1

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        shard = self.rank * self.workers + worker
        done = max(0, -(-(self.skip_batches - worker) // self.workers))  # as PackedWindows
        for i in self.indices(shard, done * self.batch_size):
            rng = sequence_rng(self.seed, "train", i)
            yield item(sequence(self.task, self.task.seq_len, rng), i)


class RecallSet(Dataset):
    """A fixed held-out set: ``count`` sequences of ``length`` tokens from the ``stream``
    (val or test), each query at ``distance`` (None: drawn as in training)."""

    def __init__(self, task: RecallTask, seed: int, stream: str, count: int, length: int,
                 distance: int | None = None):  # fmt: skip
        self.task, self.seed, self.stream = task, seed, stream
        self.count, self.length, self.distance = count, length, distance

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        rng = sequence_rng(self.seed, self.stream, i, self.distance or 0)
        return item(sequence(self.task, self.length, rng, self.distance), i)
