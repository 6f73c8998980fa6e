"""LongContextDataModule: a source's documents as packed training windows and in-document
evaluation windows, with a tokenizer trained on the train split, rank- and worker-sharded, and
resumable mid-epoch (Lightning stores ``state_dict()`` in every checkpoint)."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from data.config import DataConfig
from data.copying import CopyMix, frequent_tokens
from data.corpus import Corpus, prepare
from data.recall import RecallSet, RecallStream, RecallTask
from data.windows import DocumentWindows, PackedWindows


class LongContextDataModule(L.LightningDataModule):
    def __init__(self, config: DataConfig | dict, context_parallel: int = 1):
        """``context_parallel``: consecutive ranks that read the same windows (each then
        takes its slice of every window)."""
        super().__init__()
        self.config = config if isinstance(config, DataConfig) else DataConfig.from_dict(config)
        self.context_parallel = context_parallel
        self.corpus: Corpus | None = None
        self.batches_consumed = 0  # training batches delivered to the model on this rank
        # data.source=recall: generated sequences, no corpus (data/recall.py)
        self.recall = RecallTask.of(self.config) if self.config.source == "recall" else None

    # -- preparation -------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.recall is None:
            prepare(self.config)  # builds the cache once (rank 0); a no-op when it exists

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None and self.recall is None:
            self.corpus = prepare(self.config)

    @property
    def vocab_size(self) -> int:
        if self.recall is not None:
            return self.recall.vocab_size
        self.setup()
        return self.corpus.vocab_size

    def save_tokenizer(self, directory: str | Path) -> Path:
        """Copies the tokenizer beside a run's checkpoints, so they always find it."""
        if self.recall is not None:
            return self.recall.save_tokenizer(Path(directory) / "tokenizer.json")
        self.setup()
        target = Path(directory) / "tokenizer.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.corpus.dir / "tokenizer.json", target)
        return target

    # -- loaders -----------------------------------------------------------------------------

    def _rank(self) -> tuple[int, int]:
        """(reader, readers): the ranks of a context-parallel group read as one."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        P = self.context_parallel
        return trainer.global_rank // P, trainer.world_size // P

    def train_dataset(self, rank: int | None = None, world_size: int | None = None):
        self.setup()
        cfg = self.config
        if rank is None:
            rank, world_size = self._rank()
        if self.recall is not None:
            return RecallStream(self.recall, cfg.seed, cfg.batch_size, cfg.num_workers, rank,
                                world_size, skip_batches=self.batches_consumed)  # fmt: skip
        return PackedWindows(
            self.corpus.split("train"),
            cfg.seq_len,
            cfg.batch_size,
            cfg.num_workers,
            cfg.seed,
            rank,
            world_size,
            skip_batches=self.batches_consumed,
            copy=self.copy_mix(),
            document_eod=self.corpus.eod if cfg.document_mask else None,
        )

    def copy_mix(self) -> CopyMix | None:
        """The repeated-sequence windows of ``data.copy_fraction`` (None when 0), drawn from
        the train split's most frequent tokens (data/copying.py)."""
        cfg = self.config
        if cfg.copy_fraction == 0.0:
            return None
        self.setup()
        split = self.corpus.split("train")
        alphabet = frequent_tokens(split.tokens, self.corpus.vocab_size, cfg.copy_alphabet,
                                   exclude=self.corpus.eod)  # fmt: skip
        return CopyMix(cfg.copy_fraction, alphabet, cfg.seq_len, cfg.seed)

    def _loader(self, dataset, sampler=None) -> DataLoader:
        # A loader draws its workers' base seed from its generator when an iterator starts; a
        # private one keeps that draw off the global RNG, which dropout uses: otherwise a
        # validation pass, or the loader a resumed run makes, would shift every later mask.
        generator = torch.Generator().manual_seed(self.config.seed)
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            sampler=sampler,
            num_workers=self.config.num_workers,
            generator=generator,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        # Ranks take every world_size-th window, no padding: summed NLL over ranks is exactly
        # the single-process sum (a DistributedSampler would repeat windows to even them out).
        dataset = self.eval_dataset(split)
        rank, world = self._rank()
        return self._loader(dataset, sampler=range(rank, len(dataset), world))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset())

    def eval_dataset(self, split: str = "val", seq_len: int | None = None):
        if self.recall is not None:  # held-out sequences, distances drawn as in training
            cfg = self.config
            return RecallSet(self.recall, cfg.seed, split, cfg.recall_eval_sequences,
                             seq_len or cfg.seq_len)  # fmt: skip
        self.setup()
        return DocumentWindows(
            self.corpus.split(split), seq_len or self.config.seq_len, split_name=split
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # -- resume ------------------------------------------------------------------------------

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # called for the batches the loop actually runs (not the one it prefetches)
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self.batches_consumed += 1
        return batch

    def state_dict(self) -> dict:
        return {"batches_consumed": self.batches_consumed, "config": self.config.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batches_consumed = int(state["batches_consumed"])
