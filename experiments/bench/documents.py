"""What document masks cost: packed windows of the stdlib corpus, masked vs the same unmasked.

    python -m experiments.bench.documents                     # 32K-256K (make bench-documents)
    python -m experiments.bench.documents --quick             # 8K and 16K, one repeat

For each N: one window of N tokens of the standard-library corpus's train split (its documents
packed as training packs them, each followed by its end-of-document token; the window starts
at a fixed offset, so every N sees its first N tokens), its boundaries where
``data.document_mask=true`` puts them (at each EOD input, ``Documents.from_starts``). Then
forward+backward time (median of --repeats after a warm-up) and peak memory of:

- dilated attention with the paper's schedule (w = 2048..32768, r = 1..12), masked
  (``documents=``) and unmasked (the same q, k, v);
- dense causal attention up to --dense-max: torch SDPA unmasked, ``block_causal_attention``
  masked (causal inside each document).

B=1, H=12, D=64, as `make bench`. Target: masked within 1.3x of unmasked (a query sees fewer
keys in a masked window, so it should cost less, not more). Writes
experiments/results/documents/documents.csv (with its provenance) and prints a table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from experiments.bench.measure import PAPER_R, PAPER_W, RESULTS, K, fixed_mmap_threshold, timed
from models.attention.dilated import dilated_attention
from models.attention.documents import Documents
from models.attention.sliding import block_causal_attention
from pipeline import display
from pipeline.provenance import write_results

COLUMNS = ["n", "documents", "median_doc", "attention", "unmasked_s", "masked_s", "ratio",
           "unmasked_mem", "masked_mem"]  # fmt: skip


def window_documents(n: int, offset: int) -> Documents:
    """The boundaries of the corpus window ``[offset, offset + n)`` (train split, default
    data settings), as the data module gives them with ``document_mask=true``."""
    from data.config import DataConfig
    from data.corpus import prepare

    corpus = prepare(DataConfig())
    tokens = np.asarray(corpus.split("train").tokens[offset : offset + n])
    if len(tokens) < n:
        raise SystemExit(f"the train split holds fewer than offset + N = {offset + n} tokens")
    starts = torch.from_numpy(tokens == corpus.eod)[None]  # (1, n) bool: EOD inputs start one
    return Documents.from_starts(starts)


def _fwd_bwd(fn, n, args):
    shape = (1, n, args.heads, args.head_dim)
    gen = torch.Generator().manual_seed(0)
    qkv = [torch.randn(shape, generator=gen).requires_grad_() for _ in range(3)]
    grad = torch.randn(shape, generator=gen)

    def step():
        fn(*qkv).backward(grad)
        for x in qkv:
            x.grad = None

    return timed(step, torch.device("cpu"), args.repeats)


def measure(n: int, docs: Documents, attention: str, args) -> dict:
    if attention == "dilated":
        plain = lambda q, k, v: dilated_attention(q, k, v, PAPER_W, PAPER_R)  # noqa: E731
        masked = lambda q, k, v: dilated_attention(q, k, v, PAPER_W, PAPER_R, documents=docs)  # noqa: E731
    else:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        plain = lambda q, k, v: sdpa(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True  # noqa: E731
                                     ).transpose(1, 2)  # fmt: skip
        masked = lambda q, k, v: block_causal_attention(q, k, v, docs)  # noqa: E731
    unmasked_s, unmasked_mem = _fwd_bwd(plain, n, args)
    masked_s, masked_mem = _fwd_bwd(masked, n, args)
    return {"n": n, "documents": len(docs.lengths), "median_doc": int(docs.lengths.median()),
            "attention": attention, "unmasked_s": unmasked_s, "masked_s": masked_s,
            "ratio": masked_s / unmasked_s, "unmasked_mem": unmasked_mem,
            "masked_mem": masked_mem}  # fmt: skip


def table(rows) -> str:
    header = ["N", "attention", "documents (median tokens)", "unmasked fwd+bwd s",
              "masked fwd+bwd s", "masked / unmasked", "peak MiB unmasked",
              "peak MiB masked"]  # fmt: skip
    body = [[f"{r['n'] // K}K", r["attention"], f"{r['documents']} ({r['median_doc']})",
             f"{r['unmasked_s']:.2f}", f"{r['masked_s']:.2f}", f"{r['ratio']:.2f}",
             f"{r['unmasked_mem'] / 2**20:.0f}", f"{r['masked_mem'] / 2**20:.0f}"]
            for r in rows]  # fmt: skip
    return display.markdown_table(header, body)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", help="window lengths (tokens)")
    p.add_argument("--quick", action="store_true", help="8K and 16K, one repeat")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--dense-max", type=int, default=32 * K, help="dense up to this N")
    p.add_argument("--offset", type=int, default=0, help="window start in the train split")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS / "documents")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = args.sizes or [8 * K, 16 * K], 1
    args.sizes = args.sizes or [32 * K, 64 * K, 128 * K, 256 * K]
    if any(s <= 0 for s in args.sizes) or args.repeats <= 0 or args.offset < 0:
        p.error(f"sizes, repeats must be positive and offset >= 0, got {args.sizes}, "
                f"{args.repeats}, {args.offset}")  # fmt: skip
    return args


def main(argv=None):
    args = parse_args(argv)
    print(f"cpu fp32 threads={torch.get_num_threads()} B=1 H={args.heads} D={args.head_dim} "
          f"w={PAPER_W} r={PAPER_R}", flush=True)  # fmt: skip
    rows = []
    for n in args.sizes:
        docs = window_documents(n, args.offset)
        for attention in ("dilated", "dense") if n <= args.dense_max else ("dilated",):
            rows.append(measure(n, docs, attention, args))
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in rows[-1].items()), flush=True)  # fmt: skip
    path = write_results(args.out / "documents.csv", rows, COLUMNS)
    print(table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    fixed_mmap_threshold()
    main()
