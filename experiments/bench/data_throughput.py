"""Tokens per second delivered by the training DataLoader (tokenizer trained, cache warm).

    python -m experiments.bench.data_throughput                   # stdlib corpus, 2 workers
    python -m experiments.bench.data_throughput --workers 0 1 2 --seq-len 8192 --batch-size 4

Prepares the corpus first (a one-off: trains the tokenizer and fills the token cache, and says
how long that took), then times --batches batches per setting after a warm-up, prints a
markdown table and writes experiments/results/data_throughput/data_throughput.csv (with its
provenance record beside it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from data.config import DataConfig
from data.datamodule import LongContextDataModule
from experiments.bench.measure import RESULTS
from pipeline.provenance import write_results


def measure(cfg: DataConfig, batches: int) -> float:
    module = LongContextDataModule(cfg)
    loader = iter(module.train_dataloader())
    next(loader)  # warm-up: workers started, first batch made
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(loader)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="stdlib_code")
    p.add_argument("--path")
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--cache-dir", default=".cache/data")
    p.add_argument("--out", type=Path, default=RESULTS / "data_throughput")
    args = p.parse_args(argv)
    base = dict(
        source=args.source,
        path=args.path,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        vocab_size=args.vocab_size,
        cache_dir=args.cache_dir,
    )
    start = time.perf_counter()
    module = LongContextDataModule(DataConfig(**base))
    module.setup()
    meta = module.corpus.meta
    print(
        f"corpus ready in {time.perf_counter() - start:.1f}s: {meta['documents']} documents, "
        f"{meta['tokens']} tokens, vocab {meta['vocab_size']}",
        flush=True,
    )
    print("| workers | seq_len | batch | tokens/s |\n|---|---|---|---|")
    rows = []
    for w in args.workers:
        rate = measure(DataConfig(**base, num_workers=w), args.batches)
        print(f"| {w} | {args.seq_len} | {args.batch_size} | {rate:,.0f} |", flush=True)
        rows.append({"source": args.source, "vocab_size": meta["vocab_size"], "workers": w,
                     "seq_len": args.seq_len, "batch_size": args.batch_size,
                     "batches": args.batches, "tokens_per_s": round(rate)})  # fmt: skip
    path = write_results(args.out / "data_throughput.csv", rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
