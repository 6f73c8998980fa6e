"""Readers of what runs leave on disk: metrics CSVs of training runs, eval.py's tables."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path


def metrics_rows(run_dir: str | Path) -> list[dict]:
    """Every row of every logged version of a run (``logs/version_N/metrics.csv``), in launch
    order. A last line without its newline (a launch killed while appending it) is dropped."""
    rows = []
    versions = Path(run_dir, "logs").glob("version_*/metrics.csv")
    for f in sorted(versions, key=lambda p: int(p.parent.name.split("_")[1])):
        text = f.read_text()
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        rows += list(csv.DictReader(io.StringIO(text, newline="")))
    return rows


def metric(run_dir: str | Path, name: str) -> dict[int, float]:
    """step -> value of one logged metric (the last value logged at a step)."""
    return {int(r["step"]): float(r[name]) for r in metrics_rows(run_dir) if r.get(name)}


def validation_perplexities(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, val/ppl) in step order."""
    return sorted(metric(run_dir, "val/ppl").items())


def eval_rows(out_dir: str | Path) -> list[dict]:
    """eval.py's rows (model, context_length, ppl, tokens, note, documents) from its JSON."""
    return json.loads(Path(out_dir, "ppl_vs_context.json").read_text())["rows"]


def ppl_by_length(rows: list[dict]) -> dict[int, float]:
    """Context length -> perplexity; NaN where eval.py reported the length not reached."""
    return {
        int(r["context_length"]): math.nan if r["ppl"] in ("", None) else float(r["ppl"])
        for r in rows
    }


def prompting(out_dir: str | Path) -> dict[int, float]:
    """Prompt length -> mean NLL of the fixed suffix, from eval.py's prompting.csv."""
    f = Path(out_dir, "prompting.csv")
    if not f.exists() or not f.read_text().strip():
        return {}
    with open(f, newline="") as fh:
        return {int(r["prompt_length"]): float(r["mean_nll"]) for r in csv.DictReader(fh)}


def span_drops(out_dir: str | Path) -> dict[int, float]:
    """Copy distance -> the repeated-span probe's NLL drop (nats per token), from eval.py's
    repeated_span.csv ({} when the probe did not run)."""
    f = Path(out_dir, "repeated_span.csv")
    if not f.exists() or not f.read_text().strip():
        return {}
    with open(f, newline="") as fh:
        return {int(r["distance"]): float(r["drop"]) for r in csv.DictReader(fh)}
