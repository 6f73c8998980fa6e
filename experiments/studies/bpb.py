"""Bits per byte against context: the demo model and the tiny Table 2 models, on the standard
library's test split (their own corpus, each tokenized with its own BPE) and on the King James
Bible (data.source=kjv: English prose none of them saw), by two window methods.

    python -m experiments.studies.bpb                        # ~25 min on 2 shared cores
    python -m experiments.studies.bpb --lengths 128 256 --documents 1 --models demo \\
        --out /tmp/bpb                                       # a smoke run

Each point is eval.py's own measurement (pipeline/evaluation.evaluate, in this process) of
every model on the same documents: ``--documents`` of each corpus, drawn with
``document_seed`` from those with more than 1.5 max(lengths) tokens for every tokenizer
(``min_document_tokens``), each cut to its first 1.5 max(lengths) + 1 tokens
(``max_tokens_per_document``): strided scores every token of that span at every length,
disjoint all but the tail shorter than L (at the longest length, the last third: with a span of
one window, the two methods would be equal there). The demo's test split (test_fraction 0.05)
is a subset of the Table 2 runs' (0.15), and models reading one corpus score the documents they
share: 6 of its 21 documents are long enough. Methods (pipeline/windows.py): ``disjoint``
(each token sees 1 .. L tokens, L/2 on average) and ``strided`` with stride L/2 (YaRN's
sliding window: each token sees L/2 .. L), one eval.py run per length since a stride must not
exceed the shortest length. Dense models run blockwise
beyond their training length (``dense_blockwise``), as in Table 2. Bits per byte divide each
model's summed NLL by the UTF-8 bytes its scored tokens cover, so the models' different
tokenizers compare.

Writes ``bpb.csv`` (with provenance) and ``bpb_<corpus>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from pipeline.evaluation import evaluate
from pipeline.provenance import write_results
from settings.schema import EvalConfig, EvalData

OUT = Path("experiments/results/bpb")
MODELS = {  # name -> (checkpoint, label, training length)
    "demo": ("runs/demo/checkpoints/last.ckpt", "demo LongNet", 512),
    **{
        f"{arch}_{n}": (f"runs/paper_table2_recipe/{arch}_{n}/checkpoints/last.ckpt", label, n)
        for arch, label, sizes in (
            ("transformer", "Transformer", (512, 2048)),
            ("sparse_transformer", "Sparse Transformer", (2048, 8192)),
            ("longnet", "LongNet", (512, 2048, 8192)),
        )
        for n in sizes
    },
}
CORPORA = {  # name -> (eval.py's data.* overrides, in words); no overrides: each model's own
    "stdlib": ({}, "standard library, test split"),
    "kjv": ({"source": "kjv"}, "King James Bible (prose)"),
}
METHODS = ("disjoint", "strided")
COLUMNS = ["corpus", "split", "model", "label", "train_len", "method", "stride", "context",
           "documents", "tokens", "bytes", "nll", "bpb", "ppl", "seconds"]  # fmt: skip
log = logging.getLogger("bpb")


def configs(corpus: str, lengths: list[int], args) -> list[tuple[str, int | None, EvalConfig]]:
    """(method, stride, config) of every eval.py run for one corpus: disjoint at all lengths in
    one run, strided once per length (stride L/2)."""
    longest = max(lengths)
    span = longest + longest // 2
    common = dict(
        checkpoints=[MODELS[m][0] for m in args.models],
        max_documents=args.documents,
        document_seed=args.seed,
        min_document_tokens=span + 1,
        max_tokens_per_document=span,
        dense_blockwise=True,
        span_windows=0,
        batch_tokens=args.batch_tokens,
        device="cpu",
        data=EvalData(**CORPORA[corpus][0]),
    )
    # suffix past the longest prompt: no prompting curve (not part of this measurement)
    out = [("disjoint", None, EvalConfig(context_lengths=lengths, suffix=longest + 1, **common))]
    for n in lengths:
        stride = max(1, n // 2)
        cfg = EvalConfig(context_lengths=[n], window="strided", stride=stride, suffix=n + 1,
                         **common)  # fmt: skip
        out.append(("strided", stride, cfg))
    return out


def rows_of(corpus: str, method: str, stride, results, models: list[str], seconds: float):
    rows = []
    for name, res in zip(models, results, strict=True):
        _, label, train_len = MODELS[name]
        for n, at in sorted(res.lengths.items()):
            rows.append({
                "corpus": corpus, "split": "all" if CORPORA[corpus][0] else "test",
                "model": name, "label": label, "train_len": train_len, "method": method,
                "stride": stride or "", "context": n, "documents": len(res.documents),
                "tokens": at.tokens, "bytes": at.bytes, "nll": at.nll,
                "bpb": at.bpb if at.bpb is not None else "",
                "ppl": at.ppl if at.ppl is not None else at.reason,
                "seconds": round(seconds, 1),
            })  # fmt: skip
    return rows


def plot(path: Path, rows: list[dict], title: str) -> None:
    """bpb against context, log-2 axis: a colour per model, solid disjoint, dashed strided."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, model in enumerate(models):
        for method, style in zip(METHODS, ("-", "--"), strict=True):
            mine = [r for r in rows if r["model"] == model and r["method"] == method]
            pts = sorted((r["context"], r["bpb"]) for r in mine if r["bpb"] != "")
            if pts:
                r0 = next(r for r in rows if r["model"] == model)
                ax.plot(*zip(*pts, strict=True), style, marker="o", color=colours[i % 10],
                        label=f"{r0['label']} {r0['train_len']}, {method}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context length (tokens)", ylabel="bits per byte")
    ax.set_title(title, fontsize=9, wrap=True)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8192])
    p.add_argument("--documents", type=int, default=4, help="of each corpus")
    p.add_argument("--seed", type=int, default=0, help="document_seed")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lengths, rows = sorted(args.lengths), []
    for corpus in args.corpora:
        for method, stride, cfg in configs(corpus, lengths, args):
            with tempfile.TemporaryDirectory() as tmp:  # eval.py's own files: not kept
                cfg.out_dir = tmp
                start = time.perf_counter()
                results = evaluate(cfg)
            took = time.perf_counter() - start
            log.info("%s %s %s: %.0f s", corpus, method, cfg.context_lengths, took)
            rows += rows_of(corpus, method, stride, results, args.models, took)
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out / "bpb.csv", rows, COLUMNS)
    for corpus in args.corpora:
        docs = next(r["documents"] for r in rows if r["corpus"] == corpus)
        plot(args.out / f"bpb_{corpus}.png", [r for r in rows if r["corpus"] == corpus],
             f"bits per byte by context: {CORPORA[corpus][1]}, {docs} documents, first "
             f"{max(lengths) * 3 // 2} tokens of each; solid: disjoint, dashed: strided "
             "(stride L/2)")  # fmt: skip
    print(f"wrote {args.out}/bpb.csv, " + ", ".join(f"bpb_{c}.png" for c in args.corpora))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
