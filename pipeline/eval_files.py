"""eval.py's output files: everything is written into a fresh folder beside out_dir first,
then moved into out_dir file by file (renames), so a failed run leaves an existing out_dir as
it was and a reader never sees half a file."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

from pipeline import recall_probe
from pipeline import scoring as sc
from pipeline.display import line_plot, markdown_table
from pipeline.provenance import meta
from settings.schema import EvalConfig


def staging(out_dir: Path) -> Path:
    """A fresh folder beside ``out_dir`` (same file system: moving out of it is a rename)."""
    out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.absolute().parent))


def _move(tmp: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out_dir / f.name)  # a rename: each file is old or new, never partial
    tmp.rmdir()


def write_recall(results: list[sc.Result], models, out_dir: Path) -> None:
    """recall.{csv,json} and the accuracy plots of the recall Results (pipeline/recall_probe.py),
    and the accuracy table on stdout."""
    rows = [row for r in results for row in r.recall]
    tmp = staging(out_dir)
    written = recall_probe.write(rows, models, tmp)
    _move(tmp, out_dir)
    both = any("generated_accuracy" in row for row in rows)
    print("answer accuracy by record-to-query distance (held-out test stream)"
          + (": teacher-forced / generated greedily" if both else ""))  # fmt: skip
    print(recall_probe.table(rows))
    print(f"wrote {out_dir}/" + ", ".join(written))


def write_outputs(results, lengths, cfg: EvalConfig, split_names, out_dir: Path) -> None:
    """Everything into a fresh directory first, then moved into out_dir in one go."""
    tmp = staging(out_dir)
    corpus = f"{cfg.data.source or 'own corpus'}, {' / '.join(sorted(set(split_names)))} split"
    cap = cfg.max_tokens_per_document
    method = sc.policy(cfg.window, cfg.stride)
    title = f"{corpus}; {method}" + (f"; first {cap} tokens of each" if cap else "")
    _write_ppl(tmp, results, corpus, cfg, method)
    _write_tables(tmp, results, cfg, split_names)
    _write_plots(tmp, results, cfg, corpus, title)
    _move(tmp, out_dir)
    print(table(results, lengths, title))
    if any(r.span for r in results):
        print(span_table(results))
    print(f"wrote {out_dir}/ppl_vs_context.{{csv,json,png}}, bpb_vs_context.png, "
          "prompting.{csv,png}, "
          "positions.csv, documents.csv, repeated_span.{csv,png}")  # fmt: skip


def _write_ppl(tmp: Path, results, corpus: str, cfg: EvalConfig, method: str) -> None:
    """ppl_vs_context.{csv,json}: one row per (model, context length); bits per byte and
    byte perplexity (2^bpb) beside token perplexity, with the window method of every row."""
    stride = cfg.stride if cfg.window == "strided" else ""
    rows = [
        {
            "model": r.label,
            "context_length": n,
            "ppl": "" if a.ppl is None else a.ppl,
            "bpb": "" if a.bpb is None else a.bpb,
            "byte_ppl": "" if a.bpb is None else 2**a.bpb,
            "tokens": a.tokens,
            "bytes": a.bytes,
            "nll": a.nll,
            "note": a.reason or "",
            "documents": len(r.documents),
            "window": cfg.window,
            "stride": stride,
        }
        for r in results
        for n, a in r.lengths.items()
    ]
    _csv(tmp / "ppl_vs_context.csv", rows)
    head = {"meta": meta(), "method": method, "window": cfg.window, "stride": stride or None}
    (tmp / "ppl_vs_context.json").write_text(
        json.dumps({**head, "corpus": corpus, "rows": rows}, indent=1)
    )


def _write_tables(tmp: Path, results, cfg: EvalConfig, split_names) -> None:
    """documents.csv, prompting.csv, positions.csv and repeated_span.csv."""
    _csv(tmp / "documents.csv", [
        {"model": r.label, "split": s, "document": d}
        for r, s in zip(results, split_names, strict=True) for d in r.documents
    ])  # fmt: skip
    _csv(tmp / "prompting.csv", [
        {"model": r.label, "bpb": r.prompting_bpb.get(p, ""), "prompt_length": p,
         "suffix": cfg.suffix, "mean_nll": v}  # readers index the last three from the end
        for r in results for p, v in r.prompting.items()
    ])  # fmt: skip
    _csv(tmp / "positions.csv", [
        {"model": r.label, "length": n, "from": a, "to": b, "mean_nll": v}
        for r in results for n, a, b, v in r.positions
    ])  # fmt: skip
    _csv(tmp / "repeated_span.csv", [
        {"model": r.label, **row} for r in results for row in r.span
    ])  # fmt: skip


def _write_plots(tmp: Path, results, cfg: EvalConfig, corpus: str, title: str) -> None:
    """repeated_span.png, ppl_vs_context.png and prompting.png."""
    line_plot(tmp / "repeated_span.png",
              {r.label: {row["distance"]: row["drop"] for row in r.span} for r in results},
              "distance of the earlier copy (tokens)", "NLL drop on the repeated span (nats)",
              f"repeated-span probe: {cfg.span_length}-token spans, {corpus}",
              fontsize=7)  # fmt: skip
    ppl_curves = {r.label: {n: a.ppl for n, a in r.lengths.items()} for r in results}
    line_plot(tmp / "ppl_vs_context.png", ppl_curves, "context length (tokens)", "perplexity",
              title, fontsize=7)  # fmt: skip
    bpb_curves = {r.label: {n: a.bpb for n, a in r.lengths.items()} for r in results}
    line_plot(tmp / "bpb_vs_context.png", bpb_curves, "context length (tokens)",
              "bits per byte", title, fontsize=7)  # fmt: skip
    line_plot(tmp / "prompting.png", {r.label: r.prompting for r in results},
              "prompt length (tokens)", f"mean NLL of the final {cfg.suffix} tokens", corpus,
              fontsize=7)  # fmt: skip


def span_table(results) -> str:
    dists = sorted({row["distance"] for r in results for row in r.span})
    rows = [[r.label] + [next((f"{x['drop']:.3f}" for x in r.span if x["distance"] == d), "")
                         for d in dists] for r in results]  # fmt: skip
    return "repeated-span probe: NLL drop (nats/token) with an earlier copy d tokens back\n" + (
        markdown_table(["model", *(f"d={d}" for d in dists)], rows)
    )


def table(results, lengths, title) -> str:
    rows = [
        [r.label, str(len(r.documents))]
        + [f"{a.ppl:.2f}" if a.ppl is not None else "n/a" for a in r.lengths.values()]
        for r in results
    ]
    text = markdown_table(["model", "docs", *map(str, lengths)], rows)
    bpb = [[r.label, str(len(r.documents))]
           + [f"{a.bpb:.4f}" if a.bpb is not None else "n/a" for a in r.lengths.values()]
           for r in results]  # fmt: skip
    text += "\nbits per byte by context length\n" + markdown_table(
        ["model", "docs", *map(str, lengths)], bpb
    )
    tokens = ["/".join(str(a.tokens) for a in r.lengths.values() if a.ppl) for r in results]
    return f"perplexity by context length ({title})\n{text}\nscored tokens per length: " + (
        "; ".join(tokens)
    )


def _csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
